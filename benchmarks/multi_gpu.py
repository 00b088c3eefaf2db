"""Data-parallel training benchmark: DDP and FSDP2, torch.compile vs chronicals, one run.

    python -m benchmarks.multi_gpu [--engines ddp fsdp2 simple_fsdp] [--variants compile chronicals]
        [--nproc 2] [--model qwen2.5-0.5b] [--batch 8] [--seq 1024] [--steps 10] [--warmup 4]
        [--checkpointing] [--compile-scope model|layers] [--reference eager] [--json out.json]
        [--profile [--profile-steps 2] [--profile-trace]]

Each (engine, variant) trains in its own ``torchrun --nproc_per_node N`` job (NCCL on CUDA,
gloo on CPU), and the single-process reference trains on the same global batch (``N x batch``
rows) in one process, so the table compares every data-parallel run's per-step loss with it.
Each rank trains on its own rows of the same global batch (rank r takes rows
``r*batch .. (r+1)*batch``) of the byte corpus of :mod:`chronicals_fx.workload` (every token
real), from the same random init, with the measured loop of that module: bf16 parameters,
fused AdamW, grad clipping at 1.0, no KV cache (``use_cache=False``, see ``run_worker``). The
loss reported per step is the global batch's mean (the ranks' means averaged: equal rows, no
padding); the step time is the slowest rank's;
tokens/s counts the real tokens of all ranks. Prints one table: tokens/s, the ratio to
torch.compile under the same engine, the median step ms (the slowest rank's), rank 0's median
host ms (time to enqueue a step: near the step time, the step is host-bound), SM clock (a
step slower at the same host time on a lower clock is the power limit, gpu_clock.py) and the
share of its clock samples held down for power (cap %: the driver's clock-event reasons), rank 0's
GPU's energy a timed step and its average power over its timed steps (NVML's energy counter,
gpu_energy.py: ``energy_j_per_step``, ``avg_power_w`` in the JSON, over rank 0's own step
times; nan without the counter; the other GPUs are not read), peak GiB
per GPU (the largest rank), loss first→last,
the largest per-step loss gap to the reference, the smallest grad norm; a run that failed
keeps its row with the error (its log is written next to ``--json``, else to the temp dir).
Chronicals runs print their counts and, per pass, each distinct decline reason with how often it
came and where first (also in the worker's log and the JSON).

``--engines simple_fsdp`` shards every parameter as a DTensor gathered by a parametrization
instead of FSDP2's hooks (benchmarks/simple_fsdp.py), so the whole step is one Dynamo graph and
every pass sees every layer (compile scope model only).

``--compile-scope layers`` is the per-layer recipe for FSDP2 (any engine takes it): every decoder
layer's forward goes through one shared compiled function, the decoder stack's own forward
(``model.model.forward``: embedding, mask preparation, the layer loop, the final norm) is
``torch._dynamo.disable``d, and the wrapped (DDP/FSDP2) model is compiled with the same backend,
so Dynamo captures around the disabled stack only the head: final hidden state -> lm_head ->
loss (for chronicals the fused linear+CE; the report adds its graph to the layer graph's). As the
stack runs eagerly, transformers sees real tensors, builds no causal mask, and the layers run SDPA
``is_causal``. ``--compile-scope model`` (the default) compiles the wrapped model whole.

``--profile``: after the timed steps each data-parallel run trains ``--profile-steps`` more steps
(same model, optimizer and data stream; not in the timed numbers), rank 0 under torch.profiler
and the other ranks unprofiled beside it (the collectives match), and rank 0 writes the summary of
``benchmarks.profile_step`` (kernel time by kind, NCCL among them, with how much of it ran with
no compute beside it; top kernels; GPU idle gaps by the CPU op that launched the next kernel) to
``profile_<engine>_<variant>.txt`` next to ``--json`` (else in the temp dir), the variant's
characters other than ``[A-Za-z0-9._-]`` replaced by ``_``; ``--profile-trace`` also writes the
Chrome trace as ``profile_<engine>_<variant>.json.gz``. The one-process reference is not
profiled.

One worker (what the driver launches): ``torchrun --nproc_per_node 2 -m benchmarks.multi_gpu
--worker out.json --engine ddp --variant chronicals ...``.

The CPU smoke run (2 gloo processes, Triton interpreted, AOTAutograd without Inductor):
``python -m benchmarks.multi_gpu --device cpu --model tiny-llama --batch 2 --seq 64 --steps 3
--warmup 1`` (add ``--compile-scope layers``, ``--profile``; a CPU profile has no CUDA kernels
and says so).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time

from chronicals_fx.bench import clock_sampler, energy_counter, file_safe, spawn_worker

# NVLink multicast (NVLS) is unavailable on the lent GPU machines: NCCL and symmetric memory
# must not try it. Set here so every torchrun job inherits it.
_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
ENGINES = ("ddp", "fsdp2", "simple_fsdp")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engines", nargs="*", default=["ddp", "fsdp2"], choices=ENGINES)
    p.add_argument("--variants", nargs="*", default=["compile", "chronicals"],
                   help="eager, compile, chronicals, chronicals:<pass>,<pass>, with options "
                        "as in chronicals_fx.bench (chronicals@mode=reduce-overhead)")
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) per data-parallel run")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=8, help="rows per rank")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4, help="untimed first steps (compilation)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--checkpointing", action="store_true",
                   help="activation checkpointing of every layer (HF, non-reentrant)")
    p.add_argument("--reference", default="eager",
                   help="variant of the one-process run on the global batch, or 'none'")
    p.add_argument("--compiler", default=None,
                   help="what compiles: inductor (default on CUDA) or aot_eager (default on CPU)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP gradient bucket size")
    p.add_argument("--compile-scope", default="model", choices=("model", "layers"),
                   help="what the compile variants compile: the whole model, or (FSDP2 recipe, "
                        "any engine) each decoder layer through one shared compiled function "
                        "plus the loss head (lm_head + loss, compiled in the wrapped model "
                        "around the decoder stack, whose own forward runs eagerly: "
                        "transformers then builds no causal mask, SDPA is_causal)")
    p.add_argument("--fsdp-group", type=int, default=1,
                   help="FSDP2: decoder layers per fully_shard group")
    p.add_argument("--no-reshard", action="store_true",
                   help="FSDP2: reshard_after_forward=False for every layer group")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps, rank 0 of each data-parallel run profiles "
                        "--profile-steps more steps (the other ranks step with it) and writes "
                        "profile_<engine>_<variant>.txt next to --json")
    p.add_argument("--profile-steps", type=int, default=2, help="steps under the profiler")
    p.add_argument("--profile-trace", action="store_true",
                   help="with --profile, also write the Chrome trace "
                        "(profile_<engine>_<variant>.json.gz)")
    p.add_argument("--timeout", type=int, default=240, help="seconds per run before it is killed")
    p.add_argument("--deadline", type=int, default=560,
                   help="seconds for all runs: a run gets at most what is left (the table is "
                        "printed in time for a 10-minute limit), later ones are skipped")
    p.add_argument("--json", help="write every result here")
    # one run (set by the driver)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--engine", default="single", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="chronicals", help=argparse.SUPPRESS)
    p.add_argument("--profile-dir", help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------
# One run: a torchrun rank, or the single process of the reference
# ---------------------------------------------------------------------------------------------
def run_worker(args) -> dict | None:
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before any Triton kernel is imported
    import torch
    import torch.distributed as dist

    import chronicals
    from chronicals_fx.workload import (
        build_model,
        byte_batches,
        enable_activation_checkpointing,
        train,
    )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    else:
        device = "cpu"
    if args.engine != "single":
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    compiler = args.compiler or ("inductor" if args.device == "cuda" else "aot_eager")

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_model(args.model, dtype=dtype, device=device, seed=0)
    # Training builds no KV cache. With one, every decoder layer's graph guards on its
    # layer_idx (the cache update): under FSDP2, where each layer is a frame of its own, that is
    # a recompile per layer until Dynamo's recompile_limit (8), after which the remaining layers
    # run eagerly in every variant. (On CPU with torch >= 2.13 the cache also lets transformers
    # skip building the causal mask, so the attention pass would not be exercised.)
    model.config.use_cache = False
    if args.checkpointing:
        enable_activation_checkpointing(model)
    wrapped = model
    if args.engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if args.device == "cuda" else None,
            bucket_cap_mb=args.bucket_mb)
    elif args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # --fsdp-group layers per fully_shard call; --no-reshard keeps each group's parameters
        # gathered from its forward to its backward (CPU: -22% / -19% of FSDP2's host step,
        # docs/fsdp2_host_overhead.md)
        layers = list(model.model.layers)
        for i in range(0, len(layers), args.fsdp_group):
            group = layers[i:i + args.fsdp_group]
            fully_shard(group if len(group) > 1 else group[0],
                        reshard_after_forward=not args.no_reshard)
        wrapped = fully_shard(model)
    elif args.engine == "simple_fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        from benchmarks.simple_fsdp import shard_parameters

        if args.compile_scope != "model":
            raise ValueError("simple_fsdp compiles the whole model (--compile-scope model)")
        wrapped = shard_parameters(model, init_device_mesh(args.device, (world,)))
    variant = args.variant
    report = _apply_variant(args, model, wrapped, compiler)

    def shard():  # this rank's rows of each global batch (the reference: all of them)
        rows = args.batch
        for batch in byte_batches(rows * world, args.seq, device=device):
            yield {k: v[rank * rows:(rank + 1) * rows] for k, v in batch.items()}

    # the optimizer train() would make, made here so that --profile's steps continue training
    optimizer = torch.optim.AdamW([q for q in wrapped.parameters() if q.requires_grad],
                                  lr=args.lr, fused=args.device == "cuda")
    batches = shard()
    with clock_sampler() as clock:   # this rank's GPU: the table shows rank 0's clock and host
        stats = train(wrapped, batches, args.steps, lr=args.lr, warmup_steps=args.warmup,
                      optimizer=optimizer, clock=clock, energy=energy_counter())
    # this rank's GPU's energy over this rank's own steps (before step_ms becomes the slowest
    # rank's below): the table shows rank 0's
    energy = stats.energy_summary()
    profile = None
    if args.profile and args.engine != "single":
        profile = _profile(args, wrapped, batches, optimizer, stats, rank, world)
    if world > 1:  # the global batch's mean loss, the slowest rank, all ranks' tokens
        def reduce(values: list[float], op: str) -> list[float]:
            t = torch.tensor(values, dtype=torch.float64, device=device)
            dist.all_reduce(t, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
            return (t / world if op == "mean" else t).tolist()

        stats.losses = reduce(stats.losses, "mean")
        stats.step_ms = reduce(stats.step_ms, "max")
        (stats.peak_gib,) = reduce([stats.peak_gib], "max")
        stats.tokens_per_step *= world
    result = {**stats.to_dict(), **energy}
    result.update(engine=args.engine, variant=variant, world=world,
                  checkpointing=args.checkpointing, compile_scope=args.compile_scope,
                  problems=stats.proof_of_training())
    if profile is not None:
        result["profile"] = profile
    if variant.startswith("chronicals"):
        report = report if report is not None else chronicals.report_of(wrapped)
        reasons = _decline_reasons(report)
        result.update(counts=report.counts, declined=report.declined_counts,
                      graphs=report.graphs, decline_reasons=reasons)
        if rank == 0:
            print(f"chronicals: {report.graphs} graph(s), matched {report.counts}", flush=True)
            for line in reasons:
                print(f"chronicals declined {line}", flush=True)
    if args.engine != "single":
        dist.destroy_process_group()
    return result if rank == 0 else None


def _apply_variant(args, model, wrapped, compiler):
    """Compile or optimize ``wrapped`` (``model`` inside DDP/FSDP2, or ``model`` itself) as
    ``args.variant`` asks, with ``compiler`` compiling; the chronicals report of a per-layer run
    (the layer graph's and the head graph's), else None."""
    import chronicals
    from chronicals_fx.bench import compile_variant, variant_options

    variant = args.variant
    report = None
    if variant.partition("@")[0] == "compile":
        if args.compile_scope == "layers":
            if variant_options(variant):
                raise ValueError("--compile-scope layers takes no compile@ variant options")
            _compile_layers_and_head(model, wrapped, compiler)
        else:
            compile_variant(wrapped, variant, backend=compiler)
    elif variant.startswith("chronicals"):
        options = {"compiler": compiler, **variant_options(variant)}
        if args.compile_scope == "layers":
            from chronicals_fx.backend import chronicals_backend

            if "mode" in options:
                raise ValueError("--compile-scope layers takes no mode= variant option")
            report = chronicals.Report()   # the layer graph's and the head graph's
            _compile_layers_and_head(model, wrapped, functools.partial(
                chronicals_backend, options=chronicals.Config.from_options(options),
                on_report=report.extend))
        else:
            chronicals.optimize(wrapped, **options)
    elif variant != "eager":
        raise ValueError(f"unknown variant {variant!r}")
    return report


def _profile(args, wrapped, batches, optimizer, stats, rank: int, world: int) -> str | None:
    """``--profile-steps`` more training steps, rank 0's under torch.profiler (CPU and CUDA), the
    other ranks' plain (every rank runs the same steps, so the collectives match); rank 0 writes
    the summary (and with ``--profile-trace`` the trace) and returns the summary's path."""
    import torch

    from benchmarks.profile_step import dynamo_counters, load_trace, summarize
    from chronicals_fx.workload import train

    def steps():
        return train(wrapped, batches, args.profile_steps, lr=args.lr, warmup_steps=0,
                     optimizer=optimizer)

    if rank != 0:
        steps()
        return None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        profiled = steps()
    directory = args.profile_dir or os.path.dirname(os.path.abspath(args.worker))
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, f"profile_{args.engine}_{file_safe(args.variant)}")
    events = load_trace(prof, base + ".json.gz" if args.profile_trace else None)
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    scope = "  compiled per layer + head" if args.compile_scope == "layers" else ""
    text = summarize(
        events, args.profile_steps,
        wall_ms=sum(profiled.step_ms) / len(profiled.step_ms),
        title=(f"{card} rank 0 of {world}  torch {torch.__version__}  {args.engine} "
               f"{args.variant}{scope}  {args.model} B={args.batch}/rank T={args.seq}"),
        plain_ms=stats.median_step_ms,
        peak_gib=stats.peak_gib if args.device == "cuda" else None,
        notes=[(f"# {args.profile_steps} profiled steps after the {len(stats.step_ms)} of the "
                f"run (\"without the profiler\": this rank's median timed step; the table's "
                f"time is the slowest rank's); their loss {profiled.losses[0]:.3f} -> "
                f"{profiled.losses[-1]:.3f} (this rank's last timed step: "
                f"{stats.losses[-1]:.3f})")],
        extra=[dynamo_counters(brief=True)])
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return base + ".txt"


def _layer_forward(layer, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)


def _compile_layers(layers, backend) -> None:
    """Compile every decoder layer's forward through one compiled function (FSDP2's hooks stay
    outside it, in the module call): Dynamo compiles it once for all layers (parameters are
    inputs, guards are on the class), where ``layer.compile()`` per layer would recompile per
    layer (a new backend callable each time) up to Dynamo's recompile_limit. The decoder stack's
    own forward runs eagerly (:func:`_compile_layers_and_head`), so transformers decides there,
    on real tensors, that the batch is neither padded nor packed and hands the layers no mask
    (SDPA ``is_causal``)."""
    import torch

    compiled = torch.compile(_layer_forward, backend=backend)
    for layer in layers:
        layer.forward = functools.partial(compiled, layer)


def _compile_layers_and_head(model, wrapped, backend) -> None:
    """The per-layer recipe (``--compile-scope layers``): the decoder layers through
    :func:`_compile_layers`, and the loss head too. The decoder stack's forward
    (``model.model.forward``: embedding, mask preparation, the layers, the final norm) is
    ``torch._dynamo.disable``d, so it runs eagerly (no causal mask, as above), and the wrapped
    model (DDP/FSDP2) is compiled with the same backend: Dynamo breaks the graph at the disabled
    stack and captures what follows, final hidden state -> lm_head -> loss, as a graph of its
    own (chronicals: the fused linear+CE, no materialized logits)."""
    import torch

    _compile_layers(model.model.layers, backend)
    model.model.forward = torch._dynamo.disable(model.model.forward)
    # nn.Module.compile, not wrapped.compile: a subclass may define its own `compile`
    torch.nn.Module.compile(wrapped, backend=backend)


def _decline_reasons(report, width: int = 160) -> list[str]:
    """One line per (pass, reason): how often, where first, the reason (shortened)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for d in report.declines:
        seen.setdefault((d.op, d.reason), []).append(d.where)
    lines = []
    for (op, reason), where in seen.items():
        line = f"{op} x{len(where)} (first at {where[0]}): {reason}"
        lines.append(line if len(line) <= width else line[:width - 3] + "...")
    return lines


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def _common(args) -> list[str]:
    cmd = ["--device", args.device, "--model", args.model, "--seq", str(args.seq),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr)]
    if args.compiler:
        cmd += ["--compiler", args.compiler]
    cmd += ["--bucket-mb", str(args.bucket_mb), "--compile-scope", args.compile_scope]
    if args.checkpointing:
        cmd.append("--checkpointing")
    cmd += ["--fsdp-group", str(args.fsdp_group)] + (["--no-reshard"] if args.no_reshard else [])
    return cmd


def _profile_args(args, logdir: str) -> list[str]:
    """What a data-parallel worker needs for --profile (the reference is not profiled)."""
    if not args.profile:
        return []
    cmd = ["--profile", "--profile-steps", str(args.profile_steps), "--profile-dir", logdir]
    return cmd + (["--profile-trace"] if args.profile_trace else [])


def _launch(cmd: list[str], name: str, args, logdir: str, timeout: float) -> dict:
    """Run one job; its JSON or an error. Its log is kept either way (what every rank printed:
    chronicals' counts and declines)."""
    env = {**os.environ, **_ENV}
    if args.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    # a session of its own: the timeout kills torchrun's ranks with it
    worker = spawn_worker(cmd, os.path.join(logdir, f"multi_gpu_{name}.log"), timeout=timeout,
                          own_session=True, keep_log=True, env=env)
    if worker.error:
        return {"error": worker.error, "log": worker.log, "wall_s": worker.seconds}
    return {**worker.result, "wall_s": worker.seconds}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.profile and args.profile_steps < 1:
        parser.error("--profile-steps must be at least 1")
    if args.fsdp_group < 1:
        parser.error("--fsdp-group must be at least 1")
    if args.worker:
        result = run_worker(args)
        if result is not None:
            with open(args.worker, "w") as f:
                json.dump(result, f)
        return 0

    import torch

    from chronicals_fx import workload

    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = (f"# {card} x{args.nproc}  torch {torch.__version__}  model {args.model}  "
              f"B={args.batch}/rank (global {args.batch * args.nproc}) T={args.seq}  "
              f"steps {args.steps} (warm-up {args.warmup})"
              f"{'  activation checkpointing' if args.checkpointing else ''}"
              f"{'  compiled per layer + head' if args.compile_scope == 'layers' else ''}"
              f"{f'  FSDP2 groups of {args.fsdp_group} layers' if args.fsdp_group > 1 else ''}"
              f"{'  no reshard after forward' if args.no_reshard else ''}")
    print(header, flush=True)
    logdir = os.path.dirname(os.path.abspath(args.json)) if args.json else tempfile.gettempdir()
    os.makedirs(logdir, exist_ok=True)
    results = []
    jobs = []
    if args.reference != "none":
        jobs.append(("single", args.reference, [sys.executable, "-m", "benchmarks.multi_gpu",
                                                "--engine", "single", "--variant", args.reference,
                                                "--batch", str(args.batch * args.nproc)]))
    for engine in args.engines:
        for variant in args.variants:
            jobs.append((engine, variant, [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(args.nproc), "-m", "benchmarks.multi_gpu",
                "--engine", engine, "--variant", variant, "--batch", str(args.batch),
                *_profile_args(args, logdir)]))
    deadline = time.monotonic() + args.deadline
    for engine, variant, cmd in jobs:
        name = file_safe(f"{engine}_{variant.replace(':', '-').replace(',', '+')}")
        left = deadline - time.monotonic()
        if left < 30:
            r = {"error": "skipped: --deadline reached", "log": "", "wall_s": 0.0}
        else:
            r = _launch(cmd + _common(args), name, args, logdir, min(args.timeout, left))
        r.setdefault("engine", engine)
        r.setdefault("variant", variant)
        results.append(r)
        if "error" in r:
            print(f"{engine} {variant}: failed after {r['wall_s']:.0f} s ({r['log']}): "
                  f"{r['error']}", flush=True)
        else:
            print(f"{engine} {variant}: {r['tokens_per_s']:,.0f} tok/s, {r['peak_gib']:.1f} GiB, "
                  f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}, {r['wall_s']:.0f} s"
                  + workload.allocator_note(r)
                  + (f", counts {r['counts']}, declined {r['declined']}" if "counts" in r else ""),
                  flush=True)
            for line in r.get("decline_reasons", []):
                print(f"    declined {line}", flush=True)
            if "profile" in r:
                print(f"    profile of rank 0: {r['profile']}", flush=True)

    print(summary_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "results": results}, f, indent=1)
    return 0


def summary_table(results: list[dict]) -> str:
    from tabulate import tabulate

    from chronicals_fx.workload import energy_cell

    reference = next((r for r in results if r["engine"] == "single" and "error" not in r), None)
    compile_tps = {r["engine"]: r["tokens_per_s"] for r in results
                   if r["variant"] == "compile" and "error" not in r}
    headers = ("engine", "variant", "tok/s (global)", "vs compile", "step ms",
               "host ms (rank 0)", "SM MHz (rank 0)", "cap % (rank 0)", "J/step (rank 0)",
               "avg W (rank 0)", "peak GiB/GPU", "loss first→last", "max |Δloss| vs 1 proc",
               "min grad norm", "proof")
    rows = []
    for r in results:
        engine = "1 process" if r["engine"] == "single" else r["engine"]
        if "error" in r:     # the error in the last column, the others empty
            rows.append((engine, r["variant"], "failed", *[""] * (len(headers) - 4),
                         r["error"][:70]))
            continue
        gap = (max(abs(a - b) for a, b in zip(r["losses"], reference["losses"]))
               if reference is not None and r is not reference else None)
        base = compile_tps.get(r["engine"])
        rows.append((engine, r["variant"], f"{r['tokens_per_s']:,.0f}",
                     f"{r['tokens_per_s'] / base:.2f}x" if base else "",
                     f"{r['median_step_ms']:.1f}", f"{r.get('median_host_ms', float('nan')):.1f}",
                     f"{r.get('median_sm_mhz', float('nan')):.0f}",
                     f"{100 * r.get('power_capped_share', float('nan')):.0f}",
                     energy_cell(r.get("energy_j_per_step", float("nan")),
                                 r.get("energy_resolution_j", float("nan"))),
                     f"{r.get('avg_power_w', float('nan')):.0f}", f"{r['peak_gib']:.1f}",
                     f"{r['losses'][0]:.3f}→{r['losses'][-1]:.3f}",
                     "" if gap is None else f"{gap:.3f}", f"{r['min_grad_norm']:.3f}",
                     "; ".join(r["problems"]) or "trained"))
    return tabulate(rows, headers=headers, disable_numparse=True)


if __name__ == "__main__":
    raise SystemExit(main())
