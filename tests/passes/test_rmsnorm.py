"""RMSNorm pass: exact counts and eager parity on HF models and hand-written spellings;
look-alikes left alone; declines say why."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import chronicals
from tests.tiny_models import (FAMILIES, assert_same_training_signal, batch,
                               expected_rmsnorm_count, optimized_matches_eager, tiny_causal_lm,
                               twins)


# ---------------------------------------------------------------------------------------------
# Hugging Face families
# ---------------------------------------------------------------------------------------------
# AOTAutograd traces forward and backward through the ops' registered autograd (what Inductor
# compiles); Inductor's own code generation is exercised once, on Llama, to keep CI fast.
@pytest.mark.parametrize("family,compiler", [(f, "aot_eager") for f in sorted(FAMILIES)]
                         + [("llama", "inductor")])
def test_hf_family_counts_and_parity(family, compiler):
    eager, optimized = twins(family)
    inputs = batch()
    report = chronicals.explain(eager, **inputs)
    assert report.counts["rmsnorm"] == expected_rmsnorm_count(family), str(report)
    assert not [d for d in report.declines if d.op == "rmsnorm"], str(report)
    chronicals.optimize(optimized, strict=True, compiler=compiler)
    assert_same_training_signal(eager, optimized, inputs)
    # every norm after the first reads a residual sum: that add is fused into the op
    fused = [m for m in report.matches if m.op == "rmsnorm" and "residual add fused" in m.detail]
    # 2 layers: both post-attention norms, the second layer's input norm, and the final norm
    assert len(fused) == 4, str(report)
    assert chronicals.report_of(optimized).counts["rmsnorm"] == expected_rmsnorm_count(family)


def test_model_without_rmsnorm_is_untouched():
    config = transformers.GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    eager = transformers.GPT2LMHeadModel(config)
    optimized = copy.deepcopy(eager)
    inputs = batch()
    only = {"passes": ("rmsnorm",)}
    report = chronicals.explain(eager, **inputs, chronicals_options=only)
    assert report.counts["rmsnorm"] == 0
    assert not report.declines, str(report)  # LayerNorm is not even a candidate
    # Run op by op: with nothing rewritten, results must be bit-identical.
    chronicals.optimize(optimized, strict=True, compiler="eager", **only)
    assert_same_training_signal(eager, optimized, inputs, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Hand-written spellings: each module must match exactly once and equal eager.
# ---------------------------------------------------------------------------------------------
class Norm(nn.Module):
    def __init__(self, fn, hidden=40, weight=True, zero_centered=False):
        super().__init__()
        self.fn = fn
        init = torch.randn(hidden) * 0.1 + (0.0 if zero_centered else 1.0)
        self.weight = nn.Parameter(init) if weight else None
        self.eps = 1e-6

    def forward(self, x):
        return self.fn(self, x)


SPELLINGS = {
    "llama": lambda s, x: s.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + s.eps)).to(x.dtype),
    "x_times_x": lambda s, x: (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + s.eps)) * s.weight,
    "square_recip_sqrt": lambda s, x: x * (1.0 / torch.sqrt(torch.square(x).mean(dim=-1, keepdim=True) + s.eps)) * s.weight,
    "div_sqrt": lambda s, x: s.weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + s.eps)),
    "reciprocal": lambda s, x: s.weight * (x * torch.reciprocal(torch.sqrt(s.eps + x.pow(2.0).mean(-1, True)))),
    "pow_neg_half": lambda s, x: s.weight * x * torch.pow(x.pow(2).mean(-1, keepdim=True) + s.eps, -0.5),
    "to_dtype_type_as": lambda s, x: (x.to(torch.float32) * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + s.eps) * s.weight).type_as(x),
    "no_weight": lambda s, x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.eps),
    "t5": lambda s, x: s.weight * (x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + s.eps)).to(s.weight.dtype),
    "mean_dim_list": lambda s, x: s.weight * x * torch.rsqrt(torch.mean(x ** 2, dim=[-1], keepdim=True) + s.eps),
    "positive_dim": lambda s, x: s.weight * x * torch.rsqrt(x.pow(2).mean(x.dim() - 1, keepdim=True) + s.eps),
}
GEMMA = lambda s, x: (s.weight.float() + 1.0) * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + s.eps))  # noqa: E731


def _check_matches_and_parity(module, x, count=1, rtol=1e-5, atol=1e-6, compiler="aot_eager"):
    report = chronicals.explain(module, x)
    assert report.counts["rmsnorm"] == count, str(report)
    optimized_matches_eager(module, x, rtol=rtol, atol=atol, compiler=compiler)
    return report


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_hand_written_spellings(name):
    module = Norm(SPELLINGS[name], weight=name != "no_weight")
    _check_matches_and_parity(module, torch.randn(3, 5, 40))


def test_gemma_offset_weight():
    report = _check_matches_and_parity(Norm(GEMMA, zero_centered=True), torch.randn(4, 40))
    assert "1+w" in report.matches[0].detail


@pytest.mark.parametrize("hidden", [7, 40, 123, 1000])
def test_any_hidden_size(hidden):
    _check_matches_and_parity(Norm(SPELLINGS["llama"], hidden=hidden), torch.randn(2, 3, hidden))


def test_per_head_norm_on_4d():
    module = Norm(SPELLINGS["llama"], hidden=16)
    _check_matches_and_parity(module, torch.randn(2, 5, 3, 16), compiler="inductor")


def test_torch_rms_norm_module_and_functional():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.RMSNorm(24, eps=1e-5)
            self.w = nn.Parameter(torch.randn(24))

        def forward(self, x):
            return F.rms_norm(self.norm(x), (24,), self.w) + F.rms_norm(x, (24,))

    _check_matches_and_parity(Both(), torch.randn(3, 24), count=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_llama_rounding_points(dtype):
    """bf16/fp16 input, fp32 statistics, cast back, then the weight multiply in low precision:
    the op must round where eager rounds (checked at the dtype's own tolerance)."""
    module = Norm(SPELLINGS["llama"], hidden=64).to(dtype)
    report = _check_matches_and_parity(module, torch.randn(4, 64).to(dtype), rtol=1.6e-2, atol=1e-2)
    assert "weight multiply in" in report.matches[0].detail


def test_gemma_low_precision_multiplies_in_fp32():
    module = Norm(GEMMA, hidden=32, zero_centered=True).to(torch.bfloat16)
    report = _check_matches_and_parity(
        nn.Sequential(module, _TypeAs()), torch.randn(4, 32).to(torch.bfloat16), rtol=1.6e-2, atol=1e-2)
    assert "weight multiply in fp32" in report.matches[0].detail


class _TypeAs(nn.Module):
    def forward(self, y):
        return y.to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Look-alikes: never matched, results identical.
# ---------------------------------------------------------------------------------------------
LOOK_ALIKES = {
    "l2_normalize": lambda s, x: s.weight * F.normalize(x, dim=-1),
    "l2_by_norm": lambda s, x: s.weight * x / x.norm(dim=-1, keepdim=True),
    "sum_not_mean": lambda s, x: s.weight * x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + s.eps),
    "layer_norm_hand_written": lambda s, x: s.weight * (x - x.mean(-1, keepdim=True)) / torch.sqrt((x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + s.eps),
    "layer_norm_functional": lambda s, x: F.layer_norm(x, (x.shape[-1],), s.weight),
    "stats_of_other_tensor": lambda s, x: (x + 1) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + s.eps),
    "cube_not_square": lambda s, x: x * torch.rsqrt(x.abs().pow(3).mean(-1, keepdim=True) + s.eps),
    "sqrt_not_rsqrt": lambda s, x: x * torch.sqrt(x.pow(2).mean(-1, keepdim=True) + s.eps),
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_are_not_matched(name):
    module = Norm(LOOK_ALIKES[name])
    x = torch.randn(3, 40)
    report = chronicals.explain(module, x)
    assert report.counts["rmsnorm"] == 0, str(report)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager")
    torch.testing.assert_close(optimized(x), module(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Declines: the kernel can't serve it, the original runs, the report says why.
# ---------------------------------------------------------------------------------------------
def test_intermediate_used_elsewhere_declines():
    class Leaky(nn.Module):
        def forward(self, x):
            variance = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(variance + 1e-6), variance

    x = torch.randn(3, 16)
    report = chronicals.explain(Leaky(), x)
    assert report.counts["rmsnorm"] == 0
    [decline] = report.declines
    assert "used outside" in decline.reason
    optimized = chronicals.optimize(Leaky(), strict=True, compiler="eager")
    for got, want in zip(optimized(x), Leaky()(x)):
        torch.testing.assert_close(got, want)


def test_norm_over_non_last_dim_declines():
    module = Norm(lambda s, x: x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + s.eps), weight=False)
    x = torch.randn(2, 40, 3)
    report = chronicals.explain(module, x)
    assert report.counts["rmsnorm"] == 0
    assert "last dim" in report.declines[0].reason


def test_float64_declines():
    module = Norm(SPELLINGS["no_weight"], weight=False)
    report = chronicals.explain(module, torch.randn(2, 40, dtype=torch.float64))
    assert report.counts["rmsnorm"] == 0
    assert "float64" in report.declines[0].reason


def test_passes_option_turns_rmsnorm_off():
    model = tiny_causal_lm("llama")
    report = chronicals.explain(model, **batch(), chronicals_options={"passes": ()})
    assert report.counts["rmsnorm"] == 0 and not report.declines
