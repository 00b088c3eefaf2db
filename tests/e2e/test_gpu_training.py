"""Short bf16 training runs on the GPU: the optimized model trains like eager."""

from __future__ import annotations

import pytest
import torch

import chronicals
from chronicals_fx.workload import build_model, byte_batches, train


@pytest.mark.gpu
def test_tiny_llama_bf16_trains_like_eager_on_gpu():
    runs = {}
    for variant in ("eager", "chronicals"):
        model = build_model("tiny-llama", dtype=torch.bfloat16, device="cuda")
        if variant == "chronicals":
            chronicals.optimize(model, strict=True)
        runs[variant] = train(model, byte_batches(8, 256, device="cuda"), 30, lr=1e-3)
    eager, ours = runs["eager"], runs["chronicals"]
    assert not ours.proof_of_training(), ours.proof_of_training()
    assert ours.losses[-1] < ours.losses[0] - 0.5          # it learned
    # bf16 tolerance: per-step losses agree to 2% (rounding differences compound over steps)
    for a, b in zip(eager.losses, ours.losses):
        assert abs(a - b) <= 0.02 * abs(a), (eager.losses, ours.losses)
    assert chronicals.report_of(model).counts["rmsnorm"] == 9
