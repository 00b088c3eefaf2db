"""``chronicals run``: an unmodified script trains with its model optimized, same losses."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from chronicals_fx import backend
from chronicals_fx.runtime.launch import installed, run_script
from chronicals_fx.workload import parse_example_output

EXAMPLES = Path(__file__).parents[2] / "examples"
EXAMPLE = str(EXAMPLES / "train_plain.py")


def _run_line(err: str) -> dict:
    lines = [line for line in err.splitlines() if line.startswith("CHRONICALS_RUN ")]
    return json.loads(lines[-1].split(" ", 1)[1])


def test_plain_loop_runs_unmodified_with_model_optimized(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [EXAMPLE, "--steps", "4"])
    runpy.run_path(EXAMPLE, run_name="__main__")  # the script as written, no hooks
    plain = parse_example_output(capsys.readouterr().out)
    backend.RECENT_REPORTS.clear()
    run_script(EXAMPLE, ["--steps", "4"], compiler="aot_eager")
    captured = capsys.readouterr()
    optimized = parse_example_output(captured.out)
    assert backend.RECENT_REPORTS, "the script's model was not optimized"
    counts = backend.RECENT_REPORTS[-1].counts
    assert counts["rmsnorm"] == 9 and counts["swiglu"] == 4, counts
    run = _run_line(captured.err)  # what `chronicals run` says it did
    assert run["optimized_at_train"] == ["LlamaForCausalLM"] and run["counts"]["rmsnorm"] >= 9
    assert len(plain["losses"]) == len(optimized["losses"]) == 4  # every step prints its loss
    for a, b in zip(plain["losses"], optimized["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a)
    assert optimized["real_tokens"] == 512 and optimized["min_grad_norm"] > 0


def test_torch_compile_defaults_to_chronicals_inside_and_is_restored_after():
    original = torch.compile
    backend.RECENT_REPORTS.clear()
    with installed(compiler="eager"):
        f = torch.compile(lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        f(torch.randn(2, 8))
    assert backend.RECENT_REPORTS[-1].counts["rmsnorm"] == 1
    assert torch.compile is original
    assert torch.nn.Module.train.__qualname__ == "Module.train"


def test_hf_torch_compile_backend_chronicals_is_accepted_and_optimizes(tmp_path):
    """``TrainingArguments(torch_compile_backend="chronicals")``: accelerate's enum of backend
    names knows chronicals once it is imported; the Trainer then compiles with it."""
    transformers = pytest.importorskip("transformers")
    from accelerate.utils import DynamoBackend

    from tests.tiny_models import tiny_causal_lm

    assert DynamoBackend("CHRONICALS") is DynamoBackend.CHRONICALS  # registered at import
    model = tiny_causal_lm("llama")
    rows = torch.randint(0, 96, (8, 16))
    dataset = [{"input_ids": r, "labels": r} for r in rows]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), torch_compile=True, torch_compile_backend="chronicals",
        per_device_train_batch_size=2, max_steps=2, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True, logging_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset)
    assert trainer.accelerator.state.dynamo_plugin.to_kwargs()["backend"] == "chronicals"
    backend.RECENT_REPORTS.clear()
    with installed(compiler="aot_eager"):  # Inductor's CPU build is too slow for a unit test
        trainer.train()
    assert backend.RECENT_REPORTS, "the Trainer's model was not compiled with chronicals"
    assert sum(r.counts["rmsnorm"] for r in backend.RECENT_REPORTS) >= 5


def test_trl_sft_example_runs_under_chronicals_run(capsys):
    pytest.importorskip("trl")
    run_script(str(EXAMPLES / "train_trl_sft.py"),
               ["--steps", "2", "--warmup", "1", "--batch", "2", "--seq", "64"],
               compiler="aot_eager")
    captured = capsys.readouterr()
    result = parse_example_output(captured.out)
    assert result and result["packing"] and len(result["losses"]) == 2
    run = _run_line(captured.err)
    assert run["optimized_at_train"] and run["counts"]["rmsnorm"] >= 9, run
