"""End-to-end training-step benchmark, each variant in its own process, in one run.

    chronicals bench [--model qwen2.5-0.5b] [--batch 8] [--seq 1024] [--steps 20]
        [--variants eager compile liger chronicals] [--passes rmsnorm ...] [--lora 32]

A variant ``chronicals:rmsnorm,swiglu`` runs chronicals with that pass set, so cumulative sets
compare in one run: ``--variants compile chronicals:rmsnorm chronicals:rmsnorm,swiglu``; and
``chronicals@swiglu_save_hidden=0`` (after the pass set, if any) with backend options of its
own, comma-separated ``key=value`` (0/1/true/false are booleans, digits integers);
``mode=reduce-overhead`` (CUDA graphs) goes to ``torch.compile`` for ``compile@...`` and
``chronicals@...`` alike, and so do Inductor's options (``compile@cpp_wrapper=true``).

``--repeat R`` runs the list R times over, each run its own process, round-robin (A B C A B C):
the table gives each variant's mean tokens/s with the range of its runs and the ratio to
torch.compile's mean (where two variants' ranges overlap, read no order into their means).

``--interleave R`` runs every variant in one process instead: all models are built and warmed
up, then the timed steps alternate between the variants over R rounds (the order reversed every
round), so a slow drift of the card or the host falls on all of them alike — for differences
of a percent or less. Each step runs between two syncs, so its energy reading is its own
variant's: J/step and avg W stay per variant. Peak memory is then the process's, not a
variant's (shown as nan): take memory from a run without it. Nor take host-bound comparisons
from it: a process holding several compiled models spends more host time a step (H200, session
19: torch.compile's median host 59.3 ms in a three-model process, 35.9 in its own), and a
variant near host-bound loses there what it would not alone.

Random init, bf16 parameters, fused AdamW, SDPA attention, the byte corpus of
:mod:`chronicals_fx.workload` (every token real). Prints real tokens/s, step ms, peak GiB, loss
first→last, min grad norm, the largest per-step loss gap to eager, and the ratio to
torch.compile; with them the GPU's SM clock and power (nvidia-smi's samples, gpu_clock.py),
the share of those samples with the clock held down for power (cap %), and its energy a timed step and average power over the timed steps (NVML's energy counter,
gpu_energy.py: ``energy_j_per_step``, ``avg_power_w`` in the JSON; NaN without one). A
variant whose run did not train (non-finite loss, zero grad norm) is flagged.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from tabulate import tabulate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-0.5b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="untimed first steps (compilation)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--variants", nargs="*", default=["eager", "compile", "liger", "chronicals"])
    p.add_argument("--passes", nargs="*", default=None,
                   help="chronicals passes (default: chronicals.DEFAULT_PASSES, all of them)")
    p.add_argument("--layers", type=int, default=0,
                   help="decoder layers (0: the model's own count; fewer compile faster)")
    p.add_argument("--lora", type=int, default=0, help="LoRA rank on all linear layers (0: full FT)")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="all variants in one process, their timed steps alternated over this "
                        "many rounds (0: each variant in its own process)")
    p.add_argument("--repeat", type=int, default=1, metavar="R",
                   help="run the variant list R times over, round-robin, each run its own "
                        "process; the table gives means and ranges")
    p.add_argument("--autocast", action="store_true",
                   help="mixed precision as HF Trainer's bf16=True: fp32 weights, the forward "
                        "under torch.autocast(bf16) (default: a bf16 model on a GPU)")
    p.add_argument("--pin-cpus", metavar="LIST",
                   help="run each variant's process on these CPUs only (e.g. 0-3,8; its "
                        "compile workers too, so the warm-up compiles slower): whether the host "
                        "time's spread between processes is where the OS puts them")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)        # run one variant, write JSON here
    p.add_argument("--variant", help=argparse.SUPPRESS)
    return p


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


VARIANTS = ("eager", "compile", "liger", "liger_compile", "chronicals")


def build_variant(args, variant: str, device: str | None = None):
    """The variant's model, made as it trains: built, LoRA-wrapped, patched or compiled, on
    ``device`` (default: the GPU if there is one)."""
    import torch

    import chronicals
    from chronicals_fx.workload import build_model

    if variant.partition("@")[0].partition(":")[0] not in VARIANTS:
        raise SystemExit(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)}, with "
                         "chronicals[:passes] and @key=value options)")
    device = device or _device()
    # bf16 on the GPU, as trained, or fp32 under autocast (--autocast); fp32 on a CPU (a smoke
    # run: the fused kernels are GPU-only)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    low = device == "cuda" and not args.autocast
    model = build_model(args.model, dtype=torch.bfloat16 if low else torch.float32,
                        device=device, **overrides)
    if args.lora:
        model = with_lora(model, args.lora)
    if variant.startswith("liger"):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=model.get_base_model() if args.lora else model)
    if variant.partition("@")[0] in ("compile", "liger_compile"):
        compile_variant(model, variant)
    if variant.startswith("chronicals"):
        options = {} if args.passes is None else {"passes": tuple(args.passes)}
        options.update(variant_options(variant))
        chronicals.optimize(model, **options)
    return model


def _result(variant: str, model, stats) -> dict:
    import chronicals

    report = chronicals.report_of(model) if variant.startswith("chronicals") else None
    return {"variant": variant, **stats.to_dict(), "problems": stats.proof_of_training(),
            "counts": report.counts if report else None,
            "declined": report.declined_counts if report else None}


def run_variant(args) -> dict:
    from chronicals_fx.workload import byte_batches, train

    model = build_variant(args, args.variant)
    with clock_sampler() as clock:
        stats = train(model, byte_batches(args.batch, args.seq, device=_device()), args.steps,
                      lr=args.lr, warmup_steps=args.warmup, clock=clock,
                      autocast=_autocast_dtype(args), energy=energy_counter())
    return _result(args.variant, model, stats)


def _autocast_dtype(args):
    import torch

    return torch.bfloat16 if args.autocast else None


def clock_sampler():
    """The current GPU's clock sampled during the steps (gpu_clock.py); samples nothing on a
    CPU."""
    import torch

    from chronicals_fx.gpu_clock import ClockSampler

    if not torch.cuda.is_available():
        return contextlib.nullcontext()
    return ClockSampler(nvml_gpu_id(torch.cuda.current_device()))


def energy_counter():
    """The current GPU's NVML energy counter (gpu_energy.py); None on a CPU, or where the
    counter cannot be read."""
    import torch

    from chronicals_fx.gpu_energy import open_energy_counter

    if not torch.cuda.is_available():
        return None
    return open_energy_counter(nvml_gpu_id(torch.cuda.current_device()))


def nvml_gpu_id(device: int) -> int | str:
    """CUDA's GPU ``device`` as nvidia-smi and NVML name it. They number the GPUs as the driver
    does (PCI order), and CUDA_VISIBLE_DEVICES may renumber them (and CUDA_DEVICE_ORDER reorder
    them) for CUDA: torch's own mapping to the driver's index (what torch.cuda.clock_rate uses,
    and what the clock sampler has used on the GPU machines since session 17); else the PCI bus
    id, which both agree on, where torch's device properties carry it (``pci_domain_id``,
    ``pci_bus_id``, ``pci_device_id``); else the UUID."""
    import torch

    try:
        return torch.cuda._get_nvml_device_index(device)
    except Exception:  # noqa: BLE001 (a private helper: absent, or needing pynvml for UUIDs)
        pass
    props = torch.cuda.get_device_properties(device)
    try:
        return f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
    except (AttributeError, TypeError, ValueError):   # a torch without the fields
        uuid = str(props.uuid)
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def run_interleaved(args) -> list[dict]:
    """Every variant in this process: built and warmed up one after another, then their timed
    steps alternated over ``args.interleave`` rounds, the order reversed every round. Each
    variant reads the same batches in the same order as a run of its own."""
    from chronicals_fx.workload import Trainer, byte_batches

    started = time.perf_counter()
    energy = energy_counter()     # one GPU, one counter: each step reads it around its own span
    runs = []
    for variant in args.variants:
        model = build_variant(args, variant)
        runs.append((variant, model, Trainer(model, lr=args.lr, autocast=_autocast_dtype(args),
                                             energy=energy),
                     byte_batches(args.batch, args.seq, device=_device())))
    for variant, _model, trainer, batches in runs:     # warm-up: compilation, autotuning
        for _ in range(min(args.warmup, args.steps)):
            trainer.step(next(batches))
        _progress(f"{variant} built and warmed up", started)
    timed = max(0, args.steps - args.warmup)
    rounds = max(1, args.interleave)
    with clock_sampler() as clock:
        for r in range(rounds):
            for _variant, _model, trainer, batches in (runs if r % 2 == 0 else runs[::-1]):
                for _ in range(timed // rounds + (r < timed % rounds)):
                    trainer.step(next(batches))
            _progress(f"round {r + 1} of {rounds} timed", started)
    results = []
    for variant, model, trainer, _batches in runs:
        stats = trainer.stats(args.warmup, clock)
        stats.peak_gib = float("nan")          # the process's peak, not this variant's
        results.append(_result(variant, model, stats))
    return results


def _progress(what: str, started: float) -> None:
    """A line on the worker's stdout, which the parent passes through: a run cut short by a
    time limit still shows how far it got."""
    print(f"  [{time.perf_counter() - started:6.0f} s] {what}", flush=True)


def with_lora(model, rank: int):
    """PEFT LoRA of this rank on every linear layer (alpha = rank, no dropout): the LoRA runs'
    model, shared with benchmarks/profile_step.py."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules="all-linear",
                                            lora_dropout=0.0))


def file_safe(name: str) -> str:
    """``name`` with every character other than [A-Za-z0-9._-] replaced by ``_`` (the GPU
    machine returns no file whose name has others, '@' for one)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def variant_options(variant: str) -> dict:
    """The options a variant name carries: ``chronicals[:pass,...][@key=value,...]`` (backend
    options; ``mode`` too) or ``compile@mode=reduce-overhead`` (``torch.compile``'s)."""
    name, _, settings = variant.partition("@")
    options = {}
    if ":" in name:  # chronicals:rmsnorm,swiglu — a pass set of its own
        options["passes"] = tuple(name.split(":", 1)[1].split(","))
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant {variant!r}: option {item!r} is not key=value")
        lowered = value.lower()
        options[key] = (lowered in ("1", "true") if lowered in ("0", "1", "true", "false")
                        else int(value) if value.isdigit() else value)
    return options


def compile_kwargs(options: dict) -> dict:
    """``torch.compile``'s arguments for a ``compile@...`` variant: ``mode`` as such, the rest as
    Inductor ``options`` (``compile@cpp_wrapper=true``). torch.compile takes one or the other."""
    options = dict(options)
    mode = options.pop("mode", None)
    if mode and options:
        raise SystemExit(f"torch.compile takes mode or options, not both: {mode!r}, {options}")
    return {"mode": mode} if mode else {"options": options} if options else {}


def compile_variant(model, variant: str, **kwargs) -> None:
    """``model.compile`` for a ``compile@...`` variant, ``kwargs`` (``backend=``) besides: the one
    place a variant name becomes torch.compile's arguments, for this module and the benchmarks
    that build the same variants (profile_step, multi_gpu)."""
    model.compile(**kwargs, **compile_kwargs(variant_options(variant)))


@dataclasses.dataclass
class WorkerRun:
    """One worker process, as :func:`spawn_worker` saw it."""

    result: Any                # what it wrote to its JSON file; None if nothing readable
    error: str | None          # why it failed (None: it did not)
    log: str | None            # the log file, if one was written
    seconds: float
    returncode: int | None     # None: killed at the time limit


KILLED = "[killed after"
_GRACE_S = 10   # for a signalled worker to end and its output to close


def spawn_worker(cmd: list[str], log: str, *, show_stdout: bool = False,
                 timeout: float | None = None, own_session: bool = False, keep_log: bool = False,
                 env: dict | None = None, cwd: str | None = None) -> WorkerRun:
    """Run ``cmd --worker <temporary .json>`` and read what the worker wrote there.

    The worker failed if it wrote no readable JSON. A non-zero exit after writing it (a crash or
    hang at teardown: NCCL, Triton, CUDA) does not undo a measurement that completed; its log is
    written all the same. Its output goes to ``log`` when it failed or exited non-zero, or
    always with ``keep_log``; the error is the output's last line naming an ``Error`` (or the
    kill), else its last line. The output is its stdout and stderr together; with
    ``show_stdout`` its stdout passes through to this process's as it comes (progress lines),
    and only stderr is kept.

    ``timeout``: seconds before the worker is killed. ``own_session``: the worker runs in a
    session of its own, all of which the timeout kills (torchrun and its ranks); without it only
    the worker is killed, but a signal to this process's group (the time limit of whatever runs
    this) still reaches it, which a session of its own would outlive."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    start = time.perf_counter()
    proc = subprocess.Popen([*cmd, "--worker", path], text=True, env=env, cwd=cwd,
                            stdout=None if show_stdout else subprocess.PIPE,
                            stderr=subprocess.PIPE if show_stdout else subprocess.STDOUT,
                            start_new_session=own_session)

    def signal_worker(sig):
        with contextlib.suppress(ProcessLookupError):   # it may have ended meanwhile
            if own_session:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    try:
        try:
            out, err = proc.communicate(timeout=timeout)
            killed = ""
        except subprocess.TimeoutExpired:
            killed = f"\n{KILLED} {timeout:.0f} s]"
            # torchrun starts each rank in a session of its own, out of reach of a signal to
            # its group: SIGTERM has it stop them (it passes the signal on), then SIGKILL takes
            # what is left of the group.
            for sig in (signal.SIGTERM, signal.SIGKILL) if own_session else (signal.SIGKILL,):
                signal_worker(sig)
                try:
                    out, err = proc.communicate(timeout=_GRACE_S)
                    break
                except subprocess.TimeoutExpired as exc:
                    partial = exc
            else:   # what escaped the kill holds the pipe: keep what was written so far
                out, err = (b.decode(errors="replace") if isinstance(b, bytes) else b or ""
                            for b in (partial.stdout, partial.stderr))
                killed += " (some of its processes outlived the kill)"
        except BaseException:   # ^C: the worker must not run on without its parent
            signal_worker(signal.SIGTERM if own_session else signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_GRACE_S)
            raise
        seconds = time.perf_counter() - start
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    output = (err if show_stdout else out) + killed
    error = None
    if result is None:
        lines = output.splitlines()
        errors = [ln for ln in lines if "Error" in ln or ln.startswith(KILLED)] or lines
        error = (errors[-1] if errors else f"exit {proc.returncode}")[:300]
    written = None
    if result is None or proc.returncode != 0 or keep_log:
        os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
        with open(log, "w") as f:
            f.write(output)
        written = log
    return WorkerRun(result, error, written, seconds, None if killed else proc.returncode)


def log_dir(json_path: str | None) -> str:
    """Where a run's logs go: next to its ``--json``, else in the temp dir."""
    return os.path.dirname(os.path.abspath(json_path)) if json_path else tempfile.gettempdir()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        if args.pin_cpus:   # before torch starts its threads: they inherit the set
            os.sched_setaffinity(0, cpu_list(args.pin_cpus))
        with open(args.worker, "w") as f:
            json.dump(run_interleaved(args) if args.interleave else run_variant(args), f)
        return 0

    import torch

    from chronicals_fx import workload

    card = (torch.cuda.get_device_name() if torch.cuda.is_available()
            else "CPU (smoke run: no speed claims, the fused kernels run on GPUs only)")
    header = (f"# {card}  torch {torch.__version__}  model {args.model}"
              f"{f' ({args.layers} layers)' if args.layers else ''}  B={args.batch} T={args.seq}  steps {args.steps} (warm-up {args.warmup})"
              f"  {'LoRA r=' + str(args.lora) if args.lora else 'full FT'}"
              f"{'  fp32 weights under autocast(bf16)' if args.autocast else ''}"
              f"{f'  interleaved in one process over {args.interleave} rounds' if args.interleave else ''}")
    print(header, flush=True)
    if args.interleave and args.repeat > 1:
        raise SystemExit("--repeat runs variants in processes of their own; --interleave in one")
    results = []
    for run, variant in enumerate([None] if args.interleave
                                  else args.variants * max(1, args.repeat)):
        cmd = [sys.executable, "-m", "chronicals_fx.bench",
               "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--lr", str(args.lr),
               "--lora", str(args.lora), "--layers", str(args.layers)]
        cmd += ["--autocast"] if args.autocast else []
        cmd += ["--pin-cpus", args.pin_cpus] if args.pin_cpus else []
        cmd += (["--interleave", str(args.interleave), "--variants", *args.variants]
                if variant is None else ["--variant", variant])
        if args.passes is not None:
            cmd += ["--passes", *args.passes]
        variant = variant or "interleaved: " + " ".join(args.variants)
        attempt = f"_run{run // len(args.variants) + 1}" if args.repeat > 1 else ""
        log = os.path.join(log_dir(args.json), f"train_{file_safe(variant)}{attempt}.log")
        # the worker's stdout passes through: its progress lines show as they come
        worker = spawn_worker(cmd, log, show_stdout=True)
        if worker.error:
            print(f"{variant}: failed ({worker.log}): {worker.error}", flush=True)
            results.append({"variant": variant, "error": worker.error})
            _save(args, header, results)
            continue
        got = worker.result
        for r in got if isinstance(got, list) else [got]:
            results.append(r)
            print(f"{r['variant']}: {r['tokens_per_s']:.0f} tok/s, {r['peak_gib']:.1f} GiB, "
                  f"loss {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}, min grad norm "
                  f"{min(r['grad_norms']):.3f}, counts {r['counts']}{workload.allocator_note(r)}"
                  f"{workload.host_note(r)}", flush=True)
        _save(args, header, results)

    print(summary_table(results))
    if torch.cuda.is_available():
        for r in results:
            note = "error" not in r and workload.host_bound_note(r)
            if note:
                print(note)
    return 0


def cpu_list(text: str) -> set[int]:
    """CPU numbers from a list like "0-3,8" (taskset's -c syntax)."""
    cpus = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _save(args, header: str, results: list[dict]) -> None:
    """Written after every variant: a run cut off at its time limit keeps what it measured."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "args": vars(args), "results": results}, f, indent=1)


def merged_runs(results: list[dict]) -> list[dict]:
    """One record per variant, in first-seen order: a single run as it is; several (``--repeat``)
    with mean tokens/s and its range (``tokens_per_s_range``), the median step of all their
    steps, J a step and average W over all their timed steps, the largest peak, the smallest grad norm, the first run's losses, and every run's
    losses under ``runs_losses`` (all of them are checked against eager's). A failed run is not
    averaged away: it is a problem of the variant's record (or the record, if none ran)."""
    import math
    import statistics

    from chronicals_fx.workload import (energy_figures, mean_of_numbers, median_of_numbers,
                                        timed_values)

    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    out = []
    for runs in by_variant.values():
        ok = [r for r in runs if "error" not in r]
        failed = [r for r in runs if "error" in r]
        if not ok:
            out.append(failed[0] if len(failed) == 1 else
                       {**failed[0], "error": f"all {len(failed)} runs failed: {failed[0]['error']}"})
            continue
        problems = sorted({p for r in ok for p in r["problems"]})
        problems += [f"{len(failed)} of {len(runs)} runs failed: {failed[0]['error']}"] if failed else []
        if len(ok) == 1:
            out.append({**ok[0], "problems": problems})
            continue
        tps = [r["tokens_per_s"] for r in ok]

        def all_timed(key: str) -> list:
            return [v for r in ok for v in timed_values(r, key)]

        def median_of_timed(key: str) -> float:
            return median_of_numbers(all_timed(key))

        joules, watts, resolution = energy_figures(all_timed("energy_j"), all_timed("step_ms"))

        out.append({**ok[0], "tokens_per_s": statistics.fmean(tps),
                    "tokens_per_s_range": (min(tps), max(tps)),
                    "median_step_ms": median_of_timed("step_ms"),
                    "median_host_ms": median_of_timed("host_ms"),
                    "median_sm_mhz": median_of_timed("sm_mhz"),
                    "median_power_w": median_of_timed("power_w"),
                    "power_capped_share": mean_of_numbers(all_timed("power_capped")),
                    "mean_gc_ms": statistics.fmean(r.get("mean_gc_ms", math.nan) for r in ok),
                    "energy_j_per_step": joules, "avg_power_w": watts,
                    "energy_resolution_j": resolution,
                    "peak_gib": max(r["peak_gib"] for r in ok),
                    "min_grad_norm": min(r["min_grad_norm"] for r in ok),
                    "problems": problems, "runs_losses": [r["losses"] for r in ok]})
    return out


def summary_table(results: list[dict]) -> str:
    import math

    from chronicals_fx.workload import energy_cell

    results = merged_runs(results)
    ok = {r["variant"]: r for r in results if "error" not in r}
    compile_tps = ok.get("compile", {}).get("tokens_per_s")
    eager_losses = ok.get("eager", {}).get("losses")
    headers = ("variant", "tok/s", "step ms", "host ms", "SM MHz", "W", "cap %", "J/step",
               "avg W", "GC ms", "peak GiB", "loss first→last", "min grad norm",
               "max |Δloss| vs eager", "vs compile", "proof")
    rows = []
    for r in results:
        if "error" in r:     # the error in the last column, the others empty
            rows.append((r["variant"], "failed", *[""] * (len(headers) - 3), r["error"][:60]))
            continue
        gap = (max(abs(a - b) for losses in r.get("runs_losses", [r["losses"]])
                   for a, b in zip(losses, eager_losses))
               if eager_losses else float("nan"))
        tps = f"{r['tokens_per_s']:,.0f}"
        if "tokens_per_s_range" in r:
            low, high = r["tokens_per_s_range"]
            tps += f" ({low:,.0f}–{high:,.0f}, {len(r['runs_losses'])} runs)"
        rows.append((r["variant"], tps, f"{r['median_step_ms']:.1f}",
                     f"{r.get('median_host_ms', float('nan')):.1f}",
                     f"{r.get('median_sm_mhz', float('nan')):.0f}",
                     f"{r.get('median_power_w', float('nan')):.0f}",
                     f"{100 * r.get('power_capped_share', math.nan):.0f}",
                     energy_cell(r.get("energy_j_per_step", math.nan),
                                 r.get("energy_resolution_j", math.nan)),
                     f"{r.get('avg_power_w', float('nan')):.0f}",
                     f"{r.get('mean_gc_ms', float('nan')):.1f}", f"{r['peak_gib']:.1f}",
                     f"{r['losses'][0]:.3f}→{r['losses'][-1]:.3f}",
                     f"{r['min_grad_norm']:.3f}", f"{gap:.3f}",
                     f"{r['tokens_per_s'] / compile_tps:.3f}x" if compile_tps else "",
                     "; ".join(r["problems"]) or "trained"))
    # host ms: the median time to enqueue a step (close to step ms: the host sets the pace);
    # SM MHz, W: the GPU's clock and power draw while the steps ran (gpu_clock.py; nan without
    # nvidia-smi). W at the card's limit with the clock below its maximum: the step is
    # power-bound; W low with the clock at its maximum: the GPU waited (on the host, mostly).
    # J/step, avg W: the GPU's energy a timed step (mean; sync to sync) and that energy over
    # the steps' time, from NVML's cumulative energy counter (gpu_energy.py; nan without it),
    # ± its resolution (the counter moves in increments: workload.energy_figures): at a power
    # cap, two variants' J/step compare their work where their clocks differ.
    # GC ms: Python's garbage collector inside a step, mean over the timed steps (host time).
    # cap %: the share of the clock samples inside the timed steps in which the driver held
    # the clock down for power (its clock-event reasons: SW power cap, HW power brake). On the
    # H200s of session 24 it read 100 for every compiled variant, even at 548 W and 1935 MHz,
    # and 0–50 for eager: a flag of any hold-down, not of how much; the SM clock says that.
    return tabulate(rows, headers=headers)


if __name__ == "__main__":
    raise SystemExit(main())
