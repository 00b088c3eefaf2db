"""Linear layer + cross-entropy as one op that never holds the [N, V] logits.

Notation (the kernels use the same symbols). Rows i = 1..N (tokens), vocabulary j = 1..V:

    x_ij  = h_i · w_j + b_j                    logits (cuBLAS, in the input dtype, like eager)
    z_ij  = c · tanh(s · x_ij / c)             soft-capped logits   (c = softcap > 0)
          = s · x_ij                           without soft-capping (s = logit_scale)
    lse_i = log Σ_j exp(z_ij)
    ℓ_i   = lse_i − (1 − ε) z_{i,y_i} − (ε / V) Σ_j z_ij  + λ lse_i²
            (ε = label_smoothing, λ = z-loss coefficient, 0 by default)
    loss  = Σ_{i valid} ℓ_i / n_valid    (reduction "mean"; n_valid = #{i : y_i ≠ ignore_index})
          = Σ_{i valid} ℓ_i              (reduction "sum")

Backward, with g the upstream gradient of the scalar loss and w_i = g / n_valid (mean) or g
(sum) for valid rows, 0 for ignored rows:

    p_ij      = exp(z_ij − lse_i) · (1 + 2 λ lse_i)
    ∂ℓ/∂z_ij  = p_ij − (1 − ε) [j = y_i] − ε / V
    d_ij      = w_i · ∂ℓ/∂z_ij · ∂z/∂x        ∂z/∂x = s (1 − tanh²(s x / c)), or s
    dH = d @ W      dW = dᵀ @ H      db = Σ_i d_ij

"mean" over zero valid rows is 0/0 = nan, as in eager; the gradients are then 0 (every row
is ignored), as in eager. n_valid stays a device tensor: no ``.item()``, no host sync.

How it runs on CUDA (the "chunked cuBLAS" design): the vocabulary is cut into chunks of Vc
columns. The forward loops over chunks: one GEMM x = H @ W_cᵀ into a [N, Vc] buffer, then a
Triton kernel folds the chunk into each row's running max / sum of exponentials (online
softmax), the target logit and Σ z. Only lse [N] (fp32) is saved. The backward recomputes each
chunk's logits (one GEMM), a Triton kernel turns them into d in place, then dW_c = d_cᵀ @ H is
written straight into its rows of dW (one GEMM over all N: each element rounded once, as
eager's single GEMM rounds it) and dH += d_c @ W_c accumulates in an fp32 [N, H] buffer.
FLOPs: 2NHV forward + 6NHV backward (8NHV; the logits are computed twice). Extra memory: one
[N, Vc] buffer (≤ 256 MiB, see :func:`vocab_chunk`) and the fp32 dH accumulator; nothing of
size N·V and no fp32 [V, H] buffer. Exact: no gradient filtering, fp32 accumulation everywhere.

Off CUDA the op runs :func:`linear_cross_entropy_reference` (the same chunked algorithm in
plain torch, computed in fp32 or wider), which is also what the tests compare to float64.

References: Milakov & Gimelshein 2018 (online softmax); Wijmans et al. 2024 (Cut Your Losses
in Large-Vocabulary Language Models); Liger Kernel's fused linear cross-entropy (whose bugs
under ignore_index / bf16 accumulation this design avoids: see docs/linear_ce.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

REDUCTIONS = ("mean", "sum")
# [N, Vc] logits buffer: at most this many bytes ...
MAX_CHUNK_BYTES = 256 << 20
# ... at least this many (small buffers make the GEMMs launch-bound) ...
MIN_CHUNK_BYTES = 64 << 20
# ... and big enough that each chunk's GEMM does about this many FLOPs.
CHUNK_FLOPS = 1 << 37


def vocab_chunk(n_rows: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Columns per vocabulary chunk: a power of two ≥ 128 (or all of V)."""
    by_flops = CHUNK_FLOPS // max(1, 2 * n_rows * hidden)
    by_bytes = MIN_CHUNK_BYTES // max(1, n_rows * itemsize)
    cap = MAX_CHUNK_BYTES // max(1, n_rows * itemsize)
    want = max(128, min(max(by_flops, by_bytes), cap))
    chunk = 1 << (want.bit_length() - 1)
    return vocab if chunk >= vocab else chunk


# ---------------------------------------------------------------------------------------------
# Triton kernels: the elementwise work on one [N, Vc] chunk of logits.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _transform(x, scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """(z, ∂z/∂x) for fp32 logits x: z = c·tanh(s·x/c), or s·x without soft-capping."""
    if HAS_SOFTCAP:
        # tanh(y) = 1 − 2 / (exp(2y) + 1): finite for every y (exp overflows to inf → 1).
        t = 1.0 - 2.0 / (tl.exp(2.0 * x * (scale / softcap)) + 1.0)
        return softcap * t, scale * (1.0 - t * t)
    return x * scale, scale + 0.0 * x


@triton.jit
def lce_fwd_chunk_kernel(
    X, stride_x,                # logits chunk [N, VC] (row stride; columns contiguous)
    LABELS,                     # int64 [N]
    M, S, ZT, ZSUM,             # fp32 [N] running max, Σ exp(z − max), target z, Σ z (in/out)
    N, VC, v0,                  # rows, columns in this chunk, first vocabulary index of it
    scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Fold one vocabulary chunk into each row's online-softmax state."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    m = tl.load(M + rows, mask=row_mask, other=0.0)
    s = tl.load(S + rows, mask=row_mask, other=0.0)
    zt = tl.load(ZT + rows, mask=row_mask, other=0.0)
    zsum = tl.load(ZSUM + rows, mask=row_mask, other=0.0)
    target = tl.load(LABELS + rows, mask=row_mask, other=-1) - v0      # column in this chunk
    base = X + rows.to(tl.int64)[:, None] * stride_x
    for c0 in range(0, VC, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < VC)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z, _ = _transform(x, scale, softcap, HAS_SOFTCAP)
        z_inf = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_inf, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)           # masked rows
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z_inf - m_safe[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(mask & (cols[None, :] == target[:, None]), z, 0.0), axis=1)
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=1)
    tl.store(M + rows, m, mask=row_mask)
    tl.store(S + rows, s, mask=row_mask)
    tl.store(ZT + rows, zt, mask=row_mask)
    if HAS_SMOOTHING:
        tl.store(ZSUM + rows, zsum, mask=row_mask)


@triton.jit
def lce_bwd_chunk_kernel(
    X, stride_x,                # logits chunk [N, VC]; overwritten with d (same dtype)
    LABELS, LSE, ROW_W,         # int64 [N], fp32 [N], fp32 [N] (0 on ignored rows)
    N, VC, v0,
    scale, softcap,
    target_weight,              # 1 − ε
    uniform_weight,             # ε / V
    z_loss,                     # λ
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Logits → d = w_i · (softmax·(1 + 2λ·lse) − (1−ε)·onehot − ε/V) · ∂z/∂x, in place."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    w = tl.load(ROW_W + rows, mask=row_mask, other=0.0)
    p_scale = w * (1.0 + 2.0 * z_loss * lse)
    target = tl.load(LABELS + rows, mask=row_mask, other=-1) - v0
    base = X + rows.to(tl.int64)[:, None] * stride_x
    for c0 in range(0, VC, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < VC)[None, :]
        x = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        z, dz = _transform(x, scale, softcap, HAS_SOFTCAP)
        p = tl.exp(z - lse[:, None]) * p_scale[:, None]
        hot = tl.where(cols[None, :] == target[:, None], target_weight, 0.0)
        d = (p - (hot + uniform_weight) * w[:, None]) * dz
        tl.store(base + cols[None, :], d.to(X.dtype.element_ty), mask=mask)


def _kernel_tiles(vc: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_V, num_warps): 4k-element tiles, rows × columns."""
    block_v = min(1024, triton.next_power_of_2(max(vc, 16)))
    block_n = max(1, 4096 // block_v)
    return block_n, block_v, 8 if block_v >= 1024 else 4


def lce_fwd_chunk(x: Tensor, labels: Tensor, m: Tensor, s: Tensor, zt: Tensor, zsum: Tensor,
                  v0: int, scale: float, softcap: float, smoothing: bool) -> None:
    """Launch :func:`lce_fwd_chunk_kernel` on a [N, Vc] chunk (plain tensors: also CPU under
    ``TRITON_INTERPRET=1``)."""
    n, vc = x.shape
    block_n, block_v, warps = _kernel_tiles(vc)
    lce_fwd_chunk_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), labels, m, s, zt, zsum, n, vc, v0, scale, softcap or 1.0,
        HAS_SOFTCAP=softcap > 0, HAS_SMOOTHING=smoothing,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps)


def lce_bwd_chunk(x: Tensor, labels: Tensor, lse: Tensor, row_w: Tensor, v0: int, vocab: int,
                  scale: float, softcap: float, label_smoothing: float, z_loss: float) -> None:
    """Launch :func:`lce_bwd_chunk_kernel` on a [N, Vc] chunk, in place."""
    n, vc = x.shape
    block_n, block_v, warps = _kernel_tiles(vc)
    lce_bwd_chunk_kernel[(triton.cdiv(n, block_n),)](
        x, x.stride(0), labels, lse, row_w, n, vc, v0, scale, softcap or 1.0,
        1.0 - label_smoothing, label_smoothing / vocab, z_loss,
        HAS_SOFTCAP=softcap > 0, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps)


# ---------------------------------------------------------------------------------------------
# What the kernel path and the reference share: the per-row loss and the row weights, [N]-sized
# torch ops on the device (no host sync).
# ---------------------------------------------------------------------------------------------
def _valid(labels: Tensor, ignore_index: int) -> Tensor:
    return labels != ignore_index


def finish_loss(lse: Tensor, zt: Tensor, zsum: Tensor | None, labels: Tensor, vocab: int,
                ignore_index: int, reduction: str, label_smoothing: float,
                z_loss: float) -> Tensor:
    """ℓ_i from the row statistics, reduced. "mean" of nothing is 0/0 = nan, as eager's."""
    valid = _valid(labels, ignore_index)
    per_row = lse - (1.0 - label_smoothing) * zt
    if label_smoothing:
        per_row = per_row - (label_smoothing / vocab) * zsum
    if z_loss:
        per_row = per_row + z_loss * lse * lse
    total = torch.where(valid, per_row, 0.0).sum()
    if reduction == "mean":
        total = total / valid.sum().to(total.dtype)
    return total


def row_weights(grad: Tensor, labels: Tensor, ignore_index: int, reduction: str,
                dtype: torch.dtype) -> Tensor:
    """w_i = g / n_valid (mean) or g (sum) on valid rows, 0 on ignored rows (never nan)."""
    valid = _valid(labels, ignore_index)
    g = grad.to(dtype)
    if reduction == "mean":
        g = g / valid.sum().clamp(min=1).to(dtype)
    return torch.where(valid, g, torch.zeros((), dtype=dtype, device=labels.device))


def _chunks(vocab: int, chunk: int):
    for v0 in range(0, vocab, chunk):
        yield v0, min(v0 + chunk, vocab)


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, v0: int, v1: int) -> Tensor:
    w = weight[v0:v1]
    if bias is None:
        return h @ w.t()
    return torch.addmm(bias[v0:v1], h, w.t())


# ---------------------------------------------------------------------------------------------
# The Triton path (host side). Plain tensors in: on CPU tensors it runs under TRITON_INTERPRET=1.
# ---------------------------------------------------------------------------------------------
def lce_forward(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                ignore_index: int, reduction: str, label_smoothing: float, scale: float,
                softcap: float, z_loss: float, chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(loss in fp32, lse [N] fp32) for h [N, H], weight [V, H], labels [N]."""
    n, vocab = h.shape[0], weight.shape[0]
    chunk = chunk or vocab_chunk(n, h.shape[1], vocab, h.element_size())
    f32 = dict(dtype=torch.float32, device=h.device)
    m = torch.full((n,), float("-inf"), **f32)
    s, zt = torch.zeros(n, **f32), torch.zeros(n, **f32)
    zsum = torch.zeros(n, **f32) if label_smoothing else s
    for v0, v1 in _chunks(vocab, chunk):
        x = _logits(h, weight, bias, v0, v1)                              # [N, Vc]
        lce_fwd_chunk(x, labels, m, s, zt, zsum, v0, scale, softcap, bool(label_smoothing))
        del x
    lse = m + torch.log(s)
    loss = finish_loss(lse, zt, zsum if label_smoothing else None, labels, vocab, ignore_index,
                       reduction, label_smoothing, z_loss)
    return loss, lse


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (fp32) += a @ b, with a and b in any float dtype; no [.., ..] temporary on CUDA."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)   # cuBLAS: fp32 C, bf16/fp16 A·B
    else:
        acc += (a @ b).to(acc.dtype)


def lce_backward(grad: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                 lse: Tensor, ignore_index: int, reduction: str, label_smoothing: float,
                 scale: float, softcap: float, z_loss: float, need_h: bool, need_w: bool,
                 need_b: bool, chunk: int | None = None
                 ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(dH, dW, db) in the dtypes of h, weight, bias (None where not asked for)."""
    n, vocab = h.shape[0], weight.shape[0]
    chunk = chunk or vocab_chunk(n, h.shape[1], vocab, h.element_size())
    row_w = row_weights(grad, labels, ignore_index, reduction, torch.float32)
    dh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
    dw = torch.empty_like(weight) if need_w else None
    db = torch.empty(vocab, dtype=torch.float32, device=h.device) if need_b else None
    for v0, v1 in _chunks(vocab, chunk):
        d = _logits(h, weight, bias, v0, v1)                              # [N, Vc]
        lce_bwd_chunk(d, labels, lse, row_w, v0, vocab, scale, softcap, label_smoothing, z_loss)
        if need_w:
            torch.mm(d.t(), h, out=dw[v0:v1])
        if need_b:
            torch.sum(d, dim=0, dtype=torch.float32, out=db[v0:v1])
        if need_h:
            _accumulate_mm(dh, d, weight[v0:v1])
        del d
    return (dh.to(h.dtype) if need_h else None, dw,
            db.to(bias.dtype) if need_b else None)


def row_chunk(vocab: int, itemsize: int) -> int:
    """Rows per token chunk of the gradients-in-forward mode: a [C, V] buffer ≤ 256 MiB."""
    want = max(128, MAX_CHUNK_BYTES // max(1, vocab * itemsize))
    return 1 << (want.bit_length() - 1)


def lce_forward_with_grads(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                           ignore_index: int, reduction: str, label_smoothing: float,
                           scale: float, softcap: float, z_loss: float, need_h: bool,
                           need_w: bool, need_b: bool, rows: int | None = None
                           ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Opt-in 6NHV mode: (loss fp32, dH, dW, db) for an upstream gradient of 1.

    Token chunks of C rows hold whole rows of logits [C, V], so each row's lse is known inside
    its chunk and d can be formed at once: dH_c = d_c @ W is exact (one GEMM over V), and
    dW accumulates over chunks in an fp32 [V, H] buffer (cuBLAS addmm with an fp32 output:
    exact, but 4·V·H bytes — the memory this mode trades for the recompute).
    """
    n, vocab = h.shape[0], weight.shape[0]
    rows = rows or row_chunk(vocab, h.element_size())
    f32 = dict(dtype=torch.float32, device=h.device)
    one = torch.ones((), **f32)
    row_w = row_weights(one, labels, ignore_index, reduction, torch.float32)
    dh = torch.empty_like(h) if need_h else None
    dw = torch.zeros(weight.shape, **f32) if need_w else None
    db = torch.zeros(vocab, **f32) if need_b else None
    lse = torch.empty(n, **f32)
    zt, zsum = torch.zeros(n, **f32), torch.zeros(n, **f32)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        hc, yc = h[r0:r1], labels[r0:r1]
        x = _logits(hc, weight, bias, 0, vocab)                           # [C, V]
        m = torch.full((r1 - r0,), float("-inf"), **f32)
        s = torch.zeros(r1 - r0, **f32)
        lce_fwd_chunk(x, yc, m, s, zt[r0:r1], zsum[r0:r1], 0, scale, softcap,
                      bool(label_smoothing))
        lse[r0:r1] = m + torch.log(s)
        lce_bwd_chunk(x, yc, lse[r0:r1], row_w[r0:r1], 0, vocab, scale, softcap,
                      label_smoothing, z_loss)
        if need_h:
            torch.mm(x, weight, out=dh[r0:r1])
        if need_w:
            _accumulate_mm(dw, x.t(), hc)
        if need_b:
            db += x.sum(0, dtype=torch.float32)
        del x
    loss = finish_loss(lse, zt, zsum if label_smoothing else None, labels, vocab, ignore_index,
                       reduction, label_smoothing, z_loss)
    return (loss, dh, dw.to(weight.dtype) if need_w else None,
            db.to(bias.dtype) if need_b else None)


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the op off CUDA, and the same algorithm the tests hold to float64.
# ---------------------------------------------------------------------------------------------
def _transform_torch(x: Tensor, scale: float, softcap: float) -> tuple[Tensor, Tensor]:
    if softcap > 0:
        t = torch.tanh(x * (scale / softcap))
        return softcap * t, scale * (1.0 - t * t)
    return x * scale, torch.full_like(x, scale)


def linear_cross_entropy_reference(h: Tensor, weight: Tensor, bias: Tensor | None,
                                   labels: Tensor, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0,
                                   scale: float = 1.0, softcap: float = 0.0,
                                   z_loss: float = 0.0, chunk: int | None = None
                                   ) -> tuple[Tensor, Tensor]:
    """(loss, lse) computed chunk by chunk in fp32 (float64 for float64 inputs)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    n, vocab = h.shape[0], weight.shape[0]
    chunk = chunk or vocab_chunk(n, h.shape[1], vocab, 4)
    hf = h.to(acc)
    m = torch.full((n,), float("-inf"), dtype=acc, device=h.device)
    s = torch.zeros(n, dtype=acc, device=h.device)
    zt, zsum = torch.zeros_like(s), torch.zeros_like(s)
    for v0, v1 in _chunks(vocab, chunk):
        x = _logits(hf, weight.to(acc), None if bias is None else bias.to(acc), v0, v1)
        z, _ = _transform_torch(x, scale, softcap)
        m_new = torch.maximum(m, z.amax(1))
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(1)
        m = m_new
        inside = (labels >= v0) & (labels < v1)
        col = torch.where(inside, labels - v0, 0)
        zt = zt + torch.where(inside, z.gather(1, col[:, None])[:, 0], 0.0)
        zsum = zsum + z.sum(1)
    lse = m + torch.log(s)
    loss = finish_loss(lse, zt, zsum, labels, vocab, ignore_index, reduction, label_smoothing,
                       z_loss)
    return loss, lse


def linear_cross_entropy_backward_reference(
        grad: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
        lse: Tensor, ignore_index: int = -100, reduction: str = "mean",
        label_smoothing: float = 0.0, scale: float = 1.0, softcap: float = 0.0,
        z_loss: float = 0.0, chunk: int | None = None
        ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dH, dW, db) in the input dtypes, accumulated in fp32 (or float64)."""
    acc = torch.promote_types(h.dtype, torch.float32)
    n, vocab = h.shape[0], weight.shape[0]
    chunk = chunk or vocab_chunk(n, h.shape[1], vocab, 4)
    hf, wf = h.to(acc), weight.to(acc)
    bf = None if bias is None else bias.to(acc)
    lse = lse.to(acc)
    row_w = row_weights(grad, labels, ignore_index, reduction, acc)
    dh = torch.zeros_like(hf)
    dw = torch.empty_like(wf)
    db = torch.empty(vocab, dtype=acc, device=h.device)
    for v0, v1 in _chunks(vocab, chunk):
        x = _logits(hf, wf, bf, v0, v1)
        z, dz = _transform_torch(x, scale, softcap)
        p = torch.exp(z - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None]
        cols = torch.arange(v0, v1, device=h.device)
        hot = (cols[None, :] == labels[:, None]).to(acc) * (1.0 - label_smoothing)
        d = (p - hot - label_smoothing / vocab) * row_w[:, None] * dz
        dh += d @ wf[v0:v1]
        dw[v0:v1] = d.t() @ hf
        db[v0:v1] = d.sum(0)
    return dh.to(h.dtype), dw.to(weight.dtype), None if bias is None else db.to(bias.dtype)


# ---------------------------------------------------------------------------------------------
# The registered ops.
#
# Opaque custom ops, not triton_op (the other kernels' pattern), on purpose: the body is a host
# loop over vocabulary chunks whose memory plan is the point of the op (one [N, Vc] buffer
# reused, cuBLAS writing straight into row slices of dW, fp32 accumulation with out=). Traced
# into Inductor, functionalization would turn those out= writes and the in-place kernel into
# copies and scatters whose buffers the plan does not account for. The op runs once per step,
# for milliseconds, so the dispatcher's tens of microseconds per call do not matter here.
# ---------------------------------------------------------------------------------------------
def _check(hidden: Tensor, weight: Tensor, labels: Tensor, reduction: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels [N] expected, got {tuple(labels.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


@torch.library.custom_op("chronicals::linear_cross_entropy", mutates_args=())
def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         ignore_index: int, reduction: str, label_smoothing: float,
                         logit_scale: float, softcap: float, z_loss: float,
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(loss [] in ``out_dtype``, lse [N] fp32). hidden [N, H], weight [V, H], labels [N]."""
    _check(hidden, weight, labels, reduction)
    args = (ignore_index, reduction, label_smoothing, logit_scale, softcap, z_loss)
    if hidden.is_cuda:
        loss, lse = lce_forward(hidden, weight, bias, labels, *args)
    else:
        loss, lse = linear_cross_entropy_reference(hidden, weight, bias, labels, *args)
    return loss.to(out_dtype), lse.float()


@linear_cross_entropy.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, logit_scale,
      softcap, z_loss, out_dtype):
    return (hidden.new_empty((), dtype=out_dtype),
            hidden.new_empty(hidden.shape[:1], dtype=torch.float32))


@torch.library.custom_op("chronicals::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_bwd(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None,
                             labels: Tensor, lse: Tensor, ignore_index: int, reduction: str,
                             label_smoothing: float, logit_scale: float, softcap: float,
                             z_loss: float, need_hidden: bool, need_weight: bool,
                             need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dH, dW, db); a grad not asked for is an empty tensor."""
    args = (ignore_index, reduction, label_smoothing, logit_scale, softcap, z_loss)
    if hidden.is_cuda:
        dh, dw, db = lce_backward(grad, hidden, weight, bias, labels, lse, *args,
                                  need_hidden, need_weight, need_bias and bias is not None)
    else:
        dh, dw, db = linear_cross_entropy_backward_reference(grad, hidden, weight, bias, labels,
                                                             lse, *args)
    # each absent grad gets its own empty tensor: outputs of a custom op may not alias
    return (dh if need_hidden else hidden.new_empty(0),
            dw if need_weight else hidden.new_empty(0),
            db if need_bias and db is not None else hidden.new_empty(0))


@linear_cross_entropy_bwd.register_fake
def _(grad, hidden, weight, bias, labels, lse, ignore_index, reduction, label_smoothing,
      logit_scale, softcap, z_loss, need_hidden, need_weight, need_bias):
    empty = hidden.new_empty(0)
    return (torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty,
            torch.empty_like(bias) if need_bias and bias is not None else empty)


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, labels, *params, _out_dtype = inputs
    _loss, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.params = tuple(params)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_loss: Tensor, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    dh, dw, db = torch.ops.chronicals.linear_cross_entropy_backward(
        grad_loss, hidden, weight, bias, labels, lse, *ctx.params, need_h, need_w,
        bool(need_b and bias is not None))
    return (dh if need_h else None, dw if need_w else None,
            db if need_b and bias is not None else None) + (None,) * 8


linear_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


# Opt-in: the gradients computed in the forward (6NHV instead of 8NHV; an fp32 [V, H]
# accumulator instead of the recompute). The forward returns them for an upstream gradient of
# 1; the backward multiplies by the real one (one more rounding of dW when g is not a power of 2).
@torch.library.custom_op("chronicals::linear_cross_entropy_grad_in_forward", mutates_args=())
def linear_cross_entropy_gif(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                             ignore_index: int, reduction: str, label_smoothing: float,
                             logit_scale: float, softcap: float, z_loss: float,
                             out_dtype: torch.dtype, need_hidden: bool, need_weight: bool,
                             need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dH, dW, db) with grads for g = 1; a grad not asked for is an empty tensor."""
    _check(hidden, weight, labels, reduction)
    need_bias = need_bias and bias is not None
    args = (ignore_index, reduction, label_smoothing, logit_scale, softcap, z_loss)
    if hidden.is_cuda:
        loss, dh, dw, db = lce_forward_with_grads(hidden, weight, bias, labels, *args,
                                                  need_hidden, need_weight, need_bias)
    else:
        loss, lse = linear_cross_entropy_reference(hidden, weight, bias, labels, *args)
        one = torch.ones((), dtype=torch.float32, device=hidden.device)
        dh, dw, db = linear_cross_entropy_backward_reference(one, hidden, weight, bias, labels,
                                                             lse, *args)
    return (loss.to(out_dtype), dh if need_hidden else hidden.new_empty(0),
            dw if need_weight else hidden.new_empty(0),
            db if need_bias and db is not None else hidden.new_empty(0))


@linear_cross_entropy_gif.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, logit_scale,
      softcap, z_loss, out_dtype, need_hidden, need_weight, need_bias):
    empty = hidden.new_empty(0)
    return (hidden.new_empty((), dtype=out_dtype),
            torch.empty_like(hidden) if need_hidden else empty,
            torch.empty_like(weight) if need_weight else empty,
            torch.empty_like(bias) if need_bias and bias is not None else empty)


def _setup_context_gif(ctx, inputs, output) -> None:
    _loss, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)


def _backward_gif(ctx, grad_loss: Tensor, *_unused):
    dh, dw, db = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    g = grad_loss.to(torch.float32)
    scaled = [(t * g).to(t.dtype) if need and t.numel() else None
              for t, need in ((dh, need_h), (dw, need_w), (db, need_b))]
    return tuple(scaled) + (None,) * 11


linear_cross_entropy_gif.register_autograd(_backward_gif, setup_context=_setup_context_gif)


def linear_cross_entropy_loss(hidden: Tensor, weight: Tensor, labels: Tensor,
                              bias: Tensor | None = None, *, ignore_index: int = -100,
                              reduction: str = "mean", label_smoothing: float = 0.0,
                              logit_scale: float = 1.0, softcap: float = 0.0,
                              z_loss: float = 0.0, grad_in_forward: bool = False) -> Tensor:
    """Functional form: cross_entropy(transform(hidden @ weightᵀ + bias), labels), fp32 loss.

    hidden [..., H] and labels [...] are flattened; the [N, V] logits are never stored.
    ``grad_in_forward=True``: the opt-in 6NHV mode (fp32 [V, H] accumulator, see the docs).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    args = (h, weight, bias, labels.reshape(-1), ignore_index, reduction, label_smoothing,
            logit_scale, softcap, z_loss, torch.float32)
    if grad_in_forward and torch.is_grad_enabled():
        needs = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        return torch.ops.chronicals.linear_cross_entropy_grad_in_forward(*args, *needs)[0]
    loss, _ = torch.ops.chronicals.linear_cross_entropy(*args)
    return loss


def flops(n: int, hidden: int, vocab: int) -> int:
    """Matmul FLOPs of one forward + backward: 2NHV (forward) + 2NHV (recompute) + 4NHV."""
    return 8 * n * hidden * vocab


def ideal_bytes(n: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Bytes a perfect fused op must move: read H and W (forward and backward), write dH, dW."""
    return itemsize * (2 * (n * hidden + vocab * hidden) + n * hidden + vocab * hidden) + 8 * n


__all__ = ["linear_cross_entropy", "linear_cross_entropy_loss", "linear_cross_entropy_reference",
           "linear_cross_entropy_backward_reference", "lce_forward", "lce_backward",
           "lce_forward_with_grads", "vocab_chunk", "row_chunk", "flops", "ideal_bytes"]
