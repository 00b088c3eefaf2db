"""Attention pass: HF families (sdpa and eager), hand-written spellings, packed batches with
no cross-document attention; look-alikes left alone; declines say why."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chronicals
from chronicals_fx.kernels import attention as attention_kernels
from tests.conftest import DEVICE
from tests.tiny_models import (
    assert_same_training_signal,
    batch,
    loss_and_grads,
    optimized_matches_eager,
    tiny_causal_lm,
)

ONLY = {"passes": ("attention",)}


# ---------------------------------------------------------------------------------------------
# Hugging Face families. use_cache=False is the training setting; there transformers builds a
# [B,1,T,T] mask inside the graph (from position ids), which the pass must prove causal.
# AOTAutograd traces forward and backward (aot_eager); Inductor is exercised once below.
# ---------------------------------------------------------------------------------------------
HF_CASES = [("llama", "sdpa", 2), ("llama", "eager", 1), ("qwen2", "eager", 1),
            ("mistral", "sdpa", 1), ("gemma", "eager", 1), ("phi3", "sdpa", 1),
            ("qwen3", "eager", 1)]


@pytest.mark.parametrize("family,impl,layers", HF_CASES)
def test_hf_family_counts_and_parity(family, impl, layers):
    eager = tiny_causal_lm(family, attn_implementation=impl, use_cache=False,
                           num_hidden_layers=layers)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager", **ONLY)
    inputs = batch()
    assert_same_training_signal(eager, optimized, inputs, rtol=1e-4, atol=1e-5)
    report = chronicals.report_of(optimized)
    assert report.counts["attention"] == layers, str(report)
    assert not report.declines, str(report)
    detail = report.matches[0].detail
    assert "mask proven causal, not materialized" in detail and "GQA without repeat_kv" in detail


# ---------------------------------------------------------------------------------------------
# Packed batches: several documents per row, position ids restarting at 0, no attention_mask.
# ---------------------------------------------------------------------------------------------
DOCS = [[5, 6, 5], [3, 9, 4]]   # document lengths per row, T = 16


def _packed_position_ids() -> torch.Tensor:
    return torch.tensor([[p for n in row for p in range(n)] for row in DOCS])


def _spans():
    for r, row in enumerate(DOCS):
        s = 0
        for n in row:
            yield r, s, s + n
            s += n


def test_packed_batch_documents_are_isolated():
    torch.manual_seed(0)
    eager = tiny_causal_lm("llama", attn_implementation="sdpa", use_cache=False)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager", **ONLY)
    position_ids = _packed_position_ids()
    embeds = torch.randn(2, 16, eager.config.hidden_size)
    labels = torch.randint(0, 96, (2, 16))

    # Loss and every gradient equal transformers' own (dense block-diagonal mask) computation.
    inputs = {"inputs_embeds": embeds, "position_ids": position_ids, "labels": labels}
    assert_same_training_signal(eager, optimized, inputs, rtol=1e-4, atol=1e-5)
    report = chronicals.report_of(optimized)
    assert report.counts["attention"] == 2 and not report.declines, str(report)
    assert all("causal within documents" in m.detail and "document kernel" in m.detail
               for m in report.matches), str(report)

    # No cross-document attention: a document's output has exactly zero gradient with
    # respect to every token of every other document.
    x = embeds.clone().requires_grad_()
    logits = optimized(inputs_embeds=x, position_ids=position_ids).logits
    weights = torch.randn_like(logits)
    for r, s, e in _spans():
        (grad,) = torch.autograd.grad((logits[r, s:e] * weights[r, s:e]).sum(), x,
                                      retain_graph=True)
        inside = torch.zeros(2, 16, dtype=torch.bool)
        inside[r, s:e] = True
        assert grad[~inside].abs().max() == 0, (r, s, e)
        assert grad[inside].abs().sum() > 0

    # Each document gets the logits it gets alone.
    with torch.no_grad():
        for r, s, e in _spans():
            alone = eager(inputs_embeds=embeds[r:r + 1, s:e],
                          position_ids=torch.arange(e - s)[None]).logits[0]
            torch.testing.assert_close(logits[r, s:e].detach(), alone, rtol=1e-4, atol=1e-5)


def test_arange_position_ids_are_plain_causal():
    """position_ids passed explicitly are runtime values: the document kernel serves them
    (one document per row); without them transformers' arange proves the mask causal."""
    model = tiny_causal_lm("qwen2", attn_implementation="eager", use_cache=False,
                           num_hidden_layers=1)
    inputs = {**batch(), "position_ids": torch.arange(16)[None].expand(2, -1)}
    report = chronicals.explain(model, **inputs, chronicals_options=ONLY)
    assert report.counts["attention"] == 1 and "within documents" in report.matches[0].detail


# ---------------------------------------------------------------------------------------------
# Hand-written attention: each spelling matches once and equals eager (loss and every grad).
# ---------------------------------------------------------------------------------------------
T = 16


def _repeat_kv(x, n):
    b, h, t, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def _neg_inf_triu(q):
    return torch.triu(torch.full((q.shape[2], q.shape[2]), float("-inf"), device=q.device), 1)


def _tril_bool(q):
    return torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).tril()


def _arange_causal(q):
    i = torch.arange(q.shape[2], device=q.device)
    return i[None, :] <= i[:, None]


def _eager(q, k, v, scores_fn, scale=None):
    s = scores_fn(torch.matmul(q, k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5))
    return torch.matmul(torch.softmax(s, dim=-1), v)


SPELLINGS = {
    "sdpa_is_causal_repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(
        q, _repeat_kv(k, 2), _repeat_kv(v, 2), is_causal=True),
    "sdpa_bool_tril_gqa": lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=_tril_bool(q), enable_gqa=True),
    "sdpa_additive_triu_repeat_kv": lambda q, k, v: F.scaled_dot_product_attention(
        q, _repeat_kv(k, 2), _repeat_kv(v, 2), attn_mask=_neg_inf_triu(q)),
    "eager_additive_triu": lambda q, k, v: _eager(
        q, _repeat_kv(k, 2), _repeat_kv(v, 2), lambda s: s + _neg_inf_triu(q)),
    "eager_masked_fill_not_tril": lambda q, k, v: _eager(
        q, _repeat_kv(k, 2), _repeat_kv(v, 2),
        lambda s: s.masked_fill(~_tril_bool(q), float("-inf"))),
    "eager_where_arange": lambda q, k, v: _eager(
        q, _repeat_kv(k, 2), _repeat_kv(v, 2),
        lambda s: torch.where(_arange_causal(q), s, float("-inf"))),
    "eager_hf_style_float_softmax_dropout": lambda q, k, v: torch.matmul(F.dropout(
        F.softmax(torch.matmul(q, _repeat_kv(k, 2).transpose(2, 3)) / math.sqrt(q.shape[-1])
                  + torch.where(_arange_causal(q), torch.tensor(0.0), torch.finfo(torch.float32).min),
                  dim=-1, dtype=torch.float32).to(q.dtype), p=0.0, training=True), _repeat_kv(v, 2)),
    "eager_tril_ones_eq_zero": lambda q, k, v: _eager(
        q, _repeat_kv(k, 2), _repeat_kv(v, 2),
        lambda s: s.masked_fill(torch.tril(torch.ones(T, T)) == 0, float("-inf"))),
    "eager_no_mask_mha": lambda q, k, v: _eager(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), lambda s: s),
    "eager_scaled_query": lambda q, k, v: torch.matmul(torch.softmax(
        torch.matmul(q * 0.5, _repeat_kv(k, 2).transpose(-1, -2)) + _neg_inf_triu(q), -1),
        _repeat_kv(v, 2)),
}


class Attention(nn.Module):
    def __init__(self, fn, hidden=32, heads=4, kv_heads=2):
        super().__init__()
        self.fn, self.heads, self.kv_heads, self.dim = fn, heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.dim, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, *extra):
        B, T_, _ = x.shape
        q = self.q(x).view(B, T_, self.heads, self.dim).transpose(1, 2)
        k = self.k(x).view(B, T_, self.kv_heads, self.dim).transpose(1, 2)
        v = self.v(x).view(B, T_, self.kv_heads, self.dim).transpose(1, 2)
        y = self.fn(q, k, v, *extra)
        return self.o(y.transpose(1, 2).reshape(B, T_, -1))


def _check(module, *args, count=1, compiler="aot_eager", rtol=1e-5, atol=1e-6, **options):
    optimized = optimized_matches_eager(module, *args, rtol=rtol, atol=atol, compiler=compiler,
                                        **ONLY, **options)
    report = chronicals.report_of(optimized)
    assert report.counts["attention"] == count, str(report)
    assert not report.declines, str(report)
    return report


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_hand_written_spellings(name):
    torch.manual_seed(0)
    report = _check(Attention(SPELLINGS[name]), torch.randn(2, T, 32))
    detail = report.matches[0].detail
    assert ("no mask" if "no_mask" in name else "causal") in detail
    if "repeat_kv" in name or name.startswith("eager_") and "mha" not in name:
        assert "GQA without repeat_kv" in detail


def test_already_fused_sdpa_is_not_counted():
    """SDPA with is_causal and enable_gqa already runs the fused kernels: nothing to change."""
    module = Attention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                      enable_gqa=True))
    report = chronicals.explain(module, torch.randn(2, T, 32), chronicals_options=ONLY)
    assert report.counts["attention"] == 0 and not report.declines, str(report)


def test_attention_dropout_is_kept():
    module = Attention(lambda q, k, v: torch.matmul(F.dropout(torch.softmax(
        torch.matmul(q, _repeat_kv(k, 2).transpose(-1, -2)) + _neg_inf_triu(q), -1),
        p=0.25, training=True), _repeat_kv(v, 2)))
    report = chronicals.explain(module, torch.randn(2, T, 32), chronicals_options=ONLY)
    assert report.counts["attention"] == 1 and "dropout 0.25" in report.matches[0].detail


# ---------------------------------------------------------------------------------------------
# A hand-written packed model (transformers' document detection, copied): document kernel,
# compiled once by Inductor.
# ---------------------------------------------------------------------------------------------
def _document_mask(position_ids):
    first = position_ids[:, :1] - 1
    doc = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    i = torch.arange(position_ids.shape[1], device=position_ids.device)
    b = torch.arange(position_ids.shape[0], device=position_ids.device)[:, None, None, None]
    causal = i[None, None, None, :] <= i[None, None, :, None]
    same = doc[b, i[None, None, :, None]] == doc[b, i[None, None, None, :]]
    return causal & same


def _packed_attention(dropout=0.0):
    def fn(q, k, v, position_ids):
        mask = _document_mask(position_ids)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                              dropout_p=dropout)
    return fn


def test_hand_written_packed_attention_inductor():
    torch.manual_seed(0)
    # compile_threads=1: no worker pool to start on a small CI machine
    report = _check(Attention(_packed_attention()), torch.randn(2, T, 32), _packed_position_ids(),
                    compiler="inductor", rtol=1e-4, atol=1e-5, inductor={"compile_threads": 1})
    assert "causal within documents" in report.matches[0].detail


# ---------------------------------------------------------------------------------------------
# Look-alikes: not attention, never reported; results identical.
# ---------------------------------------------------------------------------------------------
LOOK_ALIKES = {
    "softmax_over_queries": lambda q, k, v: torch.matmul(
        torch.softmax(torch.matmul(q, k.transpose(-2, -1).repeat_interleave(2, 1)), dim=-2),
        v.repeat_interleave(2, 1)),
    "softmax_then_elementwise": lambda q, k, v: torch.softmax(
        torch.matmul(q, k.transpose(-2, -1).repeat_interleave(2, 1)), -1).sum(-1, keepdim=True) * q,
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_are_not_matched(name):
    module = Attention(LOOK_ALIKES[name])
    x = torch.randn(2, T, 32)
    report = chronicals.explain(module, x, chronicals_options=ONLY)
    assert report.counts["attention"] == 0 and not report.declines, str(report)


# ---------------------------------------------------------------------------------------------
# Declines: the original runs, the report says why.
# ---------------------------------------------------------------------------------------------
def _window(q):
    i = torch.arange(q.shape[2], device=q.device)
    return (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4)


def _with_weights(q, k, v):
    p = torch.softmax(torch.matmul(q, _repeat_kv(k, 2).transpose(-1, -2)) + _neg_inf_triu(q), -1)
    return torch.matmul(p, _repeat_kv(v, 2)) + p.sum()   # the weights feed something else


DECLINES = {
    "anti_causal": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=_tril_bool(q).T, enable_gqa=True), "unknown structure"),
    "sliding_window": (lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=_window(q), enable_gqa=True), "sliding window of 4"),
    "soft_capping": (lambda q, k, v: torch.matmul(torch.softmax(
        torch.tanh(torch.matmul(q, _repeat_kv(k, 2).transpose(-1, -2)) / 50.0) * 50.0
        + _neg_inf_triu(q), -1), _repeat_kv(v, 2)), "soft-capping"),
    "weights_returned": (lambda q, k, v: _with_weights(q, k, v), "used outside"),
    "dropout_in_packed_documents": (_packed_attention(dropout=0.1), "dropout"),
}


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declines(name):
    fn, reason = DECLINES[name]
    module = Attention(fn)
    args = (torch.randn(2, T, 32),) + ((_packed_position_ids(),) if "packed" in name else ())
    report = chronicals.explain(module, *args, chronicals_options=ONLY)
    assert report.counts["attention"] == 0, str(report)
    [decline] = report.declines
    assert reason in decline.reason, decline.reason


def test_runtime_masks_decline_and_run_unchanged():
    """A mask that arrives as an input (padding, arbitrary) can't be proven: declined."""
    module = Attention(lambda q, k, v, m: F.scaled_dot_product_attention(
        q, k, v, attn_mask=m & _tril_bool(q), enable_gqa=True))
    x, m = torch.randn(2, T, 32), torch.rand(2, 1, T, T) > 0.3
    m[..., 0] = True
    report = chronicals.explain(module, x, m, chronicals_options=ONLY)
    assert report.counts["attention"] == 0
    [decline] = report.declines
    assert "runtime boolean tensor" in decline.reason
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager", **ONLY)
    torch.testing.assert_close(optimized(x, m), module(x, m), rtol=0, atol=0)


def test_declines_keep_no_caller_frame_alive():
    """A decline must not hold the compiling frames: DDP's graph splitter keeps a guard in one
    whose ``__del__`` clears ``fakify_first_call``, and a late cyclic GC of it broke the next
    bucket's compile on GPUs. With the cyclic GC off, the caller's locals die with its frame."""
    import gc
    import weakref

    class Guard:
        pass

    def compile_here():
        guard = Guard()  # noqa: F841  (alive exactly as long as this frame)
        module = Attention(lambda q, k, v, m: F.scaled_dot_product_attention(
            q, k, v, attn_mask=m & _tril_bool(q), enable_gqa=True))
        mask = torch.rand(2, 1, T, T) > 0.3
        report = chronicals.explain(module, torch.randn(2, T, 32), mask, chronicals_options=ONLY)
        assert report.declines and "runtime boolean tensor" in report.declines[0].reason
        return weakref.ref(guard)

    # Dynamo itself runs a young-generation GC after each compile, which would hide the cycle.
    no_gc_after = ({"run_gc_after_compile": False}
                   if hasattr(torch._dynamo.config, "run_gc_after_compile") else {})
    enabled = gc.isenabled()
    gc.disable()
    try:
        with torch._dynamo.config.patch(**no_gc_after):
            ref = compile_here()
        assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
    finally:
        if enabled:
            gc.enable()


# ---------------------------------------------------------------------------------------------
# GPU: the kernels the CPU tests replace by references.
# ---------------------------------------------------------------------------------------------
def _output_and_grads(module, x, dy):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    return [y, x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", attention_kernels.BACKENDS)
def test_gpu_causal_backends_bf16(backend):
    """bf16 output and every gradient no further from a float64 run than eager bf16 is (twice
    eager's relative error plus one bf16 rounding): elementwise closeness of two bf16 runs is
    not a meaningful bar for weight gradients summed over 512 tokens."""
    torch.manual_seed(0)
    # the spelling repeats k and v twice: 8 query heads over 4 key/value heads; its boolean
    # mask keeps the scores' dtype (the additive spellings' fp32 mask would promote bf16)
    module = Attention(SPELLINGS["eager_masked_fill_not_tril"], hidden=512, heads=8, kv_heads=4)
    module = module.to(DEVICE, torch.bfloat16)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="inductor",
                                    attention_backend=backend, **ONLY)
    x = torch.randn(2, 256, 512, device=DEVICE, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    reference = _output_and_grads(copy.deepcopy(module).double(), x.double(), dy.double())
    eager = _output_and_grads(module, x, dy)
    ours = _output_and_grads(optimized, x, dy)
    for i, (r, e, o) in enumerate(zip(reference, eager, ours)):
        err_e = ((e.double() - r).norm() / r.norm()).item()
        err_o = ((o.double() - r).norm() / r.norm()).item()
        assert err_o <= 2 * err_e + 2 ** -8, (i, err_o, err_e)
    report = chronicals.report_of(optimized)
    assert report.counts["attention"] == 1 and not report.declines, str(report)
    assert f"backend {backend}" in report.matches[0].detail


@pytest.mark.gpu
def test_gpu_packed_llama_bf16_inductor():
    torch.manual_seed(0)
    eager = tiny_causal_lm("llama", attn_implementation="sdpa", use_cache=False,
                           hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                           ).to(DEVICE, torch.bfloat16)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, **ONLY)
    lengths = [[100, 300, 112], [512], [1, 255, 256]]
    position_ids = torch.tensor([[p for n in row for p in range(n)] for row in lengths],
                                device=DEVICE)
    ids = torch.randint(0, 96, (3, 512), device=DEVICE)
    inputs = {"input_ids": ids, "labels": ids, "position_ids": position_ids}
    loss_e, grads_e = loss_and_grads(eager, inputs)
    loss_o, grads_o = loss_and_grads(optimized, inputs)
    torch.testing.assert_close(loss_o, loss_e, rtol=1e-2, atol=1e-2)
    for name, g in grads_e.items():
        err = ((grads_o[name].float() - g.float()).norm() / g.float().norm()).item()
        assert err < 3e-2, (name, err)
    report = chronicals.report_of(optimized)
    assert report.counts["attention"] == 2 and "document kernel" in report.matches[0].detail


def test_symbolic_sequence_length_declines_and_runs_the_original():
    """A graph compiled for any sequence length (dynamic=True, or Dynamo's automatic dynamic
    shapes after a second length) cannot have its mask proven for every length: the pass
    declines with the reason and the original attention runs, equal to eager."""
    import functools

    from chronicals_fx.backend import chronicals_backend

    torch.manual_seed(0)
    module = Attention(SPELLINGS["eager_additive_triu"])
    reports = []
    backend = functools.partial(chronicals_backend, options=dict(compiler="aot_eager", **ONLY),
                                on_report=reports.append)
    compiled = torch.compile(module, backend=backend, dynamic=True)
    for length in (T, T + 3):
        x = torch.randn(2, length, 32)
        torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6)
    assert reports and all(r.counts["attention"] == 0 for r in reports)
    assert any("symbolic shapes" in d.reason for r in reports for d in r.declines), reports
