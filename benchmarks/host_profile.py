"""Where a training step's host time goes: the CPU side of what ``profile_step`` shows for the GPU.

    python -m benchmarks.host_profile [--variants compile chronicals] [--steps 3] [--top 25]
        [--autocast]

A step is host-bound when the host takes longer to enqueue its work than the GPU takes to run it
(``chronicals bench``'s ``host ms`` near its ``step ms``). For each variant (same model, data and
optimizer as ``profile_step``), after the warm-up:

1. synchronizing calls inside a step, found by ``torch.cuda.set_sync_debug_mode("warn")``, each
   with the last frames of the Python stack that made it (a sync makes the host wait for the
   GPU: host time that is not enqueueing);
2. under torch.profiler (CPU and CUDA), the CUDA runtime and driver calls per step (launches,
   copies, allocations, syncs: count and time) and the CPU ops with the most inclusive time
   (nested ops count in their parents too);
3. under cProfile, the Python functions with the most own time (C functions such as a
   launcher's count separately from the Python that calls them);
4. with ``--py-spy RATE`` (py-spy on PATH, or ``--py-spy-bin``): py-spy samples the process
   from outside at RATE Hz, thread by thread — unlike cProfile it keeps the autograd engine's
   thread (the backward) apart from the main thread, and it slows neither. Per thread that ran
   ≥ 5% of the samples: the frames with the most inclusive and the most own time, in ms a step
   (samples ÷ rate ÷ steps; threads waiting are not sampled, so this is time on a CPU).

Each part runs its own steps; the profilers slow the host, so their times are relative, but
counts are exact. The proof of training (first and last loss, smallest grad norm) closes each
variant's section.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch

from benchmarks.profile_step import add_step_arguments, load_trace, training_step

RUNTIME_CATEGORIES = ("cuda_runtime", "cuda_driver")
OP_CATEGORIES = ("cpu_op", "user_annotation", "python_function")


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", nargs="+", default=["compile", "chronicals"])
    add_step_arguments(p)
    p.add_argument("--device", default="cuda", help="cpu: a check of this tool, not a measurement")
    p.add_argument("--py-spy", type=int, default=0, metavar="RATE",
                   help="also sample the steps with py-spy at RATE Hz (0: not)")
    p.add_argument("--py-spy-bin", default="py-spy")
    p.add_argument("--py-spy-only", action="store_true",
                   help="skip the sync check, torch.profiler and cProfile (parts 1–3)")
    args = p.parse_args(argv)
    for variant in args.variants:
        print(profile_variant(args, variant), flush=True)
    return 0


def profile_variant(args, variant: str) -> str:
    from chronicals_fx.workload import _sync

    args = argparse.Namespace(**{**vars(args), "variant": variant})
    device = torch.device(args.device)
    trainer, batches = training_step(args, args.device)

    def step():
        trainer.enqueue(next(batches))

    for _ in range(args.warmup):
        step()
    for _ in range(args.steps):
        trainer.step(next(batches))
    host_ms = statistics.median(trainer.host_ms[-args.steps:])
    step_ms = statistics.median(trainer.step_ms[-args.steps:])

    lines = [f"\n# {variant}  {args.model} B={args.batch} T={args.seq}"
             f"{f' LoRA r={args.lora}' if args.lora else ''}"
             f"{' fp32 under autocast(bf16)' if args.autocast else ''}: step "
             f"{step_ms:.1f} ms, host enqueue {host_ms:.1f} ms (median of {args.steps}, "
             "no profiler)"]
    if not args.py_spy_only:
        lines += profiled_sections(args, step, device)
    if args.py_spy:
        lines += sampled_threads(step, args.steps, args.py_spy, args.py_spy_bin, args.top,
                                 lambda: _sync(device))

    values = torch.stack(trainer.losses).float().tolist()
    lines.append(f"# trained: loss {values[0]:.3f} -> {values[-1]:.3f} over {len(values)} steps, "
                 f"min grad norm {torch.stack(trainer.grad_norms).min().item():.3f}")
    del trainer, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return "\n".join(lines)


def profiled_sections(args, step, device) -> list[str]:
    """Parts 1–3 of the module's docstring, each over its own ``args.steps`` steps."""
    from chronicals_fx.workload import _sync

    lines = sync_points(step, args.steps) if device.type == "cuda" else []

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        _sync(device)
    lines += host_summary(load_trace(prof), args.steps, args.top)

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.steps):
        step()
    _sync(device)
    profiler.disable()
    return lines + python_hot_spots(profiler, args.steps, args.top)


def sync_points(step, steps: int) -> list[str]:
    """The synchronizing CUDA calls made during ``steps`` calls of ``step``, grouped by where
    they were made (the innermost frames of the stack, this file's left out)."""
    places: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-2] if f.filename != __file__
                  and "warnings" not in f.filename]
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                            for f in reversed(frames[-4:]))
        places[f"{str(message).splitlines()[0][:80]} at {where}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if not places:
        return ["synchronizing calls inside the step: none"]
    lines = [f"synchronizing calls inside the step ({steps} steps):"]
    lines += [f"{n / steps:6.1f}/step  {place}" for place, n in places.most_common()]
    return lines


def host_summary(events: list[dict], steps: int, top: int) -> list[str]:
    """CUDA runtime/driver calls per step (count, ms) and the CPU ops with the most inclusive
    time per step, from a profiled run's Chrome trace events."""
    runtime: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    ops: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if "dur" not in e:
            continue
        table = (runtime if e.get("cat") in RUNTIME_CATEGORIES
                 else ops if e.get("cat") in OP_CATEGORIES else None)
        if table is not None:
            table[e["name"]][0] += 1 / steps
            table[e["name"]][1] += e["dur"] / 1000 / steps
    launches = sum(n for name, (n, _) in runtime.items() if "aunch" in name)
    lines = [f"CUDA runtime/driver calls per step (under the profiler; {launches:.0f} launches):",
             f"{'calls':>7} {'ms':>8}  name"]
    for name, (n, ms) in sorted(runtime.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{n:7.0f} {ms:8.2f}  {name[:100]}")
    lines += [f"CPU ops by inclusive time per step (top {top}):", f"{'calls':>7} {'ms':>8}  name"]
    for name, (n, ms) in sorted(ops.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{n:7.0f} {ms:8.2f}  {name[:100]}")
    return lines


def python_hot_spots(profiler: cProfile.Profile, steps: int, top: int) -> list[str]:
    """The functions with the most own time per step (cProfile's tottime), with their calls."""
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (filename, lineno, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append((tottime, cumtime, calls, f"{filename.rsplit('/', 2)[-1]}:{lineno} {name}"))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    lines = [f"Python functions by own time per step (cProfile, {1000 * total / steps:.1f} ms "
             f"in all; top {top}):", f"{'calls':>7} {'own ms':>8} {'cum ms':>8}  function"]
    for tottime, cumtime, calls, where in rows[:top]:
        lines.append(f"{calls / steps:7.0f} {1000 * tottime / steps:8.2f} "
                     f"{1000 * cumtime / steps:8.2f}  {where[:100]}")
    return lines


PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1)


def sampled_threads(step, steps: int, rate: int, binary: str, top: int, sync) -> list[str]:
    """py-spy's samples of ``steps`` steps of this process, summarized per thread."""
    found = shutil.which(binary)
    if found is None:
        return [f"py-spy: {binary!r} not found, no samples"]
    # Yama's ptrace_scope 1 lets a process read only its descendants: allow the sampler.
    ctypes.CDLL(None).prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "stacks.txt")
        sampler = subprocess.Popen([found, "record", "--pid", str(os.getpid()), "--rate",
                                    str(rate), "--format", "raw", "--threads", "--nonblocking",
                                    "--output", raw], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        time.sleep(2.0)    # attached and sampling before the first step
        sync()
        for _ in range(steps):
            step()
        sync()
        sampler.send_signal(signal.SIGINT)
        log = sampler.communicate(timeout=60)[0]
        if not os.path.exists(raw):
            return [f"py-spy wrote no samples (exit {sampler.returncode}): {log.strip()[-300:]}"]
        with open(raw) as f:
            stacks = parse_raw_stacks(f)
    return thread_summary(stacks, steps, rate, top)


def parse_raw_stacks(lines) -> list[tuple[list[str], int]]:
    """py-spy's ``--format raw`` (collapsed stacks, "outer;…;inner count" a line) as
    (frames outer first, samples); a frame is "function (file)", its line number dropped so
    that a function's samples add up."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        frames, _, count = line.rpartition(" ")
        if frames and count.isdigit():
            stacks.append(([re.sub(r":\d+\)$", ")", f) for f in frames.split(";")], int(count)))
    return stacks


SOURCES = (("chronicals", re.compile(r"\(chronicals_fx/")),
           ("compiled code", re.compile(r"\(c[a-z0-9]{40,}\.py\)")),   # Inductor's wrappers
           ("inductor", re.compile(r"\(torch/_inductor/")),
           ("triton", re.compile(r"\(triton/|\(<string>\)")),           # and its launchers
           ("torch", re.compile(r"\(torch/")))


def source_counts(stacks) -> list[tuple[str, int]]:
    """Samples by the source of their innermost frame (:data:`SOURCES`, else "other"), most
    first: own time, where C calls count to the Python that made them."""
    counts: Counter = Counter()
    for frames, count in stacks:
        leaf = frames[-1] if frames else ""
        counts[next((name for name, pattern in SOURCES if pattern.search(leaf)), "other")] += count
    return counts.most_common()


def thread_summary(stacks, steps: int, rate: int, top: int) -> list[str]:
    """Per thread (the first frame of each stack, with ``--threads``) that has ≥ 5% of the
    samples: total, then the frames with the most inclusive and own ms a step."""
    ms = 1000.0 / rate / steps
    threads: dict[str, list] = defaultdict(list)
    for frames, count in stacks:
        threads[frames[0]].append((frames[1:], count))
    total = sum(c for _, c in stacks)
    lines = [f"py-spy samples of {steps} steps at {rate} Hz: {total * ms:.1f} ms a step on a "
             "CPU over all threads"]
    for thread, own_stacks in sorted(threads.items(), key=lambda kv: -sum(c for _, c in kv[1])):
        samples = sum(c for _, c in own_stacks)
        if samples < 0.05 * total:
            continue
        inclusive, own = Counter(), Counter()
        for frames, count in own_stacks:
            for frame in set(frames):
                inclusive[frame] += count
            if frames:
                own[frames[-1]] += count
        lines.append(f"{thread}: {samples * ms:.1f} ms a step; own time by source: " + ", ".join(
            f"{source} {count * ms:.1f}" for source, count in source_counts(own_stacks)))
        for title, counter in (("inclusive", inclusive), ("own", own)):
            lines.append(f"  by {title} ms a step (top {top}):")
            lines += [f"  {count * ms:8.2f}  {frame[:110]}" for frame, count in counter.most_common(top)]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
