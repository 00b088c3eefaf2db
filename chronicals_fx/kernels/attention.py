"""Attention: causal attention through SDPA's own kernels, document-masked attention in Triton.

Two computations, one per kind of mask the attention pass can prove:

**Causal** (no mask, or a mask proven equal to ``j ≤ i``): :func:`attention` calls one of the
SDPA kernels torch already ships, picked when the graph is rewritten (``backend``):

    "sdpa"   F.scaled_dot_product_attention(is_causal=True, enable_gqa=…)   (the default)
    "cudnn"  aten._scaled_dot_product_cudnn_attention   (cuDNN fused attention, GQA native)
    "flash"  aten._scaled_dot_product_flash_attention   (FlashAttention-2, GQA native)
    "triton" the document kernel below with one document per row

It is a plain function, not a registered op: AOTAutograd traces through it, so the compiled
graph calls the aten kernel (and its aten backward) directly, with torch's own autograd
formulas and none of the dispatch cost of an opaque custom op (51 µs per call, DESIGN.md).
Why SDPA's kernels rather than one of ours: cuDNN runs causal attention at 475 TFLOP/s
(ANCHORS.md), which a Triton kernel does not beat. What the HF graph loses under
torch.compile is the *use* of those kernels: transformers materializes a [B,1,T,T] mask there,
which rules out flash and cuDNN (12.4 ms with the dense mask against 4.05 ms cuDNN at B=4
T=4096 Hq=32 Hk=8 D=128, H200), and eager attention materializes the scores. Proving the mask
causal and dropping it (and the K/V repeat, via ``enable_gqa``) is the win.

Why "sdpa" is the default, measured on an H200 with torch 2.11 / cuDNN 9.19 (bf16, fwd+bwd,
eager calls, median of 20 CUDA-event timings, 2026-11-27): with ``is_causal=True,
enable_gqa=True`` SDPA's own dispatch already runs cuDNN's sm90 kernels (torch prefers cuDNN
on sm90 with cuDNN ≥ 9.15; the profiler shows ``cudnn_generated_fort_native_sdpa_sm90_flash_
{f,b}prop``), with GQA native: 4.00 ms at B=4 T=4096 Hq=32 Hk=8 D=128 against 4.27 ms calling
the cuDNN op directly and 7.15 ms for flash; at B=8 T=1024 Hq=14 Hk=2 D=64 0.47 / 0.66 /
0.59 ms. Routing inside the graph buys nothing there, so the other backends stay as options
(``attention_backend`` option) for other cards and versions; the benchmark case measures
every candidate per shape.

**Document-causal** (packed rows: token i attends to j iff j ≤ i and both are in the same
document): ``chronicals::document_attention``, a FlashAttention-2-style Triton kernel that reads
one int32 per token instead of a [T,T] mask. Documents are contiguous runs of a row, so with
``start[i]`` the first index of i's document and ``end[j]`` one past the last of j's:

    allowed(i, j) = start[i] ≤ j ≤ i                       (same document, causal)
    forward, query block [m0, m1):  key blocks from start[m0] to m1     (start is nondecreasing)
    dK/dV,   key block  [n0, n1):   query blocks from n0 to end[n1 − 1] (end is nondecreasing)

so work is proportional to Σ doc_len², as with varlen kernels, with no host sync, no
data-dependent shapes, and a launch Inductor emits in its own code (``triton_op``). The
bounds are computed once per batch in the graph (:func:`document_bounds`) and shared by every
layer. Why not ``varlen_attn``: it needs ``cu_seqlens`` of data-dependent length and a host-side
``max_seqlen`` (a sync, or a graph break, per batch), and in torch 2.11 it takes no GQA
(K/V must be repeated). Why not FlexAttention: the block mask must be built from the batch's
document ids (7–10 ms per call when built per call, ANCHORS.md), and inserting the flex
higher-order op after Dynamo is not supported. Both are measured beside this kernel in
``benchmarks/op_cases/attention.py``.

Measured (H200, torch 2.11, fwd+bwd bf16, packed 8 documents a row, RESULTS.md session 3):
B=8 T=1024 Hq=14 Hk=2 D=64 0.179 ms through the pass (varlen 0.291, FlexAttention with a
prebuilt mask 0.178, HF's dense-mask path 0.508); B=2 T=4096 D=64 0.334 (varlen 0.376, flex
0.270, HF 1.701); B=4 T=4096 Hq=32 Hk=8 D=128 1.854 (varlen 2.730, flex 1.379, HF 12.558).
It beats varlen everywhere and HF's path by 2.8–6.8×; prebuilt-mask FlexAttention is faster at
T=4096, but that figure leaves out the mask build a model pays once per batch. Tiles are fixed
per head dim (see :func:`_tiles`), not autotuned.

Forward (per query row i, in fp32, log2 domain; s = scale · log2 e):

    m_i = max_j s·qᵢ·kⱼ,   ℓ_i = Σ_j 2^(s·qᵢ·kⱼ − m_i),   o_i = Σ_j 2^(s·qᵢ·kⱼ − m_i) vⱼ / ℓ_i
    lse_i = (m_i + log₂ ℓ_i) · ln 2                          (natural log, saved for backward)

Backward (FlashAttention-2, Dao 2023): with P_ij = exp(scale·qᵢ·kⱼ − lse_i) over allowed
pairs and δ_i = Σ_d dO_id · O_id,

    dV_j = Σ_i P_ij dO_i,   dS_ij = P_ij (dO_i·V_j − δ_i),
    dK_j = scale Σ_i dS_ij q_i,   dQ_i = scale Σ_j dS_ij k_j

dK/dV programs own one key block of one KV head and loop over the query heads of its group
(GQA without atomics); dQ programs own one query block of one query head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ..config import ATTENTION_BACKENDS as BACKENDS
from ._triton import launchable

MAX_HEAD_DIM = 256          # the Triton kernel keeps a [BLOCK, head_dim] tile per operand

_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a·b accumulated in fp32; fp32 operands exactly (IEEE) rather than through TF32."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _tile(base, offs, stride, offs_d, ok, d_ok):
    """Rows ``offs`` (row stride ``stride``, columns ``offs_d`` contiguous) of a [T, D] matrix;
    zero outside ``ok`` × ``d_ok``."""
    return tl.load(base + offs[:, None] * stride + offs_d[None, :],
                   mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _in_document(query, key, start):
    """Key may be attended by query: causal (key ≤ query) and in the query's document (key ≥
    the document's first token ``start``). Arguments are broadcast to the score tile's shape."""
    return (key <= query) & (key >= start)


@triton.jit
def _doc_attn_fwd_kernel(
    Q, K, V, START, O, LSE,          # q [B,Hq,T,D], k/v [B,Hk,T,D], start [B,T] i32, o [B,Hq,T,D], lse [B,Hq,T]
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,   # strides (last dim contiguous)
    H, T, D, GROUP,                  # query heads, tokens, head dim, query heads per KV head
    qk_scale,                        # scale · log2(e)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,              # fp32 inputs: exact fp32 products (no TF32)
):
    qk_scale = tl.full([], qk_scale, tl.float32)   # Inductor may pass float scalars as fp64
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)   # longest rows first
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D

    q = _tile(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, row_ok, d_ok)
    start = tl.load(START + b * T + offs_m, mask=row_ok, other=T)           # [BLOCK_M]
    lo = (tl.min(start, axis=0) // BLOCK_N) * BLOCK_N                        # first useful key block
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)                                # causal end

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T
        k = _tile(k_base, offs_n, skt, offs_d, col_ok, d_ok)
        v = _tile(v_base, offs_n, svt, offs_d, col_ok, d_ok)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale   # [BLOCK_M, BLOCK_N]
        allowed = _in_document(offs_m[:, None], offs_n[None, :], start[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)              # fully masked so far
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new

    # No guard for l_i = 0: every stored row attends at least to itself (only padding rows,
    # never stored, allow nothing), so l_i = 0 means every allowed score was −inf (an inf in q
    # or k): out = 0/0 = NaN and lse = −inf there, as eager's softmax gives, not a silent 0
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + (b * H + h) * T + offs_m, lse, mask=row_ok)


@triton.jit
def _doc_attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, START, END, DK, DV,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    H, HK, T, D, GROUP,
    qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    qk_scale = tl.full([], qk_scale, tl.float32)   # Inductor may pass float scalars as fp64
    scale = tl.full([], scale, tl.float32)
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // HK).to(tl.int64)
    hk = (bh % HK).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < T
    d_ok = offs_d < D
    tile_ok = col_ok[:, None] & d_ok[None, :]

    k = _tile(K + b * skb + hk * skh, offs_n, skt, offs_d, col_ok, d_ok)
    v = _tile(V + b * svb + hk * svh, offs_n, svt, offs_d, col_ok, d_ok)
    last = tl.minimum(pid_n * BLOCK_N + BLOCK_N, T) - 1
    q_hi = tl.load(END + b * T + last)                       # end of the last key's document
    q_lo = ((pid_n * BLOCK_N) // BLOCK_M) * BLOCK_M          # causal: rows ≥ first key

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(GROUP):
        h = hk * GROUP + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * H + h) * T
        for m0 in range(q_lo, q_hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = _tile(q_base, offs_m, sqt, offs_d, row_ok, d_ok)
            do = _tile(do_base, offs_m, sdot, offs_d, row_ok, d_ok)
            lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            start = tl.load(START + b * T + offs_m, mask=row_ok, other=T)
            s_t = _dot(k, tl.trans(q), IEEE) * qk_scale       # [BLOCK_N, BLOCK_M]
            allowed = _in_document(offs_m[None, :], offs_n[:, None], start[None, :])
            p_t = tl.where(allowed, tl.exp2(s_t - lse2[None, :]), 0.0)
            dv += _dot(p_t.to(do.dtype), do, IEEE)
            dp_t = _dot(v, tl.trans(do), IEEE)                # [BLOCK_N, BLOCK_M]
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q.dtype), q, IEEE)

    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=tile_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=tile_ok)


@triton.jit
def _doc_attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, START, DQ,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
    H, T, D, GROUP,
    qk_scale, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    qk_scale = tl.full([], qk_scale, tl.float32)   # Inductor may pass float scalars as fp64
    scale = tl.full([], scale, tl.float32)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]

    q = _tile(Q + b * sqb + h * sqh, offs_m, sqt, offs_d, row_ok, d_ok)
    do = _tile(DO + b * sdob + h * sdoh, offs_m, sdot, offs_d, row_ok, d_ok)
    row_base = (b * H + h) * T
    lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    start = tl.load(START + b * T + offs_m, mask=row_ok, other=T)
    lo = (tl.min(start, axis=0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < T
        k = _tile(k_base, offs_n, skt, offs_d, col_ok, d_ok)
        v = _tile(v_base, offs_n, svt, offs_d, col_ok, d_ok)
        s = _dot(q, tl.trans(k), IEEE) * qk_scale
        allowed = _in_document(offs_m[:, None], offs_n[None, :], start[:, None])
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, IEEE)

    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------
# Host launchers: plain tensors, so tests can call them on CPU tensors under TRITON_INTERPRET=1.
# ---------------------------------------------------------------------------------------------
def _tiles(head_dim: int, device: torch.device, kind: str, itemsize: int = 2) -> dict:
    """Block sizes and launch options (fixed per head dim; the benchmark case reports speed).

    Shared memory, compiled for sm_90 (bf16): 32/41/41 KB (fwd/dK dV/dQ) at D=64, 64/82/82 KB
    at D=128, 128/99/98 KB at D=256. fp32 operands take twice that, so their tiles are halved
    (at D=256 the bf16 tiles would need 295 KB, more than a Hopper SM has).
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    if device.type != "cuda":                  # the interpreter: small tiles, fast tests
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": block_d}
    if itemsize > 2:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": block_d,
                "num_warps": 4 if block_d <= 64 else 8, "num_stages": 1 if block_d > 128 else 2}
    big = block_d > 64
    if kind == "fwd":
        return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": block_d,
                "num_warps": 8 if big else 4, "num_stages": 3 if block_d <= 128 else 2}
    # backward tiles after the Triton fused-attention tutorial (BLOCK_M1=32/BLOCK_N1=128 for
    # dK/dV, BLOCK_M2=128/BLOCK_N2=32 for dQ)
    if kind == "dkdv":
        return {"BLOCK_M": 32, "BLOCK_N": 128 if block_d <= 128 else 64, "BLOCK_D": block_d,
                "num_warps": 8 if big else 4, "num_stages": 2}
    return {"BLOCK_M": 128 if block_d <= 128 else 64, "BLOCK_N": 32, "BLOCK_D": block_d,
            "num_warps": 8 if big else 4, "num_stages": 2}


def _ieee(t: Tensor) -> bool:
    return t.dtype == torch.float32


def _s(t: Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def document_attention_forward(q: Tensor, k: Tensor, v: Tensor, start: Tensor, out: Tensor,
                               lse: Tensor, scale: float) -> None:
    """Launch the forward: q [B,Hq,T,D], k/v [B,Hk,T,D], start [B,T] int32 → out, lse [B,Hq,T]."""
    B, H, T, D = q.shape
    tiles = _tiles(D, q.device, "fwd", q.element_size())
    grid = (triton.cdiv(T, tiles["BLOCK_M"]), B * H)
    launchable(_doc_attn_fwd_kernel, q)[grid](
        q, k, v, start, out, lse, *_s(q), *_s(k), *_s(v), *_s(out),
        H, T, D, H // k.shape[1], scale * _LOG2E, IEEE=_ieee(q), **tiles)


def document_attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                lse: Tensor, start: Tensor, end: Tensor, dq: Tensor, dk: Tensor,
                                dv: Tensor, scale: float) -> None:
    """Launch the backward into dq [B,Hq,T,D], dk/dv [B,Hk,T,D]."""
    B, H, T, D = q.shape
    HK = k.shape[1]
    delta = (do.float() * out.float()).sum(-1).contiguous()                 # [B,Hq,T]
    tiles = _tiles(D, q.device, "dkdv", q.element_size())
    launchable(_doc_attn_bwd_dkdv_kernel, q)[(triton.cdiv(T, tiles["BLOCK_N"]), B * HK)](
        q, k, v, do, lse, delta, start, end, dk, dv,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dk), *_s(dv),
        H, HK, T, D, H // HK, scale * _LOG2E, scale, IEEE=_ieee(q), **tiles)
    tiles = _tiles(D, q.device, "dq", q.element_size())
    launchable(_doc_attn_bwd_dq_kernel, q)[(triton.cdiv(T, tiles["BLOCK_M"]), B * H)](
        q, k, v, do, lse, delta, start, dq,
        *_s(q), *_s(k), *_s(v), *_s(do), *_s(dq),
        H, T, D, H // HK, scale * _LOG2E, scale, IEEE=_ieee(q), **tiles)


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the test oracle (in float64) and the op's implementation off CUDA.
# ---------------------------------------------------------------------------------------------
def document_mask(bounds: Tensor) -> Tensor:
    """The [B,1,T,T] boolean mask ``start[i] ≤ j ≤ i`` that the kernel never materializes."""
    start = bounds[0].long()
    T = start.shape[-1]
    j = torch.arange(T, device=bounds.device)
    return ((j[None, None, :] <= j[None, :, None]) & (j[None, None, :] >= start[:, :, None]))[:, None]


def _expand_kv(t: Tensor, heads: int) -> Tensor:
    return t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t


def document_attention_reference(q: Tensor, k: Tensor, v: Tensor, bounds: Tensor,
                                 scale: float) -> tuple[Tensor, Tensor]:
    """(out, lse) by explicit scores and softmax, accumulating in fp32 (fp64 for fp64 inputs)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    H = q.shape[1]
    kf, vf = _expand_kv(k, H).to(acc), _expand_kv(v, H).to(acc)
    s = torch.matmul(q.to(acc), kf.transpose(-1, -2)) * scale
    s = s.masked_fill(~document_mask(bounds), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse[..., None]), vf)
    return out.to(q.dtype), lse.to(torch.float32 if acc == torch.float32 else acc)


def document_attention_backward_reference(do: Tensor, q: Tensor, k: Tensor, v: Tensor,
                                          out: Tensor, lse: Tensor, bounds: Tensor,
                                          scale: float) -> tuple[Tensor, Tensor, Tensor]:
    acc = torch.promote_types(q.dtype, torch.float32)
    H, HK = q.shape[1], k.shape[1]
    qf, dof = q.to(acc), do.to(acc)
    kf, vf = _expand_kv(k, H).to(acc), _expand_kv(v, H).to(acc)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    p = torch.exp(s - lse.to(acc)[..., None]).masked_fill(~document_mask(bounds), 0.0)
    dv = torch.matmul(p.transpose(-1, -2), dof)
    dp = torch.matmul(dof, vf.transpose(-1, -2))
    delta = (dof * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    if HK != H:  # sum the gradients of each KV head over the query heads that share it
        B, _, T, D = dk.shape
        dk = dk.view(B, HK, H // HK, T, D).sum(2)
        dv = dv.view(B, HK, H // HK, T, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def document_bounds(doc_ids: Tensor, batch: int) -> Tensor:
    """[2, B, T] int32: first index of each token's document, and one past its last.

    ``doc_ids`` [B or 1, T] is nondecreasing along each row (a cumulative sum of document
    boundaries), so a document is a contiguous run and ``searchsorted`` finds its ends.
    Computed once per batch in the graph and shared by every attention layer.
    """
    ids = doc_ids.expand(batch, -1).contiguous()
    start = torch.searchsorted(ids, ids, right=False)
    end = torch.searchsorted(ids, ids, right=True)
    return torch.stack([start, end]).to(torch.int32)


def causal_bounds(batch: int, seq: int, device: torch.device) -> Tensor:
    """Bounds of one document per row: plain causal attention for the Triton kernel."""
    start = torch.zeros(batch, seq, dtype=torch.int32, device=device)
    return torch.stack([start, torch.full_like(start, seq)])


# ---------------------------------------------------------------------------------------------
# The registered document-attention ops (triton_op: Inductor emits the launches itself).
# ---------------------------------------------------------------------------------------------
@triton_op("chronicals::document_attention", mutates_args=())
def document_attention(q: Tensor, k: Tensor, v: Tensor, bounds: Tensor,
                       scale: float) -> tuple[Tensor, Tensor]:
    """(out [B,Hq,T,D], lse [B,Hq,T] fp32) of causal attention within documents."""
    if q.device.type != "cuda":
        return document_attention_reference(q, k, v, bounds, scale)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    B, H, T, D = q.shape
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    document_attention_forward(q, k, v, bounds[0], out, lse, scale)
    return out, lse


@triton_op("chronicals::document_attention_backward", mutates_args=())
def document_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           bounds: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    if q.device.type != "cuda":
        return document_attention_backward_reference(do, q, k, v, out, lse, bounds, scale)
    do, q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (do, q, k, v))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    document_attention_backward(do, q, k, v, out, lse, bounds[0], bounds[1], dq, dk, dv, scale)
    return dq, dk, dv


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, bounds, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bounds)
    ctx.scale = scale


def _backward(ctx, dout: Tensor, _dlse: Tensor | None):
    q, k, v, out, lse, bounds = ctx.saved_tensors
    dq, dk, dv = torch.ops.chronicals.document_attention_backward(dout, q, k, v, out, lse, bounds,
                                                                  ctx.scale)
    return dq, dk, dv, None, None


document_attention.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Causal (or unmasked) attention through SDPA's kernels: what the pass calls.
# ---------------------------------------------------------------------------------------------
def select_backend(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, dropout_p: float,
                   preferred: str = "sdpa") -> str:
    """The kernel for this attention (fake tensors), fixed when the graph is rewritten.

    "sdpa" unless ``preferred`` (``Config.attention_backend``) names another backend that
    accepts the case.
    """
    choice = preferred if q.device.type == "cuda" else "sdpa"
    same_dims = q.shape[-1] == k.shape[-1] == v.shape[-1]
    if choice == "triton":
        ok = (is_causal and dropout_p == 0.0 and same_dims and q.shape[-1] <= MAX_HEAD_DIM
              and q.shape[2] == k.shape[2] and q.dtype in (torch.float32, torch.bfloat16, torch.float16))
        return "triton" if ok else "sdpa"
    if choice in ("cudnn", "flash"):
        low = q.dtype in (torch.bfloat16, torch.float16)
        return choice if low and same_dims and q.shape[-1] <= 256 else "sdpa"
    return "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, is_causal: bool,
              backend: str, bounds: Tensor | None = None) -> Tensor:
    """softmax(q·kᵀ·scale [+ causal mask]) · v with K/V of Hk ≤ Hq heads (GQA), [B,H,T,D].

    With ``bounds`` (:func:`document_bounds`), attention is causal within documents and runs
    the document kernel whatever ``backend`` says.
    """
    H = q.shape[1]
    gqa = k.shape[1] != H
    if bounds is not None:
        return torch.ops.chronicals.document_attention(q, k, v, bounds, scale)[0]
    if q.is_cuda and backend == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, dropout_p, is_causal, False, scale=scale)[0]
    if q.is_cuda and backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, dropout_p, is_causal, False, scale=scale)[0]
    if backend == "triton" and is_causal:
        bounds = causal_bounds(q.shape[0], q.shape[2], q.device)
        return torch.ops.chronicals.document_attention(q, k, v, bounds, scale)[0]
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=gqa)
