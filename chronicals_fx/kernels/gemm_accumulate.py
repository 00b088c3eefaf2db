"""C += Aᵀ B in C's own dtype with C read during the main loop: a persistent Hopper GEMM in
Gluon (TMA, mbarriers, asynchronous wgmma). The fused loss accumulates dW this way over its
token chunks (kernels/linear_ce.py: dW += d_cᵀ H_c, d_c [C, V] and H_c [C, H] as stored).

    A [K, M]  (d_c: M contiguous; wgmma reads its [BK, BM] blocks transposed)
    B [K, N]  (H_c)
    C [M, N]  (dW), updated in place: C = round(fp32(Aᵀ B) + C), one rounding, as cuBLAS's
              addmm with beta = 1 rounds

cuBLAS's beta = 1 GEMM reads C in its epilogue, after the main loop, and waits for it there: at
the fused loss's H=4096 shape (M=V=128256, N=4096, K=1024) that is ~0.25 ms of a 1.89 ms GEMM,
against 1.63 with beta = 0 (benchmarks/RESULTS.md, session 6 call 1), paid ⌈N / C⌉ - 1 times.
Here each tile's C block is loaded by TMA into shared memory while its K loop runs (issued just
after the first wgmma, once the previous tile's result has left that buffer), the next tile's
first A/B blocks are in flight during the epilogue, and the result goes back by an asynchronous
TMA store from the same buffer. TMA clips and zero-fills at the edges: any M, N, K.

Grouped persistent tile order (tutorial 09): one program per SM walks tiles start_pid,
start_pid + #SMs, ...
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                               warpgroup_mma,
                                                               warpgroup_mma_wait)

from ._gluon import hopper_unusable, num_sms, tma_descriptor, wgmma_layout
from ._triton import tile_coords

GROUP_M = 8


@dataclass(frozen=True)
class AccumulateTile:
    """One launch configuration (compile-time constants)."""
    bm: int = 128
    bn: int = 256
    bk: int = 64
    stages: int = 3           # depth of the A/B ring
    warps: int = 8            # two warpgroups of 64 rows

    def tag(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk} s{self.stages} {self.warps}w"

    def smem_bytes(self) -> int:
        return (self.stages * (self.bk * self.bm + self.bk * self.bn) + self.bm * self.bn) * 2


DEFAULT_TILE = AccumulateTile()


@gluon.jit
def _issue_ab(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n, k,
              STAGES: gl.constexpr):
    """TMA loads of the K block at ``k`` of A and B into ring slot ``prod % STAGES``; its
    barrier completes when both have landed. Returns prod + 1."""
    s = prod % STAGES
    bar = bars.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [k, off_m], bar, a_bufs.index(s))
    tma.async_copy_global_to_shared(b_desc, [k, off_n], bar, b_bufs.index(s))
    return prod + 1


@gluon.jit
def _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n, k_tiles,
              STAGES: gl.constexpr):
    """The first STAGES-1 K blocks of a tile (fewer if K has fewer)."""
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[0]
    for i in gl.static_range(STAGES - 1):
        if i < k_tiles:
            prod = _issue_ab(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n,
                             i * BLOCK_K, STAGES)
    return prod


@gluon.jit
def gemm_accumulate_kernel(
    a_desc,                       # A [K, M] in [BK, BM] blocks
    b_desc,                       # B [K, N] in [BK, BN] blocks
    c_desc,                       # C [M, N] in [BM, BN] blocks: read, then written
    M, N, K,
    STAGES: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr,
):
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = wgmma_layout(BLOCK_M, BLOCK_N, gl.num_warps())
    gl.static_assert(STAGES >= 2, "at least two stages")

    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    c_buf = gl.allocate_shared_memory(dtype, c_desc.block_type.shape, c_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    c_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    mbarrier.init(c_bar, count=1)

    start_pid = gl.program_id(0)
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    prod = 0
    cons = 0
    tiles = 0
    pid_m, pid_n = tile_coords(start_pid, num_pid_in_group, num_pid_m, GROUP_M)
    prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, pid_m * BLOCK_M,
                     pid_n * BLOCK_N, k_tiles, STAGES)
    for tile_id in range(start_pid, num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        for ki in range(k_tiles):
            s = cons % STAGES
            mbarrier.wait(bars.index(s), (cons // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s).permute((1, 0)), b_bufs.index(s), acc,
                                is_async=True)
            if ki == 0:
                # while the first block multiplies: once the previous tile's result has been
                # read out of c_buf by its TMA store, this tile's C block goes in, to land
                # during the rest of the K loop
                tma.store_wait(0)
                mbarrier.expect(c_bar, c_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(c_desc, [off_m, off_n], c_bar, c_buf)
            # one wgmma left in flight: the previous block's slot is free to refill
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            cons += 1
            if ki + (STAGES - 1) < k_tiles:
                prod = _issue_ab(a_desc, b_desc, a_bufs, b_bufs, bars, prod, off_m, off_n,
                                 (ki + (STAGES - 1)) * BLOCK_K, STAGES)
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        # the next tile's first blocks load during this epilogue
        next_id = tile_id + NUM_PROGS
        if next_id < num_tiles:
            npid_m, npid_n = tile_coords(next_id, num_pid_in_group, num_pid_m, GROUP_M)
            prod = _prologue(a_desc, b_desc, a_bufs, b_bufs, bars, prod, npid_m * BLOCK_M,
                             npid_n * BLOCK_N, k_tiles, STAGES)
        mbarrier.wait(c_bar, tiles & 1)
        # each thread reads and writes back the same values: no barrier between
        acc = acc + c_buf.load(acc_layout).to(gl.float32)
        c_buf.store(acc.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [off_m, off_n], c_buf)
        tiles += 1
    tma.store_wait(0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))
    mbarrier.invalidate(c_bar)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
_failed: list[str] = []      # the first launch's error, if any: the kernel is not tried again


def unusable(c: Tensor, a: Tensor, b: Tensor) -> str | None:
    """Why the kernel can't compute ``c += aᵀ b`` (None: it can)."""
    if os.environ.get("CHRONICALS_GEMM_ACCUMULATE", "1") == "0":
        return "turned off by CHRONICALS_GEMM_ACCUMULATE=0"
    if _failed:
        return f"the kernel failed before: {_failed[0]}"
    reason = hopper_unusable(c, a, b)
    if reason:
        return reason
    if not (a.dim() == b.dim() == c.dim() == 2 and a.shape[0] == b.shape[0]
            and c.shape == (a.shape[1], b.shape[1])):
        return f"shapes {tuple(c.shape)} += {tuple(a.shape)}ᵀ {tuple(b.shape)} do not agree"
    for t in (a, b, c):
        # TMA: a unit last stride, other strides and the base 16-byte aligned
        if (t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16
                or t.data_ptr() % 16):
            return "TMA needs rows of a multiple of 16 bytes, unit column stride, aligned base"
    return None


def make_launch(c: Tensor, a: Tensor, b: Tensor, tile: AccumulateTile = DEFAULT_TILE):
    """A callable running ``c += aᵀ b`` (a [K, M], b [K, N], c [M, N]; see :func:`unusable`)."""
    k, m = a.shape
    n = b.shape[1]
    a_desc = tma_descriptor(a, [tile.bk, tile.bm])
    b_desc = tma_descriptor(b, [tile.bk, tile.bn])
    c_desc = tma_descriptor(c, [tile.bm, tile.bn])
    progs = num_sms(c.device)
    programs = min(progs, triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn))
    args = (a_desc, b_desc, c_desc, m, n, k)
    kwargs = dict(STAGES=tile.stages, GROUP_M=GROUP_M, NUM_PROGS=programs,
                  num_warps=tile.warps)

    def launch(warmup: bool = False):
        if warmup:
            return gemm_accumulate_kernel.warmup(*args, grid=(programs,), **kwargs)
        return gemm_accumulate_kernel[(programs,)](*args, **kwargs)
    launch.kernel, launch.args, launch.kwargs = gemm_accumulate_kernel, args, kwargs
    return launch


def accumulate_at_b(c: Tensor, a: Tensor, b: Tensor) -> None:
    """``c += aᵀ @ b`` in place, by the kernel where it can run, else ``c.addmm_(a.t(), b)``.
    A failure to compile or launch is warned about once, and the kernel is not tried again."""
    if a.shape[0] == 0:
        return
    if unusable(c, a, b) is None:
        try:
            make_launch(c, a, b)()
            return
        except Exception as e:  # noqa: BLE001 (a Triton without this Gluon API, a driver error)
            _failed.append(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            warnings.warn(f"chronicals: the accumulating Gluon GEMM failed ({_failed[0]}); "
                          "using cuBLAS from now on", stacklevel=2)
    c.addmm_(a.t(), b)
