"""Batches of changing length, as a dynamic-padding collator gives them: Dynamo compiles the
first length as it is and, once a second length arrives, one graph for symbolic lengths
(automatic dynamic shapes). Every pass but attention serves the symbolic graph; attention
proves masks at fixed sizes only, so there it keeps the original and says why."""

from __future__ import annotations

import copy

import torch

import chronicals
from tests.tiny_models import assert_same_training_signal, batch, tiny_causal_lm


def test_changing_lengths_keep_every_pass_but_attention_and_train_like_eager():
    layers = 2
    eager = tiny_causal_lm("llama", attn_implementation="sdpa", use_cache=False,
                           num_hidden_layers=layers)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager")
    torch._dynamo.reset()
    per_graph = {"rmsnorm": 2 * layers + 1, "swiglu": layers, "rope": layers,
                 "linear_cross_entropy": 1}
    for step, seq in enumerate((16, 24, 20)):           # static, then symbolic, then reused
        assert_same_training_signal(eager, optimized, batch(seq=seq, seed=step), rtol=1e-4,
                                    atol=1e-5)
        report = chronicals.report_of(optimized)
        graphs = min(step + 1, 2)
        for name, count in per_graph.items():
            assert report.counts[name] == graphs * count, (name, str(report))
        assert report.counts["attention"] == layers, str(report)     # the static graph's
        declined = [d for d in report.declines if d.op == "attention"]
        assert len(declined) == (graphs - 1) * layers, str(report)
        assert all("symbolic shapes" in d.reason for d in declined), str(report)
        assert len(report.declines) == len(declined), str(report)
