"""Where a training step's GPU time goes: one variant, a few profiled steps, kernels grouped.

    python -m benchmarks.profile_step [--variant chronicals] [--batch 8 --seq 1024] [--lora 32]
        [--top 25] [--autocast]

Same model, data and optimizer as `python -m chronicals_fx.bench` (variants `eager`, `compile`
and `chronicals[:passes][@key=value,...]`). After the warm-up steps (compilation, autotuning),
`--steps` steps are timed plainly, then `--steps` more run under torch.profiler; the table lists
the CUDA kernels with the most time per step, and a summary by kind (GEMM, attention,
chronicals' Triton kernels, Inductor's, optimizer, NCCL, other) against the step's wall time: the
gap between the two is time the GPU sat idle. The first and last loss and the smallest grad
norm of the timed steps are printed with them (the run trained), and the peak memory of the
warm-up and plain steps. The summary is :func:`summarize`, also used by ``python -m benchmarks.multi_gpu
--profile`` for rank 0 of a data-parallel run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence

import torch

KINDS = (  # first match wins; patterns on the kernel name
    ("nccl", re.compile(r"nccl", re.I)),   # collectives (multi_gpu --profile), own streams
    ("gemm", re.compile(r"gemm|cutlass|sm90_xmma|nvjet|cublas|splitK", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|cudnn", re.I)),
    ("chronicals", re.compile(r"^(rms|swiglu|rope|lce|scale_inplace|_?doc|geglu|logits_stats|combine_tile)",
                              re.I)),
    ("inductor", re.compile(r"^triton_", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
)


GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="chronicals")
    add_step_arguments(p)
    p.add_argument("--trace", help="also write the Chrome trace here (gzipped)")
    p.add_argument("--gaps", type=int, default=15,
                   help="list this many causes of GPU idle time (the CPU op that launched "
                        "the kernel the GPU was waiting for)")
    args = p.parse_args(argv)

    trainer, batches = training_step(args)

    def step():
        trainer.enqueue(next(batches))

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    # The peak counts the warm-up too (no reset here, as in chronicals_fx.bench): under CUDA
    # graphs a replay allocates nothing, so only the recording steps show the graphs' memory.
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    plain_ms = (time.perf_counter() - start) * 1000 / args.steps
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    events = load_trace(prof, args.trace)

    loss_values = torch.stack(trainer.losses).float().tolist()
    print(summarize(
        events, args.steps, top=args.top, gaps=args.gaps, wall_ms=wall_ms,
        title=(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  {args.variant}  "
               f"{args.model} B={args.batch} T={args.seq}"
               f"{f'  LoRA r={args.lora}' if args.lora else ''}"),
        plain_ms=plain_ms, peak_gib=peak_gib,
        notes=[(f"# trained: loss {loss_values[0]:.3f} -> {loss_values[-1]:.3f} over "
                f"{len(loss_values)} steps, min grad norm {torch.stack(trainer.grad_norms).min().item():.3f}")],
        extra=[dynamo_counters()]))
    return 0


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """The options of :func:`training_step` and of the tables printed from it."""
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers (0: full FT)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--autocast", action="store_true",
                   help="fp32 weights, the forward under torch.autocast(bf16) (HF Trainer's "
                        "bf16=True)")


def training_step(args, device: str = "cuda"):
    """(trainer, batches): ``args.variant``'s model in ``chronicals bench``'s
    :class:`~chronicals_fx.workload.Trainer` (AdamW, grad clipping, the forward under
    autocast(bf16) where ``args.autocast`` is set) and its endless batches.
    ``trainer.enqueue(next(batches))`` runs a step with no host sync of its own,
    ``trainer.step(next(batches))`` times one; ``trainer.losses`` and ``trainer.grad_norms``
    keep every step's, the proof of training."""
    from chronicals_fx.workload import Trainer, byte_batches

    trainer = Trainer(variant_model(args, device),
                      autocast=torch.bfloat16 if getattr(args, "autocast", False) else None)
    return trainer, byte_batches(args.batch, args.seq, device=device)


def variant_model(args, device: str = "cuda"):
    """``args.variant``'s model as ``chronicals bench`` builds it (:func:`build_variant`: bf16,
    fp32 where ``args.autocast`` is set or on a CPU; LoRA-wrapped with ``args.lora``; compiled,
    patched or optimized)."""
    from chronicals_fx.bench import build_variant

    defaults = dict(layers=0, passes=None, autocast=False)
    return build_variant(argparse.Namespace(**{**defaults, **vars(args)}), args.variant,
                         device=device)


def dynamo_counters(brief: bool = False) -> str:
    """Dynamo's counters of this process (graphs, recompiles, graph breaks), one line; ``brief``:
    the stats on that line, then one line per graph break reason (its first line) with its
    count."""
    counters = {k: dict(v) for k, v in torch._dynamo.utils.counters.items()
                if k in ("stats", "graph_break")}
    if not brief:
        return f"\ndynamo: {json.dumps(counters)[:600]}"
    lines = [f"\ndynamo: {json.dumps(counters.get('stats', {}))[:600]}"]
    for reason, n in sorted(counters.get("graph_break", {}).items(), key=lambda kv: -kv[1]):
        lines.append(f"graph break x{n}: {reason.splitlines()[0][:150]}")
    return "\n".join(lines)


def summarize(events: list[dict], steps: int, *, top: int = 25, gaps: int = 15,
              wall_ms: float, title: str, plain_ms: float | None = None,
              peak_gib: float | None = None, notes: Sequence[str] = (),
              extra: Sequence[str] = ()) -> str:
    """The summary of a profiled run of ``steps`` steps from its Chrome trace's events
    (``json.load(trace)["traceEvents"]``): a header (``title``, wall time per step ``wall_ms``,
    kernel time, GPU idle; the unprofiled step time ``plain_ms`` and ``peak_gib`` when given),
    the ``notes`` lines, GPU time by kind (:data:`KINDS`), the ``top`` kernels, the ``extra``
    lines, and the ``gaps`` largest causes of GPU idle time (:func:`idle_causes`).

    NCCL kernels run on streams of their own, beside compute: when there are any, a line gives
    the time some kernel ran (the union, not the sum), the time compute ran, and the time NCCL
    ran alone (communication nothing overlapped). A trace without GPU events (a CPU run) says
    so instead of printing empty tables."""
    # GPU work only: kernels, copies, memsets (not the gpu_user_annotation ranges, which span
    # other kernels and would count them twice)
    gpu = [e for e in events if e.get("cat") in GPU_CATEGORIES]
    if not gpu:
        return "\n".join([
            f"# {title}: step {wall_ms:.1f} ms wall under the profiler"
            + (f", {plain_ms:.1f} ms without it" if plain_ms is not None else "")
            + "; the trace holds no GPU kernels (no CUDA activity was recorded: a CPU run), "
              "so there is no kernel time, no breakdown by kind and no GPU idle time to report",
            *notes, *extra])
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in gpu:
        entry = per_kernel[event["name"]]
        entry[0] += event.get("dur", 0) / 1000 / steps      # µs → ms per step
        entry[1] += 1 / steps
    by_kind: dict[str, float] = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        by_kind[kind_of(name)] += ms
    busy = sum(by_kind.values())

    header = (f"# {title}: step {wall_ms:.1f} ms wall, {busy:.1f} ms of kernels "
              f"(GPU idle ≈ {max(0.0, wall_ms - busy):.1f} ms)")
    if plain_ms is not None:
        header += (f"; without the profiler {plain_ms:.1f} ms "
                   f"(idle ≈ {max(0.0, plain_ms - busy):.1f} ms)")
    if peak_gib is not None:
        header += f", peak {peak_gib:.2f} GiB"
    lines = [header]
    if by_kind.get("nccl"):
        spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu]
        compute = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu
                   if kind_of(e["name"]) != "nccl"]
        any_ms, compute_ms = _union_us(spans) / 1000 / steps, _union_us(compute) / 1000 / steps
        lines.append(
            f"# nccl kernels {by_kind['nccl']:.1f} ms/step, on streams of their own: some kernel "
            f"ran {any_ms:.1f} ms/step, compute (not nccl) {compute_ms:.1f} ms, nccl alone "
            f"(communication nothing overlapped) {any_ms - compute_ms:.1f} ms, no kernel "
            f"{max(0.0, wall_ms - any_ms):.1f} ms (the idle above counts kernel time summed "
            f"over streams)")
    lines += notes
    lines.append(f"{'kind':<12} {'ms/step':>8} {'share':>6}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"{kind:<12} {ms:8.2f} {100 * ms / busy if busy else 0.0:5.1f}%")
    lines.append(f"\n{'ms/step':>8} {'calls':>6}  kernel (top {top})")
    for name, (ms, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{ms:8.3f} {calls:6.0f}  [{kind_of(name)}] {name[:110]}")
    lines += extra
    lines += idle_causes(events, steps, gaps)
    return "\n".join(lines)


def _union_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the (start, end) intervals."""
    total, end = 0.0, None
    for start, stop in sorted(spans):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def idle_causes(events: list[dict], steps: int, top: int) -> list[str]:
    """GPU idle time between kernels, charged to the CPU ops that launched the kernel after
    each gap (innermost and outermost op around the launch call): the CPU was late there."""
    kernels = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES),
                     key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    ops_by_thread: dict = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation", "python_function") and "dur" in e:
            ops_by_thread[e["tid"]].append(e)
    charged: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    end = None
    for k in kernels:
        if end is not None and k["ts"] - end > 5:       # µs: more than a launch's latency
            launch = launches.get(k["args"].get("correlation"))
            inner = outer = "?"
            if launch is not None:
                around = [e for e in ops_by_thread[launch["tid"]]
                          if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]]
                around.sort(key=lambda e: e["dur"])
                if around:
                    inner, outer = around[0]["name"], around[-1]["name"]
            entry = charged[(outer[:50], inner[:60])]
            entry[0] += (k["ts"] - end) / 1000 / steps
            entry[1] += 1 / steps
        end = max(end or 0, k["ts"] + k.get("dur", 0))
    total = sum(v[0] for v in charged.values())
    lines = [(f"\nGPU idle between kernels: {total:.2f} ms/step; by the op that launched the "
              "next kernel"), f"{'ms/step':>8} {'gaps':>6}  outermost op | innermost op"]
    for (outer, inner), (ms, n) in sorted(charged.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{ms:8.3f} {n:6.0f}  {outer} | {inner}")
    return lines


def load_trace(prof, gz_path: str | None = None) -> list[dict]:
    """A finished ``torch.profiler.profile``'s Chrome trace events; also written gzipped to
    ``gz_path`` when given."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        if gz_path:
            with open(path, "rb") as f, gzip.open(gz_path, "wb") as out:
                out.write(f.read())
    return trace["traceEvents"]


if __name__ == "__main__":
    raise SystemExit(main())
