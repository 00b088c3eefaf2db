"""RoPE pass: exact counts and eager parity on HF models and hand-written spellings; look-alikes
left alone; declines say why. One "rope" match = one op call (q and k of a layer together)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import chronicals
from tests.tiny_models import (
    FAMILIES,
    assert_same_training_signal,
    batch,
    loss_and_grads,
    tiny_causal_lm,
)

ROPE_ONLY = {"passes": ("rope",)}
LAYERS = 2  # tiny_causal_lm's depth: one fused q+k call per layer


def _rope_report(model):
    report = chronicals.report_of(model)
    return report, [m for m in report.matches if m.op == "rope"], [d for d in report.declines if d.op == "rope"]


# ---------------------------------------------------------------------------------------------
# Hugging Face families
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_family_counts_and_parity(family):
    eager = tiny_causal_lm(family)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager", **ROPE_ONLY)
    assert_same_training_signal(eager, optimized, batch())
    report, matches, declines = _rope_report(optimized)
    assert len(matches) == LAYERS and not declines, str(report)
    assert all("rotate-half, 2 tensor(s), heads 4 + 2" in m.detail and "half rows" in m.detail
               for m in matches), str(report)


def _hf(config_name: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kw)
    return transformers.AutoModelForCausalLM.from_config(config)


OTHER_HF = {
    # partial rotary (rotate-half on the first half of each head, the rest passed through)
    "phi3_partial": (lambda: tiny_causal_lm("phi3", partial_rotary_factor=0.5), "partial R=6"),
    # interleaved pairs, [B, T, H, D], partial rotary_dim, cos/sin by repeat_interleave
    "gptj": (lambda: _hf("GPTJConfig", vocab_size=96, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                         n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             "interleaved, 2 tensor(s), heads 4 + 4, D=16, partial R=8, [B,T,H,D]"),
}


@pytest.mark.parametrize("name", sorted(OTHER_HF))
def test_other_hf_spellings(name):
    build, detail = OTHER_HF[name]
    eager = build()
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager", **ROPE_ONLY)
    assert_same_training_signal(eager, optimized, batch())
    report, matches, declines = _rope_report(optimized)
    assert len(matches) == LAYERS and not declines, str(report)
    assert all(detail in m.detail for m in matches), str(report)


def test_gpt2_learned_positions_untouched():
    eager = _hf("GPT2Config", vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="eager", **ROPE_ONLY)
    assert_same_training_signal(eager, optimized, batch(), rtol=0, atol=0)
    report, matches, declines = _rope_report(optimized)
    assert not matches and not declines, str(report)


def test_bf16_llama_is_bit_identical_to_eager_rounding():
    """bf16 Llama: HF casts cos/sin to bf16, so eager rounds q·cos, rotate_half(q)·sin and their
    sum to bf16 (and autograd rounds the gradient products). The op rounds at the same points:
    with and without the pass, under the same compiler, loss and every gradient are identical."""
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    with_rope = chronicals.optimize(copy.deepcopy(model), strict=True, compiler="aot_eager", **ROPE_ONLY)
    without = chronicals.optimize(copy.deepcopy(model), strict=True, compiler="aot_eager", passes=())
    inputs = batch()
    loss_r, grads_r = loss_and_grads(with_rope, inputs)
    loss_w, grads_w = loss_and_grads(without, inputs)
    _, matches, _ = _rope_report(with_rope)
    assert len(matches) == LAYERS and "products rounded to bf16" in matches[0].detail
    assert torch.equal(loss_r, loss_w)
    for name in grads_w:
        assert torch.equal(grads_r[name], grads_w[name]), name


# ---------------------------------------------------------------------------------------------
# Hand-written spellings: q and k projected from x, rotated; one fused call each, equal to eager.
# ---------------------------------------------------------------------------------------------
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


class Rotary(nn.Module):
    def __init__(self, fn, layout="bhtd", C=24, Hq=4, Hk=2, D=8, T=6, rotary_dim=None):
        super().__init__()
        self.fn, self.layout, self.Hq, self.Hk, self.D = fn, layout, Hq, Hk, D
        self.R = rotary_dim or D
        self.wq = nn.Linear(C, Hq * D, bias=False)
        self.wk = nn.Linear(C, Hk * D, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.R, 2).float() / self.R))
        theta = torch.arange(T).float()[:, None] * self.inv_freq                      # (T, R/2)
        self.register_buffer("cos_cached", torch.cat((theta, theta), -1).cos())      # (T, R)
        self.register_buffer("sin_cached", torch.cat((theta, theta), -1).sin())
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(theta), theta))  # complex

    def forward(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.Hq, self.D)
        k = self.wk(x).view(B, T, self.Hk, self.D)
        if self.layout == "bhtd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        return self.fn(self, q, k)

    def hf_cos_sin(self, T, dtype):
        """HF's rotary module: angles from positions in the graph, halves duplicated by cat."""
        pos = torch.arange(T, device=self.inv_freq.device)[None, :, None].float()
        freqs = pos * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _seq(q, s):
    return q.shape[2] if s.layout == "bhtd" else q.shape[1]


def hf(s, q, k, unsqueeze_dim=1):
    cos, sin = s.hf_cos_sin(_seq(q, s), q.dtype)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def chunk_neg_mul_commuted(s, q, k):
    cos, sin = s.cos_cached[None, None], s.sin_cached[None, None]   # buffers: full rows

    def rot(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat([b * -1, a], dim=3)

    return sin * rot(q) + cos * q, rot(k) * sin + k * cos


def split_and_narrow(s, q, k):
    T = q.shape[2]

    def apply(x, use_split):
        cos, sin = s.hf_cos_sin(T, x.dtype)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)   # separate unsqueeze nodes per call
        h = x.shape[-1] // 2
        if use_split:
            x1, x2 = torch.split(x, h, dim=-1)
        else:
            x1, x2 = x.narrow(-1, 0, h), torch.narrow(x, 3, h, h)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    return apply(q, True), apply(k, False)


def gptj_interleaved(s, q, k):   # [B, T, H, D]
    theta = torch.arange(q.shape[1]).float()[None, :, None] * s.inv_freq     # (1, T, R/2)
    sin, cos = theta.sin(), theta.cos()
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin


def interleaved_reshape(s, q, k):
    cos, sin = s.cos_cached[None, None], s.sin_cached[None, None]

    def rot(x):
        pairs = torch.stack((-x[:, :, :, 1::2], x[:, :, :, ::2]), -1)
        return pairs.reshape(x.shape)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def meta_complex(s, q, k):       # [B, T, H, D]
    T = q.shape[1]
    q_ = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    k_ = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    f = s.freqs_cis[:T].view(1, T, 1, q_.shape[-1])
    return (torch.view_as_real(q_ * f).flatten(3).type_as(q),
            torch.view_as_real(k_ * f).flatten(3).type_as(k))


def partial_rotate_half(s, q, k):
    cos, sin = s.hf_cos_sin(q.shape[2], q.dtype)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    R = cos.shape[-1]

    def apply(x):
        x_rot, x_pass = x[..., :R], x[..., R:]
        return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)

    return apply(q), apply(k)


def partial_interleaved(s, q, k):   # [B, T, H, D], GPT-J
    theta = torch.arange(q.shape[1]).float()[None, :, None] * s.inv_freq
    cos = torch.repeat_interleave(theta.cos()[:, :, None, :], 2, 3)
    sin = torch.repeat_interleave(theta.sin()[:, :, None, :], 2, 3)

    def apply(x):
        x_rot, x_pass = x[:, :, :, : s.R], x[:, :, :, s.R:]
        return torch.cat([x_rot * cos + rotate_pairs(x_rot) * sin, x_pass], dim=-1)

    return apply(q), apply(k)


def gpt_oss_halves(s, q, k):
    """GPT-OSS: cos/sin of one angle per pair (width D/2), the halves rotated and concatenated;
    the products in q's dtype as there (its rotary module casts the tables to q's dtype)."""
    theta = torch.arange(q.shape[2]).float()[:, None] * s.inv_freq          # (T, D/2)
    cos, sin = theta.cos().to(q.dtype)[None, None], theta.sin().to(q.dtype)[None, None]

    def apply(x):
        first, second = torch.chunk(x, 2, dim=-1)
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    return apply(q), apply(k)


def ernie_widened_apart(s, q, k):
    """Ernie 4.5: interleaved pairs in fp32 whatever q's dtype, with x and rotate(x) each widened
    on its own (so x's gradient is two terms rounded to its dtype apart), fp32 tables taken as
    their first half repeated pairwise, the result cast back to q's dtype."""
    cos, sin = s.hf_cos_sin(q.shape[2], torch.float32)
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1).unsqueeze(1)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1).unsqueeze(1)

    def apply(x):
        return ((x.float() * cos) + (rotate_pairs(x).float() * sin)).to(x.dtype)

    return apply(q), apply(k)


def widened_twice(s, q, k):
    """x widened once for each product (``x.float()`` written twice): the same rotation, its
    gradient's two terms rounded apart as in Ernie's spelling."""
    cos, sin = s.hf_cos_sin(q.shape[2], torch.float32)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def apply(x):
        return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)

    return apply(q), apply(k)


def q_only(s, q, k):
    cos, sin = s.hf_cos_sin(q.shape[2], q.dtype)
    return q * cos.unsqueeze(1) + rotate_half(q) * sin.unsqueeze(1), k


def mrope_sections(s, q, k):
    """Multimodal-style cos/sin: per-section rows from three position streams (not duplicated
    halves): the op reads full rows."""
    T = q.shape[2]
    pos = torch.stack([torch.arange(T), torch.arange(T) // 2, torch.arange(T) % 3]).float()
    freqs = pos[:, None, :, None] * s.inv_freq                         # (3, 1, T, R/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    sections = [2, 1, 1, 2, 1, 1]                                      # 3 streams × 2 halves
    cos = torch.cat([c[i % 3] for i, c in enumerate(emb.cos().split(sections, -1))], -1)
    sin = torch.cat([c[i % 3] for i, c in enumerate(emb.sin().split(sections, -1))], -1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


SPELLINGS = {  # name -> (fn, layout, rotary_dim, words in the match detail)
    "hf": (hf, "bhtd", None, "rotate-half, 2 tensor(s), heads 4 + 2, D=8, [B,H,T,D], fp32→fp32, cos/sin half rows"),
    "hf_bthd": (lambda s, q, k: hf(s, q, k, 2), "bthd", None, "[B,T,H,D]"),
    "chunk_neg_mul_commuted": (chunk_neg_mul_commuted, "bhtd", None, "full rows"),
    "split_and_narrow": (split_and_narrow, "bhtd", None, "2 tensor(s)"),
    "gptj_interleaved": (gptj_interleaved, "bthd", None, "interleaved, 2 tensor(s), heads 4 + 2, D=8, [B,T,H,D], fp32→fp32, cos/sin half rows"),
    "interleaved_reshape": (interleaved_reshape, "bhtd", None, "interleaved, 2 tensor(s)"),
    "meta_complex": (meta_complex, "bthd", None, "complex, 2 tensor(s), heads 4 + 2, D=8, [B,T,H,D]"),
    "partial_rotate_half": (partial_rotate_half, "bhtd", 4, "partial R=4"),
    "partial_interleaved": (partial_interleaved, "bthd", 4, "interleaved, 2 tensor(s), heads 4 + 2, D=8, partial R=4"),
    "gpt_oss_halves": (gpt_oss_halves, "bhtd", None, "halves, 2 tensor(s), heads 4 + 2, D=8, [B,H,T,D], fp32→fp32, cos/sin half rows"),
    "ernie_widened_apart": (ernie_widened_apart, "bhtd", None, "interleaved, 2 tensor(s), heads 4 + 2, D=8, [B,H,T,D], fp32→fp32, cos/sin half rows"),
    "widened_twice": (widened_twice, "bhtd", None, "rotate-half, 2 tensor(s), heads 4 + 2, D=8, [B,H,T,D], fp32→fp32, cos/sin half rows"),
    "q_only": (q_only, "bhtd", None, "1 tensor(s), heads 4,"),
    "mrope_sections": (mrope_sections, "bhtd", None, "full rows"),
}


def _check(module, x, count=1, compiler="aot_eager", rtol=1e-6, atol=1e-6, exact=False):
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler=compiler, **ROPE_ONLY)
    x_e, x_o = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    outs_e, outs_o = module(x_e), optimized(x_o)
    report, matches, declines = _rope_report(optimized)
    assert len(matches) == count, str(report)
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": rtol, "atol": atol}
    for e, o in zip(outs_e, outs_o):
        assert e.dtype == o.dtype and e.shape == o.shape
        torch.testing.assert_close(o, e, **tol)
    dys = [torch.randn_like(e) for e in outs_e]
    torch.autograd.backward(outs_e, dys)
    torch.autograd.backward(outs_o, dys)
    torch.testing.assert_close(x_o.grad, x_e.grad, **tol)
    for (name, p_e), p_o in zip(module.named_parameters(), optimized.parameters()):
        torch.testing.assert_close(p_o.grad, p_e.grad, msg=name, **tol)
    return report, matches, declines


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_hand_written_spellings(name):
    fn, layout, rotary_dim, detail = SPELLINGS[name]
    torch.manual_seed(0)
    module = Rotary(fn, layout, rotary_dim=rotary_dim)
    report, matches, declines = _check(module, torch.randn(2, 6, 24))
    assert detail in matches[0].detail, str(report)
    assert not declines, str(report)


def test_inductor_complex():
    """Inductor compiles the inserted view_as_real/select of a complex table (on GPU, the HF
    rotate-half path through Inductor is test_gpu_llama_bf16_inductor)."""
    fn, layout, rotary_dim, _ = SPELLINGS["meta_complex"]
    torch.manual_seed(0)
    _check(Rotary(fn, layout, rotary_dim=rotary_dim), torch.randn(2, 6, 24), compiler="inductor")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rounds_where_eager_rounds(dtype):
    """bf16/fp16 q with cos/sin cast to the same dtype (as HF does): every product and the sum
    round to that dtype in eager, and in the op: forward and gradients bit for bit."""
    torch.manual_seed(0)
    for fn in (hf, gpt_oss_halves):
        module = Rotary(fn, "bhtd", D=16).to(dtype)
        _, matches, _ = _check(module, torch.randn(2, 6, 24).to(dtype), exact=True)
        assert "products rounded to" in matches[0].detail


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_products_in_fp32_of_a_low_precision_x(dtype):
    """Ernie's spelling on bf16/fp16 q and k: the rotation in fp32, one rounding at the store;
    backward, each of the two gradient terms rounded to x's dtype where its own cast rounds it,
    then added in that dtype: forward and gradients bit for bit."""
    torch.manual_seed(0)
    for fn in (ernie_widened_apart, widened_twice):
        module = Rotary(fn, "bhtd", D=16).to(dtype)
        _, matches, _ = _check(module, torch.randn(2, 6, 24).to(dtype), exact=True)
        assert "products rounded to" not in matches[0].detail, matches[0].detail


def test_several_layers_pair_q_with_k_of_the_same_layer():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Rotary(hf, "bhtd"), Rotary(hf, "bhtd")

        def forward(self, x):
            qa, ka = self.a(x)
            y = x + (qa.mean() + ka.mean())       # the second layer depends on the first
            return (qa, ka, *self.b(y))

    torch.manual_seed(0)
    _, matches, _ = _check(Two(), torch.randn(2, 6, 24), count=2)
    assert all("2 tensor(s)" in m.detail for m in matches)


# ---------------------------------------------------------------------------------------------
# Look-alikes: never matched, results identical.
# ---------------------------------------------------------------------------------------------
def _cos_sin(s, q):
    cos, sin = s.hf_cos_sin(q.shape[2], q.dtype)
    return cos.unsqueeze(1), sin.unsqueeze(1)


def _look(rot):
    def fn(s, q, k):
        cos, sin = _cos_sin(s, q)
        return q * cos + rot(q) * sin, k * cos + rot(k) * sin
    return fn


def _halves(x):
    h = x.shape[-1] // 2
    return x[..., :h], x[..., h:]


def _halves_look(x, s, q, sign=1, swap=False):
    """GPT-OSS's halves with a sign flipped (x1·c + x2·s, x2·c − x1·s: the inverse rotation's
    signs on the wrong halves) or cos and sin swapped in the second half: not a rotation by c, s."""
    theta = torch.arange(q.shape[2]).float()[:, None] * s.inv_freq
    c, sn = theta.cos()[None, None], theta.sin()[None, None]
    a, b = torch.chunk(x, 2, dim=-1)
    if swap:
        return torch.cat((a * c - b * sn, b * sn + a * c), dim=-1)
    if sign < 0:
        return torch.cat((a * c - b * sn, b * c - a * sn), dim=-1)
    return torch.cat((a * c - b * sn, b * c + a * sn), dim=-1)


LOOK_ALIKES = {
    "learned_absolute_positions": lambda s, q, k: (q + s.cos_cached[None, None], k + s.sin_cached[None, None]),
    "cat_without_negation": _look(lambda x: torch.cat((_halves(x)[1], _halves(x)[0]), -1)),
    "negation_on_the_other_half": _look(lambda x: torch.cat((_halves(x)[1], -_halves(x)[0]), -1)),
    "halves_not_swapped": _look(lambda x: torch.cat((-_halves(x)[0], _halves(x)[1]), -1)),
    "pairs_not_swapped": _look(lambda x: torch.stack((-x[..., ::2], x[..., 1::2]), -1).flatten(-2)),
    "minus_instead_of_plus": lambda s, q, k: tuple(x * _cos_sin(s, q)[0] - rotate_half(x) * _cos_sin(s, q)[1]
                                                   for x in (q, k)),
    "halves_with_swapped_signs": lambda s, q, k: tuple(_halves_look(x, s, q, sign=-1) for x in (q, k)),
    "halves_with_tables_swapped": lambda s, q, k: tuple(_halves_look(x, s, q, swap=True) for x in (q, k)),
    "rotates_another_tensor": lambda s, q, k: (q * _cos_sin(s, q)[0] + rotate_half(q.flip(1)) * _cos_sin(s, q)[1], k),
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_are_not_matched(name):
    torch.manual_seed(0)
    module = Rotary(LOOK_ALIKES[name], "bhtd")
    x = torch.randn(2, 6, 24)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager", **ROPE_ONLY)
    for got, want in zip(optimized(x), module(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    report, matches, declines = _rope_report(optimized)
    assert not matches and not declines, str(report)


# ---------------------------------------------------------------------------------------------
# Declines: the kernel can't serve it, the original runs, the report says why.
# ---------------------------------------------------------------------------------------------
class LearnedTable(Rotary):
    """A trainable cos table: the op passes no gradient to cos/sin, so this must stay eager."""

    def __init__(self):
        super().__init__(lambda s, q, k: (q * s.table[None, None] + rotate_half(q) * s.sin_cached[None, None],),
                         "bhtd")
        self.table = nn.Parameter(torch.randn(6, 8))


def _leaky(s, q, k):
    cos, sin = _cos_sin(s, q)
    rot = rotate_half(q)
    return q * cos + rot * sin, rot


def _per_head(s, q, k):
    cos = s.cos_cached[None, None].expand(1, 4, 6, 8) * torch.arange(1.0, 5.0)[None, :, None, None]
    return (q * cos + rotate_half(q) * s.sin_cached[None, None],)


def _three_d(s, q, k):
    q3 = q.reshape(-1, q.shape[2], q.shape[3])                       # [B·H, T, D]
    return (q3 * s.cos_cached + rotate_half(q3) * s.sin_cached,)


DECLINES = {
    "cos_requires_grad": (lambda: LearnedTable(), torch.float32, "requires grad"),
    "intermediate_used_outside": (lambda: Rotary(_leaky, "bhtd"), torch.float32, "used outside"),
    "cos_varies_over_heads": (lambda: Rotary(_per_head, "bhtd"), torch.float32, "vary over heads"),
    "float64": (lambda: Rotary(hf, "bhtd").double(), torch.float64, "float64"),
    "three_d": (lambda: Rotary(_three_d, "bhtd"), torch.float32, "3-D"),
}


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declines(name):
    build, dtype, reason = DECLINES[name]
    torch.manual_seed(0)
    module = build()
    x = torch.randn(2, 6, 24, dtype=dtype)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager", **ROPE_ONLY)
    for got, want in zip(optimized(x), module(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    report, matches, declines = _rope_report(optimized)
    assert not matches and declines, str(report)
    assert all(reason in d.reason for d in declines), str(report)


def test_passes_option_turns_rope_off():
    optimized = chronicals.optimize(Rotary(hf, "bhtd"), strict=True, compiler="eager", passes=())
    optimized(torch.randn(2, 6, 24))
    _, matches, declines = _rope_report(optimized)
    assert not matches and not declines


# ---------------------------------------------------------------------------------------------
# GPU: the whole path (pass, Inductor, Triton kernel) on a bf16 model
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_llama_bf16_inductor():
    model = tiny_causal_lm("llama").to(device="cuda", dtype=torch.bfloat16)
    optimized = chronicals.optimize(copy.deepcopy(model), strict=True, **ROPE_ONLY)
    inputs = {k: v.cuda() for k, v in batch().items()}
    assert_same_training_signal(model, optimized, inputs, rtol=2e-2, atol=2e-2)
    _, matches, declines = _rope_report(optimized)
    assert len(matches) == LAYERS and not declines
