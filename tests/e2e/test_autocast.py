"""Mixed precision by ``torch.autocast`` (HF Trainer's ``bf16=True`` on an fp32 model): fp32
weights, bf16 GEMMs. RoPE leaves q and k in fp32 while v is bf16, and the lm_head's operands are
fp32 with bf16 logits; autocast casts them where SDPA and the linear run. The attention and
fused-loss passes make those casts explicit instead of declining "mixed dtypes"."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chronicals
from tests.tiny_models import batch, loss_and_grads, tiny_causal_lm

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _twins(family: str, **overrides):
    model = tiny_causal_lm(family, **overrides)
    model.config.use_cache = False
    return model, copy.deepcopy(model)


def _attention_rewritten_equals_reference(reference, optimized):
    """``optimized`` with the attention pass, both models trained one step under autocast:
    loss and every gradient bit for bit the reference's. Returns the report."""
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=("attention",))
    inputs = batch()
    with torch.autocast(**BF16):
        loss_r, grads_r = loss_and_grads(reference, inputs)
        loss_o, grads_o = loss_and_grads(optimized, inputs)
    assert torch.equal(loss_o, loss_r)
    assert grads_r.keys() == grads_o.keys()
    for name in grads_r:
        assert torch.equal(grads_o[name], grads_r[name]), name
    return chronicals.report_of(optimized)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_sdpa_under_autocast_is_rewritten_with_the_casts_and_equals_eager(family):
    """q, k (fp32 after RoPE) and v (bf16) cast to bf16 explicitly: the rewritten attention runs
    what autocast ran, so loss and every gradient are eager's bit for bit."""
    report = _attention_rewritten_equals_reference(*_twins(family, attn_implementation="sdpa"))
    assert report.counts["attention"] == 2 and not report.declines, str(report)
    assert all("autocast's casts of q/k to bf16 made explicit" in m.detail
               for m in report.matches)


def test_eager_attention_under_autocast_equals_sdpa_on_the_cast_inputs():
    """The eager spelling under autocast becomes SDPA on bf16 q, k, v: exactly what the same
    model with SDPA attention computes under autocast (eager's own path rounds its scores to
    bf16 in the q·kᵀ matmul, which the fused kernel does not: the documented difference)."""
    sdpa = tiny_causal_lm("llama", attn_implementation="sdpa")
    sdpa.config.use_cache = False
    optimized = copy.deepcopy(sdpa)
    optimized.config._attn_implementation = "eager"
    report = _attention_rewritten_equals_reference(sdpa, optimized)
    assert report.counts["attention"] == 2, str(report)
    assert all(m.detail.startswith("eager bf16") for m in report.matches)


class _Head(nn.Module):
    def __init__(self, hidden=24, vocab=50, bias=False):
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)

    def forward(self, h, y):
        logits = self.lm_head(h).float()
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))


@pytest.mark.parametrize("bias", [False, True])
def test_fused_loss_under_autocast_takes_the_linears_bf16_operands(bias):
    """The fused op gets hidden and W cast to bf16, as autocast's linear does, and computes the
    loss from them exactly (fp32 logits: eager rounds its logits to bf16 first). Against a
    float64 reference on the bf16-cast operands: the loss to fp32 accuracy; the fp32 gradients
    of hidden and W (and b) within one bf16 rounding (the op's gradients are bf16, cast back to
    fp32 by the casts' backward, as under autocast)."""
    torch.manual_seed(0)
    module = _Head(bias=bias)
    with torch.no_grad():
        if bias:
            module.lm_head.bias.normal_()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, 24, generator=g)
    y = torch.randint(0, 50, (2, 9), generator=g)
    y[0, :3] = -100
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager",
                                    passes=("linear_cross_entropy",))
    h_o = h.clone().requires_grad_()
    with torch.autocast(**BF16):
        loss_o = optimized(h_o, y)
    loss_o.backward()
    [match] = chronicals.report_of(optimized).matches
    assert "autocast's casts of the operands to bf16 made explicit" in match.detail

    # the reference: autocast's operand casts, then the math in float64
    h_r = h.clone().requires_grad_()
    params = {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}
    as64 = lambda t: t.to(torch.bfloat16).double()               # noqa: E731
    logits = F.linear(as64(h_r), as64(params["lm_head.weight"]),
                      as64(params["lm_head.bias"]) if bias else None)
    loss_r = F.cross_entropy(logits[:, :-1].reshape(-1, 50), y[:, 1:].reshape(-1))
    loss_r.backward()
    torch.testing.assert_close(loss_o.double(), loss_r, rtol=1e-6, atol=0)
    one_rounding = dict(rtol=2 ** -8, atol=1e-7)
    torch.testing.assert_close(h_o.grad.double(), h_r.grad.double(), **one_rounding)
    for name, p in optimized.named_parameters():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p.grad.double(), params[name].grad.double(), **one_rounding,
                                   msg=name)


def _max_relative_gap(grads, reference) -> float:
    """The largest |difference| of any gradient, relative to that gradient's largest entry."""
    return max(((grads[n] - reference[n]).abs().max() / reference[n].abs().max()).item()
               for n in reference if reference[n].abs().max() > 0)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_whole_model_under_autocast_matches_everything_and_stays_as_close_as_compile(family):
    """Every default pass on an fp32 model under autocast: nothing declines. Against eager
    under autocast, the gradients differ by where bf16 intermediates are rounded — as much for
    torch.compile itself (AOTAutograd's backward rounds elsewhere than eager's: ~0.7% of a
    gradient's scale in this model). The fused loss adds the unrounded logits. The bound is
    measured, not fixed: within twice torch.compile's own gap, the loss within one bf16
    rounding of eager's."""
    eager, optimized = _twins(family)
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    chronicals.optimize(optimized, strict=True, compiler="aot_eager")
    inputs = batch()
    with torch.autocast(**BF16):
        loss_e, grads_e = loss_and_grads(eager, inputs)
        loss_c, grads_c = loss_and_grads(compiled, inputs)
        loss_o, grads_o = loss_and_grads(optimized, inputs)
    report = chronicals.report_of(optimized)
    assert not report.declines, str(report)
    assert report.counts == {"rmsnorm": 5, "swiglu": 2, "rope": 2, "attention": 2,
                             "linear_cross_entropy": 1, "lora": 0, "projections": 2}
    # every norm feeds linears only (the final one through the lm_head's slice), every RoPE
    # SDPA only: all write their results in bf16, where autocast's casts would take them
    details = {op: [m.detail for m in report.matches if m.op == op] for op in ("rmsnorm", "rope")}
    assert all("result in bf16" in d for d in details["rmsnorm"]), details
    assert all("autocast casts it to for attention" in d for d in details["rope"]), details
    assert all(g.dtype == torch.float32 for g in grads_o.values())
    torch.testing.assert_close(loss_o, loss_e, rtol=2 ** -8, atol=0)
    compile_gap = _max_relative_gap(grads_c, grads_e)
    assert 0 < compile_gap < 2 ** -6                     # the premise: bf16-sized, not zero
    assert _max_relative_gap(grads_o, grads_e) <= 2 * compile_gap


@pytest.mark.gpu
def test_fp32_model_under_cuda_autocast_trains_like_eager_with_every_pass():
    """HF Trainer's mixed precision on the GPU: fp32 weights, ``torch.autocast`` bf16, Inductor
    and the Triton kernels, every pass matched (none declined); 20 AdamW steps of real text,
    per-step losses within the convergence suite's bf16 tolerance of eager's."""
    from chronicals_fx.workload import build_model, byte_batches

    losses = {}
    for variant in ("eager", "chronicals"):
        model = build_model("tiny-llama", dtype=torch.float32, device="cuda")
        model.config.use_cache = False
        if variant == "chronicals":
            chronicals.optimize(model, strict=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        batches = byte_batches(8, 256, device="cuda")
        losses[variant] = []
        for _ in range(20):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(**next(batches)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[variant].append(loss.item())
        if variant == "chronicals":
            report = chronicals.report_of(model)
            assert not report.declines, str(report)
            # attention: transformers may call SDPA is_causal already (left alone, uncounted)
            assert report.counts["rmsnorm"] == 9 and report.counts["linear_cross_entropy"] == 1
    eager, ours = losses["eager"], losses["chronicals"]
    assert ours[-1] < ours[0] - 0.5                       # it learned
    for a, b in zip(eager, ours):
        assert abs(a - b) <= 0.02 * abs(a), (eager, ours)


class _ProbabilitiesCastToV(nn.Module):
    """Eager attention over fp32 q, k and a bf16 v without autocast: the code casts P to v's
    dtype itself, so its scores are fp32 — not autocast's bf16 inputs."""

    def forward(self, q, k, v):
        causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~causal, -torch.inf)
        return torch.softmax(scores, dim=-1).to(v.dtype) @ v


class _AutocastInside(nn.Module):
    """``with torch.autocast`` inside the traced code (an autocast region of the graph)."""

    def forward(self, q, k, v):
        causal = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril()
        with torch.autocast(**BF16):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=causal)


def _qkv():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 4, generator=g) for _ in range(3))
    return q, k, v.to(torch.bfloat16)


def test_mixed_dtypes_without_autocast_are_left_as_written():
    """Mixed dtypes are autocast's casts only where autocast is on: here the scores are fp32
    by the code's own choice, and casting q and k down would round them, so it declines."""
    report = chronicals.explain(_ProbabilitiesCastToV(), *_qkv(),
                                chronicals_options={"passes": ("attention",)})
    assert report.counts["attention"] == 0
    assert [d.reason for d in report.declines] == [
        "mixed dtypes q torch.float32, k torch.float32, v torch.bfloat16"]


@pytest.mark.parametrize("v_dtype, cast", [(torch.bfloat16, "q/k"), (torch.float32, "q/k/v")])
def test_autocast_entered_inside_the_traced_code_is_seen(v_dtype, cast):
    """q and k fp32 with v bf16 (RoPE's fp32 cos/sin), or all three fp32 (transformers 5.17's
    Qwen2 under autocast, where the attention declined "output dtype differs" on the GPU:
    session 18): both are autocast's casts to bf16 at SDPA."""
    module = _AutocastInside()
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager",
                                    passes=("attention",))
    q, k, v = _qkv()
    v = v.to(v_dtype)
    expected, got = module(q, k, v), optimized(q, k, v)
    [match] = chronicals.report_of(optimized).matches
    assert f"autocast's casts of {cast} to bf16 made explicit" in match.detail
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


class _GatedMLP(nn.Module):
    def __init__(self, hidden=16, intermediate=40):
        super().__init__()
        self.gate = nn.Linear(hidden, intermediate, bias=False)
        self.up = nn.Linear(hidden, intermediate, bias=False)
        self.down = nn.Linear(intermediate, hidden)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x)).float().square().mean()


def test_down_projection_under_autocast_is_taken_into_swiglu_with_its_casts():
    """The fp32 down projection meets the bf16 product under autocast: its W and b are cast down
    explicitly and the projection goes into the SwiGLU op (which saves only g and u). Loss and
    every weight gradient are eager's bit for bit; x's gradient, the sum of the gate and up
    branches', within one bf16 rounding (the two bf16 terms are summed in another order)."""
    module = _GatedMLP()
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager",
                                    passes=("swiglu",))
    x = torch.randn(4, 8, 16)
    x_e, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast(**BF16):
        loss_e, loss_o = module(x_e), optimized(x_o)
    loss_e.backward()
    loss_o.backward()
    [match] = chronicals.report_of(optimized).matches
    assert "down projection taken in" in match.detail
    assert "autocast's casts of the down projection's weight made explicit" in match.detail
    assert torch.equal(loss_o, loss_e)
    for (name, p_e), p_o in zip(module.named_parameters(), optimized.parameters()):
        assert torch.equal(p_o.grad, p_e.grad), name
    assert (x_o.grad - x_e.grad).abs().max() <= 2 ** -8 * x_e.grad.abs().max()


class _NormIntoProjections(nn.Module):
    """An fp32 RMSNorm (HF's spelling) read by ``readers`` linears, their outputs summed;
    ``residual``: the norm's result also added to that sum (a reader that is not a linear);
    ``cast_once``: the result cast to that dtype before the linears read it — what the pass
    makes of the norm under autocast, as a reference."""

    def __init__(self, readers: int, residual: bool = False,
                 cast_once: torch.dtype | None = None, hidden: int = 48):
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(hidden))
        self.projections = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(readers))
        self.residual, self.cast_once = residual, cast_once

    def forward(self, x):
        h = x.float()
        y = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        if self.cast_once is not None:
            y = y.to(self.cast_once)
        out = sum(p(y) for p in self.projections)
        if self.residual:
            out = out + y
        return out.float().square().mean()


def _train_step_under_autocast(module, x, dtype=torch.bfloat16):
    x = x.clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with torch.autocast(device_type="cpu", dtype=dtype):
        loss = module(x)
    loss.backward()
    return loss.detach(), {"x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}


@pytest.mark.parametrize("readers,dtype", [(1, torch.bfloat16), (3, torch.bfloat16),
                                           (3, torch.float16)])
def test_norm_read_only_by_linears_writes_its_result_in_autocast_dtype(readers, dtype):
    """Under autocast every linear reading the fp32 norm result casts it to bf16 (fp16): the
    op writes it in that dtype instead. The loss is eager's bit for bit (the same values reach
    the GEMMs). The gradients are those of the norm cast once and read by the linears (the
    reference module): autograd adds the readers' low-precision gradients in that dtype before
    the norm's backward (under Inductor on a GPU our kernel takes them unsummed and adds them
    in fp32)."""
    x = torch.randn(2, 7, 48)
    eager = _NormIntoProjections(readers)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager",
                                    passes=("rmsnorm",))
    loss_o, grads_o = _train_step_under_autocast(optimized, x, dtype)
    [match] = chronicals.report_of(optimized).matches
    short = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    assert f"result in {short} (autocast casts it there for every reader)" in match.detail
    loss_e, grads_e = _train_step_under_autocast(eager, x, dtype)
    assert torch.equal(loss_o, loss_e)
    reference = _NormIntoProjections(readers, cast_once=dtype)
    reference.load_state_dict(eager.state_dict())
    _, grads_r = _train_step_under_autocast(reference, x, dtype)
    for name, grad in grads_r.items():
        assert grads_o[name].dtype == torch.float32
        torch.testing.assert_close(grads_o[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    if readers == 1:             # one reader: no sum, so the gradients are eager's too
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_o[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("autocast", [True, False])
def test_norm_result_stays_fp32_when_a_reader_is_not_an_autocast_linear(autocast):
    """A reader that uses the fp32 value itself (a residual add) or no autocast: the result is
    written in fp32, as the graph computes it, and the step equals eager's."""
    x = torch.randn(2, 7, 48)
    eager = _NormIntoProjections(2, residual=autocast)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager",
                                    passes=("rmsnorm",))
    context = torch.autocast(**BF16) if autocast else contextlib.nullcontext()
    with context:
        loss_o = optimized(x)
        loss_e = eager(x)
    [match] = chronicals.report_of(optimized).matches
    assert "result in" not in match.detail
    torch.testing.assert_close(loss_o, loss_e, rtol=1e-6, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_rope_read_by_sdpa_writes_its_result_in_autocast_dtype_and_equals_eager(family):
    """RoPE of bf16 q and k by fp32 cos/sin gives fp32 under autocast, which SDPA casts back to
    bf16 (Qwen2's k through repeat_kv first): the op writes bf16 itself. The loss and every
    gradient are still eager's bit for bit — the same bf16 values reach attention, and its
    bf16 gradients reach the rotation's backward as the exact fp32 values they were cast to."""
    reference, optimized = _twins(family, attn_implementation="sdpa")
    chronicals.optimize(optimized, strict=True, compiler="aot_eager",
                        passes=("rope", "attention"))
    inputs = batch()
    with torch.autocast(**BF16):
        loss_r, grads_r = loss_and_grads(reference, inputs)
        loss_o, grads_o = loss_and_grads(optimized, inputs)
    report = chronicals.report_of(optimized)
    ropes = [m for m in report.matches if m.op == "rope"]
    assert len(ropes) == 2 and not report.declines, str(report)
    assert all("result in the dtype autocast casts it to for attention" in m.detail
               for m in ropes)
    assert torch.equal(loss_o, loss_r)
    for name in grads_r:
        assert torch.equal(grads_o[name], grads_r[name]), name


def test_rope_read_by_eager_attention_keeps_its_fp32_result():
    """The eager spelling casts its softmax to the query's dtype: a bf16 result would change
    what that reads, so RoPE's result stays fp32 there."""
    _, optimized = _twins("llama", attn_implementation="eager")
    chronicals.optimize(optimized, strict=True, compiler="aot_eager",
                        passes=("rope", "attention"))
    with torch.autocast(**BF16):
        loss_and_grads(optimized, batch())
    ropes = [m for m in chronicals.report_of(optimized).matches if m.op == "rope"]
    assert len(ropes) == 2 and all("autocast casts" not in m.detail for m in ropes)
