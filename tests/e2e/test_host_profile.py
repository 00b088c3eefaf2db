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
