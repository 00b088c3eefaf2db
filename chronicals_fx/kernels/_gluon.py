"""What the Gluon (Hopper) GEMMs share: TMA descriptors, the wgmma accumulator layout, the SM
count of a persistent launch, and the one check of where they can run."""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def tma_descriptor(t: Tensor, block: list[int]) -> TensorDescriptor:
    """A host TMA descriptor of ``t`` in ``block``-shaped tiles, NVMMA-swizzled in shared memory."""
    layout = gl.NVMMASharedLayout.get_default_for(block, GL_DTYPES[t.dtype])
    return TensorDescriptor.from_tensor(t, block, layout)


def num_sms(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM."""
    if device.type != "cuda":
        return 132      # compiled offline (no driver): an H100/H200's count
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def hopper_unusable(*tensors: Tensor) -> str | None:
    """Why a Gluon Hopper kernel can't take these tensors (None: it can): static facts only
    (device, dtype), so the answer is the same on fake tensors while tracing."""
    t = tensors[0]
    if t.device.type != "cuda" or torch.cuda.get_device_capability(t.device)[0] != 9:
        return "needs a CUDA device of compute capability 9.x (Hopper)"
    if any(x.dtype != t.dtype for x in tensors) or t.dtype not in GL_DTYPES:
        return "bf16 or fp16, one dtype"
    return None


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
