"""``chronicals run``: an unmodified script trains with its model optimized, same losses."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import torch

from chronicals_fx import backend
from chronicals_fx.runtime.launch import installed, run_script

EXAMPLE = str(Path(__file__).parents[2] / "examples" / "train_plain.py")


def _losses(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"loss (\d+\.\d+)", text)]


def test_plain_loop_runs_unmodified_with_model_optimized(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [EXAMPLE, "--steps", "6"])
    runpy.run_path(EXAMPLE, run_name="__main__")  # the script as written, no hooks
    plain = _losses(capsys.readouterr().out)
    backend.RECENT_REPORTS.clear()
    run_script(EXAMPLE, ["--steps", "6"], compiler="aot_eager")
    optimized = _losses(capsys.readouterr().out)
    assert backend.RECENT_REPORTS, "the script's model was not optimized"
    counts = backend.RECENT_REPORTS[-1].counts
    assert counts["rmsnorm"] == 9 and counts["swiglu"] == 4, counts
    assert len(plain) == len(optimized) == 2  # steps 0 and 5 print their loss
    for a, b in zip(plain, optimized):
        assert abs(a - b) <= 1e-4 * abs(a)


def test_torch_compile_defaults_to_chronicals_inside_and_is_restored_after():
    original = torch.compile
    backend.RECENT_REPORTS.clear()
    with installed(compiler="eager"):
        f = torch.compile(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        f(torch.randn(2, 8))
    assert backend.RECENT_REPORTS[-1].counts["rmsnorm"] == 1
    assert torch.compile is original
    assert torch.nn.Module.train.__qualname__ == "Module.train"
