"""Host (CPU) time of an FSDP2 training step, per variant, on CPU processes over gloo.

    python -m benchmarks.host_overhead [--variants eager compile chronicals] [--compiler inductor]
        [--layers 24] [--hidden 64] [--batch 2] [--seq 64] [--steps 20] [--warmup 3]
        [--optim dtensor-fused] [--group 1] [--no-reshard-last] [--skip-guards]
        [--profile-steps 5] [--top 12] [--json out.json]

What ``python -m benchmarks.multi_gpu --engines fsdp2 --compile-scope layers`` runs (the same
model builder, the Qwen2.5-0.5B structure: 24 decoder layers; every layer ``fully_shard``ed and
compiled through one shared compiled function, the decoder stack eager, the loss head compiled;
AdamW with grad clipping), with tiny dimensions (hidden 64, vocabulary 512, B=2 T=64 by default)
so that the step is almost all host work: the Python of FSDP2's hooks, Dynamo's frame entry and
guards, AOTAutograd's runtime wrappers, the generated code's calls, our ops, DTensor dispatch in
the clip and the optimizer, and the small tensor ops all of them issue. Each variant runs in
fresh processes (``--nproc`` over gloo, one thread each).

Per variant, rank 0 prints: the median step and its phases (forward, backward, clip, optimizer
step, zero_grad) over ``--steps`` steps after ``--warmup``; Dynamo's counters (graphs, graph
breaks, recompiles during the timed steps, which should be none); the time of one guard check of
the layer's compiled frame; a cProfile of ``--profile-steps`` more steps, self time grouped by
where it is spent (tensor ops that Python calls are charged to the caller's group), with the
top functions of each group; and, after training, the host time of ``clip + optimizer.step()``
alone, for AdamW fused / foreach / for-loop on the DTensor parameters and fused / foreach on
their local shards (``--optim local-*`` trains with those: the clip's norm is the local
shards' squared norms all-reduced, the same number).

CPU is not the GPU machine: no CUDA launches, streams or events (FSDP2's copy-in/out run on the
host here), gloo collectives run synchronously, and on CPU the chronicals ops run their torch
references (Inductor traces into them, as it traces into the Triton launches on CUDA), except the
fused loss and, on CPU, the SwiGLU backward, which are opaque custom ops. What carries over:
the Python and dispatcher work per layer, which is the same code on both.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict

VARIANTS = ("eager", "compile", "chronicals")
OPTIMS = ("dtensor-fused", "dtensor-foreach", "dtensor-forloop", "local-fused", "local-foreach")

# (group, test on "filename:function"), first match wins. Builtins (tensor ops, C functions) are
# charged to their caller's group.
GROUPS = (
    ("fsdp2", ("torch/distributed/fsdp/",)),
    ("dtensor", ("torch/distributed/tensor/", "torch/distributed/_tensor")),
    ("c10d", ("torch/distributed/distributed_c10d", "torch/distributed/c10d_logger",
              "torch/distributed/device_mesh")),
    ("optimizer", ("torch/optim/", "torch/nn/utils/clip_grad", "host_overhead.py:_local")),
    ("inductor generated code", ("torchinductor_",)),
    ("fx graph code (aot_eager)", ("<eval_with_key>",)),
    ("aot autograd runtime", ("torch/_functorch/",)),
    ("inductor runtime", ("torch/_inductor/",)),
    ("dynamo (frame entry, transformed code)", ("torch/_dynamo/", "__transformed_code",
                                                "torch_dynamo_resume_in", "torch/compiler/")),
    ("chronicals_fx ops", ("chronicals_fx/",)),
    ("custom-op dispatch (torch._library)", ("torch/_library/", "torch/_ops.py")),
    ("autograd engine", ("torch/autograd/", "torch/_tensor.py:backward",
                         "run_backward")),
    ("nn.Module call / hooks", ("torch/nn/modules/module.py",)),
    ("transformers model code", ("transformers/",)),
    ("training loop", ("host_overhead.py",)),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--compiler", default="inductor", choices=("inductor", "aot_eager"),
                   help="what compiles the graphs of compile and chronicals")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--optim", default="dtensor-fused", choices=OPTIMS,
                   help="what clips and steps in the timed loop")
    p.add_argument("--group", type=int, default=1, help="decoder layers per fully_shard group")
    p.add_argument("--no-reshard-last", action="store_true",
                   help="the last layer group keeps its parameters gathered after forward")
    p.add_argument("--no-reshard", action="store_true",
                   help="no group reshards after forward (ZeRO-2-like)")
    p.add_argument("--skip-guards", action="store_true",
                   help="after warm-up: torch.compiler.set_stance(skip_guard_eval_unsafe=True)")
    p.add_argument("--no-record-function", action="store_true",
                   help="experiment: FSDP2's record_function ranges replaced by a null context "
                        "(what they cost with no profiler running)")
    p.add_argument("--profile-steps", type=int, default=5, help="0: no cProfile")
    p.add_argument("--optim-bench", type=int, default=10,
                   help="steps per optimizer kind in the clip+step micro-benchmark (0: none)")
    p.add_argument("--top", type=int, default=6, help="functions listed per group")
    p.add_argument("--json", help="write the results here")
    return p


# ---------------------------------------------------------------------------------------------
# Model, sharding, compilation (as benchmarks.multi_gpu does it)
# ---------------------------------------------------------------------------------------------
def _build(args, variant: str):
    import torch
    from torch.distributed.fsdp import fully_shard

    from benchmarks.multi_gpu import _compile_layers_and_head
    from chronicals_fx.workload import build_model

    heads = max(2, args.hidden // 16)
    model = build_model("qwen2.5-0.5b", dtype=torch.float32, device="cpu", seed=0,
                        hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                        num_hidden_layers=args.layers, num_attention_heads=heads,
                        num_key_value_heads=max(1, heads // 2), vocab_size=args.vocab)
    model.config.use_cache = False
    layers = list(model.model.layers)
    groups = [layers[i:i + args.group] for i in range(0, len(layers), args.group)]
    for i, group in enumerate(groups):
        reshard = not args.no_reshard and not (args.no_reshard_last and i == len(groups) - 1)
        fully_shard(group if len(group) > 1 else group[0], reshard_after_forward=reshard)
    wrapped = fully_shard(model)
    report = None
    if variant == "compile":
        _compile_layers_and_head(model, wrapped, args.compiler)
    elif variant == "chronicals":
        import functools

        import chronicals
        from chronicals_fx.backend import chronicals_backend

        report = chronicals.Report()
        _compile_layers_and_head(model, wrapped, functools.partial(
            chronicals_backend, options=chronicals.Config.from_options(
                {"compiler": args.compiler}), on_report=report.extend))
    return model, wrapped, report


# ---------------------------------------------------------------------------------------------
# Clip + optimizer step: on the DTensor parameters, or on their local shards
# ---------------------------------------------------------------------------------------------
class Stepper:
    """clip_grad_norm_(1.0) then AdamW.step(), then zero_grad: ``dtensor-*`` on the DTensor
    parameters (what workload.train does), ``local-*`` on plain tensors sharing the local
    shards' storage, the norm all-reduced by hand."""

    def __init__(self, kind: str, params, lr: float = 3e-4):
        import torch

        self.kind, self.params = kind, params
        where, impl = kind.split("-")
        flags = {"fused": {"fused": True}, "foreach": {"foreach": True},
                 "forloop": {"foreach": False, "fused": False}}[impl]
        if where == "dtensor":
            self.opt = torch.optim.AdamW(params, lr=lr, **flags)
        else:
            self.local = [p.to_local().detach().requires_grad_(True) for p in params]
            self.opt = torch.optim.AdamW(self.local, lr=lr, **flags)

    def clip(self):
        import torch

        if self.kind.startswith("dtensor"):
            norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        return self._local_clip()

    def _local_clip(self):
        import torch
        import torch.distributed as dist

        grads = [p.grad.to_local() for p in self.params if p.grad is not None]
        for lp, p in zip(self.local, self.params):
            lp.grad = None if p.grad is None else p.grad.to_local()
        squares = torch.stack(torch._foreach_norm(grads)).square().sum()
        dist.all_reduce(squares)
        norm = squares.sqrt()
        torch._foreach_mul_(grads, (1.0 / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def step(self):
        self.opt.step()

    def zero(self):
        self.opt.zero_grad(set_to_none=True)
        if not self.kind.startswith("dtensor"):
            for p in self.params:
                p.grad = None


# ---------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------
def _worker(rank: int, port: int, args, variant: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(args.nproc), LOCAL_RANK=str(rank))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if args.no_record_function:
        import contextlib

        import torch.distributed.fsdp._fully_shard._fsdp_param_group as group_module
        import torch.distributed.fsdp._fully_shard._fsdp_state as state_module

        group_module.record_function = lambda *a, **k: contextlib.nullcontext()
        state_module.torch = _TorchWithoutRecordFunction(torch)
    dist.init_process_group("gloo", rank=rank, world_size=args.nproc)
    try:
        result = _run(rank, args, variant)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(result, f)
    finally:
        dist.destroy_process_group()


class _TorchWithoutRecordFunction:
    """``torch`` as _fsdp_state.py sees it, with ``torch.profiler.record_function`` a no-op."""

    def __init__(self, torch):
        import contextlib
        import types

        self._torch = torch
        self.profiler = types.SimpleNamespace(
            record_function=lambda *a, **k: contextlib.nullcontext())

    def __getattr__(self, name):
        return getattr(self._torch, name)


def _run(rank: int, args, variant: str) -> dict:
    import torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    from chronicals_fx.workload import byte_batches

    t0 = time.perf_counter()
    model, wrapped, report = _build(args, variant)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    stepper = Stepper(args.optim, params)
    rows = args.batch
    stream = byte_batches(rows * args.nproc, args.seq)

    def batches():
        for b in stream:
            yield {k: v[rank * rows:(rank + 1) * rows] for k, v in b.items()}

    data = batches()
    recorded = {}   # the first decoder layer's call (for the guard check)

    def record(module, a, kw):
        if "args" not in recorded:
            recorded.update(args=a, kwargs=kw)

    hook = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    phases = defaultdict(list)
    losses = []

    def step(timed: bool):
        batch = next(data)
        marks = [time.perf_counter()]
        loss = wrapped(**batch).loss
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        stepper.clip()
        marks.append(time.perf_counter())
        stepper.step()
        marks.append(time.perf_counter())
        stepper.zero()
        marks.append(time.perf_counter())
        losses.append(float(loss.detach()))
        if timed:
            for name, a, b in zip(("forward", "backward", "clip", "optimizer.step", "zero_grad"),
                                  marks, marks[1:]):
                phases[name].append((b - a) * 1e3)
            phases["step"].append((marks[-1] - marks[0]) * 1e3)

    for _ in range(args.warmup):
        step(False)
    hook.remove()
    warm_s = time.perf_counter() - t0
    before = _counter_snapshot(counters)
    if args.skip_guards:
        torch.compiler.set_stance(skip_guard_eval_unsafe=True)
    dist.barrier()
    for _ in range(args.steps):
        step(True)
    after = _counter_snapshot(counters)
    result = {
        "variant": variant, "compiler": args.compiler if variant != "eager" else None,
        "torch": torch.__version__, "warmup_s": warm_s,
        "median_ms": {k: statistics.median(v) for k, v in phases.items()},
        "step_ms": phases["step"], "losses": losses,
        "dynamo": after, "dynamo_in_timed_steps": _counter_diff(before, after),
        "guard_failures": _guard_failures(),
    }
    if report is not None:
        result["chronicals"] = {"graphs": report.graphs, "counts": report.counts,
                                "declined": report.declined_counts}
    if variant != "eager":   # every rank: unshard() is a collective
        result["guard_check"] = _guard_check(model, recorded)
    if args.profile_steps:
        dist.barrier()
        if rank == 0:
            prof = cProfile.Profile()
            prof.enable()
        t = time.perf_counter()
        for _ in range(args.profile_steps):
            step(False)
        wall = (time.perf_counter() - t) * 1e3 / args.profile_steps
        if rank == 0:
            prof.disable()
            result["profile"] = _profile_summary(prof, args.profile_steps, args.top)
            result["profile"]["wall_ms_under_profiler"] = wall
    if args.optim_bench:
        result["optim_bench"] = _optim_bench(args, wrapped, data, params)
    return result


def _counter_snapshot(counters) -> dict:
    keep = ("stats", "graph_break", "recompiles", "frames", "unimplemented")
    return {k: dict(v) for k, v in counters.items() if k in keep or "recompil" in k}


def _counter_diff(a: dict, b: dict) -> dict:
    out = {}
    for k, v in b.items():
        d = {n: c - a.get(k, {}).get(n, 0) for n, c in v.items()
             if isinstance(c, (int, float)) and c - a.get(k, {}).get(n, 0)}
        if d:
            out[k] = d
    return out


def _guard_failures() -> dict:
    from torch._dynamo.utils import guard_failures

    return {getattr(code, "co_name", str(code)): [str(r)[:200] for r in reasons][:5]
            for code, reasons in guard_failures.items()}


def _guard_check(model, recorded: dict) -> dict:
    """Guards of the decoder layer's compiled frame (benchmarks.multi_gpu._layer_forward): how
    many cache entries, how many guard lines, and the time of one check on the first layer's
    real call (its parameters gathered, as they are inside FSDP2's forward)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    from benchmarks.multi_gpu import _layer_forward

    entries = _debug_get_cache_entry_list(_layer_forward.__code__)
    out = {"cache_entries": len(entries)}
    if not entries or "args" not in recorded:
        return out
    manager = entries[0].guard_manager

    def count(m) -> tuple[int, int]:   # (leaf guards, tensor-match guards) under m
        leaves = m.get_leaf_guards()
        n = len(leaves)
        t = sum("TENSOR_MATCH" in type(g).__name__.upper() for g in leaves)
        for child in m.get_child_managers():
            cn, ct = count(child)
            n, t = n + cn, t + ct
        return n, t

    try:
        root = manager.root
        n, t = count(root)
        out["leaf_guards"] = n + len(root.get_epilogue_lambda_guards())
        out["tensor_match_guards"] = t
    except Exception as e:   # noqa: BLE001 - diagnostics only
        out["guard_count_error"] = repr(e)[:200]
    layer = model.model.layers[0]
    layer.unshard()
    try:
        f_locals = {"layer": layer, "args": recorded["args"], "kwargs": recorded["kwargs"]}
        out["check_passes"] = bool(manager.check(f_locals))
        n = 2000
        t = time.perf_counter()
        for _ in range(n):
            manager.check(f_locals)
        out["check_us"] = (time.perf_counter() - t) * 1e6 / n
    except Exception as e:   # noqa: BLE001 - diagnostics only
        out["check_error"] = repr(e)[:300]
    finally:
        layer.reshard()
    return out


def _optim_bench(args, wrapped, data, params) -> dict:
    """Host ms of clip and of optimizer.step() alone, per kind, on this run's gradients."""
    import torch

    batch = next(data)
    wrapped(**batch).loss.backward()
    grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved = [p.detach().clone() for p in params]
    out = {}
    for kind in OPTIMS:
        stepper = Stepper(kind, params)
        clip, stp = [], []
        for i in range(args.optim_bench + 2):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            t = time.perf_counter()
            norm = stepper.clip()
            t1 = time.perf_counter()
            stepper.step()
            t2 = time.perf_counter()
            stepper.zero()
            if i >= 2:
                clip.append((t1 - t) * 1e3)
                stp.append((t2 - t1) * 1e3)
        with torch.no_grad():   # the next kind starts from the same parameters
            for p, s in zip(params, saved):
                p.copy_(s)
        out[kind] = {"clip_ms": statistics.median(clip), "step_ms": statistics.median(stp),
                     "norm": float(norm)}
    return out


# ---------------------------------------------------------------------------------------------
# cProfile, grouped
# ---------------------------------------------------------------------------------------------
# Builtins by name, before the caller rule: time blocked in a collective (gloo runs them on
# the host; on GPUs they are asynchronous), the other rank's pace included.
BUILTIN_GROUPS = (("collective wait (gloo)", ("_distributed_c10d.wait", "wait_tensor",
                                             "_distributed_c10d.all", "_distributed_c10d.reduce",
                                             "_distributed_c10d.barrier")),)


def _group_of(key) -> str | None:
    filename, _line, name = key
    where = f"{filename}:{name}"
    if filename == "~":          # a builtin: by name, else charged to its caller
        for group, needles in BUILTIN_GROUPS:
            if any(n in name for n in needles):
                return group
        return None
    for group, needles in GROUPS:
        if any(n in where for n in needles):
            return group
    return "other python"


def _profile_summary(prof: cProfile.Profile, steps: int, top: int) -> dict:
    stats = pstats.Stats(prof).stats   # key -> (cc, nc, tt, ct, callers)
    per_group: dict[str, float] = defaultdict(float)
    per_func: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    def charge(group: str, label: str, seconds: float) -> None:
        per_group[group] += seconds
        per_func[group][label] += seconds

    def label_of(key) -> str:
        filename, line, name = key
        if filename == "~":
            return name
        short = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        return f"{short}:{line}({name})"

    for key, (_cc, _nc, tt, _ct, callers) in stats.items():
        group = _group_of(key)
        if group is not None:
            charge(group, label_of(key), tt)
            continue
        # a builtin: split its self time over its callers' groups by their share of it
        total = sum(edge[2] for edge in callers.values()) or 0.0
        if not callers or total == 0.0:
            charge("builtins (no caller)", label_of(key), tt)
            continue
        for caller, edge in callers.items():
            cg = _group_of(caller) or "builtins called by builtins"
            charge(cg, f"{label_of(key)} <- {label_of(caller)}", tt * edge[2] / total)
    # inclusive times of the entry points that matter (per step)
    entry = {}
    for key, (_cc, nc, _tt, ct, _callers) in stats.items():
        filename, _line, name = key
        for pattern, label in ENTRY_POINTS:
            if pattern[0] in filename and name == pattern[1]:
                prev = entry.get(label, (0, 0.0))
                entry[label] = (prev[0] + nc, prev[1] + ct)
    total = sum(per_group.values())
    return {
        "self_ms_per_step": total * 1e3 / steps,
        "groups": {g: s * 1e3 / steps for g, s in sorted(per_group.items(), key=lambda x: -x[1])},
        "top": {g: [(f, s * 1e3 / steps) for f, s in sorted(fs.items(), key=lambda x: -x[1])[:top]]
                for g, fs in per_func.items()},
        "entry_points": {k: {"calls_per_step": n / steps, "incl_ms_per_step": s * 1e3 / steps}
                         for k, (n, s) in sorted(entry.items())},
    }


ENTRY_POINTS = (  # ((file substring, function name), label): inclusive time (cProfile cumtime)
    (("fsdp/_fully_shard/_fsdp_state.py", "_pre_forward"), "FSDPState._pre_forward"),
    (("fsdp/_fully_shard/_fsdp_state.py", "_post_forward"), "FSDPState._post_forward"),
    (("fsdp/_fully_shard/_fsdp_state.py", "_root_post_backward_final_callback"),
     "FSDPState._root_post_backward_final_callback"),
    (("fsdp/_fully_shard/_fsdp_state.py", "_pre_backward"), "FSDPState._pre_backward"),
    (("fsdp/_fully_shard/_fsdp_param_group.py", "post_backward"), "FSDPParamGroup.post_backward"),
    (("fsdp/_fully_shard/_fsdp_param_group.py", "unshard"), "FSDPParamGroup.unshard"),
    (("fsdp/_fully_shard/_fsdp_param_group.py", "wait_for_unshard"),
     "FSDPParamGroup.wait_for_unshard"),
    (("fsdp/_fully_shard/_fsdp_param_group.py", "reshard"), "FSDPParamGroup.reshard"),
    (("fsdp/_fully_shard/_fsdp_collectives.py", "foreach_all_gather"), "foreach_all_gather"),
    (("fsdp/_fully_shard/_fsdp_collectives.py", "foreach_all_gather_copy_out"),
     "foreach_all_gather_copy_out"),
    (("fsdp/_fully_shard/_fsdp_collectives.py", "foreach_reduce"), "foreach_reduce"),
    (("_dynamo/eval_frame.py", "_fn"), "dynamo eval_frame _fn (compiled call, incl. graph)"),
    (("_functorch/_aot_autograd/runtime_wrappers.py", "runtime_wrapper"),
     "AOT runtime_wrapper (forward, incl. graph)"),
    (("_functorch/_aot_autograd/runtime_wrappers.py", "backward"),
     "AOT CompiledFunction.backward (incl. graph)"),
    (("_functorch/_aot_autograd/runtime_wrappers.py", "forward"),
     "AOT CompiledFunction.forward (incl. graph)"),
    (("_dynamo/eval_frame.py", "compile_wrapper"), "torch.compile'd call (compile_wrapper)"),
    (("_inductor/output_code.py", "__call__"), "Inductor CompiledFxGraph.__call__ (incl.)"),
    (("torch/optim/optimizer.py", "wrapper"), "optimizer.step (incl.)"),
    (("nn/utils/clip_grad.py", "clip_grad_norm_"), "clip_grad_norm_ (incl.)"),
    (("torch/autograd/__init__.py", "backward"), "autograd.backward (incl.)"),
    (("torch/nn/modules/module.py", "_call_impl"), "Module._call_impl (incl., nested)"),
)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(args, variant: str) -> dict:
    import torch.multiprocessing as mp

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = tmp.name
    start = time.perf_counter()
    mp.start_processes(_worker, args=(_free_port(), args, variant, out), nprocs=args.nproc,
                       start_method="spawn")
    with open(out) as f:
        result = json.load(f)
    os.unlink(out)
    result["wall_s"] = time.perf_counter() - start
    return result


def describe(r: dict, top: int) -> str:
    m = r["median_ms"]
    lines = [f"== {r['variant']}" + (f" ({r['compiler']})" if r["compiler"] else "")
             + f": step {m['step']:.1f} ms median  [forward {m['forward']:.1f}, backward "
             f"{m['backward']:.1f}, clip {m['clip']:.1f}, optimizer.step "
             f"{m['optimizer.step']:.1f}, zero_grad {m['zero_grad']:.2f}]  "
             f"(min {min(r['step_ms']):.1f}, max {max(r['step_ms']):.1f}; warm-up "
             f"{r['warmup_s']:.0f} s; loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f})"]
    d = r["dynamo"]
    lines.append(f"   dynamo: stats {d.get('stats', {})}; graph breaks "
                 f"{sum(d.get('graph_break', {}).values())}; in the timed steps "
                 f"{r['dynamo_in_timed_steps'] or 'nothing new'}")
    for reason, n in d.get("graph_break", {}).items():
        lines.append(f"     graph break x{n}: {reason.splitlines()[0][:140]}")
    if r.get("guard_failures"):
        lines.append(f"   guard failures (recompiles): {r['guard_failures']}")
    if "guard_check" in r:
        lines.append(f"   layer frame guards: {r['guard_check']}")
    if "chronicals" in r:
        lines.append(f"   chronicals: {r['chronicals']}")
    p = r.get("profile")
    if p:
        wait = p["groups"].get("collective wait (gloo)", 0.0)
        lines.append(f"   cProfile: {p['wall_ms_under_profiler']:.1f} ms/step under the "
                     f"profiler, {p['self_ms_per_step']:.1f} ms self time, of which "
                     f"{wait:.1f} ms blocked in collectives, {p['self_ms_per_step'] - wait:.1f} "
                     f"ms host work")
        for g, ms in p["groups"].items():
            if ms >= 0.05:
                lines.append(f"     {ms:7.2f} ms  {g}")
                for f, fms in p["top"][g][:top]:
                    if fms >= 0.05:
                        lines.append(f"                 {fms:6.2f}  {f[:150]}")
        lines.append("   inclusive (cumulative) per step:")
        for k, v in p["entry_points"].items():
            lines.append(f"     {v['incl_ms_per_step']:7.2f} ms  x{v['calls_per_step']:.0f}  {k}")
    if "optim_bench" in r:
        lines.append("   clip + optimizer.step alone (host ms): " + "; ".join(
            f"{k} clip {v['clip_ms']:.2f} step {v['step_ms']:.2f} (norm {v['norm']:.4f})"
            for k, v in r["optim_bench"].items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch

    print(f"# host time per FSDP2 step, CPU x{args.nproc} gloo, torch {torch.__version__}, "
          f"qwen2 structure {args.layers} layers hidden {args.hidden} vocab {args.vocab}, "
          f"B={args.batch}/rank T={args.seq}, fully_shard groups of {args.group}"
          f"{', last group not resharded' if args.no_reshard_last else ''}"
          f"{', no reshard after forward' if args.no_reshard else ''}, optimizer {args.optim}"
          f"{', skip_guard_eval_unsafe' if args.skip_guards else ''}"
          f"{', FSDP2 record_function off' if args.no_record_function else ''}", flush=True)
    results = []
    for variant in args.variants:
        r = run_variant(args, variant)
        results.append(r)
        print(describe(r, args.top), flush=True)
    print("\nvariant      step ms  fwd    bwd    clip   step   (median of "
          f"{args.steps} steps)")
    for r in results:
        m = r["median_ms"]
        print(f"{r['variant']:<12} {m['step']:7.1f} {m['forward']:6.1f} {m['backward']:6.1f} "
              f"{m['clip']:6.1f} {m['optimizer.step']:6.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
