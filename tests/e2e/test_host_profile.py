"""benchmarks.host_profile on the CPU: its sections are filled from a real run (the CUDA-only
parts, the sync check and launch counts, need a GPU)."""

import re

import pytest

from benchmarks import host_profile


@pytest.mark.parametrize("autocast", [False, True])
def test_host_profile_reports_ops_python_and_training(capsys, autocast):
    assert host_profile.main(["--device", "cpu", "--model", "tiny-llama", "--batch", "2",
                              "--seq", "32", "--warmup", "1", "--steps", "2", "--top", "5",
                              "--variants", "chronicals", *(["--autocast"] if autocast else [])
                              ]) == 0
    out = capsys.readouterr().out
    header = re.search(r"# chronicals .*: step [\d.]+ ms, host enqueue [\d.]+ ms", out).group(0)
    assert ("fp32 under autocast(bf16)" in header) == autocast
    ops = out.split("CPU ops by inclusive time per step (top 5):")[1].split("Python functions")[0]
    assert "CompiledFunctionBackward" in ops                   # the compiled graph ran, profiled
    python = out.split("Python functions by own time per step")[1]
    assert len(re.findall(r"^\s+\d+\s+[\d.]+\s+[\d.]+\s+\S", python, re.M)) == 5
    # 1 warm-up, 2 timed, 2 under torch.profiler, 2 under cProfile (no sync check on a CPU)
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) over 7 steps", out).groups())
    assert last < first
    assert float(re.search(r"min grad norm ([\d.]+)", out).group(1)) > 0


def test_sampled_stacks_add_up_per_thread_and_function():
    """py-spy's collapsed stacks: a function's samples add up over its lines; inclusive time
    counts a frame once a stack; threads apart; ms a step = samples / rate / steps."""
    raw = ["thread (0x1): MainThread;step (a.py:3);launch (b.py:10) 30\n",
           "thread (0x1): MainThread;step (a.py:4);launch (b.py:12) 10\n",
           "thread (0x1): MainThread;step (a.py:5) 20\n",
           "thread (0x2);backward (c.py:1);backward (c.py:7) 40\n",
           "thread (0x3);rare (d.py:1) 1\n", "not a stack\n"]
    stacks = host_profile.parse_raw_stacks(raw)
    assert stacks[0] == (["thread (0x1): MainThread", "step (a.py)", "launch (b.py)"], 30)
    out = "\n".join(host_profile.thread_summary(stacks, steps=2, rate=10, top=3))
    assert "5050.0 ms a step on a CPU over all threads" in out
    main = out.split("thread (0x1): MainThread: 3000.0 ms a step")[1].split("thread (0x2)")[0]
    assert re.search(r"3000\.00\s+step \(a\.py\)", main)           # inclusive: 60 samples
    assert re.search(r"by own .*\n\s+2000\.00\s+launch \(b\.py\)", main)
    backward = out.split("thread (0x2): 2000.0 ms a step")[1]
    assert re.search(r"2000\.00\s+backward \(c\.py\)", backward)     # recursion counted once
    assert "thread (0x3)" not in out                                 # under 5% of the samples


def test_py_spy_missing_is_said(capsys):
    lines = host_profile.sampled_threads(lambda: None, 1, 100, "no-such-py-spy", 5, lambda: None)
    assert lines == ["py-spy: 'no-such-py-spy' not found, no samples"]


def test_own_time_by_source():
    """The innermost frame's file says whose time it is: ours, Inductor's generated wrapper,
    Inductor's runtime, Triton (its launchers are compiled from strings), torch, or other."""
    raw = ["t;call (cx76ksovymp3mpdoyxhlxtjbgyspd5jo5vrw6p223db2had3a5sh.py:3) 5\n",
           "t;run (torch/_inductor/runtime/triton_heuristics.py:9);launcher (<string>:2) 3\n",
           "t;f (chronicals_fx/kernels/linear_ce.py:1) 2\n",
           "t;run (torch/_inductor/runtime/static_triton_launcher.py:232) 2\n",
           "t;g (torch/_ops.py:1) 1\n", "t;h (foo.py:1) 1\n"]
    stacks = [(frames[1:], n) for frames, n in host_profile.parse_raw_stacks(raw)]
    assert host_profile.source_counts(stacks) == [
        ("compiled code", 5), ("triton", 3), ("chronicals", 2), ("inductor", 2), ("torch", 1),
        ("other", 1)]
    summary = "\n".join(host_profile.thread_summary(host_profile.parse_raw_stacks(raw), 1, 1000, 2))
    assert "t: 14.0 ms a step; own time by source: compiled code 5.0, triton 3.0," in summary
