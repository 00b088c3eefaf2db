"""The SwiGLU backward fused into the epilogue of a persistent TMA GEMM (Hopper-style; an
experiment measured by ``benchmarks/sweep_swiglu_tma.py``, not wired into any op).

Around ``out = h W_downᵀ`` with ``h = act(g)·u`` (g, u: [M, I]; W_down: [O, I]; dy: [M, O]),
the backward needs dh = dy W_down and then, elementwise, dg, du and h again (for dW_down):

    unfused   dh = dy @ W_down              cuBLAS, writes dh                  [M, I] x1
              (dg, du, y) = pass(dh, g, u)  reads dh, g, u; writes dg, du, y   [M, I] x6
    fused     this kernel: per [BLOCK_M, BLOCK_N] tile of dh, still in registers, read that
              tile of g and u and write dg, du, y                              [M, I] x5

As a GEMM: A = dy [M, K] (K = O), B = W_down [K, N] (N = I, the nn.Linear weight as stored:
N contiguous), C = dh [M, N]. The math and its rounding points are the SwiGLU pass's
(kernels/swiglu.py: ``swiglu_bwd_kernel`` with STORE_Y), with dh rounded to the inputs' dtype
first, as cuBLAS's bf16 output is; only the order of the fp32 accumulation differs from cuBLAS:

    dh = round(dy @ W)                  # fp32 accumulator, rounded as a bf16 store would
    a  = round(act(g));  d = act'(g)    # _act_and_grad (σ shared)
    dg = round(round(dh·u) · d)
    du = round(dh · a)
    y  = round(round(act(g)) · u)       # _act: bit for bit the forward kernel's y

The structure is Triton's tutorial 09 (persistent matmul), its TMA-descriptor variant:

- persistent grid: ``ctas`` programs per SM (tutorial 09: one) walk the tiles
  ``start_pid, start_pid + NUM_PROGS, ...`` in grouped order (GROUP_M row blocks share each
  column block of W while it is in L2);
- the GEMM operands (and, by default, g, u, dg, du, y) go through host-built tensor
  descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``: no device allocator
  needed): TMA loads past the tensor's edge read zeros and stores past it are dropped, so no
  masks;
- the tile loop is ``tl.range(..., flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE)``:
  flattened, the software pipeliner sees one loop over (tile, k) and can issue the next tile's
  first loads while this tile's epilogue runs;
- epilogue subtiling: the [BLOCK_M, BLOCK_N] accumulator is cut into SPLIT column pieces of
  [BLOCK_M, BLOCK_N / SPLIT], each loaded/computed/stored in turn, so that g, u and the three
  results of one piece sit beside the accumulator without spilling, and the epilogue's shared
  memory buffers (TMA loads and stores go through shared memory) stay small.

The epilogue's reads of g and u are the latency the GEMM does not hide: a descriptor load is
waited for where it is issued. Sweep options around that (``Tile``): two programs per SM
(one's epilogue overlaps the other's main loop), pointer loads instead of TMA, and pointer
loads of the whole g, u tile issued before the K loop (``load="prefetch"``).

``INTERPRETED`` (Triton's CPU interpreter, TRITON_INTERPRET=1): its bf16 ``tl.dot`` multiplies
raw bits, so operands go to fp32 with ``input_precision="ieee"``, and its ``.to(bfloat16)``
truncates, so the plain GEMM rounds explicitly (``round_to``) before storing dh.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from chronicals_fx.kernels._triton import ROUND_CODES, round_to, tile_coords
from chronicals_fx.kernels.swiglu import swiglu_bwd_math

GROUP_M = 8


@dataclass(frozen=True)
class Tile:
    """One launch configuration (every field is a compile-time constant of the kernels)."""
    bm: int = 128
    bn: int = 128
    bk: int = 64
    warps: int = 8
    stages: int = 3
    split: int = 2            # epilogue pieces along N: 1, 2 or 4 (plain GEMM: 1 or 2)
    flatten: bool = True      # tl.range(flatten=...) over the tile loop
    ws: bool = False          # tl.range(warp_specialize=...) (Triton documents it for Blackwell)
    ctas: int = 1             # programs per SM: 2 lets one program's epilogue overlap the
                              # other's main loop (needs both to fit in registers and smem)
    maxnreg: int | None = None    # register cap per thread (e.g. 128 so two 8-warp CTAs fit)
    # fused only: how g, u are read (LOADS) and dg, du, y written
    load: str = "tma"         # "tma": per epilogue piece via descriptors; "ptr": per piece,
                              # masked pointer loads; "prefetch": pointer loads of the whole
                              # [BM, BN] tile issued before the K loop
    store_tma: bool = True    # dg, du, y via descriptors (else masked pointer stores)

    def tag(self) -> str:
        extra = ("" if self.flatten else " noflat") + (" ws" if self.ws else "") + (
            f" {self.ctas}cta/SM" if self.ctas != 1 else "") + (
            f" maxnreg{self.maxnreg}" if self.maxnreg else "")
        return (f"{self.bm}x{self.bn}x{self.bk} w{self.warps} s{self.stages} "
                f"split{self.split}{extra}")

    def fused_tag(self) -> str:
        return f"{self.tag()} ld:{self.load} st:{'tma' if self.store_tma else 'ptr'}"


LOADS = {"tma": 0, "ptr": 1, "prefetch": 2}


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
@triton.jit
def _dh_tile(dy_desc, w_desc, off_m, off_n, k_tiles,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             W_KMAJOR: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of dy @ W at (off_m, off_n): the GEMM main loop.

    W_KMAJOR False: ``w_desc`` views W [K, N] (N contiguous, the weight as nn.Linear stores it)
    in [BLOCK_K, BLOCK_N] blocks; True: it views Wᵀ [N, K] (K contiguous, tutorial 09's B) in
    [BLOCK_N, BLOCK_K] blocks, transposed in shared memory for the MMA. Partial K blocks are
    zero-filled by TMA on both operands, so they add nothing."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ki in range(k_tiles):
        off_k = ki * BLOCK_K
        a = dy_desc.load([off_m, off_k])
        if W_KMAJOR:
            b = w_desc.load([off_n, off_k]).T
        else:
            b = w_desc.load([off_k, off_n])
        if INTERPRETED:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """[BLOCK_M, WIDTH] → its left and right [BLOCK_M, WIDTH / 2] column halves (tutorial 09's
    epilogue subtiling: reshape to [BM, 2, W/2], move the 2 last, split)."""
    x = tl.reshape(x, (BLOCK_M, 2, WIDTH // 2))
    x = tl.permute(x, (0, 2, 1))
    return tl.split(x)


# ---------------------------------------------------------------------------------------------
# (d) the plain GEMM: dh = dy @ W, stored (what the fused kernel's main loop is worth alone)
# ---------------------------------------------------------------------------------------------
@triton.jit
def matmul_tma_persistent_kernel(
    dy_desc, w_desc,              # A [M, K] in [BM, BK] blocks; B (see _dh_tile)
    dh_desc,                      # C [M, N] in [BM, BN / SPLIT] blocks
    M, N, K,
    ROUND: tl.constexpr,          # rounding code of dh's dtype (INTERPRETED only)
    SPLIT: tl.constexpr,          # 1 or 2 column pieces for the store (epilogue subtiling)
    W_KMAJOR: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGS: tl.constexpr,      # the grid size: the tile loop's stride (tutorial's NUM_SMS)
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    dtype = dh_desc.dtype
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    # The epilogue recomputes its tile's coordinates from its own counter (tutorial 09: keeps
    # the flattened loop's prologue and epilogue independent for the pipeliner).
    tile_id_c = start_pid - NUM_PROGS
    for tile_id in tl.range(start_pid, num_tiles, NUM_PROGS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        acc = _dh_tile(dy_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, k_tiles,
                       BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, INTERPRETED)

        tile_id_c += NUM_PROGS
        pid_m, pid_n = tile_coords(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        if INTERPRETED:
            acc = round_to(acc, ROUND)        # its .to(bfloat16) would truncate
        if SPLIT == 1:
            dh_desc.store([off_m, off_n], acc.to(dtype))
        else:
            left, right = _halves(acc, BLOCK_M, BLOCK_N)
            dh_desc.store([off_m, off_n], left.to(dtype))
            dh_desc.store([off_m, off_n + BLOCK_N // 2], right.to(dtype))


# ---------------------------------------------------------------------------------------------
# (e) the fused kernel: the same main loop, the SwiGLU backward as epilogue
# ---------------------------------------------------------------------------------------------
@triton.jit
def _column_piece(x, j: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Columns [j·BLOCK_N/SPLIT, (j+1)·BLOCK_N/SPLIT) of a [BLOCK_M, BLOCK_N] tile, by halving
    (SPLIT 1, 2 or 4; the repeated splits of one tile are common subexpressions)."""
    if SPLIT == 1:
        piece = x
    else:
        left, right = _halves(x, BLOCK_M, BLOCK_N)
        half = left if j < SPLIT // 2 else right
        if SPLIT == 2:
            piece = half
        else:
            q0, q1 = _halves(half, BLOCK_M, BLOCK_N // 2)
            piece = q0 if j % 2 == 0 else q1
    return piece


@triton.jit
def _ptr_block(off_m, off_n, M, N, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """(offsets, mask) of the [BLOCK_M, WIDTH] block at (off_m, off_n) of a contiguous [M, N]."""
    rows = (off_m + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = off_n + tl.arange(0, WIDTH)
    return rows[:, None] * N + cols[None, :], (rows[:, None] < M) & (cols[None, :] < N)


@triton.jit
def _load_block(X, off_m, off_n, M, N, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                WIDTH: tl.constexpr):
    """The [BLOCK_M, WIDTH] block at (off_m, off_n) of [M, N] ``X`` (a descriptor with that
    block shape, or a pointer), zeros outside, in X's dtype (a prefetched tile waits in
    registers through the K loop: half the registers of fp32)."""
    if TMA:
        v = X.load([off_m, off_n])
    else:
        offs, mask = _ptr_block(off_m, off_n, M, N, BLOCK_M, WIDTH)
        v = tl.load(X + offs, mask=mask, other=0.0)
    return v


@triton.jit
def _store_block(X, v, off_m, off_n, M, N, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                 WIDTH: tl.constexpr):
    """Store fp32 ``v`` (already rounded to X's dtype) as the block at (off_m, off_n)."""
    if TMA:
        X.store([off_m, off_n], v.to(X.dtype))
    else:
        offs, mask = _ptr_block(off_m, off_n, M, N, BLOCK_M, WIDTH)
        tl.store(X + offs, v.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_math(dh, g, u, ACT: tl.constexpr, ROUND: tl.constexpr):
    """dg, du, y (fp32, each rounded to the inputs' dtype) of one piece from the fp32
    accumulator dh, rounded first as cuBLAS stores it: the pass's math (swiglu_bwd_math).
    (The Gluon kernels call this too.)"""
    return swiglu_bwd_math(round_to(dh, ROUND), g, u, ACT, ROUND)


@triton.jit
def _swiglu_bwd_piece(dh, g, u, off_m, off_n, M, N, DG, DU, Y,
                      ACT: tl.constexpr, ROUND: tl.constexpr, STORE_Y: tl.constexpr,
                      STORE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, WIDTH: tl.constexpr):
    """The SwiGLU backward of one [BLOCK_M, WIDTH] piece at (off_m, off_n); stores dg, du (and
    y; when not stored, the compiler drops its computation)."""
    dg, du, y = _swiglu_bwd_math(dh, g, u, ACT, ROUND)
    _store_block(DG, dg, off_m, off_n, M, N, STORE_TMA, BLOCK_M, WIDTH)
    _store_block(DU, du, off_m, off_n, M, N, STORE_TMA, BLOCK_M, WIDTH)
    if STORE_Y:
        _store_block(Y, y, off_m, off_n, M, N, STORE_TMA, BLOCK_M, WIDTH)


@triton.jit
def swiglu_bwd_gemm_tma_kernel(
    dy_desc, w_desc,              # A [M, K] in [BM, BK] blocks; B (see _dh_tile)
    G, U,                         # gate, up [M, N]: descriptors in [BM, BN / SPLIT] blocks
                                  # (LOAD 0) or pointers (LOAD 1, 2)
    DG, DU, Y,                    # outputs [M, N]: d gate, d up, act(g)·u; descriptors in
                                  # [BM, BN / SPLIT] blocks (STORE_TMA) or pointers
    M, N, K,
    ACT: tl.constexpr, ROUND: tl.constexpr, STORE_Y: tl.constexpr,
    SPLIT: tl.constexpr,          # the epilogue in 1, 2 or 4 column pieces
    LOAD: tl.constexpr,           # g, u: 0 TMA per piece in the epilogue; 1 pointer loads per
                                  # piece in the epilogue; 2 pointer loads of the whole tile
                                  # issued before the K loop (latency hidden behind it)
    STORE_TMA: tl.constexpr,      # dg, du, y through descriptors (else masked pointer stores)
    W_KMAJOR: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGS: tl.constexpr,      # the grid size: the tile loop's stride (tutorial's NUM_SMS)
    FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    WIDTH: tl.constexpr = BLOCK_N // SPLIT
    start_pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    num_pid_in_group = GROUP_M * num_pid_n
    tile_id_c = start_pid - NUM_PROGS
    for tile_id in tl.range(start_pid, num_tiles, NUM_PROGS, flatten=FLATTEN,
                            warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        if LOAD == 2:
            # issued now, first used after the K loop: their latency hides behind the GEMM
            g_tile = _load_block(G, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, False,
                                 BLOCK_M, BLOCK_N)
            u_tile = _load_block(U, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, False,
                                 BLOCK_M, BLOCK_N)
        acc = _dh_tile(dy_desc, w_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, k_tiles,
                       BLOCK_M, BLOCK_N, BLOCK_K, W_KMAJOR, INTERPRETED)

        tile_id_c += NUM_PROGS
        pid_m, pid_n = tile_coords(tile_id_c, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        for j in tl.static_range(SPLIT):
            if LOAD == 2:
                g = _column_piece(g_tile, j, SPLIT, BLOCK_M, BLOCK_N)
                u = _column_piece(u_tile, j, SPLIT, BLOCK_M, BLOCK_N)
            else:
                g = _load_block(G, off_m, off_n + j * WIDTH, M, N, LOAD == 0, BLOCK_M, WIDTH)
                u = _load_block(U, off_m, off_n + j * WIDTH, M, N, LOAD == 0, BLOCK_M, WIDTH)
            _swiglu_bwd_piece(_column_piece(acc, j, SPLIT, BLOCK_M, BLOCK_N), g, u,
                              off_m, off_n + j * WIDTH, M, N, DG, DU, Y,
                              ACT, ROUND, STORE_Y, STORE_TMA, BLOCK_M, WIDTH)


# ---------------------------------------------------------------------------------------------
# Host side: descriptors and launches. Plain tensors in, so the same calls run on CPU tensors
# under TRITON_INTERPRET=1.
# ---------------------------------------------------------------------------------------------
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3        # interpreter: a few programs, each walking several tiles


def _check(dy: Tensor, w: Tensor, w_kmajor: bool, *mn: Tensor) -> tuple[int, int, int]:
    """(M, N, K); TMA needs unit last stride and 16-byte aligned row strides and bases."""
    m, k = dy.shape
    n = w.shape[0] if w_kmajor else w.shape[1]
    assert w.shape == ((n, k) if w_kmajor else (k, n)), (dy.shape, w.shape, w_kmajor)
    for t in (dy, w, *mn):
        assert t.is_contiguous() and t.dtype == dy.dtype, "contiguous, one dtype"
        assert t.data_ptr() % 16 == 0 and (t.shape[1] * t.element_size()) % 16 == 0
    for t in mn:
        assert t.shape == (m, n), (t.shape, m, n)
    return m, n, k


def _operand_descs(dy: Tensor, w: Tensor, tile: Tile, w_kmajor: bool):
    a = TensorDescriptor.from_tensor(dy, [tile.bm, tile.bk])
    b = TensorDescriptor.from_tensor(w, [tile.bn, tile.bk] if w_kmajor else [tile.bk, tile.bn])
    return a, b


def _grid(m: int, n: int, tile: Tile, device: torch.device) -> tuple[int, int]:
    """(programs, NUM_PROGS): a persistent grid of min(ctas·#SMs, #tiles) programs; the tile
    loop strides by ctas·#SMs (tutorial 09: NUM_SMS)."""
    progs = tile.ctas * num_sms(device)
    return min(progs, triton.cdiv(m, tile.bm) * triton.cdiv(n, tile.bn)), progs


def _options(tile: Tile) -> dict:
    opts = {"num_warps": tile.warps, "num_stages": tile.stages}
    if tile.maxnreg and not interpreted():
        opts["maxnreg"] = tile.maxnreg
    return opts


def _launcher(kernel, programs: int, args: tuple, kwargs: dict):
    """``launch(warmup=False)``: runs the kernel on a 1-D grid of ``programs`` and returns the
    compiled kernel; ``warmup=True`` only compiles it (into Triton's on-disk cache too)."""
    def launch(warmup: bool = False):
        if warmup:
            return kernel.warmup(*args, grid=(programs,), **kwargs)
        return kernel[(programs,)](*args, **kwargs)
    launch.kernel, launch.args, launch.kwargs = kernel, args, kwargs   # for offline compiles
    return launch


def make_plain_launch(dy: Tensor, w: Tensor, dh: Tensor, tile: Tile, w_kmajor: bool = False):
    """A callable launching dh = dy @ W (descriptors built once, here; see _launcher)."""
    m, n, k = _check(dy, w, w_kmajor, dh)
    assert tile.split in (1, 2)
    a, b = _operand_descs(dy, w, tile, w_kmajor)
    c = TensorDescriptor.from_tensor(dh, [tile.bm, tile.bn // tile.split])
    programs, progs = _grid(m, n, tile, dy.device)
    return _launcher(matmul_tma_persistent_kernel, programs, (a, b, c, m, n, k), dict(
        ROUND=ROUND_CODES[dh.dtype], SPLIT=tile.split, W_KMAJOR=w_kmajor,
        INTERPRETED=interpreted(),
        BLOCK_M=tile.bm, BLOCK_N=tile.bn, BLOCK_K=tile.bk, GROUP_M=GROUP_M,
        NUM_PROGS=progs, FLATTEN=tile.flatten, WARP_SPECIALIZE=tile.ws, **_options(tile)))


def make_fused_launch(dy: Tensor, w: Tensor, g: Tensor, u: Tensor, dg: Tensor, du: Tensor,
                      y: Tensor | None, tile: Tile, activation: int = 0,
                      w_kmajor: bool = False):
    """A callable launching the fused backward (see _launcher): dg, du (and y = act(g)·u when
    ``y`` is given) from dh = dy @ W, g, u."""
    m, n, k = _check(dy, w, w_kmajor, g, u, dg, du, *([y] if y is not None else []))
    assert tile.split in (1, 2, 4) and tile.load in LOADS
    a, b = _operand_descs(dy, w, tile, w_kmajor)
    out_y = dg if y is None else y
    piece = [tile.bm, tile.bn // tile.split]

    def as_arg(t: Tensor, tma: bool):
        return TensorDescriptor.from_tensor(t, piece) if tma else t

    ins = [as_arg(t, tile.load == "tma") for t in (g, u)]
    outs = [as_arg(t, tile.store_tma) for t in (dg, du, out_y)]
    programs, progs = _grid(m, n, tile, dy.device)
    return _launcher(swiglu_bwd_gemm_tma_kernel, programs, (a, b, *ins, *outs, m, n, k), dict(
        ACT=activation, ROUND=ROUND_CODES[g.dtype], STORE_Y=y is not None,
        SPLIT=tile.split, LOAD=LOADS[tile.load], STORE_TMA=tile.store_tma,
        W_KMAJOR=w_kmajor, INTERPRETED=interpreted(),
        BLOCK_M=tile.bm, BLOCK_N=tile.bn, BLOCK_K=tile.bk, GROUP_M=GROUP_M,
        NUM_PROGS=progs, FLATTEN=tile.flatten, WARP_SPECIALIZE=tile.ws, **_options(tile)))
