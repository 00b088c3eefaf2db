"""Shared-input projections pass: q/k/v of every HF family concatenated into one GEMM (counts
exact, loss and every gradient equal to eager); wide projections, projections of different
inputs, mixed bias and SwiGLU's claimed gate/up left alone; weights made between the
projections (gathered from shards, cast) moved before the first; a weight computed from one of
their outputs declined with the reason."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chronicals
from chronicals_fx.passes.projections import NARROW, WIDE
from tests.tiny_models import (assert_same_training_signal, batch, optimized_matches_eager,
                                tiny_causal_lm, twins)



def _projections(report):
    return ([m for m in report.matches if m.op == "projections"],
            [d for d in report.declines if d.op == "projections"])


# (family, q/k/v widths) of the tiny configs: hidden 48, 4 heads, 2 KV heads. Phi3 projects
# q, k and v with one fused linear already: nothing shares its input.
HF_CASES = {
    "llama": "48 + 24 + 24",
    "qwen2": "48 + 24 + 24",          # q/k/v with bias
    "mistral": "48 + 24 + 24",        # head_dim 12
    "gemma": "48 + 24 + 24",
    "phi3": None,
}


@pytest.mark.parametrize("family,passes", [
    *((family, chronicals.DEFAULT_PASSES) for family in HF_CASES),
    ("qwen2", ("projections",)), ("phi3", ("projections",)),
], ids=[*HF_CASES, "qwen2 alone", "phi3 alone"])
def test_hf_attention_projections(family, passes):
    """One group per layer (q, k, v), the MLP's gate/up not taken when SwiGLU's op reads them
    (all passes) and taken when nothing claims them (alone); eager's loss and gradients."""
    eager, optimized = twins(family, num_hidden_layers=2)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=passes)
    assert_same_training_signal(eager, optimized, batch())
    matches, declines = _projections(chronicals.report_of(optimized))
    assert not declines
    qkv = [m for m in matches if m.where.endswith("self_attn.q_proj")]
    mlp = [m for m in matches if m.where.endswith("mlp.gate_proj")]
    if HF_CASES[family] is None:
        assert not qkv
    else:
        assert [m.where for m in qkv] == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
        assert all(HF_CASES[family] in m.detail for m in qkv)
    # tiny gate/up (80 columns) are narrow: joined only when the SwiGLU pass is off
    assert len(mlp) == (2 if passes == ("projections",) and family != "phi3" else 0)
    assert len(matches) == len(qkv) + len(mlp)


def test_lora_projections_match_eager():
    """PEFT-wrapped q/k/v of an fp32 model (the lora pass leaves fp32 models alone): the frozen
    base projections form one group and the LoRA A projections (rank 4, no bias) another;
    gradients of the adapters equal eager's."""
    eager, _ = twins("qwen2")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                             lora_dropout=0.0, init_lora_weights=False)  # B ≠ 0
    eager = peft.get_peft_model(eager, config)
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager")
    assert_same_training_signal(eager, optimized, batch())
    matches, _ = _projections(chronicals.report_of(optimized))
    details = sorted(m.detail for m in matches)
    assert details == sorted(["3 projections of one input → one GEMM (48 + 24 + 24 = 96 columns)",
                              "3 projections of one input → one GEMM (4 + 4 + 4 = 12 columns)"] * 2)


def test_lora_pass_keeps_its_a_products_apart():
    """A bf16 model with PEFT's fp32 adapters on q/k/v: the lora pass rewrites their A products
    (autocast's precision, autocast's rounding of x's gradient), so the projections pass joins
    the frozen base q/k/v only and leaves the A products to ``lora_concat_a``."""
    model = tiny_causal_lm("qwen2").to(torch.bfloat16)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                             lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(model, config)
    chronicals.optimize(model, strict=True, compiler="aot_eager")
    model(**batch()).loss.backward()
    report = chronicals.report_of(model)
    assert report.counts["lora"] == 6, str(report)
    matches, declines = _projections(report)
    assert not declines
    assert [m.detail for m in matches] == [
        "3 projections of one input → one GEMM (48 + 24 + 24 = 96 columns)"] * 2
    assert all(m.where.endswith("q_proj.base_layer") for m in matches), matches


class SharedInput(nn.Module):
    def __init__(self, widths, bias=(True,), hidden=32):
        super().__init__()
        bias = bias * len(widths) if len(bias) == 1 else bias
        self.proj = nn.ModuleList(nn.Linear(hidden, w, bias=b) for w, b in zip(widths, bias))

    def forward(self, x):
        return torch.cat([p(x).sum(-1, keepdim=True) * (i + 1) for i, p in enumerate(self.proj)],
                         -1)


def test_on_by_default():
    assert "projections" in chronicals.DEFAULT_PASSES


def test_a_wide_projection_stays_apart_from_the_narrow_ones():
    optimized = optimized_matches_eager(SharedInput((WIDE, 8, 8), hidden=16),
                                        torch.randn(3, 5, 16))
    matches, _ = _projections(chronicals.report_of(optimized))
    assert [m.detail for m in matches] == [
        "2 projections of one input → one GEMM (8 + 8 = 16 columns)"]
    assert matches[0].where.endswith("proj.1"), matches


def test_narrow_group_matches_eager():
    model = SharedInput((40, 8, 8))
    optimized = optimized_matches_eager(model, torch.randn(3, 5, 32))
    matches, _ = _projections(chronicals.report_of(optimized))
    assert [m.detail for m in matches] == [
        "3 projections of one input → one GEMM (40 + 8 + 8 = 56 columns)"]


@pytest.mark.parametrize("model", [
    SharedInput((NARROW, NARROW + 8)),              # none narrow: the launches saved don't pay
    SharedInput((8, 8), bias=(True, False)),        # bias on one only: not one linear
    SharedInput((8,)),                              # alone
], ids=["wide", "mixed bias", "single"])
def test_left_alone(model):
    optimized = optimized_matches_eager(model, torch.randn(3, 5, 32))
    assert _projections(chronicals.report_of(optimized)) == ([], [])


class DifferentInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 8), nn.Linear(32, 8)

    def forward(self, x):
        return self.a(x) + self.b(x * 2)


class LateWeight(nn.Module):
    """The second projection's weight is computed after the first projection."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(8, 32)), nn.Parameter(torch.randn(8, 32))

    def forward(self, x):
        a = F.linear(x, self.w1)
        return a + F.linear(x, self.w2 * a.mean())


class WeightsMadeInTurn(nn.Module):
    """Each weight made right before its own projection (as a sharded weight is gathered, or a
    weight cast), after the previous projection's output is already read."""

    def __init__(self):
        super().__init__()
        # nn.Linear's scale: outputs of order 1, where fp32 GEMMs of other widths agree to ~1e-7
        self.w = nn.ParameterList(nn.Parameter(torch.randn(n, 32) / 32 ** 0.5) for n in (40, 8, 8))

    def forward(self, x):
        q = F.linear(x, self.w[0] * 0.5).sum(-1, keepdim=True)
        k = F.linear(x, self.w[1] * 2.0) * 2
        v = F.linear(x, self.w[2] * 4.0)
        return torch.cat([q, k, v], -1)


def test_weights_made_between_the_projections_moved_before_the_first():
    optimized = optimized_matches_eager(WeightsMadeInTurn(), torch.randn(3, 5, 32))
    matches, declines = _projections(chronicals.report_of(optimized))
    assert not declines
    assert [m.detail for m in matches] == [
        "3 projections of one input → one GEMM (40 + 8 + 8 = 56 columns)"]


class AutocastBetween(nn.Module):
    """k under torch.autocast, q and v not: one GEMM would give them one precision."""

    def __init__(self):
        super().__init__()
        self.w = nn.ParameterList(nn.Parameter(torch.randn(n, 32) / 32 ** 0.5) for n in (40, 8, 8))

    def forward(self, x):
        q = F.linear(x, self.w[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            k = F.linear(x, self.w[1])
        v = F.linear(x, self.w[2])
        return torch.cat([q, k.float(), v], -1)


def test_autocast_region_between_the_projections_declined():
    optimized = optimized_matches_eager(AutocastBetween(), torch.randn(3, 5, 32))
    matches, declines = _projections(chronicals.report_of(optimized))
    assert not matches and len(declines) == 1
    assert "autocast region" in declines[0].reason, declines


def test_different_inputs_left_alone():
    optimized = optimized_matches_eager(DifferentInputs(), torch.randn(3, 5, 32))
    assert _projections(chronicals.report_of(optimized)) == ([], [])


def test_weight_computed_late_declined():
    optimized = optimized_matches_eager(LateWeight(), torch.randn(3, 5, 32))
    matches, declines = _projections(chronicals.report_of(optimized))
    assert not matches and len(declines) == 1
    assert "a weight is computed from" in declines[0].reason and "one of their outputs" in declines[0].reason
