"""The fused SwiGLU-backward GEMM of ``benchmarks/swiglu_gemm_tma.py`` written in Gluon
(``triton.experimental.gluon``, Hopper: TMA + mbarriers + asynchronous wgmma), so that the
epilogue's loads of g and u are issued ahead instead of waited for where they are issued.

    dh = dy @ W                        (A = dy [M, K], B = W [K, N] N-contiguous, or Wᵀ [N, K])
    dg, du, y = swiglu_bwd(dh, g, u)   in the epilogue, same math and rounding points as the
                                       SwiGLU pass (kernels/swiglu.py) and the Triton kernel

Per output tile (persistent grid, one tile in flight per program, grouped tile order):

1. TMA loads of the first STAGES-1 K blocks of A and B into a STAGES-deep shared-memory ring
   (one mbarrier per stage); with ``peel`` these were already issued before the previous
   tile's epilogue, so the next tile's operands arrive while that epilogue runs;
2. TMA loads of this tile's g and u ([BM, BN] each, as SPLIT column pieces of [BM, BN/SPLIT])
   into shared memory, completing one mbarrier (``gu_bar``): they arrive while wgmma runs;
3. the K loop: wait stage, asynchronous wgmma, ``warpgroup_mma_wait(1)`` (so the previous
   block's stage is free), refill that stage with the block STAGES-1 ahead;
4. the epilogue, per column piece: wait ``gu_bar`` (once), read g, u from shared memory in the
   accumulator piece's register layout, compute dg, du, y (the Triton kernel's own
   ``_swiglu_bwd_math``: the pass's rounding points), write them into shared staging buffers and issue TMA stores.
   ``tma.store_wait`` before a staging buffer is reused lags by OUT_BUFS-1 pieces, so the
   last piece's stores drain while the next tile's K loop runs.

Shared memory (bf16): ring STAGES·(BM·BK + BK·BN)·2 + g, u 2·BM·BN·2 + staging
OUT_BUFS·3·BM·(BN/SPLIT)·2 (``GluonTile.smem_bytes``); 227 KiB per SM at most.

No warp specialization: one instruction stream per program; the wgmma of a tile does not run
during its own epilogue (two programs an SM, ``ctas=2`` with small tiles, are the option for
that). The Gluon kernel needs a CUDA device with compute capability 9.x (no interpreter).

``compile_offline`` compiles a configuration for sm_90a without a GPU (register, spill and
shared-memory figures: ``python -m benchmarks.swiglu_gemm_gluon --offline``).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from benchmarks import offline_compile
from benchmarks.swiglu_gemm_tma import (GROUP_M, _check, _column_piece, _launcher,
                                        _swiglu_bwd_math)
from chronicals_fx.kernels import swiglu_gemm
from chronicals_fx.kernels._triton import tile_coords
from chronicals_fx.kernels._gluon import GL_DTYPES, GemmTile, num_sms, tma_descriptor, wgmma_layout

SMEM_LIMIT = 232448          # bytes of shared memory one program may use on sm_90 (227 KiB)


@dataclass(frozen=True)
class GluonTile:
    """One launch configuration of the Gluon kernels (every field a compile-time constant)."""
    gluon: ClassVar[bool] = True  # how the sweep tells these from swiglu_gemm_tma.Tile
    bm: int = 128
    bn: int = 128
    bk: int = 64
    warps: int = 8            # 4 per warpgroup; 8: two warpgroups split BM (64 rows each)
    stages: int = 3           # depth of the A/B ring
    split: int = 2            # epilogue column pieces (g, u loaded and dg, du, y stored per piece)
    out_bufs: int = 1         # sets of staging buffers for the stores (store_wait lags by
                              # out_bufs - 1 pieces inside a tile; the last piece's stores
                              # always overlap the next tile's K loop)
    peel: bool = True         # issue the next tile's first A/B loads before this epilogue
    ctas: int = 1             # programs per SM (2: one's epilogue overlaps the other's wgmma)
    maxnreg: int | None = None
    hw_round: bool = False    # bf16 rounding by cvt (round_to CODE 3) instead of on the bits

    def tag(self) -> str:
        extra = ("" if self.peel else " nopeel") + (
            f" {self.ctas}cta/SM" if self.ctas != 1 else "") + (
            f" maxnreg{self.maxnreg}" if self.maxnreg else "") + (
            " hwround" if self.hw_round else "")
        return (f"gluon {self.bm}x{self.bn}x{self.bk} w{self.warps} s{self.stages} "
                f"split{self.split} ob{self.out_bufs}{extra}")

    def fused_tag(self) -> str:
        return self.tag()

    def smem_bytes(self, fused: bool = True, outs: int = 3) -> int:
        ring = self.stages * (self.bm * self.bk + self.bk * self.bn) * 2
        width = self.bn // self.split
        if not fused:
            return ring + self.out_bufs * self.bm * width * 2 + 8 * (self.stages + 1)
        return (ring + 2 * self.bm * self.bn * 2 + self.out_bufs * outs * self.bm * width * 2
                + 8 * (self.stages + 1))


# Configurations run by benchmarks/sweep_swiglu_tma.py (figures: Triton 3.6.0 compiled offline
# for sm_90a by ``python -m benchmarks.swiglu_gemm_gluon``: ptxas registers, no spills anywhere).
# Shared memory: 227 KiB a program at one per SM, 113 KiB at two.
PLAIN_CONFIGS = [
    GluonTile(128, 128, 64, 8, 4, split=1),                 # 90 regs, 160 KiB
    GluonTile(128, 256, 64, 8, 3, split=2),                 # 154 regs, 176 KiB
    GluonTile(128, 256, 64, 8, 4, split=2),                 # 154 regs, 224 KiB
]
FUSED_CONFIGS = [
    GluonTile(128, 128, 64, 8, 3, split=2),                 # 204 regs, 208 KiB (the brief's)
    GluonTile(128, 128, 64, 8, 3, split=2, peel=False),     # 202 regs, 208 KiB
    GluonTile(128, 128, 64, 8, 3, split=4, out_bufs=2),     # 145 regs, 208 KiB: stores 2-buffered
    GluonTile(128, 128, 64, 8, 4, split=4),                 # 151 regs, 216 KiB: 4 stages
    GluonTile(128, 128, 128, 8, 2, split=4),                # 142 regs, 216 KiB
    GluonTile(64, 128, 64, 4, 2, split=4, ctas=2),          # 144 regs, 92 KiB: 2 programs an SM
    GluonTile(64, 128, 64, 4, 2, split=2, ctas=2),          # 201 regs, 104 KiB
    GluonTile(64, 128, 32, 4, 4, split=4, ctas=2),          # 145 regs, 92 KiB, 4 stages of BK 32
]
QUICK_PLAIN = [PLAIN_CONFIGS[1]]
HW_ROUND_FUSED = [replace(FUSED_CONFIGS[3], hw_round=True)]
QUICK_FUSED = [FUSED_CONFIGS[0], FUSED_CONFIGS[2], FUSED_CONFIGS[3], FUSED_CONFIGS[5]]


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
@gluon.jit
def _issue_ab(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n, k,
              STAGES: gl.constexpr, W_KMAJOR: gl.constexpr):
    """TMA loads of the K block at ``k`` of A and B into ring slot ``prod % STAGES``; its
    barrier completes when both have landed. Returns prod + 1."""
    s = prod % STAGES
    bar = bars.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, k], bar, a_bufs.index(s))
    if W_KMAJOR:
        tma.async_copy_global_to_shared(b_desc, [off_n, k], bar, b_bufs.index(s))
    else:
        tma.async_copy_global_to_shared(b_desc, [k, off_n], bar, b_bufs.index(s))
    return prod + 1


@gluon.jit
def _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n, k_tiles,
              STAGES: gl.constexpr, W_KMAJOR: gl.constexpr):
    """The first STAGES-1 K blocks of a tile (fewer if K has fewer)."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    for i in gl.static_range(STAGES - 1):
        if i < k_tiles:
            prod = _issue_ab(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n,
                             i * BLOCK_K, STAGES, W_KMAJOR)
    return prod


@gluon.jit
def _k_loop(a_desc, b_desc, a_bufs, b_bufs, bars, prod, cons, off_m, off_n, k_tiles,
            acc_layout: gl.constexpr, STAGES: gl.constexpr, W_KMAJOR: gl.constexpr):
    """The fp32 [BM, BN] accumulator of dy @ W at (off_m, off_n), its first STAGES-1 blocks
    already issued. wgmma runs asynchronously: waiting until one is outstanding frees the
    slot the previous block used, which is refilled with the block STAGES-1 ahead."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    if W_KMAJOR:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    else:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    for ki in range(k_tiles):
        s = cons % STAGES
        mbarrier.wait(bars.index(s), (cons // STAGES) & 1)
        if W_KMAJOR:
            b = b_bufs.index(s).permute((1, 0))
        else:
            b = b_bufs.index(s)
        acc = warpgroup_mma(a_bufs.index(s), b, acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=(acc, ))
        cons += 1
        if ki + (STAGES - 1) < k_tiles:
            prod = _issue_ab(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n,
                             (ki + (STAGES - 1)) * BLOCK_K, STAGES, W_KMAJOR)
    acc = warpgroup_mma_wait(0, deps=(acc, ))
    return acc, prod, cons


# ---------------------------------------------------------------------------------------------
# The fused kernel
# ---------------------------------------------------------------------------------------------
@gluon.jit
def swiglu_bwd_gemm_gluon_kernel(
    a_desc,                       # dy [M, K] in [BM, BK] blocks
    b_desc,                       # W [K, N] in [BK, BN] blocks (W_KMAJOR: Wᵀ [N, K], [BN, BK])
    g_desc, u_desc,               # gate, up [M, N] in [BM, BN / SPLIT] blocks
    dg_desc, du_desc, y_desc,     # outputs [M, N] in [BM, BN / SPLIT] blocks
    M, N, K,
    ACT: gl.constexpr, ROUND: gl.constexpr, STORE_Y: gl.constexpr,
    SPLIT: gl.constexpr, STAGES: gl.constexpr, OUT_BUFS: gl.constexpr, PEEL: gl.constexpr,
    W_KMAJOR: gl.constexpr, GROUP_M: gl.constexpr,
    NUM_PROGS: gl.constexpr,      # the tile loop's stride (programs an SM x SMs)
):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    WIDTH: gl.constexpr = g_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = WIDTH * SPLIT
    NOUT: gl.constexpr = 3 if STORE_Y else 2
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = wgmma_layout(BLOCK_M, BLOCK_N, gl.num_warps())
    gl.static_assert(STAGES >= 2, "at least two stages")

    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    g_bufs = gl.allocate_shared_memory(dtype, [SPLIT] + g_desc.block_type.shape, g_desc.layout)
    u_bufs = gl.allocate_shared_memory(dtype, [SPLIT] + u_desc.block_type.shape, u_desc.layout)
    o_bufs = gl.allocate_shared_memory(dtype, [OUT_BUFS * NOUT] + dg_desc.block_type.shape,
                                       dg_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    gu_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(gu_bar, count=1)

    start_pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n

    prod = 0          # A/B blocks issued, and consumed: ring slot and barrier phase
    cons = 0
    tiles_done = 0    # gu_bar phase
    pieces = 0        # epilogue pieces stored: staging buffer set

    if PEEL:
        pid_m, pid_n = tile_coords(start_pid, num_pid_in_group, num_pid_m, GROUP_M)
        prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, pid_m * BLOCK_M,
                         pid_n * BLOCK_N, k_tiles, STAGES, W_KMAJOR)
    for tile_id in range(start_pid, num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if not PEEL:
            prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n, k_tiles,
                             STAGES, W_KMAJOR)
        # g, u of this tile, landing while the K loop runs (the previous epilogue has read
        # the buffers into registers: the compiler's barrier orders those reads first)
        fence_async_shared()
        mbarrier.expect(gu_bar, 2 * SPLIT * g_desc.block_type.nbytes)
        for j in gl.static_range(SPLIT):
            tma.async_copy_global_to_shared(g_desc, [off_m, off_n + j * WIDTH], gu_bar,
                                            g_bufs.index(j))
            tma.async_copy_global_to_shared(u_desc, [off_m, off_n + j * WIDTH], gu_bar,
                                            u_bufs.index(j))

        acc, prod, cons = _k_loop(a_desc, b_desc, a_bufs, b_bufs, bars, prod, cons, off_m,
                                  off_n, k_tiles, acc_layout, STAGES, W_KMAJOR)

        if PEEL:
            # the next tile's first blocks load while this epilogue runs (the ring is idle)
            next_id = tile_id + NUM_PROGS
            if next_id < num_tiles:
                npid_m, npid_n = tile_coords(next_id, num_pid_in_group, num_pid_m, GROUP_M)
                prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, npid_m * BLOCK_M,
                                 npid_n * BLOCK_N, k_tiles, STAGES, W_KMAJOR)

        mbarrier.wait(gu_bar, tiles_done & 1)
        tiles_done += 1  # noqa: SIM113 (a loop-carried value of the kernel)
        for j in gl.static_range(SPLIT):
            dh = _column_piece(acc, j, SPLIT, BLOCK_M, BLOCK_N)
            g = g_bufs.index(j).load(dh.type.layout)
            u = u_bufs.index(j).load(dh.type.layout)
            dg, du, y = _swiglu_bwd_math(dh, g, u, ACT, ROUND)
            base = (pieces % OUT_BUFS) * NOUT
            # the stores of this set's previous use have read their staging buffers
            tma.store_wait(NOUT * (OUT_BUFS - 1))
            o_bufs.index(base).store(dg.to(dtype))
            o_bufs.index(base + 1).store(du.to(dtype))
            if STORE_Y:
                o_bufs.index(base + 2).store(y.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(dg_desc, [off_m, off_n + j * WIDTH],
                                            o_bufs.index(base))
            tma.async_copy_shared_to_global(du_desc, [off_m, off_n + j * WIDTH],
                                            o_bufs.index(base + 1))
            if STORE_Y:
                tma.async_copy_shared_to_global(y_desc, [off_m, off_n + j * WIDTH],
                                                o_bufs.index(base + 2))
            pieces += 1
    tma.store_wait(0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    mbarrier.invalidate(gu_bar)


# ---------------------------------------------------------------------------------------------
# The plain GEMM (dh = dy @ W stored): what the main loop is worth alone
# ---------------------------------------------------------------------------------------------
@gluon.jit
def matmul_gluon_kernel(
    a_desc, b_desc,               # as above
    c_desc,                       # dh [M, N] in [BM, BN / SPLIT] blocks
    M, N, K,
    SPLIT: gl.constexpr, STAGES: gl.constexpr, OUT_BUFS: gl.constexpr, PEEL: gl.constexpr,
    W_KMAJOR: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr,
):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    WIDTH: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = WIDTH * SPLIT
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = wgmma_layout(BLOCK_M, BLOCK_N, gl.num_warps())

    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    o_bufs = gl.allocate_shared_memory(dtype, [OUT_BUFS] + c_desc.block_type.shape, c_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)

    start_pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    prod = 0
    cons = 0
    pieces = 0
    if PEEL:
        pid_m, pid_n = tile_coords(start_pid, num_pid_in_group, num_pid_m, GROUP_M)
        prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, pid_m * BLOCK_M,
                         pid_n * BLOCK_N, k_tiles, STAGES, W_KMAJOR)
    for tile_id in range(start_pid, num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if not PEEL:
            prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n, k_tiles,
                             STAGES, W_KMAJOR)
        acc, prod, cons = _k_loop(a_desc, b_desc, a_bufs, b_bufs, bars, prod, cons, off_m,
                                  off_n, k_tiles, acc_layout, STAGES, W_KMAJOR)
        if PEEL:
            next_id = tile_id + NUM_PROGS
            if next_id < num_tiles:
                npid_m, npid_n = tile_coords(next_id, num_pid_in_group, num_pid_m, GROUP_M)
                prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, npid_m * BLOCK_M,
                                 npid_n * BLOCK_N, k_tiles, STAGES, W_KMAJOR)
        for j in gl.static_range(SPLIT):
            dh = _column_piece(acc, j, SPLIT, BLOCK_M, BLOCK_N)
            buf = pieces % OUT_BUFS
            tma.store_wait(OUT_BUFS - 1)
            o_bufs.index(buf).store(dh.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m, off_n + j * WIDTH], o_bufs.index(buf))
            pieces += 1
    tma.store_wait(0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


# ---------------------------------------------------------------------------------------------
# The warp-specialized kernel (the product's: chronicals_fx/kernels/swiglu_gemm.py)
# ---------------------------------------------------------------------------------------------
# Measured (session 10): the kernel above runs at 0.80x cuBLAS + the pass because its epilogue
# is ALU-bound and one instruction stream cannot issue it while wgmma runs; the product's
# kernel gives the epilogue warps of its own. Its configurations swept here:
@dataclass(frozen=True)
class WsTile(GemmTile):
    gluon: ClassVar[bool] = True          # how the sweep tells these from Triton tiles
    ctas: ClassVar[int] = 1

    def fused_tag(self) -> str:
        return self.tag()


WS_CONFIGS = [
    WsTile(dh_bufs=1),                                          # the product's DEFAULT_TILE
    WsTile(dh_bufs=1, split=8),
    WsTile(stages=3),
    WsTile(stages=2),
    WsTile(stages=3, split=8),
    WsTile(stages=3, split=4, epi_warps=4, epi_regs=192, maxnreg=128),
    WsTile(stages=3, hw_round=False),
]


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
def _common(dy: Tensor, w: Tensor, tile: GluonTile, w_kmajor: bool, m: int, n: int):
    assert dy.dtype in GL_DTYPES, dy.dtype
    assert tile.bn % tile.split == 0 and tile.split in (1, 2, 4)
    a = tma_descriptor(dy, [tile.bm, tile.bk])
    b = tma_descriptor(w, [tile.bn, tile.bk] if w_kmajor else [tile.bk, tile.bn])
    progs = tile.ctas * num_sms(dy.device)
    programs = min(progs, triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn))
    opts = {"num_warps": tile.warps}
    if tile.maxnreg:
        opts["maxnreg"] = tile.maxnreg
    return a, b, progs, programs, opts


def make_fused_gluon_launch(dy: Tensor, w: Tensor, g: Tensor, u: Tensor, dg: Tensor, du: Tensor,
                            y: Tensor | None, tile: GluonTile, activation: int = 0,
                            w_kmajor: bool = False):
    """A callable launching the fused backward (see _launcher): dg, du (and y = act(g)·u when
    ``y`` is given) from dh = dy @ W, g, u. Same signature as
    swiglu_gemm_tma.make_fused_launch."""
    if isinstance(tile, WsTile):
        return swiglu_gemm.make_launch(dy, w, g, u, dg, du, y, activation, tile, w_kmajor)
    m, n, k = _check(dy, w, w_kmajor, g, u, dg, du, *([y] if y is not None else []))
    a, b, progs, programs, opts = _common(dy, w, tile, w_kmajor, m, n)
    piece = [tile.bm, tile.bn // tile.split]
    gd, ud, dgd, dud = (tma_descriptor(t, piece) for t in (g, u, dg, du))
    yd = tma_descriptor(y if y is not None else dg, piece)
    return _launcher(swiglu_bwd_gemm_gluon_kernel, programs,
                     (a, b, gd, ud, dgd, dud, yd, m, n, k), dict(
                         ACT=activation, ROUND=swiglu_gemm.round_code(g.dtype, tile.hw_round),
                         STORE_Y=y is not None,
                         SPLIT=tile.split, STAGES=tile.stages, OUT_BUFS=tile.out_bufs,
                         PEEL=tile.peel, W_KMAJOR=w_kmajor, GROUP_M=GROUP_M, NUM_PROGS=progs,
                         **opts))


def make_plain_gluon_launch(dy: Tensor, w: Tensor, dh: Tensor, tile: GluonTile,
                            w_kmajor: bool = False):
    """A callable launching dh = dy @ W (see _launcher)."""
    m, n, k = _check(dy, w, w_kmajor, dh)
    a, b, progs, programs, opts = _common(dy, w, tile, w_kmajor, m, n)
    c = tma_descriptor(dh, [tile.bm, tile.bn // tile.split])
    return _launcher(matmul_gluon_kernel, programs, (a, b, c, m, n, k), dict(
        SPLIT=tile.split, STAGES=tile.stages, OUT_BUFS=tile.out_bufs, PEEL=tile.peel,
        W_KMAJOR=w_kmajor, GROUP_M=GROUP_M, NUM_PROGS=progs, **opts))


# ---------------------------------------------------------------------------------------------
# Offline compilation (no GPU): the launch's specialization, compiled for a given target
# ---------------------------------------------------------------------------------------------
def compile_offline(launch, arch: int = 90):
    """Compile what ``launch`` (from make_*_gluon_launch, built on any tensors: CPU ones do)
    would run, for ``cuda:arch`` (90: sm_90a), without a driver. Returns the CompiledKernel
    (``asm["ptx"]``, ``asm["cubin"]``, ``metadata.shared``)."""
    return offline_compile.compile_offline(launch.kernel, launch.args, launch.kwargs, arch)


def ptxas_usage(compiled, arch: str = "sm_90a") -> dict:
    """Registers, spill bytes and shared memory from ``ptxas -v`` on the kernel's PTX (the
    ptxas Triton ships), plus Triton's own shared-memory figure."""
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([ptxas, "-v", f"-arch={arch}", path, "-o", os.path.join(d, "k.o")],
                             check=False, capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill_st.group(1)) if spill_st else None,
            "spill_loads": int(spill_ld.group(1)) if spill_ld else None,
            "stack": int(stack.group(1)) if stack else None,
            "smem_triton": compiled.metadata.shared, "ptxas": text.strip()}


def _gpu_check_main() -> int:
    """Every fused configuration on small shapes, ragged ones included, against cuBLAS + the
    SwiGLU pass (dg, du within bf16 tolerance, y bit for bit), on a CUDA device of compute
    capability 9.x: ``python -m benchmarks.swiglu_gemm_gluon --gpu-check``."""
    from chronicals_fx.kernels import swiglu as S
    silu = S.ACTIVATIONS["silu"]
    failures = 0
    for m, k, n in ((256, 128, 256), (200, 136, 256), (1000, 520, 768)):
        for w_kmajor in (False, True):
            gen = torch.Generator(device="cuda").manual_seed(m + n)
            def rnd(*shape, scale=1.0):
                return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(
                    torch.bfloat16)
            dy, g, u = rnd(m, k), rnd(m, n, scale=2.0), rnd(m, n)
            w = rnd(n, k, scale=k ** -0.5) if w_kmajor else rnd(k, n, scale=k ** -0.5)
            dh = dy @ (w.t() if w_kmajor else w)
            want = [torch.empty_like(g) for _ in range(3)]
            S.swiglu_backward(dh, g, u, want[0], want[1], silu, want[2])
            for tile in WS_CONFIGS + FUSED_CONFIGS[3:4] + HW_ROUND_FUSED:
                got = [torch.full_like(g, float("nan")) for _ in range(3)]
                make_fused_gluon_launch(dy, w, g, u, *got, tile, silu, w_kmajor)()
                torch.cuda.synchronize()
                err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                          for a, b in zip(got[:2], want[:2]))
                ok = err <= 2e-2 and torch.equal(got[2], want[2])
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} M={m} K={k} N={n}"
                      f"{' W[N,K]' if w_kmajor else ''} {tile.tag()}: dg/du err {err:.1e}, "
                      f"y == pass {torch.equal(got[2], want[2])}", flush=True)
    return 1 if failures else 0


def _offline_main() -> int:
    """Compile every configuration the sweep runs (both W layouts for the fused kernel) for
    sm_90a and print ptxas's figures."""
    bf = {"dtype": torch.bfloat16}
    m = k = n = 256
    failures = 0
    for kind, tiles in (("plain", PLAIN_CONFIGS), ("fused", FUSED_CONFIGS + WS_CONFIGS)):
        for tile in tiles:
            for w_kmajor in (False, True):
                dy = torch.empty(m, k, **bf)
                w = torch.empty((n, k) if w_kmajor else (k, n), **bf)
                outs = [torch.empty(m, n, **bf) for _ in range(5)]
                name = f"{kind} {tile.tag()}{' W[N,K]' if w_kmajor else ''}"
                try:
                    if kind == "plain":
                        launch = make_plain_gluon_launch(dy, w, outs[0], tile, w_kmajor)
                    else:
                        launch = make_fused_gluon_launch(dy, w, *outs, tile, 0, w_kmajor)
                    ck = compile_offline(launch)
                    r = ptxas_usage(ck)
                    # (the warp-specialized tiles have no estimate of their own)
                    est = (tile.smem_bytes(kind == "fused") if isinstance(tile, GluonTile)
                           else "none")
                    print(f"ok   {name:<62} regs {r['regs']} spill st/ld {r['spill_stores']}/"
                          f"{r['spill_loads']} B, smem {r['smem_triton']} B "
                          f"({r['smem_triton'] / 1024:.1f} KiB; estimate {est}), "
                          f"{'fits' if r['smem_triton'] <= SMEM_LIMIT // tile.ctas else 'TOO MUCH'}"
                          f" for {tile.ctas}/SM", flush=True)
                except Exception as e:  # noqa: BLE001
                    failures += 1
                    print(f"FAIL {name}: {type(e).__name__}: {' '.join(str(e).split())[:400]}",
                          flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    import sys
    sys.exit(_gpu_check_main() if "--gpu-check" in sys.argv else _offline_main())
