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

How it runs on CUDA: two modes, chosen where the op is called (the graph pass decides from
whether a gradient is needed, see passes/linear_ce.py; :func:`linear_cross_entropy_loss` from
``torch.is_grad_enabled()`` and ``requires_grad``).

Training, "gradients in the forward" (op ``chronicals::linear_cross_entropy_grad_in_forward``,
6NHV FLOPs, as eager/Inductor): the tokens are cut into chunks of C rows (:func:`row_chunk`,
the [C, V] buffer ≤ 256 MiB). Per chunk: x_c = H_c @ Wᵀ (+ b) (cuBLAS into one reused [C, V]
buffer, input dtype); a Triton pass over whole rows gives lse_i (online max / sum over column
slices, then a combine) — on Hopper (no bias, bf16/fp16) the logits come instead from a Gluon
GEMM whose epilogue also gives each row's (max, Σ exp) per column tile, and that pass becomes a
small combine (kernels/linear_ce_gemm.py; ``CHRONICALS_LCE_GEMM=0`` turns it off) —, and a
second Triton pass overwrites the buffer IN PLACE with d for an upstream gradient of 1; then
dH_c = d_c @ W is written into dH's rows (one GEMM over all of V: rounded once, as eager;
cuBLAS, or opt-in the same Gluon main loop: ``CHRONICALS_LCE_DH_GEMM=1``), dW += d_cᵀ @ H_c accumulates in a dW of the weight's dtype (cuBLAS
addmm with beta = 1: fp32 inside each GEMM, one rounding per chunk — ⌈N / C⌉ roundings in all,
against eager's one; beyond DW_LOW_PRECISION_MAX_CHUNKS chunks, an fp32 [V, H] sum instead),
db += Σ_rows d_c in fp32. n_valid (for "mean") is a device tensor computed before the first
chunk. The op returns the loss and dH, dW, db; its backward multiplies them by g (the upstream
gradient) IN PLACE — a Triton kernel that reads g on the device and does nothing when g == 1
(one more rounding of dW otherwise). Under ``retain_graph``/``create_graph`` the product is out
of place; traced (torch.compile) it is ``t * g``, which Inductor computes into the saved
(donated) buffer. Extra memory: the [C, V] buffer + dH + dW (+ db); nothing of size N·V.

Forward only, no gradient needed (op ``chronicals::linear_cross_entropy``, 2NHV): the
vocabulary is cut into chunks of Vc columns. Per chunk: one GEMM x = H @ W_cᵀ into a [N, Vc]
buffer, then a Triton kernel folds it into each row's running max / sum of exponentials
(online softmax), the target logit and Σ z. Only lse [N] (fp32) is saved. Should a gradient be
asked for after all, its backward recomputes each chunk's logits (one GEMM), a Triton kernel
turns them into d in place, dW_c = d_cᵀ @ H is written straight into its rows of dW (rounded
once) and dH += d_c @ W_c accumulates in an fp32 [N, H] buffer: 8NHV in all, exact.

Off CUDA the ops run :func:`linear_cross_entropy_with_grads_reference` and
:func:`linear_cross_entropy_reference` (the same chunked algorithms in plain torch, computed in
fp32 or wider), which are also what the tests compare to float64.

References: Milakov & Gimelshein 2018 (online softmax); Wijmans et al. 2024 (Cut Your Losses
in Large-Vocabulary Language Models); Liger Kernel's fused linear cross-entropy (whose bugs
under ignore_index this design avoids, and whose bf16 dW accumulation over many small chunks it
bounds to a few roundings: see docs/linear_ce.md).
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import _arg_key, autograd_graph_kept, fast_launch

REDUCTIONS = ("mean", "sum")
# [N, Vc] logits buffer: at most this many bytes ...
MAX_CHUNK_BYTES = 256 << 20
# ... at least this many (small buffers make the GEMMs launch-bound) ...
MIN_CHUNK_BYTES = 64 << 20
# ... and big enough that each chunk's GEMM does about this many FLOPs.
CHUNK_FLOPS = 1 << 37

# Gradients-in-the-forward mode (the sweep hooks: benchmarks/sweep_linear_ce.py sets these, or
# the environment variables CHRONICALS_LCE_ROWS / _COLS / _BLOCK_V / _WARPS, read per call):
# the [C, V] buffer of C whole rows: at most this many bytes (C a multiple of 128) ...
ROW_CHUNK_BYTES = 256 << 20
# ... or exactly this many rows when set.
ROW_CHUNK_ROWS: int | None = None
# dW sums ⌈N / C⌉ chunk GEMMs in the weight's dtype, each rounding once: a relative error of about
# u·√((chunks + 1) / 6) (u = 2⁻⁸ in bf16: 4e-3 at 11 chunks, 1.2e-2 at 64). Beyond this many
# chunks (large N) dW is summed in an fp32 [V, H] buffer instead (4·V·H more bytes).
DW_LOW_PRECISION_MAX_CHUNKS = 32
# Triton passes over a [C, V] chunk: one program per (row, slice of this many columns) ...
# (on Hopper pass 1 is the combine of the fused logits GEMM's tile statistics: ROW_STATS and
# the tilings below then shape pass 2 only; CHRONICALS_LCE_GEMM=0 brings pass 1 back)
ROW_SPLIT_COLS = 16384
# ... walking its slice in tiles of this many columns, with this many warps (None: 4, or 8 for
# tiles wider than 2048).
ROW_BLOCK_V = 2048
ROW_WARPS: int | None = 8
# Pass 1's online softmax ($CHRONICALS_LCE_STATS, read per call): "lanes" (per-lane running max
# and sum, reduced across the block once per slice; the default) or "tile" (a max and a sum
# across the block per tile). Both passes alone on one chunk, H200, 2026-11-27 (`python -m
# benchmarks.anatomy_linear_ce`; bytes = read + read + write of the chunk, copy 4.1 TB/s):
#   [768, 151936]:  lanes 16384/2048/8 warps 0.206 ms (3.40 TB/s); tile 8192/2048/4 0.242 ms
#   [1024, 128256]: lanes 16384/2048/8 warps 0.229 ms (3.44 TB/s); tile 8192/2048/4 0.273 ms
# "lanes" was faster with every one of six tilings at both shapes. (Session 5's full-op sweep had
# put "tile" ahead at H=896 by 2.9%: one run each, within the ±3% those 13 ms runs drift.) A
# third variant, both passes fused in one kernel (one program per row), lost at both shapes
# and was removed.
ROW_STATS = "lanes"
ROW_STATS_KINDS = ("tile", "lanes")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _env_str(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


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
        z = softcap * t
        dz = scale * (1.0 - t * t)
    else:
        # ∂z/∂x = s for every x, ±inf included (as a tensor s + 0·x it was NaN at an infinite
        # logit: a token banned by a −inf bias got d = NaN where eager's is 0). One return:
        # Triton requires every return of a function to have one type; a constexpr branch
        # not taken is not compiled.
        z = x * scale
        dz = scale
    return z, dz


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
    fast_launch(lce_fwd_chunk_kernel)[(triton.cdiv(n, block_n),)](
        x, x.stride(0), labels, m, s, zt, zsum, n, vc, v0, scale, softcap or 1.0,
        HAS_SOFTCAP=softcap > 0, HAS_SMOOTHING=smoothing,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps)


def lce_bwd_chunk(x: Tensor, labels: Tensor, lse: Tensor, row_w: Tensor, v0: int, vocab: int,
                  scale: float, softcap: float, label_smoothing: float, z_loss: float) -> None:
    """Launch :func:`lce_bwd_chunk_kernel` on a [N, Vc] chunk, in place."""
    n, vc = x.shape
    block_n, block_v, warps = _kernel_tiles(vc)
    fast_launch(lce_bwd_chunk_kernel)[(triton.cdiv(n, block_n),)](
        x, x.stride(0), labels, lse, row_w, n, vc, v0, scale, softcap or 1.0,
        1.0 - label_smoothing, label_smoothing / vocab, z_loss,
        HAS_SOFTCAP=softcap > 0, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=warps)


@triton.jit
def _stats_tile(base, c_begin, c_end, target, scale, softcap,
                HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, Σ exp(z − max), target z, Σ z) of columns [c_begin, c_end) of one row, tile by tile:
    each tile's max and sum reduced across the block, then folded into the running (m, s)."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    zt = tl.full([], 0.0, tl.float32)
    zsum = tl.full([], 0.0, tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = cols < c_end
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = _transform(x, scale, softcap, HAS_SOFTCAP)
        z_inf = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_inf, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z_inf - m_safe), axis=0)
        m = m_new
        zt += tl.sum(tl.where(mask & (cols == target), z, 0.0), axis=0)
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(mask, z, 0.0), axis=0)
    return m, s, zt, zsum


# The "lanes" statistics (ROW_STATS = "lanes"): each of the BLOCK_V lanes of a tile keeps its own
# online-softmax state over the columns it visits (c0 + lane, c0 + BLOCK_V + lane, ...), so the
# loop is elementwise; the lanes are reduced across the block once, at the end. :func:`_stats_tile`
# above reduces across the block (a max and a sum through shared memory) on every tile.
#
# A lane's max starts at −FLT_MAX, a finite floor below every finite logit, not at −inf: z − m is
# then never (−inf) − (−inf) = nan, with no guard in the loop (masked lanes carry z = −inf).
_M_FLOOR = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _online_fold(m, s, z):
    """One element into a lane's state (m, s = Σ exp(z' − m) over the z' seen so far):

        m' = max(m, z),     s' = s · exp(m − m') + exp(z − m').

    One of the two exponents is 0, so one exponential per element, e = exp(−|z − m|):
        z > m:  s' = s · e + 1          z ≤ m:  s' = s + e.
    e ≤ 1 whatever the logits' magnitude: nothing overflows. A masked lane (z = −inf) gets e = 0
    and keeps its state; a lane's first logit (m = −FLT_MAX) gets e = 0 (z − m rounds to FLT_MAX,
    or +inf: still e = 0), so s' = 1. (tl.exp is already ex2(x · log₂e) on NVIDIA GPUs: an
    explicit exp2 would save nothing.)"""
    e = tl.exp(-tl.abs(z - m))
    return tl.maximum(m, z), tl.where(z > m, s * e + 1.0, s + e)


@triton.jit
def _lanes_reduce(m, s):
    """The lanes' states combined into one: M = max m, S = Σ s · exp(m − M). A lane that saw no
    column has m = −FLT_MAX and s = 0: it adds 0."""
    m_all = tl.max(m, axis=0)
    return m_all, tl.sum(s * tl.exp(m - m_all), axis=0)


@triton.jit
def _stats_lanes(base, c_begin, c_end, target, scale, softcap,
                 HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    """(max, Σ exp(z − max), target z, Σ z) of columns [c_begin, c_end) of one row, lane-wise.

    The target logit is one load (0 if the target is not in the range), not a compare and a
    select on every element."""
    m = tl.full([BLOCK_V], _M_FLOOR, tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    zsum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for c0 in range(c_begin, c_end, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        mask = cols < c_end
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        z, _ = _transform(x, scale, softcap, HAS_SOFTCAP)
        m, s = _online_fold(m, s, tl.where(mask, z, float("-inf")))
        if HAS_SMOOTHING:
            zsum += tl.where(mask, z, 0.0)
    m_row, s_row = _lanes_reduce(m, s)
    hit = (target >= c_begin) & (target < c_end)
    xt = tl.load(base + target, mask=hit, other=0.0).to(tl.float32)
    zt, _ = _transform(xt, scale, softcap, HAS_SOFTCAP)
    return m_row, s_row, tl.where(hit, zt, 0.0), tl.sum(zsum, axis=0)


@triton.jit
def lce_row_stats_kernel(
    X, stride_x,                # logits [C, V], whole rows (row stride; columns contiguous)
    LABELS, ROW_W,              # int64 [C]; fp32 [C] row weights (0: ignored row, skipped)
    PM, PS, PZT, PZSUM,         # fp32 [C, SPLIT] out: per slice max, Σ exp(z − max), target z, Σ z
    V, SPLIT, COLS,             # vocabulary, slices per row, columns per slice
    scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
    LANES: tl.constexpr,        # ROW_STATS: "lanes" (True) or "tile" statistics
):
    """Pass 1 over a chunk of whole rows: one program per (row, column slice)."""
    pid = tl.program_id(0)
    row = pid // SPLIT
    c_begin = (pid % SPLIT) * COLS
    c_end = tl.minimum(c_begin + COLS, V)
    w = tl.load(ROW_W + row)
    if w != 0.0:
        target = tl.load(LABELS + row)
        base = X + row.to(tl.int64) * stride_x
        if LANES:
            m, s, zt, zsum = _stats_lanes(base, c_begin, c_end, target, scale, softcap,
                                          HAS_SOFTCAP, HAS_SMOOTHING, BLOCK_V)
        else:
            m, s, zt, zsum = _stats_tile(base, c_begin, c_end, target, scale, softcap,
                                         HAS_SOFTCAP, HAS_SMOOTHING, BLOCK_V)
        tl.store(PM + pid, m)
        tl.store(PS + pid, s)
        tl.store(PZT + pid, zt)
        if HAS_SMOOTHING:
            tl.store(PZSUM + pid, zsum)


@triton.jit
def _zero_row(base, LSE, ZT, ZSUM, row, c_begin, c_end, write_stats,
              HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr):
    """An ignored row (weight 0): d = 0 over columns [c_begin, c_end), and 0 statistics when
    ``write_stats`` (the row's first slice)."""
    zero = tl.zeros([BLOCK_V], dtype=base.dtype.element_ty)
    for c0 in range(c_begin, c_end, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        tl.store(base + cols, zero, mask=cols < c_end)
    if write_stats:
        tl.store(LSE + row, 0.0)
        tl.store(ZT + row, 0.0)
        if HAS_SMOOTHING:
            tl.store(ZSUM + row, 0.0)


@triton.jit
def _write_d(base, cols, mask, lse, p_scale, w, target, scale, softcap, target_weight,
             uniform_weight, HAS_SOFTCAP: tl.constexpr):
    """One tile of a row, in place: x → d = w·(p·(1 + 2λ·lse) − (1−ε)·[j = y] − ε/V)·∂z/∂x,
    p = exp(z − lse) (p_scale = w·(1 + 2λ·lse))."""
    x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    z, dz = _transform(x, scale, softcap, HAS_SOFTCAP)
    p = tl.exp(z - lse) * p_scale
    hot = tl.where(cols == target, target_weight, 0.0)
    d = (p - (hot + uniform_weight) * w) * dz
    tl.store(base + cols, d.to(base.dtype.element_ty), mask=mask)


@triton.jit
def lce_row_grad_kernel(
    X, stride_x,                # logits [C, V], whole rows; overwritten with d (same dtype)
    LABELS, ROW_W,              # int64 [C]; fp32 [C] (0 on ignored rows: d = 0, nothing read)
    PM, PS, PZT, PZSUM,         # fp32 [C, N_STATS] from lce_row_stats_kernel (N_STATS = SPLIT)
                                # or combine_tile_stats_kernel (N_STATS = 1)
    LSE, ZT, ZSUM,              # fp32 [C] out: the rows' statistics for the loss (0 if ignored)
    V, SPLIT, COLS, n_programs, N_STATS,
    scale, softcap,
    target_weight,              # 1 − ε
    uniform_weight,             # ε / V
    z_loss,                     # λ
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Pass 2: combine the row's slices into lse, then x → d = w·∂ℓ/∂z·∂z/∂x in place.

    Programs run in the reverse order of pass 1's, so the first slices read here are the last
    ones pass 1 read (still in L2)."""
    pid = n_programs - 1 - tl.program_id(0)
    row = pid // SPLIT
    part = pid % SPLIT
    c_begin = part * COLS
    c_end = tl.minimum(c_begin + COLS, V)
    w = tl.load(ROW_W + row)
    base = X + row.to(tl.int64) * stride_x
    if w != 0.0:
        k = tl.arange(0, BLOCK_S)
        k_mask = k < N_STATS
        pm = tl.load(PM + row * N_STATS + k, mask=k_mask, other=float("-inf"))
        ps = tl.load(PS + row * N_STATS + k, mask=k_mask, other=0.0)
        m = tl.max(pm, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        lse = m_safe + tl.log(tl.sum(ps * tl.exp(pm - m_safe), axis=0))
        p_scale = w * (1.0 + 2.0 * z_loss * lse)
        target = tl.load(LABELS + row)
        for c0 in range(c_begin, c_end, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            _write_d(base, cols, cols < c_end, lse, p_scale, w, target, scale, softcap,
                     target_weight, uniform_weight, HAS_SOFTCAP)
        if part == 0:
            tl.store(LSE + row, lse)
            tl.store(ZT + row, tl.sum(tl.load(PZT + row * N_STATS + k, mask=k_mask, other=0.0),
                                      axis=0))
            if HAS_SMOOTHING:
                tl.store(ZSUM + row,
                         tl.sum(tl.load(PZSUM + row * N_STATS + k, mask=k_mask, other=0.0), axis=0))
    else:
        _zero_row(base, LSE, ZT, ZSUM, row, c_begin, c_end, part == 0, HAS_SMOOTHING, BLOCK_V)


@triton.jit
def scale_inplace_kernel(X, G, n, BLOCK: tl.constexpr):
    """x ← x · g for a dense tensor seen flat; g a device scalar; nothing is touched if g == 1."""
    g = tl.load(G).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(X + offs, (x * g).to(X.dtype.element_ty), mask=mask)


def _row_tiles(vocab: int, cols: int | None, block_v: int | None, warps: int | None
               ) -> tuple[int, int, int]:
    """(columns per program, BLOCK_V, num_warps) of the row passes (sweep hooks, see above)."""
    block_v = block_v or _env_int("CHRONICALS_LCE_BLOCK_V") or ROW_BLOCK_V
    block_v = min(triton.next_power_of_2(block_v), triton.next_power_of_2(max(vocab, 16)))
    cols = max(block_v, cols or _env_int("CHRONICALS_LCE_COLS") or ROW_SPLIT_COLS)
    warps = warps or _env_int("CHRONICALS_LCE_WARPS") or ROW_WARPS or (8 if block_v > 2048 else 4)
    return cols, block_v, warps


def _row_variant() -> str:
    """Pass 1's statistics, "tile" or "lanes" (sweep hook ROW_STATS or $CHRONICALS_LCE_STATS,
    see above)."""
    stats = _env_str("CHRONICALS_LCE_STATS") or ROW_STATS
    if stats not in ROW_STATS_KINDS:
        raise ValueError(f"row statistics must be one of {ROW_STATS_KINDS}, got {stats!r}")
    return stats


def _launch_key(tensors: tuple[Tensor, ...], *scalars) -> tuple:
    """``fast_launch``'s key for one launch of ours, in place of the one it builds from every
    argument (~0.4 µs an argument, ~20 arguments a row pass): each tensor's dtype and 16-byte
    alignment, as ``fast_launch`` keys a tensor — all Triton specializes a pointer on; the [C]
    slices of the [N] vectors start at row r0, so theirs changes from chunk to chunk —, then
    ``scalars`` as they are. The caller
    lists every int argument there by value (which fixes its class: 1, a multiple of 16, other;
    and its width), every float (Python floats: an int where a float goes would be keyed equal
    to it, 2 == 2.0, and specialized as an int), and every constexpr and launch option that
    can vary between calls (literals in the launch can't)."""
    return tuple(map(_arg_key, tensors)), scalars


def lce_rows(x: Tensor, labels: Tensor, row_w: Tensor, lse: Tensor, zt: Tensor, zsum: Tensor,
             scale: float, softcap: float, label_smoothing: float, z_loss: float,
             cols: int | None = None, block_v: int | None = None, warps: int | None = None,
             tile_stats: tuple[Tensor, Tensor, Tensor | None] | None = None) -> None:
    """The two row passes on a [C, V] chunk of whole rows: lse, zt, zsum [C] out, x → d in place
    (d for the row weights ``row_w``), pass 1 with the statistics ROW_STATS selects (the same
    outputs). With ``tile_stats`` (per column tile, from the fused logits GEMM,
    kernels/linear_ce_gemm.py) pass 1 is a combine of those instead of a read of x. Plain
    tensors: also CPU under ``TRITON_INTERPRET=1``."""
    n, vocab = x.shape
    if n == 0:
        return
    cols, block_v, warps = _row_tiles(vocab, cols, block_v, warps)
    # floats as floats (see _launch_key); 1 − ε and ε / V are Python floats already
    scale, cap, z_loss = float(scale), float(softcap or 1.0), float(z_loss)
    has_softcap, smoothing = softcap > 0, bool(label_smoothing)
    flags = dict(HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=smoothing, BLOCK_V=block_v,
                 num_warps=warps)
    split = triton.cdiv(vocab, cols)
    stride = x.stride(0)
    # what both passes' launches specialize on, beside their tensors (n: n·split programs)
    shape = (stride, vocab, split, cols, n, scale, cap, has_softcap, smoothing, block_v, warps)
    if tile_stats is None:
        n_stats = split
        stats = torch.empty((4, n, split), dtype=torch.float32, device=x.device).unbind()
        lanes = _row_variant() == "lanes"
        key = _launch_key((x, labels, row_w, *stats), *shape, lanes)
        fast_launch(lce_row_stats_kernel, key)[(n * split,)](
            x, stride, labels, row_w, *stats, vocab, split, cols, scale, cap, LANES=lanes,
            **flags)
    else:
        from .linear_ce_gemm import combine_tile_stats_kernel
        n_stats = 1
        stats = torch.empty((4, n), dtype=torch.float32, device=x.device).unbind()
        tm, ts, tz = (t[:n] if t is not None else None for t in tile_stats)
        tz = tz if tz is not None else tm
        tiles = tm.shape[1]
        key = _launch_key((x, labels, row_w, tm, ts, tz, *stats), *shape, tiles)
        fast_launch(combine_tile_stats_kernel, key)[(n,)](
            x, stride, labels, row_w, tm, ts, tz, tiles, *stats, vocab, scale, cap,
            HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=smoothing, BLOCK_T=1024, num_warps=4)
    target_weight, uniform_weight = 1.0 - label_smoothing, label_smoothing / vocab
    key = _launch_key((x, labels, row_w, *stats, lse, zt, zsum), *shape, n_stats, target_weight,
                      uniform_weight, z_loss)
    fast_launch(lce_row_grad_kernel, key)[(n * split,)](
        x, stride, labels, row_w, *stats, lse, zt, zsum, vocab, split, cols, n * split, n_stats,
        scale, cap, target_weight, uniform_weight, z_loss,
        BLOCK_S=triton.next_power_of_2(n_stats), **flags)


def _runs_here(kernel, t: Tensor) -> bool:
    """Whether ``kernel`` (ours, ``@triton.jit``) can run on ``t``'s device: CUDA, or anywhere
    under ``TRITON_INTERPRET=1`` (which makes it an interpreted function, not a JITFunction)."""
    return t.is_cuda or not isinstance(kernel, triton.runtime.JITFunction)


def scale_inplace(t: Tensor, g: Tensor, block: int = 4096) -> None:
    """t ← t · g in place, g a 0-d tensor on t's device; no work when g == 1 (no host sync).
    The Triton kernel where it can run (CUDA, or CPU under ``TRITON_INTERPRET=1``; t dense),
    else ``mul_``."""
    if t.numel() == 0:
        return
    dense = t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())
    if not _runs_here(scale_inplace_kernel, t) or not dense or g.device != t.device:
        t.mul_(g)
        return
    fast_launch(scale_inplace_kernel)[(triton.cdiv(t.numel(), block),)](
        t, g.reshape(()), t.numel(), BLOCK=block, num_warps=4)
    torch.autograd.graph.increment_version(t)


# ---------------------------------------------------------------------------------------------
# The loss and the row weights from [N] vectors, once a call: one small Triton kernel each on
# the device (one launch in place of ~8 torch ops of host time each; no host sync), with the
# plain-torch references (*_reference: off CUDA, for float64, and what the tests compare to).
# ---------------------------------------------------------------------------------------------
# One program sweeps the N rows in tiles of this many, with this many warps (N ≤ ~10⁵: a few
# dozen tiles). Each lane keeps its own partial sums, reduced once at the end: a fixed order,
# so the loss is deterministic.
VEC_BLOCK = 4096
VEC_WARPS = 8


@triton.jit
def _valid_rows(LABELS, rows, n, ignore_index):
    """Which of ``rows`` are rows (< n) whose label is not ignore_index."""
    return tl.load(LABELS + rows, mask=rows < n, other=ignore_index) != ignore_index


@triton.jit
def row_weights_kernel(LABELS, G, W, n, ignore_index,
                       UNIT_G: tl.constexpr,     # g = 1, G not read
                       MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """w_i = g / max(n_valid, 1) ("mean") or g ("sum") on valid rows, 0 on ignored rows: never
    nan (a mean over no rows divides by 1). For "mean" a first sweep counts the valid rows."""
    if UNIT_G:
        g = tl.full([], 1.0, tl.float32)
    else:
        g = tl.load(G).to(tl.float32)
    if MEAN:
        count = tl.zeros([BLOCK], dtype=tl.int32)
        for r0 in range(0, n, BLOCK):
            count += _valid_rows(LABELS, r0 + tl.arange(0, BLOCK), n, ignore_index).to(tl.int32)
        n_valid = tl.maximum(tl.sum(count, axis=0), 1).to(tl.float32)
        g = tl.math.div_rn(g, n_valid)          # IEEE division, as torch's ('/' may be approximate)
    for r0 in range(0, n, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        valid = _valid_rows(LABELS, rows, n, ignore_index)
        tl.store(W + rows, tl.where(valid, g, 0.0), mask=rows < n)


@triton.jit
def finish_loss_kernel(LSE, ZT, ZSUM, LABELS, OUT, n, ignore_index,
                       target_weight,           # 1 − ε
                       uniform_weight,          # ε / V
                       z_loss,                  # λ
                       HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
                       MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """loss = Σ_{i valid} ℓ_i (/ n_valid for "mean") into the 0-d OUT, with
    ℓ_i = lse_i − (1 − ε) zt_i − (ε / V) zsum_i + λ lse_i². Ignored rows are not read (their
    statistics may be anything). "mean" of no rows is nan, as eager's 0/0."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for r0 in range(0, n, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        valid = _valid_rows(LABELS, rows, n, ignore_index)
        lse = tl.load(LSE + rows, mask=valid, other=0.0)
        ell = lse - target_weight * tl.load(ZT + rows, mask=valid, other=0.0)
        if HAS_SMOOTHING:
            ell = ell - uniform_weight * tl.load(ZSUM + rows, mask=valid, other=0.0)
        if HAS_Z_LOSS:
            ell = ell + z_loss * lse * lse
        total += tl.where(valid, ell, 0.0)
        count += valid.to(tl.int32)
    loss = tl.sum(total, axis=0)
    if MEAN:
        n_valid = tl.sum(count, axis=0)
        # 0/0 written out as nan (the interpreter warns on 0/0)
        mean = tl.math.div_rn(loss, tl.maximum(n_valid, 1).to(tl.float32))
        loss = tl.where(n_valid > 0, mean, float("nan"))
    tl.store(OUT, loss)


def _valid(labels: Tensor, ignore_index: int) -> Tensor:
    return labels != ignore_index


def _vectors(labels: Tensor, *rows: Tensor) -> bool:
    """Whether ``labels`` and the fp32 vectors ``rows`` are what the [N] kernels read: dense,
    one device, one element a row."""
    n = labels.numel()
    return labels.is_contiguous() and all(
        t.dtype == torch.float32 and t.is_contiguous() and t.numel() == n
        and t.device == labels.device for t in rows)


def finish_loss(lse: Tensor, zt: Tensor, zsum: Tensor | None, labels: Tensor, vocab: int,
                ignore_index: int, reduction: str, label_smoothing: float,
                z_loss: float) -> Tensor:
    """ℓ_i from the row statistics, reduced (fp32, 0-d): :func:`finish_loss_kernel` where it can
    run (fp32 statistics; CUDA, or CPU under ``TRITON_INTERPRET=1``), else
    :func:`finish_loss_reference`. "mean" of nothing is nan, as eager's 0/0."""
    smoothing, has_z_loss = bool(label_smoothing), bool(z_loss)
    stats = (lse, zt, zsum) if smoothing else (lse, zt)
    if not (_runs_here(finish_loss_kernel, lse) and _vectors(labels, *stats)):
        return finish_loss_reference(lse, zt, zsum, labels, vocab, ignore_index, reduction,
                                     label_smoothing, z_loss)
    out = torch.empty((), dtype=torch.float32, device=lse.device)
    n, mean = labels.numel(), reduction == "mean"
    target_weight, uniform_weight = 1.0 - label_smoothing, label_smoothing / vocab
    z_loss = float(z_loss)
    zsum = zsum if smoothing else lse                    # not read without smoothing
    key = _launch_key((lse, zt, zsum, labels, out), n, ignore_index, target_weight,
                      uniform_weight, z_loss, smoothing, has_z_loss, mean, VEC_BLOCK, VEC_WARPS)
    fast_launch(finish_loss_kernel, key)[(1,)](
        lse, zt, zsum, labels, out, n, ignore_index, target_weight, uniform_weight, z_loss,
        HAS_SMOOTHING=smoothing, HAS_Z_LOSS=has_z_loss, MEAN=mean, BLOCK=VEC_BLOCK,
        num_warps=VEC_WARPS)
    return out


def row_weights(grad: Tensor | None, labels: Tensor, ignore_index: int, reduction: str,
                dtype: torch.dtype) -> Tensor:
    """w_i = g / n_valid (mean) or g (sum) on valid rows, 0 on ignored rows (never nan); g =
    ``grad`` (a one-element tensor), or 1 for None. :func:`row_weights_kernel` where it can run
    (fp32 weights; CUDA, or CPU under ``TRITON_INTERPRET=1``), else
    :func:`row_weights_reference`."""
    if not (dtype == torch.float32 and _runs_here(row_weights_kernel, labels)
            and _vectors(labels) and (grad is None or (grad.numel() == 1
                                                       and grad.device == labels.device))):
        if grad is None:
            grad = torch.ones((), dtype=dtype, device=labels.device)
        return row_weights_reference(grad, labels, ignore_index, reduction, dtype)
    w = torch.empty(labels.shape, dtype=torch.float32, device=labels.device)
    n, mean = labels.numel(), reduction == "mean"
    if n == 0:
        return w
    g = labels if grad is None else grad                # not read for g = 1
    key = _launch_key((labels, g, w), n, ignore_index, grad is None, mean, VEC_BLOCK, VEC_WARPS)
    fast_launch(row_weights_kernel, key)[(1,)](
        labels, g, w, n, ignore_index, UNIT_G=grad is None, MEAN=mean, BLOCK=VEC_BLOCK,
        num_warps=VEC_WARPS)
    return w


def finish_loss_reference(lse: Tensor, zt: Tensor, zsum: Tensor | None, labels: Tensor,
                          vocab: int, ignore_index: int, reduction: str, label_smoothing: float,
                          z_loss: float) -> Tensor:
    """ℓ_i from the row statistics, reduced, in torch ops (in the statistics' dtype). "mean" of
    nothing is 0/0 = nan, as eager's."""
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


def row_weights_reference(grad: Tensor, labels: Tensor, ignore_index: int, reduction: str,
                          dtype: torch.dtype) -> Tensor:
    """w_i = g / n_valid (mean) or g (sum) on valid rows, 0 on ignored rows (never nan), in
    torch ops."""
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


def _tile_stats_buffers(h: Tensor, weight: Tensor, bias: Tensor | None, rows: int,
                        label_smoothing: float) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """Per-tile statistics buffers for the fused logits GEMM (Hopper), or None where it can't
    run: then cuBLAS computes the logits and pass 1 reads them."""
    gemm = _gluon_gemms() if h.is_cuda and rows else None
    if gemm is None or gemm.unusable(h, weight, bias):
        return None
    return gemm.tile_stats_buffers(rows, h.shape[1], weight.shape[0], bool(label_smoothing),
                                   h.device)


def _logits_with_tile_stats(hc, weight, x, tile_stats, scale, softcap) -> bool:
    """The fused logits GEMM on one chunk, after :func:`_tile_stats_buffers` found it usable."""
    return _gluon_gemms().logits_with_tile_stats(hc, weight, x, tile_stats, scale, softcap,
                                                 checked=True)


def _dh_with_gemm(d, weight, out) -> bool:
    gemm = _gluon_gemms()
    return gemm is not None and gemm.dh_with_gemm(d, weight, out)


_GLUON_IMPORT: list = []      # [module or None]: imported once


def _gluon_gemms():
    """kernels/linear_ce_gemm, or None where this Triton's Gluon API can't be imported (warned
    once; cuBLAS and both row passes then)."""
    if not _GLUON_IMPORT:
        try:
            from . import linear_ce_gemm
            _GLUON_IMPORT.append(linear_ce_gemm)
        except Exception as e:  # noqa: BLE001 (ImportError, AttributeError: another Gluon API)
            warnings.warn(f"chronicals: the fused loss's Gluon GEMMs are unavailable "
                          f"({type(e).__name__}: {e}); using cuBLAS", stacklevel=3)
            _GLUON_IMPORT.append(None)
    return _GLUON_IMPORT[0]


def row_chunk(n_rows: int, vocab: int, itemsize: int) -> int:
    """Rows C per token chunk of the gradients-in-the-forward mode: the [C, V] buffer of whole
    rows ≤ ROW_CHUNK_BYTES, C a multiple of 128 (at least 128), at most N; or ROW_CHUNK_ROWS /
    $CHRONICALS_LCE_ROWS when set."""
    forced = ROW_CHUNK_ROWS or _env_int("CHRONICALS_LCE_ROWS")
    if forced:
        return max(1, min(forced, n_rows))
    rows = ROW_CHUNK_BYTES // max(1, vocab * itemsize)
    return max(1, min(max(128, rows // 128 * 128), n_rows))


def lce_forward_with_grads(h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                           ignore_index: int, reduction: str, label_smoothing: float,
                           scale: float, softcap: float, z_loss: float, need_h: bool,
                           need_w: bool, need_b: bool, rows: int | None = None,
                           cols: int | None = None, block_v: int | None = None,
                           warps: int | None = None
                           ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss fp32, dH, dW, db) for an upstream gradient of 1, in 6NHV FLOPs.

    Token chunks of C whole rows [C, V] (one buffer, reused): each row's lse is known inside
    its chunk, so d is formed at once, in place of the logits. dH_c = d_c @ W is one GEMM over V
    (rounded once, into dH's rows); dW accumulates over the chunks in the weight's dtype
    (cuBLAS: the first chunk with beta = 0, the others addmm with beta = 1; fp32 inside each
    GEMM, one rounding per chunk) — or, beyond DW_LOW_PRECISION_MAX_CHUNKS chunks, in an fp32
    [V, H] buffer; db in fp32. Grads not asked for are None and not computed.
    """
    n, vocab = h.shape[0], weight.shape[0]
    rows = rows or row_chunk(n, vocab, h.element_size())
    labels = labels.contiguous()
    f32 = dict(dtype=torch.float32, device=h.device)
    row_w = row_weights(None, labels, ignore_index, reduction, torch.float32)
    dh = torch.empty_like(h) if need_h else None
    db = torch.zeros(vocab, **f32) if need_b else None
    # many chunks (large N): dW summed in fp32, rounded once at the end
    dw_acc = (torch.zeros(weight.shape, **f32) if need_w and weight.dtype != torch.float32
              and triton.cdiv(n, rows) > DW_LOW_PRECISION_MAX_CHUNKS else None)
    dw = torch.empty_like(weight) if need_w and dw_acc is None else None
    lse, zt, zsum = torch.empty((3, n), **f32)
    buf = torch.empty((min(rows, n), vocab), dtype=h.dtype, device=h.device) if n else None
    tile_stats = _tile_stats_buffers(h, weight, bias, min(rows, n), label_smoothing)
    cols, block_v, warps = _row_tiles(vocab, cols, block_v, warps)   # once, not once a chunk
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        hc, x = h[r0:r1], buf[:r1 - r0]
        # [C, V] logits (and their tiles' statistics, fused)
        fused = tile_stats is not None and _logits_with_tile_stats(hc, weight, x, tile_stats,
                                                                   scale, softcap)
        if not fused and bias is None:
            torch.mm(hc, weight.t(), out=x)
        elif not fused:
            torch.addmm(bias, hc, weight.t(), out=x)
        lce_rows(x, labels[r0:r1], row_w[r0:r1], lse[r0:r1], zt[r0:r1], zsum[r0:r1], scale,
                 softcap, label_smoothing, z_loss, cols, block_v, warps,
                 tile_stats if fused else None)                           # x is d now
        if need_h and not (x.is_cuda and _dh_with_gemm(x, weight, dh[r0:r1])):
            torch.mm(x, weight, out=dh[r0:r1])
        if dw_acc is not None:
            _accumulate_mm(dw_acc, x.t(), hc)
        elif need_w:
            if r0 == 0:
                torch.mm(x.t(), hc, out=dw)
            else:
                dw.addmm_(x.t(), hc)
        if need_b:
            db += x.sum(0, dtype=torch.float32)
    del buf
    if dw_acc is not None:
        dw = torch.empty_like(weight).copy_(dw_acc)
        del dw_acc
    if n == 0:
        for t in (dh, dw):
            if t is not None:
                t.zero_()
    loss = finish_loss(lse, zt, zsum if label_smoothing else None, labels, vocab, ignore_index,
                       reduction, label_smoothing, z_loss)
    return (loss, dh, dw, db.to(bias.dtype) if need_b else None)


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
    loss = finish_loss_reference(lse, zt, zsum, labels, vocab, ignore_index, reduction,
                                 label_smoothing, z_loss)
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
    row_w = row_weights_reference(grad, labels, ignore_index, reduction, acc)
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


def linear_cross_entropy_with_grads_reference(
        h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int = -100,
        reduction: str = "mean", label_smoothing: float = 0.0, scale: float = 1.0,
        softcap: float = 0.0, z_loss: float = 0.0, need_h: bool = True, need_w: bool = True,
        need_b: bool = True, rows: int | None = None
        ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(loss, dH, dW, db) for an upstream gradient of 1: the gradients-in-the-forward algorithm
    (token chunks of whole rows, d formed at once, dW summed over chunks) in plain torch, in fp32
    (float64 for float64 inputs); grads in the input dtypes, None where not asked for."""
    acc = torch.promote_types(h.dtype, torch.float32)
    n, vocab = h.shape[0], weight.shape[0]
    rows = rows or row_chunk(n, vocab, 4)
    hf, wf = h.to(acc), weight.to(acc)
    bf = None if bias is None else bias.to(acc)
    row_w = row_weights_reference(torch.ones((), dtype=acc, device=h.device), labels,
                                  ignore_index, reduction, acc)
    lse, zt, zsum = torch.zeros((3, n), dtype=acc, device=h.device)
    dh, dw = torch.zeros_like(hf), torch.zeros_like(wf)
    db = torch.zeros(vocab, dtype=acc, device=h.device)
    cols = torch.arange(vocab, device=h.device)
    for r0 in range(0, n, rows):
        r1 = min(r0 + rows, n)
        x = _logits(hf[r0:r1], wf, bf, 0, vocab)                            # [C, V]
        z, dz = _transform_torch(x, scale, softcap)
        lse_c = torch.logsumexp(z, 1)
        hot = cols[None, :] == labels[r0:r1, None]
        lse[r0:r1], zt[r0:r1], zsum[r0:r1] = lse_c, torch.where(hot, z, 0.0).sum(1), z.sum(1)
        p = torch.exp(z - lse_c[:, None]) * (1.0 + 2.0 * z_loss * lse_c)[:, None]
        d = (p - hot.to(acc) * (1.0 - label_smoothing) - label_smoothing / vocab) * dz
        d = torch.where(row_w[r0:r1, None] != 0, d * row_w[r0:r1, None], 0.0)
        dh[r0:r1] = d @ wf
        dw += d.t() @ hf[r0:r1]
        db += d.sum(0)
    loss = finish_loss_reference(lse, zt, zsum, labels, vocab, ignore_index, reduction,
                                 label_smoothing, z_loss)
    # the layouts of h and weight, as the CUDA path (and the op's fake) give them
    return (loss, torch.empty_like(h).copy_(dh) if need_h else None,
            torch.empty_like(weight).copy_(dw) if need_w else None,
            db.to(bias.dtype) if need_b and bias is not None else None)


# ---------------------------------------------------------------------------------------------
# The registered ops.
#
# Opaque custom ops, not triton_op (the other kernels' pattern), on purpose: the body is a host
# loop over chunks whose memory plan is the point of the op (one logits buffer reused and
# overwritten in place, cuBLAS writing straight into slices of dH/dW, accumulation with out= or
# beta = 1). Traced
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


# Training: the gradients computed in the forward (6NHV instead of 8NHV). The forward returns
# them for an upstream gradient of 1; the backward multiplies them by the real one, g.
@torch.library.custom_op("chronicals::linear_cross_entropy_grad_in_forward", mutates_args=())
def linear_cross_entropy_gif(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                             ignore_index: int, reduction: str, label_smoothing: float,
                             logit_scale: float, softcap: float, z_loss: float,
                             out_dtype: torch.dtype, need_hidden: bool, need_weight: bool,
                             need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, dH, dW, db) with grads for g = 1; a grad not asked for is an empty tensor."""
    _check(hidden, weight, labels, reduction)
    need_bias = need_bias and bias is not None
    args = (ignore_index, reduction, label_smoothing, logit_scale, softcap, z_loss, need_hidden,
            need_weight, need_bias)
    if hidden.is_cuda:
        loss, dh, dw, db = lce_forward_with_grads(hidden, weight, bias, labels, *args)
    else:
        loss, dh, dw, db = linear_cross_entropy_with_grads_reference(hidden, weight, bias, labels,
                                                                     *args)
    # each absent grad gets its own empty tensor: outputs of a custom op may not alias
    return (loss.to(out_dtype), dh if need_hidden else hidden.new_empty(0),
            dw if need_weight else hidden.new_empty(0),
            db if need_bias else hidden.new_empty(0))


@linear_cross_entropy_gif.register_fake
def _(hidden, weight, bias, labels, ignore_index, reduction, label_smoothing, logit_scale,
      softcap, z_loss, out_dtype, need_hidden, need_weight, need_bias):
    return (hidden.new_empty((), dtype=out_dtype),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias and bias is not None else hidden.new_empty(0))


_GRAD_NAMES = ("hidden", "weight", "bias")


def _setup_context_gif(ctx, inputs, output) -> None:
    _loss, dh, dw, db = output
    bias = inputs[2]
    need_hidden, need_weight, need_bias = inputs[11:14]
    ctx.computed = (need_hidden, need_weight, need_bias and bias is not None)
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)
    # Non-differentiable outputs still get a gradient in backward: a zero tensor of their
    # shape, unless materializing is off — for dW a second [V, H] (1.05 GB at H=4096 V=128k).
    ctx.set_materialize_grads(False)


def _scaled(grads: list[Tensor | None], g: Tensor) -> list[Tensor | None]:
    """g · grad for each grad. Eagerly, with plain tensors and a graph freed after this backward:
    in place (no second dW; nothing done when g == 1). Traced (fake/functional tensors:
    torch.compile, compiled autograd) or with the graph kept: an out-of-place product."""
    present = [t for t in grads if t is not None]
    in_place = all(type(t) is torch.Tensor for t in present + [g]) and not autograd_graph_kept()
    if in_place:
        for t in present:
            scale_inplace(t, g)
        return grads
    return [None if t is None else (t * g.to(torch.promote_types(t.dtype, torch.float32))
                                    ).to(t.dtype) for t in grads]


def _backward_gif(ctx, grad_loss: Tensor | None, *_unused):
    if grad_loss is None:       # materialize_grads is off: no gradient reached the loss
        return (None,) * 14
    grads = []
    for t, computed, needed, name in zip(ctx.saved_tensors, ctx.computed,
                                         ctx.needs_input_grad[:3], _GRAD_NAMES):
        if needed and not computed:
            raise RuntimeError(
                f"chronicals::linear_cross_entropy_grad_in_forward: the gradient of {name} is "
                f"needed but was not computed in the forward (need_{name}=False)")
        grads.append(t if needed else None)
    return tuple(_scaled(grads, grad_loss)) + (None,) * 11


linear_cross_entropy_gif.register_autograd(_backward_gif, setup_context=_setup_context_gif)


def linear_cross_entropy_loss(hidden: Tensor, weight: Tensor, labels: Tensor,
                              bias: Tensor | None = None, *, ignore_index: int = -100,
                              reduction: str = "mean", label_smoothing: float = 0.0,
                              logit_scale: float = 1.0, softcap: float = 0.0,
                              z_loss: float = 0.0, grad_in_forward: bool | None = None) -> Tensor:
    """Functional form: cross_entropy(transform(hidden @ weightᵀ + bias), labels), fp32 loss.

    hidden [..., H] and labels [...] are flattened; the [N, V] logits are never stored.
    When a gradient is needed (grad mode on, an input requiring grad) the gradients are computed
    in the forward (6NHV, op ``linear_cross_entropy_grad_in_forward``); otherwise the forward only
    (2NHV, op ``linear_cross_entropy``). ``grad_in_forward=False`` forces the latter even in
    training (its backward recomputes the logits: 8NHV).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    args = (h, weight, bias, labels.reshape(-1), ignore_index, reduction, label_smoothing,
            logit_scale, softcap, z_loss, torch.float32)
    needs = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if grad_in_forward is not False and torch.is_grad_enabled() and any(needs):
        return torch.ops.chronicals.linear_cross_entropy_grad_in_forward(*args, *needs)[0]
    loss, _ = torch.ops.chronicals.linear_cross_entropy(*args)
    return loss


def flops(n: int, hidden: int, vocab: int, grad_in_forward: bool = True) -> int:
    """Matmul FLOPs of one forward + backward: 2NHV (logits) + 4NHV (dH, dW), plus 2NHV for the
    recompute of the forward-only op's backward."""
    return (6 if grad_in_forward else 8) * n * hidden * vocab


def ideal_bytes(n: int, hidden: int, vocab: int, itemsize: int) -> int:
    """Bytes a perfect fused op must move: read H and W (forward and backward), write dH, dW."""
    return itemsize * (2 * (n * hidden + vocab * hidden) + n * hidden + vocab * hidden) + 8 * n


__all__ = ["linear_cross_entropy", "linear_cross_entropy_loss", "linear_cross_entropy_reference",
           "linear_cross_entropy_backward_reference", "lce_forward", "lce_backward",
           "lce_forward_with_grads", "linear_cross_entropy_with_grads_reference", "lce_rows",
           "scale_inplace", "vocab_chunk", "row_chunk", "flops", "ideal_bytes"]
