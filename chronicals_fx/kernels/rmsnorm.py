"""RMSNorm as one registered op with a fused backward.

Forward, per row x of length H (all arithmetic in fp32; ``round_D`` rounds to nearest-even in
dtype D where eager's graph held the value in D, and is the identity for fp32):

    r     = 1 / sqrt(mean(x²) + eps)
    x̂     = x · r
    n     = round_NORM(x̂)                      # e.g. Llama's `.to(input_dtype)` before `weight *`
    w_eff = round_WEIGHT(w + offset)           # offset = 1 for Gemma's `(1 + weight)`
    y     = round_MUL(n ⊙ w_eff)  → stored in the output dtype

Backward, with dn = dy ⊙ w_eff (dy when there is no weight), treating roundings as identity
(as autograd does for casts):

    dx = r · (dn − x̂ · mean(dn ⊙ x̂))
    dw = Σ_rows dy ⊙ n                          # fp32 partial sums per program, summed after

r is recomputed in the backward from x (which is read there anyway), so the op saves only
x and w.

``add_rms_norm`` fuses the residual add that feeds most norms of a decoder:

    h = round_H(a + b)            (stored: the next residual)      y = RMSNorm(h)
    backward: dh_total = dh + dx(dy)  →  da = db = dh_total

one read of a and b and one write of h and y forward; one read of h, dy and dh and one write
of dh_total backward — the add's own pass over memory disappears in both directions. References: Zhang & Sennrich 2019 (RMSNorm); Triton tutorial 05 (layer norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._post_grad import ChainedPostGradPass
from ._triton import ROUND_CODES, launch_of, launchable, program_count, round_to

MAX_HIDDEN = 65536  # one row must fit one program's registers
MAX_DY_TERMS = 4    # gradients of y the backward kernel sums itself (q, k, v: 3; gate, up: 2)


@triton.jit
def rms_norm_fwd_kernel(
    X, W, Y,                    # x [M, H] (rows strided), weight [H], y [M, H]
    B, H_OUT,                   # with HAS_RESIDUAL: x := x + b is the input, stored to H_OUT
    stride_x, stride_y, stride_b, stride_h,  # row strides in elements; columns are contiguous
    M, H,                       # rows, hidden size
    eps, offset,                # w_eff = w + offset
    HAS_WEIGHT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SUM_ROUND: tl.constexpr,
    NORM_ROUND: tl.constexpr, WEIGHT_ROUND: tl.constexpr, MUL_ROUND: tl.constexpr,
    OUT_ROUND: tl.constexpr,    # the output's dtype, rounded to nearest-even before the store
    BLOCK_M: tl.constexpr,      # rows per program (several when H is small)
    BLOCK_H: tl.constexpr,      # next power of two ≥ H
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    mask = (rows < M)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)  # M·H can exceed 2³¹

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        b = tl.load(B + rows[:, None] * stride_b + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + b, SUM_ROUND)
        tl.store(H_OUT + rows[:, None] * stride_h + cols[None, :], x.to(H_OUT.dtype.element_ty), mask=mask)
    r = tl.rsqrt((tl.sum(x * x, axis=1) / H + eps).to(tl.float32))      # [BLOCK_M]
    y = round_to(x * r[:, None], NORM_ROUND)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = round_to(w + offset, WEIGHT_ROUND)  # round_to also pins fp32
        y = round_to(y * w[None, :], MUL_ROUND)
    y = round_to(y, OUT_ROUND)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _load_bwd_rows(DY, X, DH, DY1, DY2, DY3,
                   stride_dy, stride_x, stride_dh, stride_dy1, stride_dy2, stride_dy3,
                   m0, row_end, cols, col_mask,
                   HAS_DH: tl.constexpr, N_DY: tl.constexpr, BLOCK_M: tl.constexpr):
    """x, dy (the terms summed in fp32) and dh of rows [m0, m0 + BLOCK_M) ∩ [·, row_end)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if N_DY > 1:
        dy += tl.load(DY1 + rows[:, None] * stride_dy1 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if N_DY > 2:
        dy += tl.load(DY2 + rows[:, None] * stride_dy2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if N_DY > 3:
        dy += tl.load(DY3 + rows[:, None] * stride_dy3 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dh = x
    if HAS_DH:
        dh = tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0)
    return x, dy, dh


@triton.jit
def rms_norm_bwd_kernel(
    DY, X, W, DX, DW_PARTIAL,   # dy, x, dx [M, H]; weight [H]; dw partial sums [programs, H]
    DH,                         # with HAS_DH: a gradient of x from elsewhere, added into dx
    DY1, DY2, DY3,              # with N_DY > 1: dy = DY + DY1 (+ DY2 (+ DY3)), summed in fp32
    stride_dy, stride_x, stride_dx, stride_dh, stride_dy1, stride_dy2, stride_dy3,
    M, H,
    eps, offset,
    rows_per_program,           # each program owns a contiguous band of rows
    HAS_WEIGHT: tl.constexpr, COMPUTE_DW: tl.constexpr, HAS_DH: tl.constexpr,
    N_DY: tl.constexpr,         # 1–4 terms of dy (the gradients from y's consumers, unsummed)
    NORM_ROUND: tl.constexpr, WEIGHT_ROUND: tl.constexpr, DX_ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    PREFETCH: tl.constexpr,     # load the next rows before computing on these (double buffer)
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = round_to(w + offset, WEIGHT_ROUND)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)

    if PREFETCH:
        x_next, dy_next, dh_next = _load_bwd_rows(
            DY, X, DH, DY1, DY2, DY3, stride_dy, stride_x, stride_dh, stride_dy1, stride_dy2,
            stride_dy3, row_start, row_end, cols, col_mask, HAS_DH, N_DY, BLOCK_M)
    for m0 in range(row_start, row_end, BLOCK_M):
        if PREFETCH:
            x, dy, dh = x_next, dy_next, dh_next
            # the loads of the next band are in flight while this one is reduced and stored
            x_next, dy_next, dh_next = _load_bwd_rows(
                DY, X, DH, DY1, DY2, DY3, stride_dy, stride_x, stride_dh, stride_dy1,
                stride_dy2, stride_dy3, m0 + BLOCK_M, row_end, cols, col_mask, HAS_DH, N_DY,
                BLOCK_M)
        else:
            x, dy, dh = _load_bwd_rows(
                DY, X, DH, DY1, DY2, DY3, stride_dy, stride_x, stride_dh, stride_dy1,
                stride_dy2, stride_dy3, m0, row_end, cols, col_mask, HAS_DH, N_DY, BLOCK_M)
        x = x.to(tl.float32)
        rows = m0 + tl.arange(0, BLOCK_M)
        # rows past the band load as zeros: with eps = 0 their r is inf and x̂ = 0·inf = NaN,
        # which would reach dW through 0·NaN; r = 0 keeps them out
        r = tl.where(rows < row_end, tl.rsqrt((tl.sum(x * x, axis=1) / H + eps).to(tl.float32)), 0.0)
        x_hat = x * r[:, None]
        if HAS_WEIGHT:
            dn = dy * w[None, :]
            if COMPUTE_DW:
                dw += tl.sum(dy * round_to(x_hat, NORM_ROUND), axis=0)
        else:
            dn = dy
        c = tl.sum(dn * x_hat, axis=1) / H                                 # mean(dn ⊙ x̂)
        dx = (dn - x_hat * c[:, None]) * r[:, None]
        if HAS_DH:
            dx += dh.to(tl.float32)
        dx = round_to(dx, DX_ROUND)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        rows = rows.to(tl.int64)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)

    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * H + cols, dw, mask=col_mask)


@triton.jit
def rms_norm_dw_kernel(DW_PARTIAL, DW, P, H, DW_ROUND: tl.constexpr, BLOCK_P: tl.constexpr,
                       BLOCK_H: tl.constexpr):
    """dW = Σ_p partial[p, :] over the backward programs' fp32 partial sums [P, H], rounded once
    to DW's dtype: one launch where the traced ``sum(0).to(dtype)`` took two of Inductor's (a
    launch less per norm: the step is partly host-bound, RESULTS.md session 11 call 8)."""
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    acc = tl.zeros([BLOCK_P, BLOCK_H], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        acc += tl.load(DW_PARTIAL + rows[:, None] * H + cols[None, :], mask=mask, other=0.0)
    dw = round_to(tl.sum(acc, axis=0), DW_ROUND)         # to nearest even, interpreted too
    tl.store(DW + cols, dw.to(DW.dtype.element_ty), mask=col_mask)


def _tiles(hidden: int, block_m: int | None = None, num_warps: int | None = None
           ) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps): whole rows; 4k elements per program (8k for rows of 4k
    and more), 32 elements per thread. From benchmarks/sweep_rmsnorm.py on an H200
    (2026-11-27): at N=16384 H=4096 this took forward + backward from 262 to 212 µs, at
    N=8192 H=896 from 70 to 46 µs."""
    block_h = triton.next_power_of_2(hidden)
    elements = 8192 if block_h >= 4096 else 4096
    block_m = block_m or max(1, elements // block_h)
    num_warps = num_warps or min(16, max(2, block_m * block_h // 1024))
    return block_m, block_h, num_warps


def _forward_tiles(hidden: int, block_m: int | None = None, num_warps: int | None = None
                   ) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, num_warps) of the forward: :func:`_tiles` with half the rows where a
    program has 4 or more, the same warps. On an H200 (benchmarks/sweep_rmsnorm.py forward,
    RESULTS.md session 13 call 5), µs: 8192 × 896 15.4 → 14.9, with the residual add 23.5 →
    21.7; 16384 × 128 8.4 → 8.0, with the add 10.5 → 10.0. (A persistent grid prefetching the
    next band gained 0.4–0.5 µs more at H=896 and lost at 4096: not taken.)"""
    tile_m, block_h, tile_warps = _tiles(hidden)
    if tile_m >= 4:
        tile_m //= 2
    return block_m or tile_m, block_h, num_warps or tile_warps


def _dw_tiles(hidden: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_H) of dW's reduction over [P, H] partials (P ≈ 264–528 backward programs
    on 132 SMs). It is latency-bound: enough programs to cover the SMs (BLOCK_H of 8–64
    columns: 112 programs at H=896, 128 at 4096), each taking its whole column band in one or
    two loads of ≤ 8k elements. 64 × 64 blocks (14 programs looping 9 times at H=896) took
    8.9 µs a norm on an H200 (RESULTS.md session 12 call 3), Inductor's two kernels ~1.5 each."""
    block_h = max(8, min(64, triton.next_power_of_2(hidden) // 128))
    block_p = 8192 // block_h   # not from P, which is symbolic under dynamic shapes
    return block_p, block_h


def _backward_programs_per_sm(block_m: int, block_h: int) -> int:
    """Resident backward programs per SM: about 16k elements in flight per SM (same sweep)."""
    return max(1, min(8, 16384 // (block_m * block_h)))


def _backward_tiles(hidden: int) -> tuple[int, int, int, bool]:
    """(BLOCK_M, num_warps, programs per SM, PREFETCH) of the backward. From 512 to 4096
    columns it loads each band of rows while the band before it is reduced; below 4096 columns
    at half :func:`_tiles`' rows a band, as the next band's rows sit in registers too. Wider rows
    keep the plain loop: a row of 8k+ already holds 32+ elements a thread per tensor, and the
    prefetch would double that unmeasured. On an H200 with dh (benchmarks/sweep_rmsnorm.py,
    RESULTS.md session 13 calls 2–3), µs with dW:

    - 8192 × 896, 1/2/3 gradient terms: 25.2/29.6/33.8 prefetched at BLOCK_M 2, against
      27.2/31.8/37.8 at the best tiles without; the same tile is best for every term count,
      twice the rows spill (62–481 µs).
    - 16384 × 4096: 143.5 prefetched at BLOCK_M 2, 8 warps (145.6 at 1), 157.2 without.
    - 16384 × 128: 13.8 without (32 rows a band already keep enough in flight), 14.6 with.
    """
    block_m, block_h, num_warps = _tiles(hidden)
    per_sm = _backward_programs_per_sm(block_m, block_h)
    if not 512 <= block_h <= 4096:
        return block_m, num_warps, per_sm, False
    return (block_m // 2 if block_h < 4096 else block_m), num_warps, per_sm, True


def rms_norm_forward(x: Tensor, weight: Tensor | None, y: Tensor, eps: float, offset: float,
                     norm_dtype: torch.dtype, weight_dtype: torch.dtype,
                     mul_dtype: torch.dtype, block_m: int | None = None,
                     num_warps: int | None = None, residual: Tensor | None = None,
                     h_out: Tensor | None = None) -> None:
    """Launch the forward over rows of ``x`` [M, H] into ``y`` [M, H].

    With ``residual``, the normalized input is ``x + residual`` (rounded to ``h_out``'s dtype),
    also written to ``h_out``.
    """
    M, H = x.shape
    block_m, block_h, num_warps = _forward_tiles(H, block_m, num_warps)
    grid = (triton.cdiv(M, block_m),)
    has_residual = residual is not None
    b, h = (residual, h_out) if has_residual else (x, y)
    launchable(rms_norm_fwd_kernel, x)[grid](
        x, x if weight is None else weight, y, b, h,
        x.stride(0), y.stride(0), b.stride(0), h.stride(0), M, H, eps, offset,
        HAS_WEIGHT=weight is not None, HAS_RESIDUAL=has_residual,
        SUM_ROUND=ROUND_CODES[h.dtype],
        NORM_ROUND=ROUND_CODES[norm_dtype], WEIGHT_ROUND=ROUND_CODES[weight_dtype],
        MUL_ROUND=ROUND_CODES[mul_dtype], OUT_ROUND=ROUND_CODES[y.dtype],
        BLOCK_M=block_m, BLOCK_H=block_h, num_warps=num_warps,
    )


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, dx: Tensor, eps: float,
                      offset: float, norm_dtype: torch.dtype, weight_dtype: torch.dtype,
                      compute_dw: bool, block_m: int | None = None, num_warps: int | None = None,
                      programs_per_sm: int | None = None, dh: Tensor | None = None,
                      dw_dtype: torch.dtype = torch.float32,
                      dy_terms: tuple[Tensor, ...] = (), prefetch: bool | None = None
                      ) -> Tensor | None:
    """Launch the backward; returns dw in ``dw_dtype``, summed in fp32 and rounded once (or None
    when not asked for).

    With ``dh`` (a gradient of x from its other uses), dx receives dx(dy) + dh. With
    ``dy_terms`` (up to 3 more [M, H] tensors), the gradient of y is dy + Σ dy_terms, summed in
    fp32 as the rows are read (:class:`SumGradientsIntoBackward` hands them over in Inductor's
    graphs, so the sum is not a kernel of its own). ``prefetch`` and the tile
    arguments override :func:`_backward_tiles`' choice (benchmarks/sweep_rmsnorm.py).
    """
    if len(dy_terms) > MAX_DY_TERMS - 1:
        raise ValueError(f"at most {MAX_DY_TERMS} terms of dy, got {1 + len(dy_terms)}")
    M, H = x.shape
    tile_m, tile_warps, tile_per_sm, tile_prefetch = _backward_tiles(H)
    block_m, num_warps = block_m or tile_m, num_warps or tile_warps
    programs_per_sm = programs_per_sm or tile_per_sm
    prefetch = tile_prefetch if prefetch is None else prefetch
    block_h = triton.next_power_of_2(H)
    programs = program_count(x.device, triton.cdiv(M, block_m), programs_per_sm)
    rows_per_program = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    programs = triton.cdiv(M, rows_per_program)
    dw_partial = torch.empty((programs, H) if compute_dw else (1,), dtype=torch.float32,
                             device=x.device)
    terms = (*dy_terms, *(dy,) * (MAX_DY_TERMS - 1 - len(dy_terms)))  # unused slots: any tensor
    launchable(rms_norm_bwd_kernel, x)[(programs,)](
        dy, x, x if weight is None else weight, dx, dw_partial, dx if dh is None else dh,
        *terms, dy.stride(0), x.stride(0), dx.stride(0), dx.stride(0) if dh is None else dh.stride(0),
        *(t.stride(0) for t in terms), M, H, eps, offset, rows_per_program,
        HAS_WEIGHT=weight is not None, COMPUTE_DW=compute_dw, HAS_DH=dh is not None,
        N_DY=1 + len(dy_terms),
        NORM_ROUND=ROUND_CODES[norm_dtype], WEIGHT_ROUND=ROUND_CODES[weight_dtype],
        DX_ROUND=ROUND_CODES[dx.dtype], BLOCK_M=block_m, BLOCK_H=block_h, PREFETCH=prefetch,
        num_warps=num_warps,
    )
    if not compute_dw:
        return None
    dw = torch.empty(H, dtype=dw_dtype, device=x.device)
    block_p, block_h = _dw_tiles(H)
    launchable(rms_norm_dw_kernel, x)[(triton.cdiv(H, block_h),)](
        dw_partial, dw, programs, H, DW_ROUND=ROUND_CODES[dw_dtype], BLOCK_P=block_p,
        BLOCK_H=block_h, num_warps=4)
    return dw


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the test oracle (in float64) and the op's implementation off CUDA.
# ---------------------------------------------------------------------------------------------
def _round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).to(t.dtype) if dtype != t.dtype and t.dtype.itemsize > dtype.itemsize else t


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float, offset: float = 0.0,
                       norm_dtype: torch.dtype = torch.float32,
                       weight_dtype: torch.dtype = torch.float32,
                       mul_dtype: torch.dtype = torch.float32,
                       out_dtype: torch.dtype | None = None) -> Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    y = _round_to(xf * r, norm_dtype)
    if weight is not None:
        w = _round_to(weight.to(acc) + offset, weight_dtype)
        y = _round_to(y * w, mul_dtype)
    return y.to(out_dtype or x.dtype)


def rms_norm_backward_reference(dy: Tensor, x: Tensor, weight: Tensor | None, eps: float,
                                offset: float = 0.0, norm_dtype: torch.dtype = torch.float32,
                                weight_dtype: torch.dtype = torch.float32,
                                compute_dw: bool = True, dh: Tensor | None = None
                                ) -> tuple[Tensor, Tensor | None]:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, dyf = x.to(acc), dy.to(acc)
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    x_hat = xf * r
    dn = dyf
    if weight is not None:
        dn = dyf * _round_to(weight.to(acc) + offset, weight_dtype)
    dx = (dn - x_hat * (dn * x_hat).mean(-1, keepdim=True)) * r
    if dh is not None:
        dx = dx + dh.to(acc)
    dw = None
    if weight is not None and compute_dw:
        dw = (dyf * _round_to(x_hat, norm_dtype)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw


def _launches_kernels(t: Tensor) -> bool:
    """CUDA tensors go to the Triton kernels, others to the plain-torch reference (a function,
    so that a CPU test can trace the CUDA path's graph without launching anything)."""
    return t.device.type == "cuda"


# ---------------------------------------------------------------------------------------------
# The registered ops. triton_op (not custom_op): Inductor traces into the body and emits the
# kernel launch in its own generated code, with no dispatcher call per use.
# ---------------------------------------------------------------------------------------------
@triton_op("chronicals::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor | None, eps: float, offset: float,
             norm_dtype: torch.dtype, weight_dtype: torch.dtype, mul_dtype: torch.dtype,
             out_dtype: torch.dtype) -> Tensor:
    """y = RMSNorm(x), with the roundings of the module docstring."""
    if not _launches_kernels(x):
        return rms_norm_reference(x, weight, eps, offset, norm_dtype, weight_dtype, mul_dtype,
                                  out_dtype)
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    rms_norm_forward(rows, weight, y, eps, offset, norm_dtype, weight_dtype, mul_dtype)
    return y.view(x.shape)


@triton_op("chronicals::rms_norm_backward", mutates_args=())
def rms_norm_bwd(dy: Tensor, x: Tensor, weight: Tensor | None, eps: float, offset: float,
                 norm_dtype: torch.dtype, weight_dtype: torch.dtype, compute_dw: bool,
                 dh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dx [+ dh], dw); dw is an empty tensor when ``compute_dw`` is False."""
    if not _launches_kernels(x):
        dx, dw = rms_norm_backward_reference(dy, x, weight, eps, offset, norm_dtype,
                                             weight_dtype, compute_dw, dh)
    else:
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden).contiguous()
        dy_rows = dy.reshape(-1, hidden).contiguous()
        dh_rows = None if dh is None else dh.reshape(-1, hidden).contiguous()
        dx = torch.empty_like(rows)
        dw = rms_norm_backward(dy_rows, rows, weight, dx, eps, offset, norm_dtype, weight_dtype,
                               compute_dw, dh=dh_rows,
                               dw_dtype=weight.dtype if weight is not None else torch.float32)
        dx = dx.view(x.shape)
    if dw is None:
        return dx, x.new_empty(0)
    return dx, dw.to(weight.dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, eps, offset, norm_dtype, weight_dtype, _mul_dtype, _out_dtype = inputs
    ctx.save_for_backward(x, weight)
    ctx.params = (eps, offset, norm_dtype, weight_dtype)


def _backward(ctx, dy: Tensor):
    x, weight = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[1]
    dx, dw = torch.ops.chronicals.rms_norm_backward(dy, x, weight, *ctx.params, compute_dw)
    return dx, (dw if compute_dw else None), None, None, None, None, None, None


rms_norm.register_autograd(_backward, setup_context=_setup_context)


@triton_op("chronicals::add_rms_norm", mutates_args=())
def add_rms_norm(a: Tensor, b: Tensor, weight: Tensor | None, eps: float, offset: float,
                 norm_dtype: torch.dtype, weight_dtype: torch.dtype, mul_dtype: torch.dtype,
                 out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(h, y) with h = a + b (same shape and dtype) and y = RMSNorm(h) as in ``rms_norm``."""
    if not _launches_kernels(a):
        h = a + b
        return h, rms_norm_reference(h, weight, eps, offset, norm_dtype, weight_dtype,
                                     mul_dtype, out_dtype)
    hidden = a.shape[-1]
    a_rows = a.reshape(-1, hidden).contiguous()
    b_rows = b.reshape(-1, hidden).contiguous()
    h = torch.empty_like(a_rows)
    y = torch.empty(a_rows.shape, dtype=out_dtype, device=a.device)
    rms_norm_forward(a_rows, weight, y, eps, offset, norm_dtype, weight_dtype, mul_dtype,
                     residual=b_rows, h_out=h)
    return h.view(a.shape), y.view(a.shape)


def _add_setup_context(ctx, inputs, output) -> None:
    _a, _b, weight, eps, offset, norm_dtype, weight_dtype, _mul, _out = inputs
    ctx.save_for_backward(output[0], weight)
    ctx.params = (eps, offset, norm_dtype, weight_dtype)


def _add_backward(ctx, dh: Tensor | None, dy: Tensor):
    h, weight = ctx.saved_tensors
    compute_dw = weight is not None and ctx.needs_input_grad[2]
    dx, dw = torch.ops.chronicals.rms_norm_backward(dy, h, weight, *ctx.params, compute_dw, dh)
    return dx, dx, (dw if compute_dw else None), None, None, None, None, None, None


add_rms_norm.register_autograd(_add_backward, setup_context=_add_setup_context)


# ---------------------------------------------------------------------------------------------
# Inductor post-grad pass: the gradient of y arrives as a sum of its consumers' gradients.
#
# A decoder's norm feeds the q, k, v projections (or gate and up): autograd sums their three
# (two) input gradients, dy = dy_q + dy_k + dy_v, before the norm's backward reads dy. Inductor
# fuses that sum into a norm backward it generates; our backward kernel is opaque to it, so the
# sum stays a kernel of its own — a launch, a write and a read of [N, H] more per norm (H200,
# Qwen2.5-0.5B B=8 T=1024: 48 launches and 0.58 ms a step, RESULTS.md session 11 call 8). This
# pass hands the terms to the kernel instead (N_DY), which adds them in fp32 as it reads rows
# (as Inductor's fused kernel does: no bf16 rounding between the adds).
# ---------------------------------------------------------------------------------------------
def _is_view(node: torch.fx.Node) -> bool:
    aten = torch.ops.aten
    return node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _val(node) -> Tensor | None:
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, Tensor) else None


def _split_add(node: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """The operands of ``node`` if it is a plain ``a + b`` of two tensors of its own shape and
    dtype read by nothing else (no alpha, no broadcast, no promotion), else None."""
    if node.target is not torch.ops.aten.add.Tensor or node.kwargs or len(node.users) != 1:
        return None
    out = _val(node)
    operands = node.args
    if out is None or len(operands) != 2:
        return None
    for t in operands:
        v = _val(t)
        if v is None or v.shape != out.shape or v.dtype != out.dtype:
            return None
    return operands[0], operands[1]


def _gradient_terms(dy: torch.fx.Node) -> tuple[list[torch.fx.Node], list[torch.fx.Node]]:
    """(terms, consumed): dy's sum split into at most MAX_DY_TERMS terms, breadth first (so
    with more consumers than that, the outer adds are taken in and the inner ones stay), and
    the view and add nodes that then have no reader left."""
    consumed = []
    while _is_view(dy) and len(dy.users) == 1:
        consumed.append(dy)
        dy = dy.args[0]
    terms = [dy]
    progress = True
    while progress and len(terms) < MAX_DY_TERMS:
        progress = False
        for i, t in enumerate(terms):
            split = _split_add(t)
            if split is not None:
                terms[i:i + 1] = split
                consumed.append(t)
                progress = True
                break
    return terms, consumed


def _as_rows(graph: torch.fx.Graph, term: torch.fx.Node, rows: int, hidden: int
             ) -> tuple[torch.fx.Node, int] | None:
    """``term`` as [rows, hidden] with unit column stride, and its row stride (a view node
    inserted where it has another shape); None where no view gives that."""
    v = _val(term)
    if v is None or v.numel() != rows * hidden or v.shape[-1] != hidden:
        return None
    # Only packed rows: Inductor constrains a user kernel's inputs to the strides traced with
    # the launch (the summed dy's, [M, H] packed), so another row stride would be copied
    # packed yet read with its own stride.
    if not v.is_contiguous():
        return None
    view = graph.call_function(torch.ops.aten.view.default, (term, [rows, hidden]))
    view.meta["val"] = v.view(rows, hidden)
    return view, hidden


def _take_in_gradient_terms(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    args = dict(node.kwargs["kwargs"])
    rows, hidden = args.get("M"), args.get("H")
    if args.get("N_DY") != 1 or not isinstance(rows, int) or not isinstance(hidden, int):
        return False
    terms, consumed = _gradient_terms(args["DY"])
    if len(terms) < 2:
        return False
    with graph.inserting_before(node):
        as_rows = [_as_rows(graph, t, rows, hidden) for t in terms]
    if any(r is None for r in as_rows):
        for r in as_rows:           # views inserted for terms before the one that failed
            if r is not None and r[0] not in terms:
                graph.erase_node(r[0])
        return False
    for i in range(MAX_DY_TERMS):    # the kernel reads slots past N_DY never: any tensor
        slot = f"DY{i}" if i else "DY"
        args[slot], args[f"stride_{slot.lower()}"] = as_rows[i] if i < len(as_rows) else as_rows[0]
    args["N_DY"] = len(terms)
    node.kwargs = {**node.kwargs, "kwargs": args}
    for dead in consumed:           # from the kernel's side: each was read by the one before
        if not dead.users:
            graph.erase_node(dead)
    return True


class SumGradientsIntoBackward(ChainedPostGradPass):
    """Inductor post-grad pass (``post_grad_custom_post_pass``): a launch of our RMSNorm
    backward whose dy is a sum ``a + b (+ c …)`` of same-shaped gradients read by nothing else
    gets the terms themselves (at most MAX_DY_TERMS), and the adds go. Other graphs and launches
    are left alone."""

    def run(self, graph: torch.fx.Graph) -> None:
        launches = [n for n in graph.nodes if launch_of(n, rms_norm_bwd_kernel)]
        if any([_take_in_gradient_terms(graph, n) for n in launches]):
            graph.lint()
