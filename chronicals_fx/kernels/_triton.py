"""Small helpers shared by the kernel modules."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton import knobs

# Rounding points are passed to kernels as small integer constexprs (a torch/Triton dtype as
# a constexpr would have to survive Inductor's code generation): 0 = keep fp32, 1 or 3 = round
# to bf16, 2 = round to fp16. Kernels compute in fp32 and round where eager rounds. bf16 is
# CODE 3 (the hardware conversion: two values an instruction, NaN kept) in compiled kernels
# and CODE 1 (on the bits, with a NaN guard) under the interpreter, which truncates on
# conversion.
INTERPRETED = bool(knobs.runtime.interpret)  # TRITON_INTERPRET, read as Triton reads it
ROUND_CODES = {torch.float32: 0, torch.bfloat16: 1 if INTERPRETED else 3, torch.float16: 2}

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def round_to(v, CODE: tl.constexpr):
    """Round fp32 ``v`` to bf16 (CODE 1) or fp16 (CODE 2) precision, keeping fp32 storage.

    bf16 rounding is done on the bits (round to nearest, ties to even: add 0x7FFF plus the
    lowest kept bit, clear the low half) because Triton's interpreter truncates on
    ``.to(tl.bfloat16)``; fp16 too, because the compiler folds a conversion round trip. inf
    passes through; a NaN is kept as it is, since the addition would carry a NaN's payload into
    the exponent or the sign (CUDA's canonical NaN 0x7FFFFFFF became -0.0, 0x7F800001 inf: a
    NaN hidden from the loss).
    CODE 3 is bf16 through the hardware conversion, for compiled kernels (ROUND_CODES picks
    it outside the interpreter): four integer instructions and the NaN guard a value fewer.
    """
    v = v.to(tl.float32)  # Inductor may pass float scalars as fp64, promoting what they touch
    if CODE == 1:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = tl.where(v != v, v, bits.to(tl.float32, bitcast=True))
    elif CODE == 2:
        # fp16 on the bits as well: a conversion round trip (even through a bitcast to int16)
        # is folded away once its result feeds arithmetic (H200, Triton 3.6: RoPE's rounded
        # products became FMAs). Normal range: keep 10 mantissa bits, ties to even.
        bits = v.to(tl.uint32, bitcast=True)
        r = ((bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000).to(tl.float32, bitcast=True)
        # Below 2⁻¹⁴ fp16 is subnormal, a fixed quantum of 2⁻²⁴: the fp32 ulp of 0.5, so
        # adding and subtracting 0.5 rounds |v| to it, ties to even; the sign is put back
        # by its bit (−0 stays −0).
        a = tl.abs(v)
        tiny = ((a + 0.5) - 0.5).to(tl.uint32, bitcast=True) | (bits & 0x80000000)
        r = tl.where(a < 6.103515625e-05, tiny.to(tl.float32, bitcast=True), r)
        r = tl.where(tl.abs(r) > 65504.0, v * float("inf"), r)  # past fp16's max: ±inf
        v = tl.where(v != v, v, r)
    elif CODE == 3:
        # bf16 by the hardware conversion (round to nearest even, two values an instruction,
        # then a shift back): compiled kernels only, as the interpreter truncates
        bits = v.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        v = bits.to(tl.float32, bitcast=True)
    return v


@triton.jit
def tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a linear tile id in grouped order (Triton tutorials 03 and 09): GROUP_M
    row blocks share each column block of B while it is in L2."""
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def launch_of(node: torch.fx.Node, kernel) -> bool:
    """Whether ``node`` (in an Inductor post-grad graph) is the functionalized launch of
    ``kernel``, a ``@triton.jit`` function of ours."""
    if node.target is not torch.ops.higher_order.triton_kernel_wrapper_functional:
        return False
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    launched = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
    while launched is not kernel and hasattr(launched, "fn"):
        launched = launched.fn        # launch options (num_warps) wrap it in an Autotuner
    return launched is kernel or launched is getattr(kernel, "fn", None)


def launchable(kernel, like: torch.Tensor):
    """``wrap_triton(kernel)`` for CUDA tensors, so Inductor can trace the launch into its
    generated code; the raw kernel otherwise (CPU tensors under ``TRITON_INTERPRET=1``)."""
    return wrap_triton(kernel) if like.is_cuda else kernel


# ---------------------------------------------------------------------------------------------
# Launches from Python at run time
# ---------------------------------------------------------------------------------------------
# Inductor launches the kernels it traces (triton_op bodies) from its own generated code. The
# kernels launched inside opaque ops (custom_op bodies: the fused loss, the Gluon GEMMs) go
# through Triton's JIT at every call: bind every argument, specialize it (alignment, value of
# ints, descriptor type), build the cache key, read the runtime knobs, and only then launch.
# ``fast_launch`` keeps the compiled kernel per key of everything Triton specializes on and
# launches it directly. Measured (RESULTS.md, session 18 call 3): 9 of a SwiGLU-backward GEMM
# call's 143 µs of host time, 190 of a fused-loss call's 3.5 ms — small beside the rest of
# those calls, but the full variant's step is host-bound on some machines.
FAST_LAUNCH = os.environ.get("CHRONICALS_FAST_LAUNCH", "1") != "0"
_COMPILED: dict = {}
_COMPILED_MAX = 1024      # distinct keys (shapes × dtypes × options) before the cache is cleared


class _Unkeyable(Exception):
    """An argument this cache can't key on: the call goes through Triton's JIT."""


def _arg_key(value):
    """What Triton's specialization can depend on, for one argument: a tensor's dtype and
    16-byte alignment (the pointer's only specialization), a descriptor's dtype, geometry, tile
    and layout, a scalar's exact value and type (ints: == 1, divisibility by 16, i32 or i64)."""
    if isinstance(value, torch.Tensor):
        return (value.dtype, value.data_ptr() % 16 == 0)
    if hasattr(value, "block_shape") and hasattr(value, "base"):      # host TMA descriptor
        return (type(value), value.base.dtype, tuple(value.shape), tuple(value.strides),
                tuple(value.block_shape), getattr(value, "layout", None),
                getattr(value, "padding", None))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return (type(value), value)
    raise _Unkeyable


class fast_launch:
    """``fast_launch(kernel)[grid](*args, **kwargs)``: ``kernel[grid](*args, **kwargs)`` with
    the JIT's per-call binding done once per specialization. The first call of a key goes
    through the JIT (compiling if need be) and keeps the compiled kernel it returns; later calls
    pass every parameter's value in order (constexprs and defaults too, as the JIT's launcher
    gets them) to the compiled kernel's own launcher. Anything else (an autotuned kernel, the
    interpreter, an argument that can't be keyed, ``CHRONICALS_FAST_LAUNCH=0``) takes the JIT.

    ``key``: the caller's own key, in place of one built from every argument (~0.4 µs an
    argument). The caller promises that it fixes everything Triton specializes on: each
    tensor's dtype and 16-byte alignment, each int's value class (1, a multiple of 16, other;
    32 or 64 bits), every constexpr and launch option, and each descriptor's dtype, block and
    layout (the shapes the caller's kernels take from their ints, say)."""

    def __init__(self, kernel, key=None):
        self.kernel = kernel
        self.key = key

    def __getitem__(self, grid: tuple):
        kernel = self.kernel
        if not FAST_LAUNCH or not isinstance(kernel, triton.runtime.JITFunction):
            return kernel[grid]

        def launch(*args, **kwargs):
            try:
                key = ((kernel, torch.cuda.current_device(), self.key) if self.key is not None
                       else (kernel, torch.cuda.current_device(), tuple(map(_arg_key, args)),
                             tuple((name, _arg_key(v)) for name, v in kwargs.items())))
            except _Unkeyable:
                return kernel[grid](*args, **kwargs)
            plan = _COMPILED.get(key)
            if plan is None:
                compiled = kernel[grid](*args, **kwargs)
                if len(_COMPILED) >= _COMPILED_MAX:
                    _COMPILED.clear()
                # the parameters after the positional arguments, with their defaults
                _COMPILED[key] = (compiled, [(p.name, p.default)
                                             for p in kernel.params[len(args):]])
                return compiled
            compiled, rest = plan
            values = [*args, *(kwargs[name] if name in kwargs else default
                               for name, default in rest)]
            compiled[tuple(grid) + (1,) * (3 - len(grid))](*values)
            return compiled

        return launch


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def program_count(device: torch.device, work_items: int, per_sm: int = 4) -> int:
    """Programs for a persistent grid: a few per SM, never more than there is work."""
    sms = multiprocessor_count(device.index or 0) if device.type == "cuda" else 4
    return max(1, min(work_items, sms * per_sm))


def autograd_graph_kept() -> bool:
    """Inside a backward: True under ``retain_graph``/``create_graph`` (or when torch can't say),
    where saved tensors may be read again and so must not be overwritten in place."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    try:
        return True if query is None else bool(query())
    except RuntimeError:
        return True
