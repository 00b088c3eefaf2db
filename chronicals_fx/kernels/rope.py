"""Rotary position embedding (RoPE) of queries and keys as one registered op with a fused backward.

Every spelling the pass finds (rotate-half, interleaved pairs, complex multiply) rotates pairs of
elements (i, j) of each head vector by per-token angles. With R the rotary width (even, ≤ D),
p = 0 … R/2 − 1 the pair index and

    rotate-half:  i = p,    j = p + R/2           (HF ``q*cos + rotate_half(q)*sin``)
    interleaved:  i = 2p,   j = 2p + 1            (GPT-J ``rotate_every_two``, Meta complex)

the forward is, per token (b, t), per head h, all arithmetic in fp32 (``rnd`` rounds to the dtype
eager multiplies and adds in — e.g. bf16 when q and cos are bf16 — and is the identity for fp32):

    y_i = rnd( rnd(x_i · c_i) − rnd(x_j · s_i) )
    y_j = rnd( rnd(x_j · c_j) + rnd(x_i · s_j) )
    y_d = x_d                                        for R ≤ d < D  (partial rotary: pass-through)

which is eager's ``x·cos + rotate(x)·sin`` with ``rotate(x)_i = −x_j, rotate(x)_j = x_i``, rounded
where eager rounds (so bf16 results are bit-identical to eager's, not merely close).

Backward (cos/sin are constants: no gradient flows to them), with g = dL/dy:

    dx_i = rnd'( rnd'(g_i · c_i) + rnd'(g_j · s_j) )
    dx_j = rnd'( rnd'(g_j · c_j) − rnd'(g_i · s_i) )
    dx_d = g_d                                       for R ≤ d < D

i.e. the forward with (s_i, s_j) → (−s_j, −s_i): a rotation by −θ when cos/sin hold one angle per
pair. ``rnd'`` rounds to the dtype autograd accumulates x's gradient in (x's dtype as multiplied).

cos/sin are [Bc, Tc, W] with Bc ∈ {1, B}, Tc ∈ {1, T} (broadcast by stride 0). ``half=True``:
W = R/2 and one angle serves both elements of a pair (c_i = c_j = cos[p]) — the pass proves this
from the graph (HF builds cos from ``cat((freqs, freqs))``) and hands over only the first half.
``half=False``: W = R, c_i = cos[i], c_j = cos[j] (any cos/sin tensor, e.g. M-RoPE's).

Kernel: one program per token (b, t); it loads that token's cos/sin once and rotates every head
of q, then every head of k, in [BLOCK_H, BLOCK_P] tiles (vector loads along D). q, k, outputs
and cos/sin are all read and written through their strides (e.g. q as HF's transpose of a view,
or a slice of a fused qkv projection): nothing is copied to make it contiguous.

Traffic (the ideal the benchmark compares with): forward reads q, k and writes q', k' once;
backward reads dq', dk' and writes dq, dk once; cos/sin add W values per token (and per batch
row when Bc = B). References: Su et al. 2021 (RoFormer); HF ``apply_rotary_pos_emb``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._triton import INTERPRETED, ROUND_CODES, launchable, round_to

_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def _to(v, DTYPE: tl.constexpr):
    """fp32 ``v`` stored as DTYPE, rounded to nearest even: the conversion does it when compiled;
    the interpreter truncates to bf16, so there the value is rounded first (round_to)."""
    if _INTERPRETED and DTYPE == tl.bfloat16:
        out = round_to(v, 1).to(DTYPE)  # exact: already a bf16 value
    else:
        out = v.to(DTYPE)
    return out


@triton.jit
def _rotate(x_i, x_j, c_i, c_j, s_i, s_j, ROUND: tl.constexpr):
    """y_i = rnd(rnd(x_i·c_i) − rnd(x_j·s_i)),  y_j = rnd(rnd(x_j·c_j) + rnd(x_i·s_j))."""
    a = round_to(x_i * c_i, ROUND)
    b = round_to(x_j * s_i, ROUND)
    c = round_to(x_j * c_j, ROUND)
    d = round_to(x_i * s_j, ROUND)
    return round_to(a - b, ROUND), round_to(c + d, ROUND)


@triton.jit
def _rotate_heads(
    X, Y,                       # this token's first element of x and y (pointers, offset applied)
    stride_xh, stride_xd,       # x strides along heads and head dim
    stride_yh, stride_yd,
    H, D, HALF_R,               # heads, head dim, R/2
    c_i, c_j, s_i, s_j,         # [BLOCK_P] fp32 angles of the pairs (s already negated for bwd)
    INTERLEAVED: tl.constexpr, ROUND: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    p = tl.arange(0, BLOCK_P)
    p_mask = p < HALF_R
    c_i, c_j = c_i[None, :], c_j[None, :]
    s_i, s_j = s_i[None, :], s_j[None, :]
    for h0 in range(0, H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        h_mask = (h < H)[:, None]
        xh = X + h[:, None] * stride_xh
        yh = Y + h[:, None] * stride_yh
        r = tl.arange(0, 2 * BLOCK_P)
        if INTERLEAVED:
            # One contiguous [BLOCK_H, 2·BLOCK_P] load, split into (even, odd) elements.
            mask = h_mask & (r < 2 * HALF_R)[None, :]
            x = tl.load(xh + r[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            x_i, x_j = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_P, 2]))
        else:
            mask = h_mask & p_mask[None, :]
            x_i = tl.load(xh + p[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
            x_j = tl.load(xh + (p + HALF_R)[None, :] * stride_xd, mask=mask, other=0.0).to(tl.float32)
        y_i, y_j = _rotate(x_i, x_j, c_i, c_j, s_i, s_j, ROUND)
        if INTERLEAVED:
            y = tl.reshape(tl.join(y_i, y_j), [BLOCK_H, 2 * BLOCK_P])
            tl.store(yh + r[None, :] * stride_yd, _to(y, Y.dtype.element_ty), mask=mask)
        else:
            tl.store(yh + p[None, :] * stride_yd, _to(y_i, Y.dtype.element_ty), mask=mask)
            tl.store(yh + (p + HALF_R)[None, :] * stride_yd, _to(y_j, Y.dtype.element_ty), mask=mask)
        if HAS_PASS:
            # Partial rotary: elements R … D−1 pass through unchanged (cast to y's dtype).
            d = 2 * HALF_R + tl.arange(0, BLOCK_PASS)
            pass_mask = h_mask & (d < D)[None, :]
            v = tl.load(xh + d[None, :] * stride_xd, mask=pass_mask, other=0.0).to(tl.float32)
            tl.store(yh + d[None, :] * stride_yd, _to(v, Y.dtype.element_ty), mask=pass_mask)


@triton.jit
def rope_kernel(
    Q, K, COS, SIN, QO, KO,     # q [B,T,Hq,D], k [B,T,Hk,D], cos/sin [Bc,Tc,W], outputs like q, k
    sq_b, sq_t, sq_h, sq_d,     # strides of q (elements), any order
    sk_b, sk_t, sk_h, sk_d,
    sqo_b, sqo_t, sqo_h, sqo_d,
    sko_b, sko_t, sko_h, sko_d,
    sc_b, sc_t, sc_d,           # cos strides; 0 along a broadcast dim
    ss_b, ss_t, ss_d,
    T, HQ, HK, D, HALF_R,       # tokens per sequence, heads of q and k, head dim, R/2
    HAS_K: tl.constexpr,
    HALF: tl.constexpr,         # cos/sin hold one angle per pair (width R/2), else width R
    INTERLEAVED: tl.constexpr,  # pairs (2p, 2p+1), else (p, p + R/2)
    BACKWARD: tl.constexpr,     # rotate by −θ: (s_i, s_j) → (−s_j, −s_i)
    ROUND: tl.constexpr,        # rounding code of the products and the sum (see _triton.round_to)
    HAS_PASS: tl.constexpr,     # R < D
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_P: tl.constexpr,      # next power of two ≥ R/2
    BLOCK_PASS: tl.constexpr,   # next power of two ≥ D − R
):
    pid = tl.program_id(0)
    b = (pid // T).to(tl.int64)  # B·T·H·D can exceed 2³¹
    t = (pid % T).to(tl.int64)

    # This token's angles, loaded once for all heads of q and k.
    p = tl.arange(0, BLOCK_P)
    p_mask = p < HALF_R
    cos = COS + b * sc_b + t * sc_t
    sin = SIN + b * ss_b + t * ss_t
    if HALF:
        c_i = tl.load(cos + p * sc_d, mask=p_mask, other=0.0).to(tl.float32)
        s_i = tl.load(sin + p * ss_d, mask=p_mask, other=0.0).to(tl.float32)
        c_j = c_i
        s_j = s_i
    else:
        if INTERLEAVED:
            i = 2 * p
            j = 2 * p + 1
        else:
            i = p
            j = p + HALF_R
        c_i = tl.load(cos + i * sc_d, mask=p_mask, other=0.0).to(tl.float32)
        c_j = tl.load(cos + j * sc_d, mask=p_mask, other=0.0).to(tl.float32)
        s_i = tl.load(sin + i * ss_d, mask=p_mask, other=0.0).to(tl.float32)
        s_j = tl.load(sin + j * ss_d, mask=p_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        s_i, s_j = -s_j, -s_i

    _rotate_heads(Q + b * sq_b + t * sq_t, QO + b * sqo_b + t * sqo_t, sq_h, sq_d, sqo_h, sqo_d,
                  HQ, D, HALF_R, c_i, c_j, s_i, s_j,
                  INTERLEAVED, ROUND, HAS_PASS, BLOCK_HQ, BLOCK_P, BLOCK_PASS)
    if HAS_K:
        _rotate_heads(K + b * sk_b + t * sk_t, KO + b * sko_b + t * sko_t, sk_h, sk_d, sko_h, sko_d,
                      HK, D, HALF_R, c_i, c_j, s_i, s_j,
                      INTERLEAVED, ROUND, HAS_PASS, BLOCK_HK, BLOCK_P, BLOCK_PASS)


# Elements of one [BLOCK_H, BLOCK_P] tile (x_i and x_j each). From the H200 sweep
# (benchmarks/sweep_rope.py, RESULTS.md session 3): at B=4 T=4096 Hq=32 Hk=8 D=128, tiles of 512
# (8 heads × 64 pairs, 2 warps) stream at 84% of copy against 63% for 2048 (all 32 heads at
# once, 8 warps: too few programs in flight per SM); at D=64 every tile from 512 to 4096 ties.
_TILE = 512


def _tiles(hq: int, hk: int, rotary_dim: int, head_dim: int, tile: int | None = None,
           num_warps: int | None = None) -> dict:
    tile = tile or _TILE
    block_p = triton.next_power_of_2(max(rotary_dim // 2, 1))
    block_hq = min(triton.next_power_of_2(hq), max(1, tile // block_p))
    block_hk = min(triton.next_power_of_2(max(hk, 1)), max(1, tile // block_p))
    rest = head_dim - rotary_dim
    work = 2 * block_p * max(block_hq, block_hk)
    return {"BLOCK_HQ": block_hq, "BLOCK_HK": block_hk, "BLOCK_P": block_p,
            "HAS_PASS": rest > 0, "BLOCK_PASS": triton.next_power_of_2(max(rest, 1)),
            "num_warps": num_warps or max(1, min(8, work // 512))}


def rope_launch(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, q_out: Tensor,
                k_out: Tensor | None, *, interleaved: bool, half: bool,
                round_dtype: torch.dtype, backward: bool = False, tile: int | None = None,
                num_warps: int | None = None) -> None:
    """Rotate ``q`` [B, T, Hq, D] (and ``k`` [B, T, Hk, D]) into ``q_out`` (``k_out``).

    Any strides. cos/sin: [Bc, Tc, W], Bc ∈ {1, B}, Tc ∈ {1, T}; W = R/2 if ``half`` else R.
    ``backward=True`` applies the transposed rotation (q, k are then the output gradients).
    ``tile``, ``num_warps``: override the launch heuristics (benchmark sweeps).
    """
    B, T, HQ, D = q.shape
    width = cos.shape[-1]
    rotary_dim = 2 * width if half else width
    cos = cos.expand(B, T, width)  # stride 0 along broadcast dims
    sin = sin.expand(B, T, width)
    has_k = k is not None
    if not has_k:
        k, k_out = q, q_out  # placeholders; HAS_K=False never touches them
    HK = k.shape[2] if has_k else 0
    # Block sizes are compile-time constants: under dynamic shapes this specializes on heads.
    meta = _tiles(int(HQ), int(HK), int(rotary_dim), int(D), tile, num_warps)
    launchable(rope_kernel, q)[(B * T,)](
        q, k, cos, sin, q_out, k_out,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(),
        *cos.stride(), *sin.stride(),
        T, HQ, HK, D, rotary_dim // 2,
        HAS_K=has_k, HALF=half, INTERLEAVED=interleaved, BACKWARD=backward,
        ROUND=ROUND_CODES[round_dtype], **meta,
    )


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the test oracle (in float64) and the op's implementation off CUDA.
# ---------------------------------------------------------------------------------------------
def _bthd(x: Tensor, seq_dim: int) -> Tensor:
    """[B, T, H, D] view of a tensor whose sequence axis is ``seq_dim`` (1 or 2)."""
    return x if seq_dim == 1 else x.transpose(1, 2)


def _round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round through ``dtype`` where the kernel does (bf16, fp16); fp32 is the kernel's own."""
    return t.to(dtype).to(t.dtype) if dtype in (torch.bfloat16, torch.float16) else t


def rope_rotate_reference(x: Tensor, cos: Tensor, sin: Tensor, *, interleaved: bool, half: bool,
                          round_dtype: torch.dtype, out_dtype: torch.dtype,
                          backward: bool = False) -> Tensor:
    """The formula of the module docstring on x [B, T, H, D], cos/sin [Bc, Tc, W]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    c, s = cos.to(acc)[:, :, None, :], sin.to(acc)[:, :, None, :]   # (Bc, Tc, 1, W)
    rotary_dim = 2 * cos.shape[-1] if half else cos.shape[-1]
    xr = xf[..., :rotary_dim]

    def pairs(v: Tensor) -> tuple[Tensor, Tensor]:
        if interleaved:
            return v[..., 0::2], v[..., 1::2]
        return v[..., : rotary_dim // 2], v[..., rotary_dim // 2:]

    x_i, x_j = pairs(xr)
    (c_i, c_j), (s_i, s_j) = ((c, c), (s, s)) if half else (pairs(c), pairs(s))
    if backward:
        s_i, s_j = -s_j, -s_i
    def r(v: Tensor) -> Tensor:
        return _round_to(v, round_dtype)

    y_i = r(r(x_i * c_i) - r(x_j * s_i))
    y_j = r(r(x_j * c_j) + r(x_i * s_j))
    y = torch.stack((y_i, y_j), -1).flatten(-2) if interleaved else torch.cat((y_i, y_j), -1)
    return torch.cat((y, xf[..., rotary_dim:]), -1).to(out_dtype)


def rope_reference(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, seq_dim: int,
                   interleaved: bool, half: bool, round_dtype: torch.dtype,
                   out_dtype: torch.dtype, backward: bool = False) -> tuple[Tensor, Tensor | None]:
    """(q', k') in the layout of the inputs; k' is None without k."""
    def one(x):
        y = rope_rotate_reference(_bthd(x, seq_dim), cos, sin, interleaved=interleaved, half=half,
                                  round_dtype=round_dtype, out_dtype=out_dtype, backward=backward)
        return _bthd(y, seq_dim)

    return one(q), (one(k) if k is not None else None)


# ---------------------------------------------------------------------------------------------
# The registered ops. triton_op (not custom_op): Inductor traces into the body and emits the
# kernel launch in its own generated code, with no dispatcher call per use.
# ---------------------------------------------------------------------------------------------
def _new_like(x: Tensor, seq_dim: int, dtype: torch.dtype) -> Tensor:
    """A tensor shaped like ``x``, stored in [B, T, H, D] order whatever x's strides.

    That is the storage of q and k in every model seen (HF transposes a [B, T, H·D]
    projection; GPT-J and Meta keep [B, T, H, D]), so outputs and gradients come out in the
    layout their consumers expect: the gradient of HF's q views back into the projection's
    gradient without a copy, and a leaf's .grad needs no relayout.
    """
    B, T, H, D = _bthd(x, seq_dim).shape
    return _bthd(torch.empty((B, T, H, D), dtype=dtype, device=x.device), seq_dim)


def _run(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, seq_dim: int, interleaved: bool,
         half: bool, round_dtype: torch.dtype, out_dtype: torch.dtype,
         backward: bool) -> tuple[Tensor, Tensor]:
    if q.device.type != "cuda":
        q_out, k_out = rope_reference(q, k, cos, sin, seq_dim, interleaved, half, round_dtype,
                                      out_dtype, backward)
        return q_out, (k_out if k_out is not None else q.new_empty(0))
    q_out = _new_like(q, seq_dim, out_dtype)
    k_out = _new_like(k, seq_dim, out_dtype) if k is not None else None
    rope_launch(_bthd(q, seq_dim), None if k is None else _bthd(k, seq_dim), cos, sin,
                _bthd(q_out, seq_dim), None if k_out is None else _bthd(k_out, seq_dim),
                interleaved=interleaved, half=half, round_dtype=round_dtype, backward=backward)
    return q_out, (k_out if k_out is not None else q.new_empty(0))


@triton_op("chronicals::rope", mutates_args=())
def rope(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, seq_dim: int, interleaved: bool,
         half: bool, round_dtype: torch.dtype, grad_round_dtype: torch.dtype,
         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(rope(q), rope(k)); the second is an empty tensor when ``k`` is None.

    q: [B, Hq, T, D] (``seq_dim=2``) or [B, T, Hq, D] (``seq_dim=1``), any strides; k likewise
    with Hk heads. cos/sin: [Bc, Tc, W] (see the module docstring). ``round_dtype``: the dtype
    eager multiplies and adds in; ``grad_round_dtype``: the dtype autograd accumulates x's
    gradient in; ``out_dtype``: the result's. No gradient flows to cos/sin.
    """
    return _run(q, k, cos, sin, seq_dim, interleaved, half, round_dtype, out_dtype, False)


@triton_op("chronicals::rope_backward", mutates_args=())
def rope_bwd(dq: Tensor, dk: Tensor | None, cos: Tensor, sin: Tensor, seq_dim: int,
             interleaved: bool, half: bool, grad_round_dtype: torch.dtype,
             grad_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Gradients of q and k (dk empty when ``dk`` is None): the rotation by −θ."""
    return _run(dq, dk, cos, sin, seq_dim, interleaved, half, grad_round_dtype, grad_dtype, True)


def _setup_context(ctx, inputs, output) -> None:
    q, k, cos, sin, seq_dim, interleaved, half, _round_dtype, grad_round_dtype, _out = inputs
    ctx.save_for_backward(cos, sin)
    ctx.params = (seq_dim, interleaved, half, grad_round_dtype, q.dtype)
    ctx.has_k = k is not None


def _backward(ctx, dq_out: Tensor, dk_out: Tensor):
    cos, sin = ctx.saved_tensors
    need_q = ctx.needs_input_grad[0]
    need_k = ctx.has_k and ctx.needs_input_grad[1]
    dq = dk = None
    if need_q:
        dq, dk = torch.ops.chronicals.rope_backward(dq_out, dk_out if need_k else None, cos, sin,
                                                    *ctx.params)
        dk = dk if need_k else None
    elif need_k:
        dk, _ = torch.ops.chronicals.rope_backward(dk_out, None, cos, sin, *ctx.params)
    return dq, dk, None, None, None, None, None, None, None, None


rope.register_autograd(_backward, setup_context=_setup_context)
