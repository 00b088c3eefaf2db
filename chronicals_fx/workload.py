"""What the demo and the end-to-end benchmark train: an embedded corpus, model shapes, and a
measured training loop whose every speed figure carries its proof of training.

The corpus is the Python standard library's own source text (it ships with every Python, so
nothing is downloaded), read as bytes: token ids 0–255, every one a real token, no padding.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

# Model shapes by name. Vocabulary sizes are the real ones: the lm_head + loss cost depends on
# them even though the byte corpus only uses ids 0–255.
MODEL_SPECS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(family="Qwen2Config", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "llama-3-8b": dict(family="LlamaConfig", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
    # small enough to train on a CPU in seconds, same structure as the real ones
    "tiny-llama": dict(family="LlamaConfig", vocab_size=512, hidden_size=128,
                       intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=False, rms_norm_eps=1e-6),
}


def build_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0, attn_implementation: str = "sdpa", **overrides) -> nn.Module:
    """A randomly initialised causal LM of a named shape (no download)."""
    import transformers

    if spec not in MODEL_SPECS:
        raise ValueError(f"unknown model spec {spec!r}; choose from {sorted(MODEL_SPECS)}")
    fields = dict(MODEL_SPECS[spec])
    config = getattr(transformers, fields.pop("family"))(**{**fields, **overrides})
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Hugging Face activation checkpointing of every layer, non-reentrant (what Dynamo traces
    as a checkpointed region). ``activation_checkpointing_enable`` where transformers has it,
    else the older ``gradient_checkpointing_enable``."""
    model.config.use_cache = False
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def corpus_bytes(limit: int = 8 << 20) -> bytes:
    """Up to ``limit`` bytes of the standard library's .py sources, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if total == 0:
        raise RuntimeError(f"no Python sources found under {root}")
    return b"".join(chunks)[:limit]


def byte_batches(batch_size: int, seq_len: int, device: str = "cpu",
                 limit: int = 8 << 20) -> Iterator[dict]:
    """Endless batches of consecutive corpus windows: ``input_ids`` = ``labels`` [B, T].

    The model shifts labels itself (HF convention), so every position is a real token.
    """
    data = torch.frombuffer(bytearray(corpus_bytes(limit)), dtype=torch.uint8).long()
    window = batch_size * seq_len
    if data.numel() < window:
        raise ValueError(f"corpus has {data.numel()} bytes, a batch needs {window}")
    offset = 0
    while True:
        if offset + window > data.numel():
            offset = 0
        ids = data[offset:offset + window].view(batch_size, seq_len).to(device)
        offset += window
        yield {"input_ids": ids, "labels": ids}


@dataclass
class TrainStats:
    """One training run: per-step loss, grad norm and time; tokens are real tokens only."""

    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    # Time to enqueue the step's work (until the optimizer step returns, before the final sync).
    # step_ms − host_ms is how far the GPU trails the host at the step's end: near zero, the
    # host sets the pace. (CUDA's launch queue holds about a thousand launches, so a GPU-bound
    # step's host time includes waits for queue slots: the gap is then the queued work's time.)
    host_ms: list[float] = field(default_factory=list)
    # The GPU's SM clock and power while each step ran (NaN where not sampled: gpu_clock.py).
    sm_mhz: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)
    # The share of each step's samples with the clock held down for power (the driver's
    # clock-event reasons: gpu_clock.ClockSampler.power_capped; NaN where not sampled).
    power_capped: list[float] = field(default_factory=list)
    # The GPU's energy between each step's two syncs, in J, from NVML's cumulative counter
    # (gpu_energy.py; NaN where not read): what a power-capped step costs, every joule counted.
    energy_j: list[float] = field(default_factory=list)
    # cudaMalloc + cudaFree calls of the caching allocator inside each step (CUDA only): past
    # the first steps they should be 0; each one may synchronize the device, which makes a
    # step's host time equal its step time for a reason other than a full launch queue.
    device_allocs: list[int] = field(default_factory=list)
    # Time Python's cyclic garbage collector ran inside each step (either thread): a process
    # holding many objects (compiled graphs and their metadata) pays for them in full
    # collections, on the host, in the middle of a step.
    gc_ms: list[float] = field(default_factory=list)
    # Involuntary context switches of the process's threads inside each step (the OS took a CPU
    # away from a runnable thread), and the CPUs the process may run on: host time that differs
    # between processes of the same code for where and with whom the OS runs them.
    preempted: list[int] = field(default_factory=list)
    cpus: int = 0
    tokens_per_step: int = 0
    warmup_steps: int = 0
    peak_gib: float = 0.0

    @property
    def timed_ms(self) -> list[float]:
        return self.step_ms[self.warmup_steps:]

    @property
    def median_step_ms(self) -> float:
        return statistics.median(self.timed_ms) if self.timed_ms else float("nan")

    @property
    def median_host_ms(self) -> float:
        return median_of_numbers(self.host_ms[self.warmup_steps:])

    @property
    def median_sm_mhz(self) -> float:
        return median_of_numbers(self.sm_mhz[self.warmup_steps:])

    @property
    def mean_gc_ms(self) -> float:
        timed = self.gc_ms[self.warmup_steps:]
        return statistics.fmean(timed) if timed else float("nan")

    @property
    def median_power_w(self) -> float:
        return median_of_numbers(self.power_w[self.warmup_steps:])

    @property
    def power_capped_share(self) -> float:
        """The timed steps' mean share of samples held down for power (NaN: not sampled)."""
        return mean_of_numbers(self.power_capped[self.warmup_steps:])

    def energy_summary(self) -> dict[str, float]:
        """The timed steps' J a step, average W and the J a step's ± (:func:`energy_figures`),
        under the keys a result dict has them."""
        joules, watts, resolution = energy_figures(self.energy_j[self.warmup_steps:],
                                                   self.timed_ms)
        return {"energy_j_per_step": joules, "avg_power_w": watts,
                "energy_resolution_j": resolution}

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_step_ms * 1000

    @property
    def min_grad_norm(self) -> float:
        return min(self.grad_norms)

    def proof_of_training(self) -> list[str]:
        """Problems that would make a speed figure meaningless (empty when it trained)."""
        problems = []
        if not all(math.isfinite(x) for x in self.losses):
            problems.append("non-finite loss")
        if not self.grad_norms or self.min_grad_norm <= 0 or not math.isfinite(self.min_grad_norm):
            problems.append(f"grad norm {self.min_grad_norm if self.grad_norms else 'missing'}")
        if self.tokens_per_step <= 0:
            problems.append("no real tokens")
        return problems

    def to_dict(self) -> dict:
        return {**asdict(self), "median_step_ms": self.median_step_ms,
                "median_host_ms": self.median_host_ms, "median_sm_mhz": self.median_sm_mhz,
                "median_power_w": self.median_power_w, "mean_gc_ms": self.mean_gc_ms,
                "power_capped_share": self.power_capped_share, **self.energy_summary(),
                "tokens_per_s": self.tokens_per_s, "min_grad_norm": self.min_grad_norm}


def _involuntary_switches() -> int:
    """The process's involuntary context switches so far (0 where the OS doesn't count them)."""
    try:
        import resource
    except ImportError:          # not a Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def _usable_cpus() -> int:
    affinity = getattr(os, "sched_getaffinity", None)     # Linux
    return len(affinity(0)) if affinity else os.cpu_count() or 0


def timed_values(result: dict, key: str) -> list:
    """A per-step list of a result dict (:meth:`TrainStats.to_dict`) without its warm-up steps."""
    return result.get(key, [])[result.get("warmup_steps", 0):]


def host_note(result: dict) -> str:
    """', P involuntary context switches a step on C CPUs' (timed steps) for a result dict of
    :meth:`TrainStats.to_dict`; '' where they were not recorded."""
    timed = timed_values(result, "preempted")
    if not timed:
        return ""
    cpus = result.get("cpus", 0)
    return (f", {statistics.fmean(timed):.0f} involuntary context switches a step on "
            f"{cpus} CPU{'' if cpus == 1 else 's'}")


# A step whose host enqueue time is at least this share of the step is paced by the host: the
# GPU waits between kernels (H200, session 24: host 73.8 of a 74.5 ms step, 0.918× torch.compile,
# where CUDA graphs ran 1.167×).
HOST_BOUND_SHARE = 0.9


def host_bound_note(result: dict) -> str:
    """A line for a GPU run's result dict (:meth:`TrainStats.to_dict`) whose median host time is
    at least HOST_BOUND_SHARE of its median step: its tokens/s is the host's, not the kernels'.
    '' otherwise. (On a CPU every step is host time: callers ask only for GPU runs.)"""
    host, step = result.get("median_host_ms"), result.get("median_step_ms")
    if not host or not step or host < HOST_BOUND_SHARE * step:
        return ""
    # the advice where it applies: our backend without CUDA graphs (eager and Liger have no
    # graphs to replay; torch.compile's own CUDA graphs break a loop that keeps its losses)
    variant = result["variant"]
    advice = ("; CUDA graphs (mode=\"reduce-overhead\") take the launches off the host"
              if variant.startswith("chronicals") and "reduce-overhead" not in variant else "")
    return (f"{variant}: host-bound — {host:.1f} ms of host time a {step:.1f} ms step "
            f"(the GPU waits on the host, so this figure is the host's){advice}")


def allocator_note(result: dict) -> str:
    """', N cudaMalloc/cudaFree in the timed steps' for a result dict (:meth:`TrainStats.to_dict`)
    whose timed steps called the driver's allocator; '' when none did."""
    calls = sum(timed_values(result, "device_allocs"))
    return f", {calls} cudaMalloc/cudaFree in the timed steps" if calls else ""


def energy_figures(energy_j: list[float], step_ms: list[float]) -> tuple[float, float, float]:
    """(J a step, average W, ± J a step) of timed steps: their energy's mean, their energy over
    their time (the steps' own spans, sync to sync), and the mean's resolution. NVML's counter
    moves in increments (H200, session 23: one of ~65–70 J about every 100 ms, so a 60 ms
    step read 0 or one increment): the sum over the steps is off by at least one increment,
    which the largest step's reading gives, so ± is that over the number of steps (12 steps of
    60 ms: ±6 J, a tenth of a step). A floor, not a bound: two 12-step runs of one variant gave
    53.9 and 39.2 J a step there. Take ~100 timed steps or more. NaN where a step's energy is
    (no counter) or there is no step: a figure over some of the steps would not be the run's."""
    nan = (math.nan, math.nan, math.nan)
    if not energy_j or len(energy_j) != len(step_ms) or any(math.isnan(e) for e in energy_j):
        return nan
    total, seconds = math.fsum(energy_j), math.fsum(step_ms) / 1000
    steps = len(energy_j)
    return (total / steps, total / seconds if seconds > 0 else math.nan,
            max(energy_j) / steps)


def energy_cell(joules: float, resolution: float) -> str:
    """A table's J/step: "44.1±5.8" (nan without a counter)."""
    return "nan" if math.isnan(joules) else f"{joules:.1f}±{resolution:.1f}"


def mean_of_numbers(values: list[float]) -> float:
    """The mean of the values that are numbers (NaN when none is)."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def median_of_numbers(values: list[float]) -> float:
    """The median of the values that are numbers (NaN when none is)."""
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


class _GcTime:
    """Seconds Python's garbage collector has spent since this was registered
    (``gc.callbacks``: called with "start" and "stop" around each collection, under the GIL)."""

    def __init__(self):
        self.total_s = 0.0
        self._start: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.total_s += time.perf_counter() - self._start
            self._start = None


def gc_time() -> _GcTime:
    """The process's one :class:`_GcTime`, registered on first use."""
    for callback in gc.callbacks:
        if isinstance(callback, _GcTime):
            return callback
    clock = _GcTime()
    gc.callbacks.append(clock)
    return clock


class Trainer:
    """The training loop one step at a time (what :func:`train` runs): AdamW (fused on CUDA),
    grad clipping; per-step time, loss and grad norm.

    Device values are collected without syncing inside the step and read once in
    :meth:`stats`, so the loop adds no host synchronization of its own beyond the per-step
    timer. Steps of several trainers may be interleaved (``chronicals bench --interleave``):
    each step is between two syncs, so its time and energy are its own.

    ``energy``: an :class:`~chronicals_fx.gpu_energy.EnergyCounter` of the GPU the steps run
    on, read right after the sync before each step and right after the one that ends it:
    outside the timed span, so the readings cost the step's time nothing (the energy includes
    the idle GPU's draw while a reading runs, a call into the driver, short against a step;
    not measured yet). The counter advances in increments, so one step's energy is rough and
    the sum over consecutive steps is the figure (gpu_energy.py). None: every step's is NaN.
    """

    def __init__(self, model: nn.Module, lr: float = 3e-4, max_grad_norm: float = 1.0,
                 optimizer: torch.optim.Optimizer | None = None,
                 autocast: torch.dtype | None = None, energy=None):
        self.model = model
        self.energy = energy
        # mixed precision as HF Trainer's bf16=True/fp16=True: the forward under torch.autocast
        self.autocast = autocast
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.device = self.params[0].device
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=lr,
                                                        fused=self.device.type == "cuda")
        self.max_grad_norm = max_grad_norm
        self.step_ms: list[float] = []
        self.host_ms: list[float] = []
        self.spans: list[tuple[float, float]] = []  # each step's (start, end), perf_counter
        self.energy_j: list[float] = []
        self.device_allocs: list[int] = []
        self.gc_ms: list[float] = []
        self._gc = gc_time()
        self.preempted: list[int] = []
        self.tokens_per_step = 0
        # each step's loss and grad norm as device values, read once in stats(): the proof of
        # training without a host sync inside the loop
        self.losses: list[torch.Tensor] = []
        self.grad_norms: list[torch.Tensor] = []
        model.train()

    def step(self, batch: dict) -> None:
        """One timed step: :meth:`enqueue` between two syncs."""
        allocs = _device_alloc_calls(self.device)
        _sync(self.device)
        gc_before = self._gc.total_s
        switches = _involuntary_switches()
        joules_before = self._joules()
        start = time.perf_counter()
        self.enqueue(batch)
        enqueued = time.perf_counter()
        _sync(self.device)
        end = time.perf_counter()
        joules_after = self._joules()
        self.energy_j.append(math.nan if joules_before is None or joules_after is None
                             else joules_after - joules_before)
        self.gc_ms.append((self._gc.total_s - gc_before) * 1000)
        self.preempted.append(_involuntary_switches() - switches)
        if allocs is not None:
            self.device_allocs.append(_device_alloc_calls(self.device) - allocs)
        self.host_ms.append((enqueued - start) * 1000)
        self.step_ms.append((end - start) * 1000)
        self.spans.append((start, end))
        self.tokens_per_step = _real_tokens(batch)

    def _joules(self) -> float | None:
        return self.energy.joules() if self.energy is not None else None

    def enqueue(self, batch: dict) -> None:
        """One training step on ``batch``, launched without a host sync or a timer of its own
        (benchmarks/profile_step.py runs steps back to back this way)."""
        with torch.autocast(self.device.type, dtype=self.autocast,
                            enabled=self.autocast is not None):
            loss = self.model(**batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor of the ranks' partial norms
            norm = norm.full_tensor()
        self.grad_norms.append(norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.detach())

    def stats(self, warmup_steps: int, clock=None) -> TrainStats:
        """The steps so far, the first ``warmup_steps`` untimed; peak memory is the device's
        (the process's, where several trainers share it). ``clock``: a
        :class:`~chronicals_fx.gpu_clock.ClockSampler` that ran during the steps."""
        stats = TrainStats(step_ms=list(self.step_ms), host_ms=list(self.host_ms),
                           energy_j=list(self.energy_j),
                           device_allocs=list(self.device_allocs), gc_ms=list(self.gc_ms),
                           preempted=list(self.preempted), cpus=_usable_cpus(),
                           tokens_per_step=self.tokens_per_step, warmup_steps=warmup_steps)
        if clock is not None:
            during = [clock.during(start, end) for start, end in self.spans]
            stats.sm_mhz = [mhz for mhz, _ in during]
            stats.power_w = [watts for _, watts in during]
            stats.power_capped = [clock.power_capped(start, end) for start, end in self.spans]
        stats.losses = [float(x) for x in torch.stack(self.losses).float().cpu()]
        stats.grad_norms = [float(x) for x in torch.stack(self.grad_norms).float().cpu()]
        if self.device.type == "cuda":
            stats.peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        return stats


def train(model: nn.Module, batches: Iterator[dict], steps: int, lr: float = 3e-4,
          warmup_steps: int = 2, max_grad_norm: float = 1.0, progress: str | None = None,
          optimizer: torch.optim.Optimizer | None = None, clock=None,
          autocast: torch.dtype | None = None, energy=None) -> TrainStats:
    """``steps`` steps of a :class:`Trainer` on ``batches``; the first ``warmup_steps`` untimed
    (``clock``: as :meth:`Trainer.stats`; ``autocast``, ``energy``: as :class:`Trainer`)."""
    trainer = Trainer(model, lr=lr, max_grad_norm=max_grad_norm, optimizer=optimizer,
                      autocast=autocast, energy=energy)
    iterator = range(steps)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=progress, unit="step", leave=False)
    for _ in iterator:
        trainer.step(next(batches))
    return trainer.stats(warmup_steps, clock)


def _real_tokens(batch: dict) -> int:
    """Tokens that are not padding: all of them unless an attention mask says otherwise."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _device_alloc_calls(device: torch.device) -> int | None:
    """cudaMalloc + cudaFree calls made by the caching allocator so far (None off CUDA)."""
    if device.type != "cuda":
        return None
    stats = torch.cuda.memory_stats(device)
    return stats.get("num_device_alloc", 0) + stats.get("num_device_free", 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# What the example scripts (examples/*.py) report, one format for all of them, so that
# benchmarks/examples.py can compare the same script run three ways.

EXAMPLE_PREFIX = "CHRONICALS_EXAMPLE "

EXAMPLE_SIZES = {  # --size name -> (model shape, dtype, batch, seq, steps, warmup)
    "tiny": ("tiny-llama", torch.float32, 4, 128, 12, 3),
    "qwen0.5b": ("qwen2.5-0.5b", torch.bfloat16, 8, 1024, 25, 5),
}


def example_parser(compile_help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """The flags every example script takes: --size (of :data:`EXAMPLE_SIZES`), --steps,
    --warmup, --batch and --seq (overriding the size's), and --compile (its own torch.compile
    switch, described by ``compile_help``)."""
    p = argparse.ArgumentParser(epilog=epilog)
    p.add_argument("--size", choices=EXAMPLE_SIZES, default="tiny")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int, help="untimed first steps")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--compile", action="store_true", help=compile_help)
    return p


class ExampleMeter:
    """Per-step loss, grad norm, real tokens and time of an example script's training run.

    The script calls :meth:`step_done` after each optimizer step (with the real tokens of that
    step: labels that are not ``-100``, or non-padding inputs) and :meth:`log` with that step's
    loss. Throughput counts only the steps after the first ``warmup`` (compilation happens
    there). :meth:`finish` prints one machine-readable line: ``CHRONICALS_EXAMPLE {json}``.
    """

    def __init__(self, warmup: int = 3):
        self.warmup = max(1, warmup)
        self.start = time.perf_counter()
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []

    def step_done(self, real_tokens: int) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.tokens.append(int(real_tokens))

    def log(self, loss: float, grad_norm: float | None = None) -> None:
        self.losses.append(float(loss))
        if grad_norm is not None:
            self.grad_norms.append(float(grad_norm))
        norm = f"  grad_norm {float(grad_norm):.4f}" if grad_norm is not None else ""
        print(f"step {len(self.losses) - 1:3d}  loss {float(loss):.4f}{norm}", flush=True)

    def result(self, **extra) -> dict:
        timed = len(self.times) - self.warmup
        seconds = self.times[-1] - self.times[self.warmup - 1] if timed > 0 else float("nan")
        tokens = sum(self.tokens[self.warmup:])
        return {"tokens_per_s": tokens / seconds if timed > 0 else None,
                "timed_steps": max(timed, 0), "timed_s": seconds if timed > 0 else None,
                "real_tokens": tokens, "real_tokens_per_step": self.tokens,
                "warmup_steps": self.warmup, "losses": self.losses,
                "min_grad_norm": min(self.grad_norms) if self.grad_norms else None,
                "total_s": time.perf_counter() - self.start, **extra}

    def finish(self, **extra) -> dict:
        result = self.result(**extra)
        if result["tokens_per_s"] is not None:
            print(f"{result['timed_steps']} timed steps: {result['tokens_per_s']:,.0f} real tokens/s")
        print(EXAMPLE_PREFIX + json.dumps(result), flush=True)
        return result


def parse_example_output(text: str) -> dict | None:
    """The last ``CHRONICALS_EXAMPLE`` result printed in ``text``, or None."""
    found = None
    for line in text.splitlines():
        if line.startswith(EXAMPLE_PREFIX):
            found = json.loads(line[len(EXAMPLE_PREFIX):])
    return found


def example_trainer_callback(meter: ExampleMeter):
    """A ``transformers.TrainerCallback`` feeding ``meter`` (HF ``Trainer`` and TRL alike).

    Loss and grad norm come from the Trainer's own logs (``logging_steps=1``); real tokens from
    ``state.num_input_tokens_seen`` (``include_num_input_tokens_seen`` on).
    """
    import transformers

    class _Callback(transformers.TrainerCallback):
        seen = 0

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_done(state.num_input_tokens_seen - self.seen)
            self.seen = state.num_input_tokens_seen

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                meter.log(logs["loss"], logs.get("grad_norm"))

    return _Callback()
