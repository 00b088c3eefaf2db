"""The end-to-end benchmark's variant names (a pass set and backend options per variant), and the
worker processes that bench, packing and multi_gpu run."""

import pytest

from chronicals_fx.bench import compile_kwargs, variant_options


def test_variant_names_carry_passes_and_options():
    assert variant_options("chronicals") == {}
    assert variant_options("chronicals:rmsnorm,swiglu") == {"passes": ("rmsnorm", "swiglu")}
    assert variant_options("chronicals:rmsnorm@swiglu_save_hidden=0,attention_backend=cudnn") == {
        "passes": ("rmsnorm",), "swiglu_save_hidden": False, "attention_backend": "cudnn"}
    assert variant_options("chronicals@swiglu_save_hidden=true") == {"swiglu_save_hidden": True}
    with pytest.raises(SystemExit, match="not key=value"):
        variant_options("chronicals@swiglu_save_hidden")
    assert variant_options("compile@mode=reduce-overhead") == {"mode": "reduce-overhead"}
    assert variant_options("chronicals@mode=reduce-overhead,swiglu_save_hidden=0") == {
        "mode": "reduce-overhead", "swiglu_save_hidden": False}


def test_compile_variant_splits_mode_from_inductor_options():
    assert compile_kwargs(variant_options("compile")) == {}
    assert compile_kwargs(variant_options("compile@mode=reduce-overhead")) == {
        "mode": "reduce-overhead"}
    assert compile_kwargs(variant_options("compile@cpp_wrapper=true")) == {
        "options": {"cpp_wrapper": True}}
    with pytest.raises(SystemExit, match="mode or options"):
        compile_kwargs(variant_options("compile@mode=reduce-overhead,cpp_wrapper=1"))


def test_interleaved_run_trains_every_variant_on_the_same_batches(tmp_path):
    """``--interleave``: one process, the timed steps alternated over rounds. Each variant makes
    all its steps on the batches a run of its own reads (eager's losses equal its own run's up
    to float rounding: on a CPU, oneDNN may pick other kernels once another model has run), the
    passes matched, and peak memory is not claimed per variant."""
    import json
    import math

    from chronicals_fx import bench

    common = ["--model", "tiny-llama", "--batch", "2", "--seq", "32", "--steps", "5",
              "--warmup", "1"]
    assert bench.main(common + ["--variants", "eager", "chronicals:rmsnorm", "--interleave", "2",
                                "--json", str(tmp_path / "mixed.json")]) == 0
    assert bench.main(common + ["--variants", "eager", "--json", str(tmp_path / "alone.json")]) == 0
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert "interleaved" in mixed["header"]
    runs = {r["variant"]: r for r in mixed["results"]}
    assert set(runs) == {"eager", "chronicals:rmsnorm"}
    for r in runs.values():
        assert r["problems"] == [] and len(r["losses"]) == 5 and len(r["step_ms"]) == 5
        assert math.isnan(r["peak_gib"])
        # no energy counter on a CPU: every step's energy and the figures are NaN, not absent
        assert len(r["energy_j"]) == 5 and all(math.isnan(e) for e in r["energy_j"])
        assert math.isnan(r["energy_j_per_step"]) and math.isnan(r["avg_power_w"])
    assert runs["chronicals:rmsnorm"]["counts"]["rmsnorm"] > 0
    own = alone["results"][0]["losses"]
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(runs["eager"]["losses"], own))


def test_repeated_runs_merge_into_means_and_ranges():
    """``--repeat``: a variant's runs become one row — mean tokens/s with the range of its runs,
    the ratio of means to torch.compile's, every run's losses against eager's; a failed run is
    a problem of the variant, not averaged away."""
    import math

    from chronicals_fx.bench import merged_runs, summary_table

    def run(variant, tps, losses, grad=1.0, warmup=1):
        return {"variant": variant, "tokens_per_s": tps, "losses": losses,
                "step_ms": [99.0] + [1000 / tps] * 2, "warmup_steps": warmup,
                "median_step_ms": 1000 / tps,
                "peak_gib": 2.0, "min_grad_norm": grad, "problems": [], "counts": None}

    results = [run("eager", 50.0, [3.0, 2.0]), run("compile", 100.0, [3.0, 2.0]),
               run("chronicals", 104.0, [3.0, 2.01]), run("compile", 102.0, [3.0, 2.0]),
               run("chronicals", 106.0, [3.0, 2.05], grad=0.5),
               {"variant": "chronicals", "error": "CUDA out of memory"}]
    merged = {r["variant"]: r for r in merged_runs(results)}
    assert merged["eager"]["tokens_per_s"] == 50.0 and "tokens_per_s_range" not in merged["eager"]
    assert merged["compile"]["tokens_per_s"] == 101.0
    assert merged["compile"]["tokens_per_s_range"] == (100.0, 102.0)
    ours = merged["chronicals"]
    assert ours["tokens_per_s"] == 105.0 and ours["min_grad_norm"] == 0.5
    assert ours["runs_losses"] == [[3.0, 2.01], [3.0, 2.05]]
    assert ours["problems"] == ["1 of 3 runs failed: CUDA out of memory"]
    table = summary_table(results)
    row = next(line for line in table.splitlines() if line.startswith("chronicals"))
    assert "104–106, 2 runs" in row and "1.040x" in row   # 105 / 101
    assert " 0.05 " in row                                 # the second run's gap to eager
    assert "1 of 3 runs failed" in row
    # every step a warm-up step (--warmup >= --steps): no timed step, a nan, not a crash
    untimed = merged_runs([run("compile", 100.0, [3.0], warmup=3), run("compile", 90.0, [3.0], warmup=3)])
    assert math.isnan(untimed[0]["median_step_ms"])
    failing = merged_runs([{"variant": "liger", "error": "boom"}] * 2)
    assert failing[0]["error"] == "all 2 runs failed: boom"


def _build_bench(variant):
    from argparse import Namespace

    from chronicals_fx.bench import build_variant

    build_variant(Namespace(model="tiny-llama", layers=0, lora=0, passes=None, autocast=False),
                  variant, device="cpu")
    return {}


def _build_profile_step(variant):
    from argparse import Namespace

    from benchmarks.profile_step import variant_model

    variant_model(Namespace(model="tiny-llama", lora=0, variant=variant), device="cpu")
    return {}


def _build_multi_gpu(variant):
    from argparse import Namespace

    import torch

    from benchmarks.multi_gpu import _apply_variant

    model = torch.nn.Linear(4, 4)
    _apply_variant(Namespace(variant=variant, compile_scope="model"), model, model, "inductor")
    return {"backend": "inductor"}


@pytest.mark.parametrize("build", [_build_bench, _build_profile_step, _build_multi_gpu],
                         ids=["bench", "profile_step", "multi_gpu"])
def test_compile_variants_reach_torch_compile_as_bench_parses_them(build, monkeypatch):
    """Every benchmark that builds ``compile@...`` variants hands torch.compile ``mode`` as such
    and Inductor's settings under ``options`` (profile_step and multi_gpu once spread them as
    keyword arguments: ``compile@cpp_wrapper=true`` was a TypeError there)."""
    import torch

    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    for variant, want in (("compile", {}),
                          ("compile@cpp_wrapper=true", {"options": {"cpp_wrapper": True}}),
                          ("compile@mode=reduce-overhead", {"mode": "reduce-overhead"})):
        calls.clear()
        extra = build(variant)
        assert calls == [{**extra, **want}], variant


_WORKER = """
import json, sys, time
path = sys.argv[sys.argv.index("--worker") + 1]
what = sys.argv[1]
print("progress line", flush=True)
if what == "ok":
    json.dump({"tokens_per_s": 1.0}, open(path, "w"))
elif what == "teardown":
    json.dump({"tokens_per_s": 2.0}, open(path, "w"))
    print("RuntimeError: at exit", file=sys.stderr)
    sys.exit(3)
elif what == "fail":
    print("ValueError: the first", file=sys.stderr)
    print("torch.OutOfMemoryError: the real one", file=sys.stderr)
    print("exiting", file=sys.stderr)
    sys.exit(1)
elif what == "hang":
    time.sleep(60)
"""


def _worker(what):
    import sys

    return [sys.executable, "-c", _WORKER, what]


def test_worker_process_result_failure_log_and_timeout(tmp_path, capfd):
    """bench, packing and multi_gpu run their workers through one function: the worker's JSON,
    or the last line naming an Error with the output in the log; a worker that wrote its JSON
    and then exited non-zero keeps its result (and its log); a timeout kills it and says so."""
    from chronicals_fx.bench import spawn_worker

    ok = spawn_worker(_worker("ok"), str(tmp_path / "ok.log"))
    assert ok.result == {"tokens_per_s": 1.0} and ok.error is None and ok.log is None
    assert ok.returncode == 0 and not (tmp_path / "ok.log").exists()

    kept = spawn_worker(_worker("ok"), str(tmp_path / "logs" / "kept.log"), keep_log=True)
    assert kept.result == {"tokens_per_s": 1.0}
    assert (tmp_path / "logs" / "kept.log").read_text().strip() == "progress line"

    failed = spawn_worker(_worker("fail"), str(tmp_path / "fail.log"))
    assert failed.result is None and failed.returncode == 1
    assert failed.error == "torch.OutOfMemoryError: the real one"
    assert failed.log == str(tmp_path / "fail.log")
    assert "progress line" in (tmp_path / "fail.log").read_text()   # stdout and stderr together

    teardown = spawn_worker(_worker("teardown"), str(tmp_path / "teardown.log"))
    assert teardown.result == {"tokens_per_s": 2.0} and teardown.error is None
    assert teardown.returncode == 3 and "at exit" in (tmp_path / "teardown.log").read_text()

    for own_session in (False, True):
        hung = spawn_worker(_worker("hang"), str(tmp_path / "hang.log"), timeout=1,
                            own_session=own_session)
        assert hung.result is None and hung.returncode is None
        assert hung.error == "[killed after 1 s]" and hung.seconds < 30

    capfd.readouterr()
    shown = spawn_worker(_worker("fail"), str(tmp_path / "shown.log"), show_stdout=True)
    assert "progress line" in capfd.readouterr().out    # passed through as it came
    assert shown.error == "torch.OutOfMemoryError: the real one"
    assert "progress line" not in (tmp_path / "shown.log").read_text()


_LAUNCHER = """
import os, signal, subprocess, sys, time
# like torchrun: the rank in a session of its own, holding the launcher's output pipe
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                        start_new_session=True)
print(f"rank {rank.pid}", flush=True)
if sys.argv[1] == "forwards":   # torchrun passes SIGTERM on to its ranks
    signal.signal(signal.SIGTERM, lambda *_: (os.killpg(rank.pid, signal.SIGTERM), sys.exit(1)))
time.sleep(60)
"""


@pytest.mark.parametrize("launcher", ["forwards", "does_not"])
def test_worker_timeout_reaches_ranks_in_sessions_of_their_own(launcher, tmp_path, monkeypatch):
    """multi_gpu's torchrun puts each rank in a session of its own: a SIGKILL of torchrun's group
    left the ranks running and the driver blocked on the pipe they held. SIGTERM lets the
    launcher stop them; what escapes even that no longer blocks the driver."""
    import os
    import re
    import signal
    import sys

    from chronicals_fx import bench

    monkeypatch.setattr(bench, "_GRACE_S", 1)
    log = tmp_path / "w.log"
    run = bench.spawn_worker([sys.executable, "-c", _LAUNCHER, launcher], str(log), timeout=3,
                             own_session=True)
    rank = int(re.search(r"rank (\d+)", log.read_text()).group(1))
    try:
        assert run.result is None and run.seconds < 20
        if launcher == "forwards":
            assert run.error == "[killed after 3 s]" and not _running(rank)
        else:
            assert run.error == "[killed after 3 s] (some of its processes outlived the kill)"
    finally:
        if _running(rank):
            os.kill(rank, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper in a container may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_autocast_runs_fp32_weights_under_autocast(tmp_path, monkeypatch):
    """``--autocast``: the worker builds fp32 weights and runs the forward under
    torch.autocast(bf16) (its linears then produce bf16), and the header says so."""
    import json

    import torch

    from chronicals_fx import bench, workload

    seen = []
    real_step = workload.Trainer.step

    def step(self, batch):
        seen.append((self.autocast, next(self.model.parameters()).dtype))
        return real_step(self, batch)

    monkeypatch.setattr(workload.Trainer, "step", step)
    args = bench._parser().parse_args(["--model", "tiny-llama", "--batch", "2", "--seq", "32",
                                       "--steps", "2", "--warmup", "1", "--autocast",
                                       "--variant", "eager"])
    result = bench.run_variant(args)
    assert seen == [(torch.bfloat16, torch.float32)] * 2
    assert result["problems"] == [] and len(result["losses"]) == 2
    assert bench.main(["--model", "tiny-llama", "--batch", "2", "--seq", "32", "--steps", "2",
                       "--warmup", "1", "--autocast", "--variants", "eager",
                       "--json", str(tmp_path / "r.json")]) == 0
    assert "autocast" in json.loads((tmp_path / "r.json").read_text())["header"]


@pytest.mark.parametrize("typo", ["chronical", "compiled@mode=reduce-overhead", "ligerkernel"])
def test_an_unknown_variant_is_refused_not_run_as_eager(typo):
    """A misspelt variant once built the plain model and was reported under its name."""
    from argparse import Namespace

    from chronicals_fx.bench import build_variant

    with pytest.raises(SystemExit, match="unknown variant"):
        build_variant(Namespace(model="tiny-llama", layers=0, lora=0, passes=None,
                                autocast=False), typo)


def test_cpu_lists_read_like_taskset():
    from chronicals_fx.bench import cpu_list

    assert cpu_list("0-3,8") == {0, 1, 2, 3, 8}
    assert cpu_list("5") == {5}


def test_pinned_worker_runs_on_the_cpus_asked_and_counts_preemptions(tmp_path):
    """``--pin-cpus``: the variant's process may run only there (its result says on how many
    CPUs), and each step's involuntary context switches are recorded."""
    import json
    import os

    from chronicals_fx import bench, workload

    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("CPU affinity is a Linux call")
    cpu = min(os.sched_getaffinity(0))
    assert bench.main(["--model", "tiny-llama", "--batch", "2", "--seq", "32", "--steps", "3",
                       "--warmup", "1", "--variants", "eager", "--pin-cpus", str(cpu),
                       "--json", str(tmp_path / "pinned.json")]) == 0
    [result] = json.loads((tmp_path / "pinned.json").read_text())["results"]
    assert result["cpus"] == 1 and result["problems"] == []
    assert len(result["preempted"]) == 3 and all(n >= 0 for n in result["preempted"])
    assert workload.host_note(result).endswith("context switches a step on 1 CPU")


def test_host_bound_runs_are_named_with_their_host_and_step_times():
    """A GPU run whose host time is ≥ 90% of its step gets a line saying its figure is the
    host's (session 24: host 73.8 of a 74.5 ms step), with the CUDA-graph advice for our
    backend's runs without them; a run with room to spare, or without the timings, gets none."""
    from chronicals_fx.workload import host_bound_note

    bound = {"variant": "chronicals", "median_host_ms": 73.8, "median_step_ms": 74.5}
    note = host_bound_note(bound)
    assert note.startswith("chronicals: host-bound") and "73.8" in note and "74.5" in note
    assert "reduce-overhead" in note
    graphs = dict(bound, variant="chronicals@mode=reduce-overhead")
    assert "host-bound" in host_bound_note(graphs)
    assert "CUDA graphs" not in host_bound_note(graphs)
    assert "CUDA graphs" not in host_bound_note(dict(bound, variant="eager"))
    assert host_bound_note(dict(bound, median_host_ms=45.9, median_step_ms=60.0)) == ""
    assert host_bound_note({"variant": "eager", "median_step_ms": 99.9}) == ""


def test_a_failed_run_keeps_its_row_with_the_error_under_proof():
    """bench's and multi_gpu's tables: a run that failed is a row of its own, "failed" under
    tokens/s and its error in the last column (proof), the columns between empty."""
    from benchmarks import multi_gpu
    from chronicals_fx import bench

    for table, first in ((bench.summary_table([{"variant": "chronicals", "error": "boom"}]),
                          "tok/s"),
                         (multi_gpu.summary_table([{"engine": "ddp", "variant": "compile",
                                                    "error": "boom"}]), "tok/s (global)")):
        header, _, row = table.splitlines()
        assert row.index("failed") == header.index(first)
        assert row.index("boom") == header.index("proof") and row.rstrip().endswith("boom")
        assert row[row.index("failed") + len("failed"):row.index("boom")].strip() == ""
