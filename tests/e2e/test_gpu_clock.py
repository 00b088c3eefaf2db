"""The benchmark's GPU-clock sampler (chronicals_fx/gpu_clock.py) and the per-step figures the
bench derives from it, without a GPU: a stand-in ``nvidia-smi`` on PATH prints the samples."""

import math
import os
import stat
import time

import pytest

from chronicals_fx.gpu_clock import ClockSampler, parse_sample


def test_parse_sample_takes_only_well_formed_lines():
    assert parse_sample("1980, 512.31\n") == (1980.0, 512.31, None)
    assert parse_sample("1755, 699.8, 0x0000000000000004\n") == (1755.0, 699.8, 4)
    assert parse_sample("1755, 699.8, [N/A]") == (1755.0, 699.8, None)   # a sample, no reasons
    assert parse_sample("clocks.current.sm [MHz], power.draw [W]") is None   # a header
    assert parse_sample("1755, [N/A]") is None
    assert parse_sample("No devices were found") is None


def test_during_takes_the_median_of_the_samples_inside_the_span():
    clock = ClockSampler()
    clock.samples = [(1.0, 1980.0, 600.0), (2.0, 1700.0, 700.0), (3.0, 1750.0, 690.0),
                     (4.0, 1980.0, 400.0)]
    assert clock.during(1.5, 3.5) == (1725.0, 695.0)
    assert all(math.isnan(v) for v in clock.during(0.0, 0.5))   # no sample in the span


@pytest.fixture
def fake_nvidia_smi(tmp_path, monkeypatch):
    """An ``nvidia-smi`` that checks it was asked for the sampler's query (the instant power)
    and prints one sample, or, in loop mode, a sample every 10 ms until it is terminated."""
    return _fake_smi(tmp_path, monkeypatch, "clocks.sm,power.draw.instant")


def _fake_smi(tmp_path, monkeypatch, fields, line="1830, 650.5"):
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      f'case "$*" in *--query-gpu={fields}\\ *) ;; *) echo "bad field"; exit 2;; esac\n'
                      f'case "$*" in *--loop-ms*) ;; *) echo "{line}"; exit 0;; esac\n'
                      'echo "clocks.current.sm [MHz], power.draw [W]"\n'
                      f"while true; do echo '{line}'; sleep 0.01; done\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    return script


def test_sampler_reads_the_loop_and_stops_it(fake_nvidia_smi):
    with ClockSampler("GPU-0") as clock:
        start = time.perf_counter()
        deadline = start + 10
        while len(clock.samples) < 3 and time.perf_counter() < deadline:
            time.sleep(0.01)
        end = time.perf_counter()
    assert len(clock.samples) >= 3                       # the header line is not a sample
    assert clock.during(start, end) == (1830.0, 650.5)
    assert clock._process.poll() is not None              # the loop ended with the block


def test_sampler_reads_the_clock_event_reasons(tmp_path, monkeypatch):
    """A driver with the clock-event reasons: the sampler asks for them and gives each span the
    share of its samples held down for power (SW power cap 0x4, HW power brake 0x80), not for
    other reasons (0x1: idle)."""
    from chronicals_fx.gpu_clock import QUERIES

    _fake_smi(tmp_path, monkeypatch, QUERIES[0], line="1755, 699.8, 0x0000000000000004")
    with ClockSampler() as clock:
        start = time.perf_counter()
        deadline = start + 10
        while len(clock.reasons) < 2 and time.perf_counter() < deadline:
            time.sleep(0.01)
        end = time.perf_counter()
    assert f"--query-gpu={QUERIES[0]}" in clock.command
    assert clock.during(start, end) == (1755.0, 699.8)
    assert clock.power_capped(start, end) == 1.0
    clock.reasons = [(1.0, 0x4), (2.0, 0x1), (3.0, 0x80), (4.0, 0x0)]
    assert clock.power_capped(0.5, 4.5) == 0.5
    assert math.isnan(clock.power_capped(5.0, 6.0))           # no sample in the span


def test_sampler_falls_back_to_the_average_power(tmp_path, monkeypatch):
    """A driver without the instant power field: the sampler asks for power.draw instead."""
    _fake_smi(tmp_path, monkeypatch, "clocks.sm,power.draw")
    with ClockSampler() as clock:
        deadline = time.perf_counter() + 10
        while not clock.samples and time.perf_counter() < deadline:
            time.sleep(0.01)
    assert "--query-gpu=clocks.sm,power.draw" in clock.command
    assert clock.samples and clock.samples[0][1:] == (1830.0, 650.5)


def test_sampler_without_nvidia_smi_records_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))            # no nvidia-smi here
    with ClockSampler() as clock:
        pass
    assert clock.samples == []
    assert all(math.isnan(v) for v in clock.during(0.0, time.perf_counter()))


def test_trainer_gives_each_step_its_clock_and_host_time():
    """Trainer.stats maps each step's span to the sampler's figures; host_ms (the time to
    enqueue the step) is recorded for every step and never exceeds the step's time."""
    import torch

    from chronicals_fx.workload import Trainer
    from tests.tiny_models import SquareLoss

    torch.manual_seed(0)
    trainer = Trainer(SquareLoss())
    for _ in range(3):
        trainer.step({"input_ids": torch.randn(2, 4), "labels": torch.zeros(2)})
    clock = ClockSampler()
    (s0, e0), (s1, e1), _ = trainer.spans
    clock.samples = [((s0 + e0) / 2, 1900.0, 500.0), ((s1 + e1) / 2, 1600.0, 690.0)]
    stats = trainer.stats(warmup_steps=1, clock=clock)
    assert stats.sm_mhz[:2] == [1900.0, 1600.0] and math.isnan(stats.sm_mhz[2])
    assert stats.power_w[:2] == [500.0, 690.0]
    assert stats.median_sm_mhz == 1600.0                  # timed steps only, NaN skipped
    assert stats.median_power_w == 690.0
    assert all(math.isnan(v) for v in stats.power_capped)   # the samples had no reasons
    clock.reasons = [((s1 + e1) / 2, 0x4), ((s0 + e0) / 2, 0x0)]
    stats = trainer.stats(warmup_steps=1, clock=clock)
    assert stats.power_capped[:2] == [0.0, 1.0] and math.isnan(stats.power_capped[2])
    assert stats.power_capped_share == 1.0                 # timed steps only, NaN skipped
    assert len(stats.host_ms) == 3
    assert all(0 < h <= s for h, s in zip(stats.host_ms, stats.step_ms))
    assert stats.device_allocs == []                       # CPU: no driver allocator to count
    assert len(stats.gc_ms) == 3 and all(ms >= 0 for ms in stats.gc_ms)
    assert len(stats.preempted) == 3 and all(n >= 0 for n in stats.preempted)
    assert stats.cpus >= 1


def test_allocator_note_counts_only_the_timed_steps():
    from chronicals_fx.workload import allocator_note

    assert allocator_note({"device_allocs": [40, 0, 0], "warmup_steps": 1}) == ""
    assert (allocator_note({"device_allocs": [40, 2, 1], "warmup_steps": 1})
            == ", 3 cudaMalloc/cudaFree in the timed steps")
    assert allocator_note({}) == ""                        # a result from before the field


def test_a_collection_inside_a_step_is_timed():
    """gc.callbacks time every collection; a step's gc_ms is what ran between its two syncs."""
    import gc

    import torch

    from chronicals_fx.workload import Trainer
    from tests.tiny_models import SquareLoss

    class Collecting(SquareLoss):
        def __init__(self, collect):
            super().__init__()
            self.collect = collect

        def forward(self, input_ids, labels):
            if self.collect:
                junk = [[] for _ in range(200_000)]
                for a, b in zip(junk, junk[1:]):
                    a.append(b)
                    b.append(a)                 # cycles: only the collector frees them
                del junk, a, b
                gc.collect()
            return super().forward(input_ids, labels)

    batch = {"input_ids": torch.randn(2, 4), "labels": torch.zeros(2)}
    quiet, busy = Trainer(Collecting(False)), Trainer(Collecting(True))
    gc.disable()
    try:
        quiet.step(batch)
        busy.step(batch)
    finally:
        gc.enable()
    assert quiet.gc_ms == [0.0]
    assert busy.gc_ms[0] > 1.0


def test_bench_table_shows_the_power_capped_share():
    """bench's cap %: the timed steps' mean share of power-capped samples, over every run of a
    variant (--repeat), nan where the driver gave no reasons."""
    from chronicals_fx.bench import summary_table
    from chronicals_fx.workload import TrainStats

    def record(variant, capped):     # as TrainStats.to_dict gives it
        share = TrainStats(power_capped=capped, warmup_steps=1).power_capped_share
        return {"variant": variant, "tokens_per_s": 1000.0, "losses": [3.0, 2.0],
                "step_ms": [99.0, 50.0, 50.0], "warmup_steps": 1, "median_step_ms": 50.0,
                "peak_gib": 2.0, "min_grad_norm": 1.0, "problems": [], "counts": None,
                "power_capped": capped, "power_capped_share": share}

    table = summary_table([record("compile", [0.0, 0.5, 0.0]),
                           record("chronicals", [0.0, 1.0, 1.0]),
                           record("chronicals", [0.0, 0.5, math.nan]),   # --repeat
                           record("eager", [math.nan] * 3)])
    header, _, *rows = table.splitlines()
    column = header.index("cap %")
    cells = {row.split()[0]: row[column:column + 5].split()[0] for row in rows}
    assert cells == {"compile": "25", "chronicals": "83", "eager": "nan"}
