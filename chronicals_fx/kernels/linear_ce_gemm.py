"""The fused loss's logits GEMM with the rows' softmax statistics in its epilogue: a
warp-specialized Hopper kernel in Gluon. Where it can't run, cuBLAS writes the logits and the
first row pass (kernels/linear_ce.py) reads them back for the statistics.

    x = H_c @ Wᵀ                  H_c [C, H] (a token chunk), W [V, H] as nn.Linear stores it;
                                  x [C, V] stored in the dtype, as cuBLAS would store it
    per row i and column tile t of BN columns, from the stored (rounded) x:
        m_it = max_j z_ij,   s_it = Σ_j exp(z_ij − m_it),   Σ_j z_ij (label smoothing only)
    with z = softcap·tanh(scale·x / softcap) or scale·x (the loss's logit transform)

:func:`combine_tile_stats_kernel` folds a row's tiles into its (max, Σ exp) and target logit;
the second row pass then turns x into d in place as before. Unfused, the statistics pass reads
the whole [C, V] chunk once more: here that read is gone (a third of the row passes' traffic),
and the statistics cost epilogue warps that run while the next tile's wgmma does. Measured
(H200, benchmarks/RESULTS.md, session 11): the op at N=8192 12.88 ms against 13.17 with cuBLAS
logits at H=896, 39.45 against 40.46 at H=4096.

The same main loop with a plain store epilogue (:func:`gemm_kernel`) can take the chunk's
dH_c = d_c @ W off cuBLAS: opt-in (``CHRONICALS_LCE_DH_GEMM=1``). Measured (session 12): a
C=1024 H=4096 chunk 1540.5 µs against cuBLAS's 1537.1, the op at N=8192 H=4096 40.56 ms against
40.84; at H=896 the grid is too small for it (the op keeps cuBLAS there).

Partitions (``gl.warp_specialize``): the loader and mma partitions of kernels/_gluon.py (A = H_c,
B = W read K-major), and

    epilogue  EPI_WARPS      per tile, in SPLIT column pieces: the rounded x read from shared
                             memory, stored to the chunk (16-byte stores), folded into each
                             row's online (max, Σ exp); the tile's statistics stored per row
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier

from ._gluon import (GemmTile, hopper_unusable, launch_or_disable, launcher,
                     load_partition, mma_partition, num_sms, piece_layout, tile_walk,
                     tma_descriptor, ws_gemm_buffers, ws_launch_kwargs)
from ._triton import tile_coords
from .linear_ce import _M_FLOOR, _transform

# The fastest of benchmarks/linear_ce_gemm.py's sweep (H200, session 11 calls 2 and 4), per
# hidden size, logits + both row passes of one chunk against cuBLAS + the unfused passes:
#   H=896  (C=768,  V=151936): 128x128, 4 epilogue warps of 192 registers   534.6 vs 552.9 µs
#   H=4096 (C=1024, V=128256): 128x256, 2 epilogue warps of 160 registers  1778.7 vs 1900.7 µs
# With few K blocks a tile (small H) the epilogue must keep pace with a short main loop: more
# epilogue warps, narrower tiles. 128x256's accumulator needs ≥ 154 registers in the wgmma
# partition, and Gluon pads the warps to a multiple of 4: 12 warps (8 wgmma, 2 epilogue, the
# loader, one idle) at 168 registers is the most that fits 64K.
NARROW_TILE = GemmTile(epi_warps=4, epi_regs=192)
WIDE_TILE = GemmTile(bn=256, split=8, dh_bufs=1, stages=3, epi_warps=2, epi_regs=160,
                     maxnreg=168)
WIDE_FROM_HIDDEN = 2048


def tile_for(hidden: int) -> GemmTile:
    return WIDE_TILE if hidden >= WIDE_FROM_HIDDEN else NARROW_TILE


@gluon.jit
def _epilogue(dh_bufs, dh_ready, dh_empty, C, stride_c, PM, PS, PZSUM, M, N, T, scale, softcap,
              STATS: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_SMOOTHING: gl.constexpr,
              SPLIT: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr):
    """Each result tile from shared memory to C [M, N] (row stride ``stride_c``) in SPLIT column
    pieces; with STATS, each piece also folded into its rows' online (max, Σ exp) (and Σ z),
    stored per (row, column tile) into PM, PS (PZSUM) [M, T]."""
    DH_BUFS: gl.constexpr = dh_bufs.shape[0]
    BLOCK_M: gl.constexpr = dh_bufs.shape[1]
    BLOCK_N: gl.constexpr = dh_bufs.shape[2]
    WIDTH: gl.constexpr = BLOCK_N // SPLIT
    layout: gl.constexpr = piece_layout(WIDTH, gl.num_warps())
    row_layout: gl.constexpr = gl.SliceLayout(1, layout)
    rows = gl.arange(0, BLOCK_M, layout=row_layout)
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows * stride_c, 1) + gl.expand_dims(cols, 0)
    num_tiles, num_pid_in_group, num_pid_m = tile_walk(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tiles = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        base = off_m.to(gl.int64) * stride_c + off_n
        row_ok = gl.expand_dims(off_m + rows < M, 1)
        if STATS:
            m = gl.full([BLOCK_M], _M_FLOOR, gl.float32, row_layout)
            s = gl.zeros([BLOCK_M], gl.float32, row_layout)
            zsum = gl.zeros([BLOCK_M], gl.float32, row_layout)
        d = tiles % DH_BUFS
        mbarrier.wait(dh_ready.index(d), (tiles // DH_BUFS) & 1)
        for j in gl.static_range(SPLIT):
            x = dh_bufs.index(d).slice(j * WIDTH, WIDTH, dim=1).load(layout)
            if j + 1 == SPLIT:
                # every warp has read the tile: the buffer may take the next one
                gl.thread_barrier()
                mbarrier.arrive(dh_empty.index(d), count=1)
            col_ok = gl.expand_dims(off_n + j * WIDTH + cols < N, 0)
            gl.store(C + base + j * WIDTH + offs, x, mask=row_ok & col_ok)
            if STATS:
                z, _ = _transform(x.to(gl.float32), scale, softcap, HAS_SOFTCAP)
                z = gl.where(col_ok, z, float("-inf"))
                # the piece's (max, Σ exp) per row, folded into the tile's: one exponential
                # of the piece's values, one rescale per row
                m_piece = gl.max(z, axis=1)
                m_new = gl.maximum(m, m_piece)
                s = s * gl.exp(m - m_new) + gl.sum(gl.exp(z - gl.expand_dims(m_new, 1)), axis=1)
                m = m_new
                if HAS_SMOOTHING:
                    zsum += gl.sum(gl.where(col_ok, z, 0.0), axis=1)
        if STATS:
            at = (off_m + rows).to(gl.int64) * T + pid_n
            ok = off_m + rows < M
            gl.store(PM + at, m, mask=ok)
            gl.store(PS + at, s, mask=ok)
            if HAS_SMOOTHING:
                gl.store(PZSUM + at, zsum, mask=ok)
        tiles += 1


@gluon.jit
def logits_stats_kernel(
    a_desc, b_desc,               # H_c [M, K] in [BM, BK] blocks; W [N, K] in [BN, BK] blocks
    X, stride_x,                  # logits chunk [M, N] out (row stride; columns contiguous)
    PM, PS, PZSUM,                # fp32 [M, T] out: per (row, column tile) max, Σ exp, Σ z
    M, N, K, T,
    scale, softcap,
    HAS_SOFTCAP: gl.constexpr, HAS_SMOOTHING: gl.constexpr, SPLIT: gl.constexpr,
    STAGES: gl.constexpr, DH_BUFS: gl.constexpr, GROUP_M: gl.constexpr,
    NUM_PROGS: gl.constexpr, EPI_WARPS: gl.constexpr, EPI_REGS: gl.constexpr,
    LOAD_REGS: gl.constexpr,
):
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    a_bufs, b_bufs, dh_bufs, ab_ready, ab_empty, dh_ready, dh_empty = ws_gemm_buffers(
        a_desc, b_desc, STAGES, DH_BUFS, True)

    gl.warp_specialize([
        (mma_partition, (a_bufs, b_bufs, ab_ready, ab_empty, dh_bufs, dh_ready, dh_empty,
                         M, N, K, BLOCK_K, True, GROUP_M, NUM_PROGS)),
        (load_partition, (a_desc, b_desc, a_bufs, b_bufs, ab_ready, ab_empty, M, N, K,
                          True, GROUP_M, NUM_PROGS)),
        (_epilogue, (dh_bufs, dh_ready, dh_empty, X, stride_x, PM, PS, PZSUM, M, N, T, scale,
                     softcap, True, HAS_SOFTCAP, HAS_SMOOTHING, SPLIT, GROUP_M, NUM_PROGS)),
    ], [1, EPI_WARPS], [LOAD_REGS, EPI_REGS])


@gluon.jit
def gemm_kernel(
    a_desc, b_desc,               # A [M, K] in [BM, BK] blocks; B [K, N] in [BK, BN] blocks
    C, stride_c,                  # C = A @ B [M, N] out, in A's dtype
    M, N, K,
    SPLIT: gl.constexpr, STAGES: gl.constexpr, DH_BUFS: gl.constexpr, GROUP_M: gl.constexpr,
    NUM_PROGS: gl.constexpr, EPI_WARPS: gl.constexpr, EPI_REGS: gl.constexpr,
    LOAD_REGS: gl.constexpr,
):
    """The fused loss's dH_c = d_c @ W (few output tiles, a long K loop over the vocabulary):
    the same warp-specialized main loop, the epilogue storing only."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    a_bufs, b_bufs, dh_bufs, ab_ready, ab_empty, dh_ready, dh_empty = ws_gemm_buffers(
        a_desc, b_desc, STAGES, DH_BUFS, False)

    gl.warp_specialize([
        (mma_partition, (a_bufs, b_bufs, ab_ready, ab_empty, dh_bufs, dh_ready, dh_empty,
                         M, N, K, BLOCK_K, False, GROUP_M, NUM_PROGS)),
        (load_partition, (a_desc, b_desc, a_bufs, b_bufs, ab_ready, ab_empty, M, N, K,
                          False, GROUP_M, NUM_PROGS)),
        (_epilogue, (dh_bufs, dh_ready, dh_empty, C, stride_c, C, C, C, M, N, 0, 1.0, 1.0,
                     False, False, False, SPLIT, GROUP_M, NUM_PROGS)),
    ], [1, EPI_WARPS], [LOAD_REGS, EPI_REGS])


@triton.jit
def combine_tile_stats_kernel(
    X, stride_x,                # logits chunk [C, V] (for the target logit)
    LABELS, ROW_W,              # int64 [C]; fp32 [C] (0: ignored row, skipped)
    PM, PS, PZSUM, T,           # fp32 [C, T] from logits_stats_kernel
    OUT_M, OUT_S, OUT_ZT, OUT_ZSUM,   # fp32 [C]: the row's max, Σ exp(z − max), target z, Σ z
    V, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One row's column tiles combined (lane-wise, then across lanes), as pass 1 would give."""
    row = tl.program_id(0)
    if tl.load(ROW_W + row) != 0.0:
        m = tl.full([BLOCK_T], _M_FLOOR, tl.float32)
        s = tl.zeros([BLOCK_T], dtype=tl.float32)
        zsum = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = t < T
            pm = tl.load(PM + row * T + t, mask=mask, other=float("-inf"))
            ps = tl.load(PS + row * T + t, mask=mask, other=0.0)
            m_new = tl.maximum(m, pm)
            s = s * tl.exp(m - m_new) + ps * tl.exp(pm - m_new)
            m = m_new
            if HAS_SMOOTHING:
                zsum += tl.load(PZSUM + row * T + t, mask=mask, other=0.0)
        m_row = tl.max(m, axis=0)
        tl.store(OUT_M + row, m_row)
        tl.store(OUT_S + row, tl.sum(s * tl.exp(m - m_row), axis=0))
        target = tl.load(LABELS + row)
        hit = (target >= 0) & (target < V)
        xt = tl.load(X + row.to(tl.int64) * stride_x + target, mask=hit, other=0.0)
        zt, _ = _transform(xt.to(tl.float32), scale, softcap, HAS_SOFTCAP)
        tl.store(OUT_ZT + row, tl.where(hit, zt, 0.0))
        if HAS_SMOOTHING:
            tl.store(OUT_ZSUM + row, tl.sum(zsum, axis=0))


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
# The first launch error of each kernel, if any: that kernel is not tried again (the other is).
_failed: list[str] = []      # the logits + statistics kernel
_dh_failed: list[str] = []   # the opt-in dH GEMM


def _misaligned(out: Tensor, *inputs: Tensor) -> bool:
    """True where a pointer is not 16-byte aligned (TMA, 16-byte stores) or ``out``'s rows are
    not unit-column with a 16-byte multiple stride — facts of these particular tensors, checked
    per call beside the kernels' static ``*unusable`` reasons."""
    return (any(t.data_ptr() % 16 for t in (out, *inputs)) or out.stride(1) != 1
            or out.stride(0) % 8 != 0)


def unusable(h: Tensor, weight: Tensor, bias: Tensor | None) -> str | None:
    """Why the kernel can't compute this chunk's logits (None: it can)."""
    if os.environ.get("CHRONICALS_LCE_GEMM", "1") == "0":
        return "turned off by CHRONICALS_LCE_GEMM=0"
    if _failed:
        return f"the kernel failed before: {_failed[0]}"
    if bias is not None:
        return "a bias (cuBLAS's addmm takes it)"
    reason = hopper_unusable(h, weight)
    if reason:
        return reason
    if h.shape[1] % 8 or weight.shape[0] % 8:
        return "TMA needs rows of a multiple of 16 bytes: hidden and vocabulary sizes of 8k"
    if not (h.is_contiguous() and weight.is_contiguous()):
        return "TMA descriptors here need contiguous hidden states and weight"
    return None


def make_launch(h: Tensor, weight: Tensor, x: Tensor, pm: Tensor, ps: Tensor,
                pzsum: Tensor | None, scale: float, softcap: float,
                tile: GemmTile | None = None):
    """A callable computing x = h @ weightᵀ (h [M, K], weight [N, K], x [M, N] with unit column
    stride) and the per-tile statistics pm, ps (and pzsum) [M, T], T = ⌈N / tile.bn⌉."""
    m, k = h.shape
    n = weight.shape[0]
    tile = tile or tile_for(k)
    t = triton.cdiv(n, tile.bn)
    assert pm.shape == ps.shape == (m, t) and x.shape == (m, n) and x.stride(1) == 1
    assert tile.bn % tile.split == 0 and (tile.bn // tile.split) % 8 == 0
    a = tma_descriptor(h, [tile.bm, tile.bk])
    b = tma_descriptor(weight, [tile.bn, tile.bk])
    # NUM_PROGS (the tile stride, a compile-time constant) is the SM count whatever the chunk;
    # the grid stops at the tile count
    progs = num_sms(h.device)
    grid = (min(progs, triton.cdiv(m, tile.bm) * t),)
    args = (a, b, x, x.stride(0), pm, ps, pzsum if pzsum is not None else pm, m, n, k, t,
            scale, softcap if softcap > 0 else 1.0)
    kwargs = dict(HAS_SOFTCAP=softcap > 0, HAS_SMOOTHING=pzsum is not None,
                  **ws_launch_kwargs(tile, progs))
    # what the kernel specializes on, given that every pointer is 16-byte aligned (callers
    # check: _misaligned) and the descriptors' blocks come from the tile
    key = (m, n, k, t, x.stride(0), h.dtype, x.dtype, scale, softcap, pzsum is not None, tile,
           progs)
    return launcher(logits_stats_kernel, grid, args, kwargs, key=key)


def tile_stats_buffers(rows: int, hidden: int, vocab: int, smoothing: bool,
                       device: torch.device, tile: GemmTile | None = None
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """pm, ps (and pzsum, with label smoothing) [rows, ⌈V / BN⌉] fp32, for one chunk size."""
    t = triton.cdiv(vocab, (tile or tile_for(hidden)).bn)
    bufs = torch.empty((3 if smoothing else 2, rows, t), dtype=torch.float32, device=device)
    return bufs[0], bufs[1], bufs[2] if smoothing else None


def logits_with_tile_stats(h: Tensor, weight: Tensor, x: Tensor,
                           stats: tuple[Tensor, Tensor, Tensor | None], scale: float,
                           softcap: float, checked: bool = False) -> bool:
    """x = h @ weightᵀ and the per-tile statistics into ``stats`` (rows [:len(h)]) by the fused
    kernel; False where it did not run (the caller takes cuBLAS and both row passes). A failure
    to compile or launch is warned about once, and the kernel is not tried again. ``checked``:
    :func:`unusable` has said None for these rows' hidden states and this weight (once a call
    of the fused loss, not once a chunk); then only an earlier failure and this chunk's
    alignment are checked."""
    if (_failed if checked else unusable(h, weight, None)) or _misaligned(x, h, weight):
        return False
    pm, ps, pzsum = (t[:h.shape[0]] if t is not None else None for t in stats)
    return launch_or_disable(lambda: make_launch(h, weight, x, pm, ps, pzsum, scale, softcap)(),
                             _failed, "the fused logits GEMM",
                             "using cuBLAS and the statistics pass")


def dh_gemm_unusable(d: Tensor, weight: Tensor) -> str | None:
    """Why :func:`dh_with_gemm` won't take dH_c = d_c @ W (None: it will). Opt-in,
    ``CHRONICALS_LCE_DH_GEMM=1``: on an H200 it ties cuBLAS at H=4096 (RESULTS.md, session 12
    call 1: 1540.5 against 1537.1 µs a chunk), which is not enough to make it the default."""
    if os.environ.get("CHRONICALS_LCE_DH_GEMM", "0") != "1":
        return "opt-in (CHRONICALS_LCE_DH_GEMM=1): it ties cuBLAS at H=4096 on an H200"
    if _dh_failed:
        return f"the kernel failed before: {_dh_failed[0]}"
    reason = hopper_unusable(d, weight)
    if reason:
        return reason
    c, hidden = d.shape[0], weight.shape[1]
    tiles = triton.cdiv(c, WIDE_TILE.bm) * triton.cdiv(hidden, WIDE_TILE.bn)
    if tiles < 0.9 * num_sms(d.device):
        return f"{tiles} output tiles: too few to fill the GPU without splitting K (cuBLAS does)"
    if weight.shape[1] % 8 or d.shape[1] % 8:
        return "TMA needs rows of a multiple of 16 bytes"
    if not (d.is_contiguous() and weight.is_contiguous()):
        return "TMA descriptors here need contiguous d and weight"
    return None


def make_dh_launch(d: Tensor, weight: Tensor, out: Tensor, tile: GemmTile = WIDE_TILE):
    """A callable computing out = d @ weight (d [M, K], weight [K, N], out [M, N] with unit
    column stride, one dtype)."""
    m, k = d.shape
    n = weight.shape[1]
    assert out.shape == (m, n) and out.stride(1) == 1 and weight.shape[0] == k
    a = tma_descriptor(d, [tile.bm, tile.bk])
    b = tma_descriptor(weight, [tile.bk, tile.bn])
    progs = num_sms(d.device)               # the tile stride, as in make_launch
    grid = (min(progs, triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn)),)
    args = (a, b, out, out.stride(0), m, n, k)
    return launcher(gemm_kernel, grid, args, ws_launch_kwargs(tile, progs))


def dh_with_gemm(d: Tensor, weight: Tensor, out: Tensor) -> bool:
    """out = d @ weight by the Gluon GEMM; False where it did not run (the caller takes
    cuBLAS). A failure to compile or launch is warned about once, and not tried again."""
    if dh_gemm_unusable(d, weight) or _misaligned(out, d, weight):
        return False
    return launch_or_disable(lambda: make_dh_launch(d, weight, out)(), _dh_failed,
                             "the fused loss's Gluon dH GEMM", "using cuBLAS for dH")


def tile_stats_reference(x: Tensor, bn: int, scale: float, softcap: float, smoothing: bool
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """What the kernel's epilogue stores, in plain torch (fp32): per row and column tile of
    ``bn`` columns of the logits x [C, V], (max z, Σ exp(z − max), Σ z). Tests hold the combine
    and the second row pass to it on the CPU, and the kernel's own statistics to it on the GPU."""
    from .linear_ce import _transform_torch
    c, vocab = x.shape
    t = triton.cdiv(vocab, bn)
    z, _ = _transform_torch(x.float(), scale, softcap)
    pad = t * bn - vocab
    # as the epilogue: the max starts at −FLT_MAX (a tile of −inf logits: m = −FLT_MAX, s = 0,
    # not exp(−inf − (−inf)) = NaN), and Σ z skips the padding only (a −inf logit counts)
    zp = torch.nn.functional.pad(z, (0, pad), value=float("-inf")).view(c, t, bn)
    m = zp.amax(2).clamp(min=_M_FLOOR.value)
    s = torch.exp(zp - m[..., None]).sum(2)
    zsum = torch.nn.functional.pad(z, (0, pad)).view(c, t, bn).sum(2) if smoothing else None
    return m, s, zsum
