"""Convergence suite: mini models of five families trained 30 steps on real text (Python's own
sources), eager vs optimized with every pass on: per-step losses and final parameters agree.

fp32 on CPU, so "agree" is tight: the rewritten graph changes only the order of floating-point
operations (fused kernels, reassociated reductions).
"""

from __future__ import annotations

import copy

import pytest
import torch

import chronicals
from chronicals_fx.workload import byte_batches, train
from tests.tiny_models import tiny_causal_lm

FAMILIES = ["llama", "qwen2", "qwen3", "gemma", "phi3", "mistral"]
STEPS = 30


@pytest.mark.parametrize("family", FAMILIES)
def test_thirty_steps_on_real_text_match_eager(family):
    eager = tiny_causal_lm(family, vocab_size=256, use_cache=False)
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager")
    runs = {name: train(model, byte_batches(4, 64), STEPS, lr=1e-3, warmup_steps=0)
            for name, model in (("eager", eager), ("optimized", optimized))}
    e, o = runs["eager"], runs["optimized"]
    assert not o.proof_of_training(), o.proof_of_training()
    assert e.losses[-1] < e.losses[0] - 1.0  # it learned something real
    torch.testing.assert_close(torch.tensor(o.losses), torch.tensor(e.losses), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(o.grad_norms), torch.tensor(e.grad_norms), rtol=1e-3, atol=1e-5)
    for (name, p_e), p_o in zip(eager.named_parameters(), optimized.parameters()):
        torch.testing.assert_close(p_o, p_e, rtol=1e-4, atol=1e-5, msg=name)
    counts = chronicals.report_of(optimized).counts
    assert counts["rmsnorm"] > 0 and counts["linear_cross_entropy"] == 1, counts
