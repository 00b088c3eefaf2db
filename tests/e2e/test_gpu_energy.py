"""The GPU energy counter (chronicals_fx/gpu_energy.py) and the per-step energy the benchmarks
derive from it, without a GPU: a stand-in NVML library object, a stand-in counter."""

import ctypes
import math
import shutil
import subprocess
import types

import pytest
import torch

from chronicals_fx import gpu_energy
from chronicals_fx.gpu_energy import EnergyCounter, open_energy_counter

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6


class FakeNvml:
    """What ``ctypes.CDLL("libnvidia-ml.so.1")`` gives, for the calls the reader makes: the
    counter stands at ``millijoules``; each call's arguments are recorded."""

    def __init__(self, millijoules=0, init=0, handle=0, energy=0):
        self.millijoules, self.init_status = millijoules, init
        self.handle_status, self.energy_status = handle, energy
        self.calls = []

    def nvmlInit_v2(self):
        self.calls.append(("init",))
        return self.init_status

    def _handle(self, how, key, out):
        self.calls.append((how, key))
        out._obj.value = 0xD00D                  # the handle NVML would write
        return self.handle_status

    def nvmlDeviceGetHandleByIndex_v2(self, index, out):
        return self._handle("index", index.value, out)

    def nvmlDeviceGetHandleByUUID(self, uuid, out):
        return self._handle("uuid", uuid, out)

    def nvmlDeviceGetHandleByPciBusId_v2(self, bus_id, out):
        return self._handle("pci", bus_id, out)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle, out):
        self.calls.append(("energy", handle.value))
        if self.energy_status == 0:
            out._obj.value = self.millijoules
        return self.energy_status


def _with_library(monkeypatch, lib):
    monkeypatch.setattr(gpu_energy.ctypes, "CDLL", lambda name: lib)
    return lib


def test_no_library_no_counter(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(gpu_energy.ctypes, "CDLL", missing)
    assert open_energy_counter(0) is None
    assert open_energy_counter("GPU-5f2c") is None


def test_counter_reads_millijoules_as_joules(monkeypatch):
    lib = _with_library(monkeypatch, FakeNvml(millijoules=123_456))
    counter = open_energy_counter(3)
    assert counter is not None
    assert counter.joules() == 123.456
    lib.millijoules = 2**40 + 1                  # an unsigned 64-bit counter, past 32 bits
    assert counter.joules() == (2**40 + 1) / 1000
    assert lib.calls[:2] == [("init",), ("index", 3)]
    assert ("energy", 0xD00D) in lib.calls       # read through the handle the lookup gave


@pytest.mark.parametrize("gpu, how, key", [
    (1, "index", 1),
    ("GPU-5f2c1e7a-0000-1111-2222-333344445555", "uuid",
     b"GPU-5f2c1e7a-0000-1111-2222-333344445555"),
    ("00000000:19:00.0", "pci", b"00000000:19:00.0"),
])
def test_gpu_named_as_for_the_clock_sampler(monkeypatch, gpu, how, key):
    """The ids ClockSampler takes: the driver's index, a UUID, a PCI bus id."""
    lib = _with_library(monkeypatch, FakeNvml(millijoules=5000))
    assert open_energy_counter(gpu).joules() == 5.0
    assert lib.calls[1] == (how, key)


@pytest.mark.parametrize("failure", [
    {"init": 9},                                  # NVML_ERROR_DRIVER_NOT_LOADED
    {"handle": NVML_ERROR_NOT_FOUND},             # no such GPU
    {"energy": NVML_ERROR_NOT_SUPPORTED},         # a GPU without the counter (before Volta)
])
def test_an_error_code_means_no_counter(monkeypatch, failure):
    _with_library(monkeypatch, FakeNvml(millijoules=5000, **failure))
    assert open_energy_counter(0) is None


def test_a_library_without_the_calls_means_no_counter(monkeypatch):
    lib = FakeNvml()
    _with_library(monkeypatch, types.SimpleNamespace(      # no energy call (an old driver)
        nvmlInit_v2=lib.nvmlInit_v2,
        nvmlDeviceGetHandleByIndex_v2=lib.nvmlDeviceGetHandleByIndex_v2))
    assert open_energy_counter(0) is None
    assert lib.calls == [("init",), ("index", 0)]          # it got as far as the handle
    _with_library(monkeypatch, types.SimpleNamespace())    # not NVML at all
    assert open_energy_counter(0) is None


def test_a_reading_that_fails_later_is_none():
    lib = FakeNvml(millijoules=1000)
    counter = EnergyCounter(lib, ctypes.c_void_p(0xD00D))
    assert counter.joules() == 1.0
    lib.energy_status = 15                        # NVML_ERROR_GPU_IS_LOST
    assert counter.joules() is None


NVML_STUB = r"""
#include <string.h>
typedef struct nvmlDevice_st { int index; } *nvmlDevice_t;
static struct nvmlDevice_st devices[2] = {{0}, {1}};
static unsigned long long millijoules = 4294967296000ULL;   /* past 32 bits */
int nvmlInit_v2(void) { return 0; }
static int found(int i, nvmlDevice_t *device) { *device = &devices[i]; return 0; }
int nvmlDeviceGetHandleByIndex_v2(unsigned int i, nvmlDevice_t *device) {
    return i < 2 ? found(i, device) : 2; }
int nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device) {
    return strcmp(uuid, "GPU-0000") == 0 ? found(0, device) : 6; }
int nvmlDeviceGetHandleByPciBusId_v2(const char *bus, nvmlDevice_t *device) {
    return strcmp(bus, "00000000:19:00.0") == 0 ? found(0, device) : 6; }
/* GPU 1 has no counter; GPU 0's gains 1.5 J a reading */
int nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t device, unsigned long long *energy) {
    if (device->index != 0) return 3;
    millijoules += 1500; *energy = millijoules; return 0; }
"""


@pytest.fixture(scope="module")
def nvml_stub(tmp_path_factory):
    """A shared library with NVML's signatures (handles as pointers, the counter an unsigned
    64-bit integer), for the reader's ctypes calls as they go to the real one."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    directory = tmp_path_factory.mktemp("nvml")
    (directory / "nvml.c").write_text(NVML_STUB)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(directory / "libnvml_stub.so"),
                    str(directory / "nvml.c")], check=True)
    return str(directory / "libnvml_stub.so")


@pytest.mark.parametrize("gpu", [0, "GPU-0000", "00000000:19:00.0"])
def test_counter_through_a_c_library(nvml_stub, gpu):
    counter = open_energy_counter(gpu, library=nvml_stub)
    first, second = counter.joules(), counter.joules()
    assert second - first == pytest.approx(1.5)
    assert first >= 2**32                          # J: all 64 bits of the mJ counter came through


@pytest.mark.parametrize("gpu", [1, 7, "GPU-ffff", "00000000:3b:00.0"])
def test_no_counter_through_a_c_library(nvml_stub, gpu):
    """GPU 1 answers NOT_SUPPORTED; the others are not there."""
    assert open_energy_counter(gpu, library=nvml_stub) is None


class StepCounter:
    """A counter that gains ``per_step[i]`` J between the two readings around step i (the
    Trainer reads it once before and once after each step); None where the value is None."""

    def __init__(self, per_step):
        self.per_step, self.total, self.readings = iter(per_step), 1000.0, 0

    def joules(self):
        self.readings += 1
        if self.readings % 2 == 0:
            gained = next(self.per_step)
            if gained is None:
                return None
            self.total += gained
        return self.total


def _trained(counter, steps=3, warmup=1):
    from chronicals_fx.workload import Trainer
    from tests.tiny_models import SquareLoss

    trainer = Trainer(SquareLoss(), energy=counter)
    for _ in range(steps):
        trainer.step({"input_ids": torch.randn(2, 4), "labels": torch.zeros(2)})
    return trainer.stats(warmup_steps=warmup)


def test_trainer_gives_each_step_its_energy():
    """Each step's energy is the counter's gain between its two readings; J a step is the timed
    steps' mean, the average power their energy over their time."""
    counter = StepCounter([7.0, 20.0, 30.0])
    stats = _trained(counter)
    assert counter.readings == 6                  # one reading before, one after each step
    assert stats.energy_j == [7.0, 20.0, 30.0]
    energy = stats.energy_summary()
    assert energy["energy_j_per_step"] == 25.0    # the warm-up step's 7 J left out
    assert energy["avg_power_w"] == pytest.approx(50.0 / (sum(stats.step_ms[1:]) / 1000))
    record = stats.to_dict()
    assert record["energy_j"] == [7.0, 20.0, 30.0]
    assert record["energy_j_per_step"] == 25.0
    assert record["avg_power_w"] == energy["avg_power_w"]


def test_no_counter_or_a_failed_reading_is_nan():
    stats = _trained(None)
    assert len(stats.energy_j) == 3 and all(math.isnan(e) for e in stats.energy_j)
    energy = stats.energy_summary()
    assert math.isnan(energy["energy_j_per_step"]) and math.isnan(energy["avg_power_w"])
    # one timed step unread: a figure over the other steps would not be the run's
    stats = _trained(StepCounter([7.0, None, 30.0]))
    assert stats.energy_j[2] == 30.0 and math.isnan(stats.energy_j[1])
    energy = stats.energy_summary()
    assert math.isnan(energy["energy_j_per_step"]) and math.isnan(energy["avg_power_w"])
    # every step a warm-up step: nothing timed
    assert math.isnan(_trained(StepCounter([1.0] * 3), warmup=3)
                      .energy_summary()["energy_j_per_step"])


def test_energy_figures():
    from chronicals_fx.workload import energy_figures

    # 80 J over 0.2 s; ± the largest step's reading over the steps (one counter increment)
    assert energy_figures([30.0, 50.0], [50.0, 150.0]) == (40.0, 400.0, 25.0)
    for energy, steps in (([], []), ([30.0, math.nan], [50.0, 50.0]), ([30.0], [50.0, 50.0])):
        assert all(math.isnan(v) for v in energy_figures(energy, steps))


def _record(variant, energy_j, step_ms=(99.0, 50.0, 50.0), tps=1000.0):
    record = {"variant": variant, "tokens_per_s": tps, "losses": [3.0, 2.0],
              "step_ms": list(step_ms), "warmup_steps": 1, "median_step_ms": 50.0,
              "peak_gib": 2.0, "min_grad_norm": 1.0, "problems": [], "counts": None}
    if energy_j is not None:       # and the figures, as TrainStats.to_dict gives them
        from chronicals_fx.workload import TrainStats

        record["energy_j"] = list(energy_j)
        record.update(TrainStats(energy_j=list(energy_j), step_ms=list(step_ms),
                                 warmup_steps=1).energy_summary())
    return record


def _columns(table: str) -> dict[str, dict[str, str]]:
    """tabulate's plain table as {first column: {header: cell}}, the columns cut where the
    dashes under the headers are."""
    lines = table.splitlines()
    spans, start = [], None
    for i, ch in enumerate(lines[1] + " "):
        if ch == "-" and start is None:
            start = i
        elif ch != "-" and start is not None:
            spans.append((start, i))
            start = None
    spans = [(a, spans[k + 1][0] if k + 1 < len(spans) else None)
             for k, (a, _) in enumerate(spans)]
    cut = [[line[a:b].strip() for a, b in spans] for line in [lines[0], *lines[2:]]]
    return {row[0]: dict(zip(cut[0], row)) for row in cut[1:]}


def test_bench_table_and_merge_show_energy_or_nan():
    from chronicals_fx.bench import merged_runs, summary_table

    results = [_record("compile", [9.0, 30.0, 34.0]),          # 32 J a step, 64 J over 0.1 s
               _record("chronicals", [9.0, 20.0, 24.0]),
               _record("chronicals", [9.0, 26.0, 30.0]),       # --repeat: all timed steps
               _record("eager", [9.0, math.nan, math.nan]),    # no counter
               _record("liger", None),                         # a record from before the field
               {"variant": "liger_compile", "error": "boom"}]
    merged = {r["variant"]: r for r in merged_runs(results)}
    assert merged["chronicals"]["energy_j_per_step"] == 25.0      # (20+24+26+30) / 4
    assert merged["chronicals"]["avg_power_w"] == pytest.approx(100.0 / 0.2)
    assert merged["chronicals"]["energy_resolution_j"] == 7.5     # 30 J over the 4 steps
    rows = _columns(summary_table(results))
    # J a step ± the largest step's reading over the steps (one counter increment at most)
    assert (rows["compile"]["J/step"], float(rows["compile"]["avg W"])) == ("32.0±17.0", 640.0)
    assert (rows["chronicals"]["J/step"], float(rows["chronicals"]["avg W"])) == ("25.0±7.5",
                                                                                 500.0)
    for variant in ("eager", "liger"):
        assert (rows[variant]["J/step"], rows[variant]["avg W"]) == ("nan", "nan")
    assert rows["liger_compile"]["tok/s"] == "failed"
    assert rows["liger_compile"]["proof"] == "boom"             # the failed row still lines up


def test_bench_worker_records_the_counter(monkeypatch):
    """run_variant hands bench's counter to the training loop; the record carries it."""
    from argparse import Namespace

    from chronicals_fx import bench

    monkeypatch.setattr(bench, "energy_counter", lambda: StepCounter([5.0, 8.0, 12.0]))
    args = Namespace(model="tiny-llama", batch=2, seq=16, steps=3, warmup=1, lr=3e-4,
                     layers=1, lora=0, autocast=False, passes=None, variant="eager")
    record = bench.run_variant(args)
    assert record["energy_j"] == [5.0, 8.0, 12.0]
    assert record["energy_j_per_step"] == 10.0
    assert record["avg_power_w"] == pytest.approx(20.0 / (sum(record["step_ms"][1:]) / 1000))


def test_bench_energy_counter_on_a_cpu_is_none():
    from chronicals_fx import bench

    assert bench.energy_counter() is None


def test_nvml_gpu_id_prefers_the_drivers_index(monkeypatch):
    from chronicals_fx.bench import nvml_gpu_id

    props = types.SimpleNamespace(pci_domain_id=0, pci_bus_id=0x19, pci_device_id=0,
                                  uuid="5f2c1e7a-0000")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda device: 4, raising=False)
    assert nvml_gpu_id(0) == 4

    def no_index(device):
        raise RuntimeError("Can't get device UUIDs")

    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", no_index, raising=False)
    assert nvml_gpu_id(0) == "00000000:19:00.0"
    del props.pci_bus_id                                        # a torch without the fields
    assert nvml_gpu_id(0) == "GPU-5f2c1e7a-0000"


def test_multi_gpu_reports_rank_0s_energy(monkeypatch, tmp_path):
    """The one-process worker (what each rank runs) records its GPU's energy; the table shows
    it, and nan where there was none."""
    from benchmarks import multi_gpu

    monkeypatch.setattr(multi_gpu, "energy_counter", lambda: StepCounter([5.0, 8.0, 12.0]))
    args = multi_gpu._parser().parse_args([
        "--worker", str(tmp_path / "out.json"), "--engine", "single", "--variant", "eager",
        "--device", "cpu", "--model", "tiny-llama", "--batch", "2", "--seq", "16",
        "--steps", "3", "--warmup", "1"])
    record = multi_gpu.run_worker(args)
    assert record["energy_j_per_step"] == 10.0
    assert record["avg_power_w"] == pytest.approx(20.0 / (sum(record["step_ms"][1:]) / 1000))
    unread = {**record, "engine": "ddp", "energy_j_per_step": math.nan,
              "avg_power_w": math.nan}
    rows = _columns(multi_gpu.summary_table(
        [record, unread, {"engine": "fsdp2", "variant": "eager", "error": "boom"}]))
    energy = ("J/step (rank 0)", "avg W (rank 0)")
    # 20 J over two steps, ± the larger reading (12 J) over them
    assert [rows["1 process"][c] for c in energy] == ["10.0±6.0", f"{record['avg_power_w']:.0f}"]
    assert [rows["ddp"][c] for c in energy] == ["nan", "nan"]
    assert rows["fsdp2"]["tok/s (global)"] == "failed" and rows["fsdp2"]["proof"] == "boom"
