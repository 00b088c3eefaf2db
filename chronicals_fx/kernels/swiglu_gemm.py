"""The backward of ``swiglu_linear`` (``linear(act(g)·u, W_down)``) as one GEMM with the SwiGLU
backward in its epilogue: a warp-specialized Hopper kernel in Gluon (sm_90: TMA, mbarriers,
asynchronous wgmma). Where it can't run, the op takes cuBLAS and the SwiGLU pass instead.

    dh = dy @ W_down                      (dy [M, K] with K = O; W_down [O, I] = [K, N], as
                                           nn.Linear stores it, N contiguous)
    (dg, du, y) = swiglu_bwd_math(dh, g, u)   per tile of dh, with dh rounded to the dtype as
                                           cuBLAS's output is; y = act(g)·u again, bit for bit
                                           the forward's, for dW_down = dyᵀ y

Unfused, cuBLAS writes dh and the pass reads it back: [M, N] streams 1 + 6 (dh, g, u in; dg, du,
y out). Here dh stays on chip: 5 streams, and no [M, N] buffer for dh.

Three partitions share each SM (``gl.warp_specialize``): the loader and mma partitions of
kernels/_gluon.py (A = dy, B = W_down; dh tiles into shared memory), and

    epilogue  EPI_WARPS      per tile: g, u fetched by TMA into shared memory (issued before
                             the tile's dh is ready, so they land while its wgmma runs); then
                             in SPLIT column pieces dh, g, u read from shared memory, the math,
                             dg, du, y stored

The epilogue is ALU-heavy (two sigmoids, seven roundings a value: bf16 rounding uses the cvt
instruction, round_to CODE 3), which is why one instruction stream (benchmarks/swiglu_gemm_gluon.py's
first kernel) ran at 0.80x of cuBLAS + the pass: its epilogue could not issue while wgmma ran.
Registers are reallocated per partition (setmaxnreg): 24 for the loader, EPI_REGS for the
epilogue, the rest (of 64K) for the wgmma partition.

Measured (H200, bf16, CUDA-graph replays; benchmarks/RESULTS.md, session 15 call 1): M=8192
K=896 N=4864 203.6 µs against 234.3 for cuBLAS + the pass (1.15x; 205.3 where the pass writes
no y, as Inductor's backward, which saved y in the forward instead); M=16384 K=4096 N=14336
3323 against 3387 (1.02x; 3257 without y). A fourth partition fetching g, u a tile ahead was
1.6% faster at the first shape and 1.5% slower at the second: removed. dg, du, y are bit for bit
the unfused path's on every shape checked (``--gpu-check``); only dh's fp32 accumulation order
may differ from cuBLAS's.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from ._gluon import (GemmTile, hopper_unusable, launch_or_disable, launcher,
                     load_partition, mma_partition, num_sms, piece_layout, tile_walk,
                     tma_descriptor, ws_gemm_buffers, ws_launch_kwargs)
from ._triton import ROUND_CODES, tile_coords
from .swiglu import swiglu_bwd_math

# Session 10's sweep (benchmarks/sweep_swiglu_tma.py --gluon-set ws): 8 epilogue warps of 128
# registers, 16 values a thread a piece, no spills. The tile's g, u (64 KB) sit in shared memory
# beside a 4-deep ring (128 KB) and one dh tile (32 KB): 224 KB of 227. Session 14 call 5 (H200,
# M=8192 K=896 N=4864): 201.5 µs against 225.5 with a 3-deep ring and two dh tiles, 313.4 with 2
# and two; cuBLAS + the pass 234.4 (207.3 without writing y). Session 15 call 1: 203.6 here,
# 3323 at M=16384 K=4096 N=14336 (the 3-deep ring 4103).
DEFAULT_TILE = GemmTile(dh_bufs=1)


@gluon.jit
def _store_piece(X, x, base, offs, rows_left, EVEN_M: gl.constexpr, layout: gl.constexpr):
    if EVEN_M:
        gl.store(X + base + offs, x.to(X.dtype.element_ty))
    else:
        gl.store(X + base + offs, x.to(X.dtype.element_ty),
                 mask=_row_mask(rows_left, offs, layout))


@gluon.jit
def _row_mask(rows_left, offs, layout: gl.constexpr):
    """[BLOCK_M, 1] row predicate, broadcast along the piece's columns by the load/store."""
    rows = gl.arange(0, offs.shape[0], layout=gl.SliceLayout(1, layout))
    return gl.expand_dims(rows < rows_left, 1)


@gluon.jit
def _fetch_gu_piece(g_desc, u_desc, gu_bufs, bars, j: gl.constexpr, off_m, off_n):
    """g's and u's piece at (off_m, off_n) into slots 2j and 2j + 1 by TMA (rows past M
    zero-filled), landing on barrier j."""
    bar = bars.index(j)
    mbarrier.expect(bar, 2 * g_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(g_desc, [off_m, off_n], bar, gu_bufs.index(2 * j))
    tma.async_copy_global_to_shared(u_desc, [off_m, off_n], bar, gu_bufs.index(2 * j + 1))


@gluon.jit
def _epilogue_partition(dh_bufs, dh_ready, dh_empty, g_desc, u_desc, gu_bufs, gu_ready,
                        DG, DU, Y, M, N,
                        ACT: gl.constexpr, ROUND: gl.constexpr, STORE_Y: gl.constexpr,
                        EVEN_M: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr):
    """Per tile, g and u come into shared memory by TMA piece by piece as the tile starts (slot
    pair j: g's and u's piece j, landing on gu_ready j), while the tile's wgmma runs."""
    DH_BUFS: gl.constexpr = dh_bufs.shape[0]
    BLOCK_M: gl.constexpr = dh_bufs.shape[1]
    BLOCK_N: gl.constexpr = dh_bufs.shape[2]
    SPLIT: gl.constexpr = gu_ready.shape[0]
    WIDTH: gl.constexpr = BLOCK_N // SPLIT
    layout: gl.constexpr = piece_layout(WIDTH, gl.num_warps())
    # a piece's offsets from its first value, the same for every piece (int32: the base,
    # int64, carries the tile's position)
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows * N, 1) + gl.expand_dims(cols, 0)
    num_tiles, num_pid_in_group, num_pid_m = tile_walk(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tiles = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        base = off_m.to(gl.int64) * N + off_n
        rows_left = M - off_m
        # (every warp read the last tile's pieces before the barrier after its last piece)
        for j in gl.static_range(SPLIT):
            _fetch_gu_piece(g_desc, u_desc, gu_bufs, gu_ready, j, off_m, off_n + j * WIDTH)
        d = tiles % DH_BUFS
        mbarrier.wait(dh_ready.index(d), (tiles // DH_BUFS) & 1)
        for j in gl.static_range(SPLIT):
            mbarrier.wait(gu_ready.index(j), tiles & 1)
            dh = dh_bufs.index(d).slice(j * WIDTH, WIDTH, dim=1).load(layout)
            g = gu_bufs.index(2 * j).load(layout)
            u = gu_bufs.index(2 * j + 1).load(layout)
            if j + 1 == SPLIT:
                # every warp has read the tile's pieces and its dh tile
                gl.thread_barrier()
                mbarrier.arrive(dh_empty.index(d), count=1)
            dg, du, y = swiglu_bwd_math(dh, g, u, ACT, ROUND)
            at = base + j * WIDTH
            _store_piece(DG, dg, at, offs, rows_left, EVEN_M, layout)
            _store_piece(DU, du, at, offs, rows_left, EVEN_M, layout)
            if STORE_Y:
                _store_piece(Y, y, at, offs, rows_left, EVEN_M, layout)
        tiles += 1


@gluon.jit
def swiglu_bwd_gemm_kernel(
    a_desc, b_desc,               # dy [M, K] in [BM, BK] blocks; W [K, N] in [BK, BN] (or Wᵀ)
    g_desc, u_desc,               # gate, up [M, N] in [BM, BN / SPLIT] pieces
    DG, DU, Y,                    # [M, N] contiguous: d gate, d up, y out
    M, N, K,
    ACT: gl.constexpr, ROUND: gl.constexpr, STORE_Y: gl.constexpr, SPLIT: gl.constexpr,
    EVEN_M: gl.constexpr,         # M a multiple of BLOCK_M: no store masks (N always is one)
    STAGES: gl.constexpr, DH_BUFS: gl.constexpr, W_KMAJOR: gl.constexpr,
    GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr,
    EPI_WARPS: gl.constexpr, EPI_REGS: gl.constexpr, LOAD_REGS: gl.constexpr,
):
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    a_bufs, b_bufs, dh_bufs, ab_ready, ab_empty, dh_ready, dh_empty = ws_gemm_buffers(
        a_desc, b_desc, STAGES, DH_BUFS, W_KMAJOR)
    # the whole tile's g, u in shared memory: slot 2j g's piece j, slot 2j + 1 u's
    gu_bufs = gl.allocate_shared_memory(g_desc.dtype, [2 * SPLIT] + g_desc.block_type.shape,
                                        g_desc.layout)
    gu_ready = gl.allocate_shared_memory(gl.int64, [SPLIT, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(SPLIT):
        mbarrier.init(gu_ready.index(j), count=1)
    gl.warp_specialize([
        (mma_partition, (a_bufs, b_bufs, ab_ready, ab_empty, dh_bufs, dh_ready, dh_empty,
                         M, N, K, BLOCK_K, W_KMAJOR, GROUP_M, NUM_PROGS)),
        (load_partition, (a_desc, b_desc, a_bufs, b_bufs, ab_ready, ab_empty, M, N, K,
                          W_KMAJOR, GROUP_M, NUM_PROGS)),
        (_epilogue_partition, (dh_bufs, dh_ready, dh_empty, g_desc, u_desc, gu_bufs, gu_ready,
                               DG, DU, Y, M, N, ACT, ROUND, STORE_Y, EVEN_M, GROUP_M,
                               NUM_PROGS)),
    ], [1, EPI_WARPS], [LOAD_REGS, EPI_REGS])


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
_failed: list[str] = []      # the first launch's error, if any: the kernel is not tried again


def unusable(dy: Tensor, weight: Tensor, gate: Tensor) -> str | None:
    """Why the kernel can't take this call (None: it can). Static facts only (device, dtype,
    widths), so the answer is the same when traced on fake tensors; alignment is checked again
    at the launch."""
    if _failed:
        return f"the kernel failed before: {_failed[0]}"
    reason = hopper_unusable(gate, dy, weight)
    if reason:
        return reason
    if weight.dim() != 2 or weight.shape[0] % 8:
        return "TMA needs rows of a multiple of 16 bytes"
    if weight.shape[1] % DEFAULT_TILE.bn:
        return f"the intermediate size must be a multiple of {DEFAULT_TILE.bn}"
    return None


def round_code(dtype: torch.dtype, hw_round: bool) -> int:
    """round_to's code for ``dtype`` in this kernel (never interpreted): bf16 by the cvt
    instruction (3), or on the bits (1) where the tile asks for it (a sweep's ``hw_round``)."""
    return (3 if hw_round else 1) if dtype == torch.bfloat16 else ROUND_CODES[dtype]


def make_launch(dy: Tensor, weight: Tensor, gate: Tensor, up: Tensor, dg: Tensor, du: Tensor,
                y: Tensor | None, activation: int, tile: GemmTile = DEFAULT_TILE,
                w_kmajor: bool = False):
    """A callable running the kernel on dy [.., K] (M rows in all), W [K, N] (``w_kmajor``: Wᵀ
    [N, K]) and gate, up, dg, du (and y, when given) [.., N]; all contiguous, one dtype,
    16-byte aligned (read as the [M, K] and [M, N] matrices they hold: no views made)."""
    k = dy.shape[-1]
    m = dy.numel() // k if k else 0
    n = weight.shape[0] if w_kmajor else weight.shape[1]
    assert n % tile.bn == 0, "only the last row block may be partial"
    assert tile.bn % tile.split == 0 and (tile.bn // tile.split) % 8 == 0
    assert gate.numel() == up.numel() == dg.numel() == m * n
    a = tma_descriptor(dy, [tile.bm, tile.bk], rows=m)
    b = tma_descriptor(weight, [tile.bn, tile.bk] if w_kmajor else [tile.bk, tile.bn])
    progs = num_sms(dy.device)
    programs = min(progs, triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn))
    g = tma_descriptor(gate, [tile.bm, tile.bn // tile.split], rows=m)
    u = tma_descriptor(up, [tile.bm, tile.bn // tile.split], rows=m)
    args = (a, b, g, u, dg, du, y if y is not None else dg, m, n, k)
    # everything the kernel specializes on follows from these (each tensor is aligned and of
    # gate's dtype: checked by the callers)
    key = (m, n, k, gate.dtype, activation, y is not None, w_kmajor, tile, progs)
    kwargs = dict(ACT=activation, ROUND=round_code(gate.dtype, tile.hw_round),
                  STORE_Y=y is not None, EVEN_M=m % tile.bm == 0, W_KMAJOR=w_kmajor,
                  **ws_launch_kwargs(tile, progs))
    return launcher(swiglu_bwd_gemm_kernel, (programs,), args, kwargs, key=key)


def _launchable(*tensors: Tensor) -> bool:
    """All contiguous and 16-byte aligned: what the descriptors and the epilogue's stores need."""
    return all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in tensors)


def swiglu_linear_backward(dy: Tensor, weight: Tensor, gate: Tensor, up: Tensor,
                           activation: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """(d gate, d up, act(gate)·up), of gate's shape, from dy [.., O], W_down [O, N], gate and
    up [.., N] (same leading dimensions), by the fused kernel; None where it can't run (the
    caller takes cuBLAS + the pass). A failure to compile or launch is warned about once, and
    the kernel is not tried again."""
    if not gate.is_cuda:
        return None
    if not _launchable(dy, weight, gate, up):
        dy, weight = dy.contiguous(), weight.contiguous()
        if not _launchable(dy, weight, gate, up):
            return None
    assert dy.dtype == weight.dtype == up.dtype == gate.dtype
    dg, du, y = (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
                 for _ in range(3))
    if not launch_or_disable(lambda: make_launch(dy, weight, gate, up, dg, du, y, activation)(),
                             _failed, "the fused SwiGLU-backward GEMM",
                             "using cuBLAS and the SwiGLU kernel"):
        return None
    return dg, du, y
