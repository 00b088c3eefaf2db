"""A kernel never hides a NaN or an inf: each one is poisoned (NaN, +inf, −inf in one element of
a row, in a whole row, in a weight), in fp32 and bf16, and its forward and backward outputs hold
NaN, +inf and −inf exactly where eager PyTorch's same computation holds them, element by
element (under TRITON_INTERPRET=1 on CPU, natively on GPU). Outputs are pre-filled with a finite
sentinel, so an element the kernel fails to write cannot pass for eager's NaN. (The interpreter
models the GPU's NaN semantics where they matter here: tl.maximum and tl.max ignore a NaN
operand, as the GPU's max.f32 does. Its tl.dot misreads bf16 operands, so attention takes fp16
as its 16-bit dtype on CPU, bf16 on the GPU.)

Where the semantics legitimately differ from eager, the difference is asserted as such (so a
change to it shows), and documented here:

- SwiGLU/GeGLU, the oracle: the formulas of PyTorch's CUDA kernels (the eager the kernels
  replace) written out in torch. CPU eager's vectorized ``F.gelu`` gives NaN for +inf (its
  scalar path and CUDA give +inf) and a derivative of exactly 0 in the far negative tail
  (at g = −6.84, where CUDA's formula gives −1.9e-10): artifacts of the CPU build.
- GELU (tanh approximation) for g ≲ −5: eager's ½g(1 + tanh z) cancels to exactly 0 there, the
  kernel's g·σ(2z) (documented in kernels/swiglu.py) does not, so an inf in u or dy meets 0 in
  eager (NaN) and a tiny nonzero in the kernel (±inf): non-finite in both.
- Document attention: inside a tile, masked pairs enter the products as 0 (p·v, dS·q, P·dO),
  and 0·NaN = 0·inf = NaN, so a NaN/inf spreads to more elements of the poisoned (batch, KV
  group) than the exact computation's; never fewer. Eager itself has no single pattern here
  (the dense masked softmax spreads over every masked pair of a row, SDPA's kernels by tile);
  the oracle is attention over each row's allowed keys only, the exact dependency.
- Fused linear + cross-entropy, gradients in the forward: rows whose label is ignored
  contribute exactly 0 to the loss and to d (their logits are never read); eager's d on such a
  row is NaN when its logits hold a NaN or +inf (0·NaN in log_softmax's backward). The loss
  itself ignores those rows in eager too; dW still shows a NaN h of such a row (0·NaN). The
  forward-only op's backward keeps eager's NaN there (d = 0·NaN, as eager).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from chronicals_fx.kernels import attention as A
from chronicals_fx.kernels import linear_ce as LCE
from chronicals_fx.kernels import rmsnorm as RMS
from chronicals_fx.kernels import rope as ROPE
from chronicals_fx.kernels import swiglu as SWI
from tests.conftest import DEVICE
from tests.kernels.test_attention import _documents
from tests.kernels.test_linear_ce import make
from tests.kernels.test_rope import _angles, eager_rope

NAN, INF = float("nan"), float("inf")
VALUES = {"nan": NAN, "inf": INF, "-inf": -INF}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SENTINEL = 7.0          # finite: an unwritten output element shows where eager is non-finite


def pattern(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 −inf, per element."""
    t = t.detach().float().cpu()
    return torch.where(t.isnan(), 1, torch.where(t == INF, 2, torch.where(t == -INF, 3, 0)))


def assert_same_pattern(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, what
    pg, pw = pattern(got), pattern(want)
    bad = (pg != pw).nonzero().tolist()
    names = ("finite", "nan", "+inf", "-inf")
    assert not bad, (f"{what}: {len(bad)} of {pg.numel()} elements differ from eager, e.g. "
                     + ", ".join(f"{tuple(i)}: {names[pg[tuple(i)]]} (eager {names[pw[tuple(i)]]})"
                                 for i in bad[:4]))


def assert_poisoned(*wants: torch.Tensor) -> None:
    """The poison reached eager's outputs: the comparison is not between two finite tensors."""
    assert any(bool(pattern(w).any()) for w in wants), "nothing non-finite in eager's outputs"


def full(shape, dtype) -> torch.Tensor:
    return torch.full(shape, SENTINEL, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------------------
# RMSNorm (and the fused residual add)
# ---------------------------------------------------------------------------------------------
def _eager_rms(x, w, eps, offset):
    """Llama's RMSNorm (``w * normed.to(dtype)``), or Gemma's (``normed * (1 + w)`` in fp32)."""
    xf = x.float()
    n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (n * (offset + w.float())).to(x.dtype)
    return w * n.to(x.dtype)


def _rms_poison(x, w, kind):
    if kind == "x_elements":             # one element of a row, one value per row
        x[1, 3], x[2, 5], x[4, 0] = NAN, INF, -INF
    elif kind == "x_rows":               # whole rows
        x[1], x[3], x[4] = NAN, INF, -INF
    else:                                # one element of the weight
        w[7] = VALUES[kind.split("_", 1)[1]]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kind", ["x_elements", "x_rows", "w_nan", "w_inf", "w_-inf"])
@pytest.mark.parametrize("rows,hidden,offset", [(6, 40, 0.0), (5, 600, 0.0), (6, 40, 1.0)],
                         ids=["llama", "llama_prefetch", "gemma"])
def test_rms_norm(rows, hidden, offset, kind, dtype):
    dtype = DTYPES[dtype]
    x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    w = torch.randn(hidden, device=DEVICE).to(dtype)
    dy = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    _rms_poison(x, w, kind)
    xe, we = x.clone().requires_grad_(), w.clone().requires_grad_()
    ye = _eager_rms(xe, we, 1e-6, offset)
    ye.backward(dy)
    rnd = torch.float32 if offset else dtype
    y, dx = full(x.shape, dtype), full(x.shape, dtype)
    RMS.rms_norm_forward(x, w, y, 1e-6, offset, rnd, rnd, rnd)
    dw = RMS.rms_norm_backward(dy, x, w, dx, 1e-6, offset, rnd, rnd, True, dw_dtype=dtype)
    assert_poisoned(ye, xe.grad, we.grad)
    assert_same_pattern(y, ye, "y")
    assert_same_pattern(dx, xe.grad, "dx")
    assert_same_pattern(dw, we.grad, "dw")


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_add_rms_norm_with_gradient_terms(dtype):
    """h = a + b normalized in one pass; backward with dh and dy given as two terms (what the
    post-grad pass hands the kernel): poison in the residual b, in dh and in one term of dy."""
    dtype = DTYPES[dtype]
    rows, hidden = 7, 96
    a, b, dh, dy0, dy1 = (torch.randn(rows, hidden, device=DEVICE).to(dtype) for _ in range(5))
    w = torch.randn(hidden, device=DEVICE).to(dtype)
    b[1, 4], b[2], dh[3, 7], dh[4], dy1[5, 1], dy0[6] = NAN, INF, -INF, NAN, INF, -INF
    ae, be, we = (t.clone().requires_grad_() for t in (a, b, w))
    he = ae + be
    ye = _eager_rms(he, we, 1e-6, 0.0)
    torch.autograd.backward([ye, he], [dy0 + dy1, dh])
    h, y, dx = full(a.shape, dtype), full(a.shape, dtype), full(a.shape, dtype)
    RMS.rms_norm_forward(a, w, y, 1e-6, 0.0, dtype, dtype, dtype, residual=b, h_out=h)
    dw = RMS.rms_norm_backward(dy0, h, w, dx, 1e-6, 0.0, dtype, dtype, True, block_m=2,
                               programs_per_sm=1, dh=dh, dw_dtype=dtype, dy_terms=(dy1,))
    assert_poisoned(he, ye)
    assert_same_pattern(h, he, "h")
    assert_same_pattern(y, ye, "y")
    assert_same_pattern(dx, ae.grad, "da")
    assert_same_pattern(dx, be.grad, "db")
    assert_same_pattern(dw, we.grad, "dw")


# ---------------------------------------------------------------------------------------------
# SwiGLU / GeGLU
# ---------------------------------------------------------------------------------------------
_K0, _K1 = math.sqrt(2.0 / math.pi), 0.044715


def _eager_act(g: torch.Tensor, activation: str) -> torch.Tensor:
    """act(g) in fp32 as PyTorch's CUDA kernels compute it (ActivationSiluKernel.cu,
    ActivationGeluKernel.cu); F.silu on CPU computes the same."""
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu":
        return g * 0.5 * (1.0 + torch.erf(g * 0.7071067811865476))
    return 0.5 * g * (1.0 + torch.tanh(_K0 * (g + _K1 * g * g * g)))


def _eager_swiglu(g, u, dy, activation):
    """(y, dg, du) of eager's ``act(g) * u`` in the dtype: act a tensor of the dtype, mul's
    backward (dy·u, dy·a) in the dtype, and act's backward op ``dy · act'(g)`` in fp32, rounded
    once (act' as CUDA's silu_backward / gelu_backward write it)."""
    a = _eager_act(g.float(), activation).to(g.dtype)
    da = dy * u
    grad = SWI.activation_grad_reference(g.float(), SWI.ACTIVATIONS[activation])
    return a * u, (da.float() * grad).to(g.dtype), dy * a


def _swiglu_poison(g, u, dy):
    """Every value in one element of g, u and dy (distinct columns of row 0), and whole rows."""
    col = 0
    for t in (g, u, dy):
        for v in VALUES.values():
            t[0, col] = v
            col += 1
    g[1], u[2], dy[3], g[4], u[4] = INF, NAN, -INF, -INF, INF


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("activation", sorted(SWI.ACTIVATIONS))
def test_swiglu(activation, dtype):
    dtype = DTYPES[dtype]
    # gate values where eager's and the kernel's formulas agree (see the next test for g < −4)
    g = (2.5 * torch.randn(6, 300, device=DEVICE)).clamp(-4, 4).to(dtype)
    u, dy = (torch.randn(6, 300, device=DEVICE).to(dtype) for _ in range(2))
    _swiglu_poison(g, u, dy)
    ye, dge, due = _eager_swiglu(g, u, dy, activation)
    code = SWI.ACTIVATIONS[activation]
    y, dg, du = (full(g.shape, dtype) for _ in range(3))
    SWI.swiglu_forward(g, u, y, code)
    SWI.swiglu_backward(dy, g, u, dg, du, code)
    assert_poisoned(ye, dge, due)
    assert_same_pattern(y, ye, "y")
    assert_same_pattern(dg, dge, "dg")
    assert_same_pattern(du, due, "du")
    # the backward that also rewrites y (the pass's default op)
    y2 = full(g.shape, dtype)
    SWI.swiglu_backward(dy, g, u, dg, du, code, y=y2)
    assert_same_pattern(y2, ye, "y (backward)")


def test_gelu_tanh_far_tail_is_nonzero_where_eager_cancels():
    """Documented difference: for g ≲ −5 eager's ½g(1 + tanh z) is exactly 0, the kernel's
    g·σ(2z) a tiny nonzero; an inf in u then gives NaN in eager, ±inf in the kernel. Below
    g ≈ −10, σ(2z) underflows too (exp(−2z) overflows): NaN in both."""
    g = torch.tensor([[-5.5, -6.0, -8.0, -12.0]], device=DEVICE)
    u = torch.full_like(g, INF)
    dy = torch.ones_like(g)
    ye, _, _ = _eager_swiglu(g, u, dy, "gelu_tanh")
    y = full(g.shape, torch.float32)
    SWI.swiglu_forward(g, u, y, SWI.ACTIVATIONS["gelu_tanh"])
    assert (_eager_act(g, "gelu_tanh") == 0).all() and ye.isnan().all()
    assert (y[0, :3] == -INF).all() and y[0, 3].isnan()


# ---------------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("rotary", [16, 8], ids=["full", "partial"])
@pytest.mark.parametrize("interleaved,half", [(False, True), (False, False), (True, True),
                                              (True, False)])
@pytest.mark.parametrize("poison", ["qk_dy", "cos_sin"])
def test_rope(poison, interleaved, half, rotary, dtype):
    """q, k and the output gradients poisoned (elements and whole head vectors; with ``half``
    token 0's sin is exactly 0, so an inf there meets a 0), or cos/sin poisoned (every head of a
    token). Eager: HF's / GPT-J's formula under autograd."""
    dtype = DTYPES[dtype]
    B, T, Hq, Hk, D = 1, 4, 3, 2, 16
    q = torch.randn(B, T, Hq, D, device=DEVICE).to(dtype)
    k = torch.randn(B, T, Hk, D, device=DEVICE).to(dtype)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    cos, sin = _angles(1, T, rotary, half, dtype)
    if poison == "qk_dy":
        q[0, 0, 0, 3], q[0, 1, 1, 5], q[0, 2, 2, 12], q[0, 3, 0] = INF, NAN, -INF, INF
        k[0, 0, 1, 0], k[0, 2, 0] = -INF, NAN
        dq_out[0, 0, 2, 1], dq_out[0, 1, 0] = INF, -INF
        dk_out[0, 3, 1, 9], dk_out[0, 2, 1] = NAN, INF
    else:
        cos[0, 1, 2], sin[0, 2, 1], cos[0, 3, 0], sin[0, 0, 3] = NAN, INF, -INF, INF
    kw = dict(interleaved=interleaved, half=half, round_dtype=dtype)
    outs = [full(t.shape, dtype) for t in (q, k, q, k)]
    ROPE.rope_launch(q, k, cos, sin, outs[0], outs[1], **kw)
    ROPE.rope_launch(dq_out, dk_out, cos, sin, outs[2], outs[3], backward=True, **kw)
    qe, ke = q.clone().requires_grad_(), k.clone().requires_grad_()
    want = [eager_rope(t, cos, sin, interleaved, half) for t in (qe, ke)]
    torch.autograd.backward(want, [dq_out, dk_out])
    want += [qe.grad, ke.grad]
    assert_poisoned(*want)
    for got, w, name in zip(outs, want, ("q'", "k'", "dq", "dk")):
        assert_same_pattern(got, w, name)


# ---------------------------------------------------------------------------------------------
# Document attention
# ---------------------------------------------------------------------------------------------
_ATT_LENGTHS = [[6, 1, 13], [20]]        # batch 0: three documents; batch 1: one, never poisoned


def _attention_exact(q, k, v, bounds, scale):
    """Eager attention of each query row over its allowed keys only (start[i] ≤ j ≤ i), in fp32:
    the exact dependency of each output on each input."""
    B, H, T, _ = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    rows = []
    for b in range(B):
        out = []
        for i in range(T):
            j0 = int(bounds[0][b, i])
            s = (q[b, :, i:i + 1] @ k[b, :, j0:i + 1].transpose(-1, -2)) * scale
            out.append(torch.softmax(s, -1) @ v[b, :, j0:i + 1])
        rows.append(torch.cat(out, 1))
    return torch.stack(rows)


def _attention_run(q, k, v, do, bounds, scale):
    """(kernel outputs, eager outputs), each (out, dq, dk, dv)."""
    B, H, T, D = q.shape
    out, lse = full(q.shape, q.dtype), full((B, H, T), torch.float32)
    A.document_attention_forward(q, k, v, bounds[0], out, lse, scale)
    dq, dk, dv = (full(t.shape, t.dtype) for t in (q, k, v))
    A.document_attention_backward(do, q, k, v, out, lse, bounds[0], bounds[1], dq, dk, dv, scale)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    oe = _attention_exact(*leaves, bounds, scale)
    oe.backward(do.float())
    return (out, dq, dk, dv), (oe.detach(), *(t.grad for t in leaves))


# Under TRITON_INTERPRET=1, tl.dot of bf16 operands multiplies their bit patterns as integers
# (Triton 3.9's interpreter: a bf16 identity times ones gives 2.6e8), so bf16 attention runs on
# the GPU only; fp16 takes the same 16-bit path (p rounded to v's dtype, 16-bit stores) on CPU.
ATT_DTYPES = ["fp32", "fp16", pytest.param("bf16", marks=[pytest.mark.gpu, pytest.mark.skipif(
    DEVICE == "cpu", reason="the interpreter's tl.dot misreads bf16 operands")])]


def _assert_attention_keeps(got, want, what):
    """Every NaN of ``want`` is a NaN of ``got``, every ±inf the same inf or a NaN (the inf met a
    0 of a masked pair too); an element finite in ``want`` is finite or NaN in ``got``."""
    pg, pw = pattern(got), pattern(want)
    hidden = ((pw == 1) & (pg != 1)) | ((pw > 1) & (pg != pw) & (pg != 1))
    assert not hidden.any(), f"{what}: {int(hidden.sum())} NaN/inf of eager not in the kernel's"
    assert not ((pw == 0) & (pg > 1)).any(), f"{what}: an inf where eager is finite"


@pytest.mark.parametrize("dtype", ATT_DTYPES)
@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("tensor", ["q", "k", "v", "do"])
def test_document_attention(tensor, value, dtype):
    """One element (token 8, in the third document) and one whole row (token 15) of batch 0
    poisoned. Every NaN/±inf of the exact computation is in the kernel's outputs; the kernel's
    extra ones are NaNs (0·NaN, 0·inf of masked pairs in a tile) and stay in the poisoned batch
    row; the forward output is exact when q or k is poisoned (masked scores are replaced by
    −inf, as eager masks them, before anything multiplies them)."""
    dtype = {"fp16": torch.float16, **DTYPES}[dtype]
    B, H, HK, T, D = 2, 2, 1, 20, 8
    bounds = A.document_bounds(_documents(_ATT_LENGTHS).to(DEVICE), B)
    q, k, v = (torch.randn(B, h, T, D, device=DEVICE).to(dtype) for h in (H, HK, HK))
    do = torch.randn(B, H, T, D, device=DEVICE).to(dtype)
    poisoned = {"q": q, "k": k, "v": v, "do": do}[tensor]
    poisoned[0, 0, 8, 3] = VALUES[value]
    poisoned[0, 0, 15] = VALUES[value]
    got, want = _attention_run(q, k, v, do, bounds, D ** -0.5)
    assert_poisoned(*want)
    for g, w, name in zip(got, want, ("out", "dq", "dk", "dv")):
        _assert_attention_keeps(g, w, name)
        assert not pattern(g)[1].any(), f"{name}: the poison crossed into another batch row"
    if tensor in ("q", "k"):
        assert_same_pattern(got[0], want[0], "out")


@pytest.mark.parametrize("dtype", ATT_DTYPES)
def test_document_attention_row_of_minus_inf_scores(dtype):
    """A row whose every allowed score is −inf (an inf in q meeting keys of one sign) is NaN, as
    eager's softmax makes it, not the silent 0 a guard for rows with no allowed key gave (no
    stored row is one: each attends to itself). Beside it, a row with one −inf score among
    finite ones is finite. (SDPA's kernels and its math path's safe softmax return 0 for such a
    row: the kernel follows eager softmax attention, which keeps the inf visible.)"""
    dtype = {"fp16": torch.float16, **DTYPES}[dtype]
    B, H, HK, T, D = 2, 2, 1, 20, 8
    bounds = A.document_bounds(_documents(_ATT_LENGTHS).to(DEVICE), B)
    q, k, v = (torch.randn(B, h, T, D, device=DEVICE).to(dtype) for h in (H, HK, HK))
    do = torch.randn(B, H, T, D, device=DEVICE).to(dtype)
    k[0, 0, :, 3] = -(k[0, 0, :, 3].abs() + 0.25)    # every key's element 3 negative ...
    q[0, 0, 9, 3] = INF                               # ... so row 9's scores are all −inf
    k[0, 0, 12, 5] = INF                              # one −inf score in row 14 of head 1,
    q[0, 1, 14, 5] = -(q[0, 1, 14, 5].abs() + 0.25)  # whose element 5 is negative
    got, want = _attention_run(q, k, v, do, bounds, D ** -0.5)
    assert want[0][0, 0, 9].isnan().all() and torch.isfinite(want[0][0, 1, 14]).all()
    assert_same_pattern(got[0], want[0], "out")
    for g, w, name in zip(got[1:], want[1:], ("dq", "dk", "dv")):
        _assert_attention_keeps(g, w, name)


# ---------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# ---------------------------------------------------------------------------------------------
LCE_CONFIGS = {
    "plain": dict(scale=1.0, softcap=0.0, label_smoothing=0.0, z_loss=0.0),
    "smoothing_z_loss": dict(scale=1.0, softcap=0.0, label_smoothing=0.1, z_loss=1e-3),
    "scale_softcap": dict(scale=0.7, softcap=3.0, label_smoothing=0.0, z_loss=0.0),
}


def _poisoned_logits(dtype):
    """Logits [10, 150] (V = 150: several slices of 64 and tiles of 32, the last partial), one
    poison per row; rows 8 and 9 ignored."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 150, generator=g) * 3
    labels = torch.randint(0, 150, (10,), generator=g)
    labels[2], labels[7] = 17, 20
    x[0, 40] = NAN
    x[1, 70] = INF
    x[2, 100] = -INF                   # not the target
    x[3, labels[3]] = -INF             # the target: an infinite loss
    x[4], x[5], x[6] = NAN, INF, -INF  # whole rows
    x[7, 144:] = -INF                  # the whole last, partial tile (as −inf padding biases)
    x[8, 3] = NAN                      # ignored rows
    x[9, 5] = -INF
    labels[8:] = -100
    row_w = torch.rand(10, generator=g) + 0.5
    row_w[8:] = 0.0
    return x.to(dtype).to(DEVICE), labels.to(DEVICE), row_w.to(DEVICE)


def _eager_rows(x, labels, row_w, scale, softcap, label_smoothing, z_loss):
    """(per-row loss, d = ∂(Σ_i w_i ℓ_i)/∂x) of eager ``F.cross_entropy`` on the logits, fp32."""
    xf = x.detach().float().requires_grad_()
    z = softcap * torch.tanh(xf * (scale / softcap)) if softcap else xf * scale
    loss = F.cross_entropy(z, labels, reduction="none", label_smoothing=label_smoothing)
    if z_loss:
        loss = loss + torch.where(labels != -100, z_loss * torch.logsumexp(z, -1).square(), 0.0)
    (loss * row_w).sum().backward()
    return loss.detach(), xf.grad


def _rows_loss(lse, zt, zsum, labels, vocab, cfg):
    """Each row's ℓ_i from the kernels' statistics, through the op's own finish_loss."""
    one = [(lse[i:i + 1], zt[i:i + 1], zsum[i:i + 1], labels[i:i + 1]) for i in range(len(lse))]
    return torch.stack([LCE.finish_loss(*row, vocab, -100, "sum", cfg["label_smoothing"],
                                        cfg["z_loss"]) for row in one])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("cfg", sorted(LCE_CONFIGS))
@pytest.mark.parametrize("variant", ["lanes", "tile", "tile_stats"])
def test_row_passes(variant, cfg, dtype, monkeypatch):
    """The gradients-in-the-forward row passes on poisoned logits: pass 1 with lane-wise or
    per-tile statistics, or the combine of per-tile statistics (the fused logits GEMM's; here
    from its plain-torch reference), then pass 2. Each valid row's loss and d as eager's; ignored
    rows: d and statistics exactly 0 (documented)."""
    monkeypatch.delenv("CHRONICALS_LCE_STATS", raising=False)
    monkeypatch.setattr(LCE, "ROW_STATS", "tile" if variant == "tile" else "lanes")
    cfg = LCE_CONFIGS[cfg]
    x, labels, row_w = _poisoned_logits(DTYPES[dtype])
    loss_e, d_e = _eager_rows(x, labels, row_w, **cfg)
    tile_stats = None
    if variant == "tile_stats":
        from chronicals_fx.kernels import linear_ce_gemm
        tile_stats = tuple(None if t is None else t.to(DEVICE) for t in
                           linear_ce_gemm.tile_stats_reference(x, 16, cfg["scale"], cfg["softcap"],
                                                               bool(cfg["label_smoothing"])))
    d = x.clone()
    stats = torch.full((3, len(x)), SENTINEL, device=DEVICE)
    LCE.lce_rows(d, labels, row_w, *stats, cfg["scale"], cfg["softcap"], cfg["label_smoothing"],
                 cfg["z_loss"], cols=64, block_v=32, tile_stats=tile_stats)
    valid = labels != -100
    assert_poisoned(loss_e, d_e)
    assert_same_pattern(_rows_loss(*stats, labels, x.shape[1], cfg), loss_e, "loss per row")
    assert_same_pattern(d[valid], d_e[valid], "d")
    assert torch.equal(d[~valid].float(), torch.zeros_like(d[~valid].float()))
    assert (stats[:2 if not cfg["label_smoothing"] else 3][:, ~valid] == 0).all()
    assert d_e[8].isnan().all()        # the documented difference: eager's d of row 8 is NaN


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("cfg", sorted(LCE_CONFIGS))
def test_forward_only_chunk_kernels(cfg, dtype):
    """The forward-only op's kernels over vocabulary chunks of poisoned logits: the online
    softmax state across chunks, then d from lse (its backward). Loss per row and d as eager's,
    on every row (ignored rows too: d = 0·(…), NaN where eager's is)."""
    cfg = LCE_CONFIGS[cfg]
    x, labels, row_w = _poisoned_logits(DTYPES[dtype])
    loss_e, d_e = _eager_rows(x, labels, row_w, **cfg)
    n, vocab = x.shape
    f32 = dict(dtype=torch.float32, device=DEVICE)
    m = torch.full((n,), -INF, **f32)
    s, zt, zsum = torch.zeros((3, n), **f32)
    chunks = [(v0, min(v0 + 64, vocab)) for v0 in range(0, vocab, 64)]
    for v0, v1 in chunks:
        LCE.lce_fwd_chunk(x[:, v0:v1], labels, m, s, zt, zsum, v0, cfg["scale"], cfg["softcap"],
                          bool(cfg["label_smoothing"]))
    lse = m + torch.log(s)
    d = x.clone()
    for v0, v1 in chunks:
        LCE.lce_bwd_chunk(d[:, v0:v1], labels, lse, row_w, v0, vocab, cfg["scale"],
                          cfg["softcap"], cfg["label_smoothing"], cfg["z_loss"])
    assert_poisoned(loss_e, d_e)
    assert_same_pattern(_rows_loss(lse, zt, zsum, labels, vocab, cfg), loss_e, "loss per row")
    assert_same_pattern(d, d_e, "d")


def _lce_inputs(dtype, scenario):
    # rows 0, 4 and 8 ignored
    h, w, b, y = make(11, 16, 150, dtype=dtype, bias=True, seed=3, device=DEVICE)
    y[y == 11] = 12
    if scenario == "bias_-inf":        # a banned token: loss and gradients finite, as in eager
        b[11] = -INF
    elif scenario == "w_nan":
        w[7, 3] = NAN
    elif scenario == "w_-inf":         # logits of column 7: +inf on some rows, −inf on others
        w[7, 3] = -INF
    elif scenario == "h_inf":
        h[2, 5] = INF
    elif scenario == "h_ignored_nan":  # a whole ignored row
        h[4] = NAN
    return h, w, b, y


def _lce_eager(h, w, b, y, zero_ignored):
    """(loss, dH, dW, db) of eager ``F.cross_entropy(h @ wᵀ + b, y)`` in fp32; with
    ``zero_ignored`` the logits' gradient of ignored rows is set to 0 first (the documented
    semantics of the gradients-in-the-forward op), then the matmuls' backward as eager's."""
    hf, wf, bf = (t.detach().float() for t in (h, w, b))
    x = (hf @ wf.t() + bf).requires_grad_()
    loss = F.cross_entropy(x, y)
    (dx,) = torch.autograd.grad(loss, x)
    if zero_ignored:
        dx = torch.where((y != -100)[:, None], dx, 0.0)
    return loss.detach(), dx @ wf, dx.t() @ hf, dx.sum(0)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("scenario", ["bias_-inf", "w_nan", "w_-inf", "h_inf", "h_ignored_nan"])
@pytest.mark.parametrize("path", ["grad_in_forward", "forward_only"])
def test_fused_loss_end_to_end(path, scenario, dtype):
    """Loss and dH, dW, db of both ops' CUDA algorithms (token chunks of whole rows with d in the
    forward; vocabulary chunks with the backward recomputing the logits) against eager
    ``F.cross_entropy(h @ wᵀ + b, y)``."""
    dtype = DTYPES[dtype]
    h, w, b, y = _lce_inputs(dtype, scenario)
    args = (-100, "mean", 0.0, 1.0, 0.0, 0.0)
    if path == "grad_in_forward":
        loss, *grads = LCE.lce_forward_with_grads(h, w, b, y, *args, True, True, True, rows=4,
                                                  cols=64, block_v=32)
    else:
        loss, lse = LCE.lce_forward(h, w, b, y, *args, chunk=64)
        grads = LCE.lce_backward(torch.tensor(1.0, device=DEVICE), h, w, b, y, lse, *args,
                                 True, True, True, chunk=64)
    want = _lce_eager(h, w, b, y, zero_ignored=path == "grad_in_forward")
    if scenario == "bias_-inf":
        assert all(torch.isfinite(t).all() for t in want)
    else:
        assert_poisoned(*want)
    for got, wt, name in zip((loss, *grads), want, ("loss", "dH", "dW", "db")):
        assert_same_pattern(got, wt, name)


@pytest.mark.parametrize("g", sorted(VALUES) + ["1"])
def test_scale_inplace_is_the_product(g):
    """The backward's t ← t·g (nothing done when g == 1) holds NaN/inf where t * g does."""
    t = torch.randn(9, 70, device=DEVICE)
    t[0, 0], t[1, 1], t[2, 2], t[3, 3] = NAN, INF, -INF, 0.0
    g = torch.tensor(float(VALUES.get(g, 1.0)), device=DEVICE)
    want = t * g
    LCE.scale_inplace(t, g, block=256)
    assert_same_pattern(t, want, "t·g")
