"""What the Gluon (Hopper) GEMMs share: TMA descriptors, the wgmma accumulator layout, the SM
count of a persistent launch, the one check of where they can run, and the warp-specialized
main loop whose epilogues differ (kernels/swiglu_gemm.py, kernels/linear_ce_gemm.py):

    loader    1 warp         TMA loads of A and B blocks into a STAGES-deep ring
                             (ab_ready: landed; ab_empty: the wgmma that read the slot is done)
    mma       the default    the K loop on asynchronous wgmma (two warpgroups of 64 rows), then
              partition      the accumulator, rounded to the dtype, into one of DH_BUFS shared
                             tiles (dh_ready / dh_empty) for the kernel's own epilogue partition

Every partition walks the same grouped persistent tile order (tutorial 09): one program per SM,
tiles start_pid, start_pid + #SMs, ...
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ._triton import fast_launch, multiprocessor_count, tile_coords

GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
GROUP_M = 8


@dataclass(frozen=True)
class GemmTile:
    """One launch configuration of a warp-specialized GEMM (compile-time constants)."""
    bm: int = 128
    bn: int = 128
    bk: int = 64
    stages: int = 4           # depth of the A/B ring
    split: int = 4            # epilogue column pieces of [BM, BN / split]
    dh_bufs: int = 2          # result tiles in shared memory (the epilogue may lag a tile)
    mma_warps: int = 8        # the default partition: two warpgroups of 64 rows
    epi_warps: int = 8
    epi_regs: int = 128
    load_regs: int = 24
    maxnreg: int = 96         # before reallocation: 64K registers / (20 warps x 32)
    hw_round: bool = True     # SwiGLU epilogue: bf16 rounding by cvt (round_to CODE 3), not bits

    def tag(self) -> str:
        return (f"gluon-ws {self.bm}x{self.bn}x{self.bk} s{self.stages} split{self.split} "
                f"dh{self.dh_bufs} mma{self.mma_warps}w epi{self.epi_warps}w/{self.epi_regs}r"
                f"{'' if self.hw_round else ' bitround'}")


def ws_launch_kwargs(tile: GemmTile, programs: int) -> dict:
    """The launch options every warp-specialized GEMM here takes from its tile (``programs``:
    the persistent tile stride, NUM_PROGS)."""
    return dict(SPLIT=tile.split, STAGES=tile.stages, DH_BUFS=tile.dh_bufs, GROUP_M=GROUP_M,
                NUM_PROGS=programs, EPI_WARPS=tile.epi_warps, EPI_REGS=tile.epi_regs,
                LOAD_REGS=tile.load_regs, num_warps=tile.mma_warps, maxnreg=tile.maxnreg)


def launcher(kernel, grid: tuple, args: tuple, kwargs: dict, key=None):
    """A callable launching ``kernel[grid](*args, **kwargs)`` (``warmup=True``: compile only);
    it carries kernel, grid, args and kwargs for offline compiles
    (benchmarks/swiglu_gemm_gluon.py's ``compile_offline``). ``key``: ``fast_launch``'s (what
    fixes every specialization of the launch), when the caller has one."""
    def launch(warmup: bool = False):
        if warmup:
            return kernel.warmup(*args, grid=grid, **kwargs)
        return fast_launch(kernel, key)[grid](*args, **kwargs)
    launch.kernel, launch.grid, launch.args, launch.kwargs = kernel, grid, args, kwargs
    launch.key = key
    return launch


def tma_descriptor(t: Tensor, block: list[int], rows: int | None = None) -> TensorDescriptor:
    """A host TMA descriptor of ``t`` in ``block``-shaped tiles, NVMMA-swizzled in shared memory;
    with ``rows``, of a contiguous ``t`` of any rank read as [rows, last dim].

    Built without the dataclass's checks (~4 µs of host time a descriptor, four a SwiGLU-backward
    GEMM call, 24 calls a step): every caller has checked what TMA needs, a base and row stride
    of 16-byte multiples and unit column stride (``unusable`` and the launch's own checks)."""
    if rows is None:
        shape, strides = list(t.shape), list(t.stride())
    else:
        shape, strides = [rows, t.shape[-1]], [t.shape[-1], 1]
    layout = _nvmma_layout(tuple(block), t.dtype)
    if _DESCRIPTOR_DEFAULTS is None:       # a TensorDescriptor this function can't build
        return TensorDescriptor(t, shape, strides, block, layout)
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_DESCRIPTOR_DEFAULTS, base=t, shape=shape, strides=strides,
                         block_shape=block, layout=layout)
    return desc


def _descriptor_defaults() -> dict | None:
    """The defaults of TensorDescriptor's fields other than the five set above (padding, and
    round_f32_to_tf32 in later Tritons), or None where it is not a plain dataclass of them."""
    import dataclasses

    if not dataclasses.is_dataclass(TensorDescriptor) or hasattr(TensorDescriptor, "__slots__"):
        return None
    fields = dataclasses.fields(TensorDescriptor)
    given = {"base", "shape", "strides", "block_shape", "layout"}
    if not given <= {f.name for f in fields}:
        return None
    rest = [f for f in fields if f.name not in given]
    if any(f.default is dataclasses.MISSING for f in rest):
        return None
    return {f.name: f.default for f in rest}


_DESCRIPTOR_DEFAULTS = _descriptor_defaults()


@functools.lru_cache(maxsize=None)
def _nvmma_layout(block: tuple[int, ...], dtype: torch.dtype):
    """Gluon's default swizzled layout for a block (an immutable value): ~10 µs of host time to
    compute, once per kernel launch and operand otherwise — a step launches these kernels
    ~50 times."""
    return gl.NVMMASharedLayout.get_default_for(list(block), GL_DTYPES[dtype])


def num_sms(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM."""
    if device.type != "cuda":
        return 132      # compiled offline (no driver): an H100/H200's count
    return multiprocessor_count(device.index if device.index is not None
                                else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_major(index: int | None) -> int:
    """The compute capability's major version (asked once a device: the fused loss asks per
    token chunk)."""
    return torch.cuda.get_device_capability(index)[0]


def hopper_unusable(*tensors: Tensor) -> str | None:
    """Why a Gluon Hopper kernel can't take these tensors (None: it can): static facts only
    (device, dtype), so the answer is the same on fake tensors while tracing."""
    t = tensors[0]
    if t.device.type != "cuda" or _cuda_major(t.device.index) != 9:
        return "needs a CUDA device of compute capability 9.x (Hopper)"
    if any(x.dtype != t.dtype for x in tensors) or t.dtype not in GL_DTYPES:
        return "bf16 or fp16, one dtype"
    return None


def launch_or_disable(launch, failures: list[str], what: str, fallback: str) -> bool:
    """Run ``launch()`` (building the descriptors too); True if it ran. Its first failure (a
    Triton without this Gluon API, a driver error) goes into ``failures``, which the kernel's ``unusable`` reads so it is not
    tried again, and is warned about once."""
    try:
        launch()
    except Exception as e:  # noqa: BLE001
        failures.append(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        warnings.warn(f"chronicals: {what} failed ({failures[0]}); {fallback} from now on",
                      stacklevel=3)
        return False
    return True


@gluon.constexpr_function
def piece_layout(WIDTH, num_warps):
    """An epilogue piece [BM, WIDTH] in registers: 16-byte accesses along a row, WIDTH / 8
    threads across, the rest of the warp down."""
    return gl.BlockedLayout([1, 8], [32 // (WIDTH // 8), WIDTH // 8], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def wgmma_layout(BLOCK_M, BLOCK_N, num_warps):
    """The wgmma accumulator layout (Gluon tutorial 05's pick_wgmma_layout, bf16: k = 16):
    warps stacked along M while each still gets 16 rows, instruction N as wide as fits."""
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if BLOCK_M > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    m_reps = triton.cdiv(BLOCK_M, 16)
    n_reps = triton.cdiv(num_warps, m_reps)
    max_n = max(BLOCK_N // n_reps, 8)
    n = 256
    while n > max_n or BLOCK_N % n != 0:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])


@gluon.jit
def tile_walk(M, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """What the persistent tile order needs of the problem: the tile count (the loop runs
    ``range(program_id, tiles, NUM_PROGS)``) and ``tile_coords``'s tiles per group of GROUP_M
    row blocks and row-block count."""
    num_pid_m = gl.cdiv(M, BLOCK_M)
    num_pid_n = gl.cdiv(N, BLOCK_N)
    return num_pid_m * num_pid_n, GROUP_M * num_pid_n, num_pid_m


@gluon.jit
def load_partition(a_desc, b_desc, a_bufs, b_bufs, ab_ready, ab_empty, M, N, K,
                    W_KMAJOR: gl.constexpr, GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    if W_KMAJOR:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    else:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_bufs.shape[0]
    num_tiles, num_pid_in_group, num_pid_m = tile_walk(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_tiles = gl.cdiv(K, BLOCK_K)
    prod = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        for ki in range(k_tiles):
            s = prod % STAGES
            # a fresh barrier counts as having completed the phase before 0: the first round
            # of slots is free at once
            mbarrier.wait(ab_empty.index(s), ((prod // STAGES) & 1) ^ 1)
            bar = ab_ready.index(s)
            mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, ki * BLOCK_K], bar,
                                            a_bufs.index(s))
            if W_KMAJOR:
                tma.async_copy_global_to_shared(b_desc, [pid_n * BLOCK_N, ki * BLOCK_K], bar,
                                                b_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(b_desc, [ki * BLOCK_K, pid_n * BLOCK_N], bar,
                                                b_bufs.index(s))
            prod += 1


@gluon.jit
def mma_partition(a_bufs, b_bufs, ab_ready, ab_empty, dh_bufs, dh_ready, dh_empty,
                   M, N, K, BLOCK_K: gl.constexpr, W_KMAJOR: gl.constexpr,
                   GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr):
    STAGES: gl.constexpr = a_bufs.shape[0]
    DH_BUFS: gl.constexpr = dh_bufs.shape[0]
    BLOCK_M: gl.constexpr = dh_bufs.shape[1]
    BLOCK_N: gl.constexpr = dh_bufs.shape[2]
    acc_layout: gl.constexpr = wgmma_layout(BLOCK_M, BLOCK_N, gl.num_warps())
    num_tiles, _, _ = tile_walk(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_tiles = gl.cdiv(K, BLOCK_K)
    cons = 0
    tiles = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGS):
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        for ki in range(k_tiles):
            s = cons % STAGES
            mbarrier.wait(ab_ready.index(s), (cons // STAGES) & 1)
            if W_KMAJOR:
                b = b_bufs.index(s).permute((1, 0))
            else:
                b = b_bufs.index(s)
            acc = warpgroup_mma(a_bufs.index(s), b, acc, is_async=True)
            # one wgmma left in flight: the previous block's has read its slot, in both
            # warpgroups once every warp is past the wait
            acc = warpgroup_mma_wait(1, deps=(acc, ))
            gl.thread_barrier()
            mbarrier.arrive(ab_empty.index((cons + STAGES - 1) % STAGES), count=1, pred=ki > 0)
            cons += 1
        acc = warpgroup_mma_wait(0, deps=(acc, ))
        gl.thread_barrier()
        mbarrier.arrive(ab_empty.index((cons + STAGES - 1) % STAGES), count=1)

        d = tiles % DH_BUFS
        mbarrier.wait(dh_empty.index(d), ((tiles // DH_BUFS) & 1) ^ 1)
        dh_bufs.index(d).store(acc.to(dh_bufs.dtype))      # rounded as cuBLAS stores dh
        gl.thread_barrier()
        mbarrier.arrive(dh_ready.index(d), count=1)
        tiles += 1


@gluon.jit
def ws_gemm_buffers(a_desc, b_desc, STAGES: gl.constexpr, DH_BUFS: gl.constexpr,
                    W_KMAJOR: gl.constexpr):
    """Shared memory and barriers of the warp-specialized GEMM: the STAGES-deep A/B ring, DH_BUFS
    result tiles [BM, BN] in the dtype, and their ready/empty mbarriers, initialized."""
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    if W_KMAJOR:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    else:
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[1]
    dtype: gl.constexpr = a_desc.dtype
    gl.static_assert(STAGES >= 2, "at least two stages")
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    dh_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
    dh_bufs = gl.allocate_shared_memory(dtype, [DH_BUFS, BLOCK_M, BLOCK_N], dh_layout)
    ab_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ab_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    dh_ready = gl.allocate_shared_memory(gl.int64, [DH_BUFS, 1], mbarrier.MBarrierLayout())
    dh_empty = gl.allocate_shared_memory(gl.int64, [DH_BUFS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ab_ready.index(i), count=1)
        mbarrier.init(ab_empty.index(i), count=1)
    for i in gl.static_range(DH_BUFS):
        mbarrier.init(dh_ready.index(i), count=1)
        mbarrier.init(dh_empty.index(i), count=1)
    return a_bufs, b_bufs, dh_bufs, ab_ready, ab_empty, dh_ready, dh_empty
