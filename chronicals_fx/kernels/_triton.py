"""Small helpers shared by the kernel modules."""

from __future__ import annotations

import functools

import torch
from torch.library import wrap_triton

# Rounding points are passed to kernels as small integer constexprs (a torch/Triton dtype as
# a constexpr would have to survive Inductor's code generation): 0 = keep fp32, 1 = round to
# bf16, 2 = round to fp16. Kernels compute in fp32 and round where eager rounds.
ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launchable(kernel, like: torch.Tensor):
    """``wrap_triton(kernel)`` for CUDA tensors, so Inductor can trace the launch into its
    generated code; the raw kernel otherwise (CPU tensors under ``TRITON_INTERPRET=1``)."""
    return wrap_triton(kernel) if like.is_cuda else kernel


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_count(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Programs for a persistent grid: a few per SM, never more than there is work."""
    sms = multiprocessor_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(work_items, sms * per_sm))
