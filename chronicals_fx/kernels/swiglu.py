"""Gated activations (SwiGLU, GeGLU) as one registered op with a fused backward.

Forward, elementwise over gate g and up u of the same shape (fp32 arithmetic; ``round_D``
rounds to nearest-even in the inputs' dtype D where eager's graph holds the value in D,
identity for fp32):

    a = round_D(act(g))                 # eager: act(g) is a tensor of dtype D
    y = a · u                           → stored in D (eager: the product is a tensor of D)

Backward, with the same rounding points as eager's ``mul`` and activation backward:

    da = round_D(dy · u)                # eager: grad of act(g) from mul's backward
    dg = da · act'(g)                   → stored in D
    du = dy · a                         → stored in D

The activations (``ACTIVATIONS``; codes are kernel constexprs):

    silu       act = g · σ(g)                          act' = σ(g) · (1 + g · (1 − σ(g)))
    gelu       act = g · Φ(g),  Φ(g) = ½(1 + erf(g/√2))  act' = Φ(g) + g · φ(g),  φ = e^(−g²/2)/√(2π)
    gelu_tanh  act = ½g(1 + t),  t = tanh(k₀(g + k₁g³))  act' = ½(1 + t) + ½g(1 − t²) k₀(1 + 3k₁g²)
               k₀ = √(2/π), k₁ = 0.044715; the kernel uses ½(1 + t) = σ(2k₀(g + k₁g³)), which
               avoids eager's cancellation in 1 + t for g ≲ −3 (values there are below 1e-2)

act(g) is recomputed in the backward from g (read there anyway), so the op saves only g and u.
Memory traffic, the whole point of the op (it does a handful of flops per byte):
forward reads g, u and writes y; backward reads dy, g, u and writes dg, du — 8 tensors of
g.numel() elements in all. References: Shazeer 2020 (GLU variants); Hendrycks & Gimpel 2016
(GELU and its tanh approximation); Triton tutorial 01 (vector add) for the 1-D launch.

Memory: with ``inplace_backward`` (set by the pass where g and u feed nothing but the op) the
backward writes dg and du over g and u, which nothing reads afterwards, so the op's extra
memory is y alone instead of y, dg and du (Liger does the same, unconditionally). Each element
of g and u is read before the same program overwrites it. When that is safe, and how it
survives AOTAutograd's functionalization, is in :func:`_may_overwrite` (eager) and
:class:`ReuseSavedInputs` (Inductor).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._library import opaque_op
from ._post_grad import ChainedPostGradPass
from ._triton import ROUND_CODES, autograd_graph_kept, launch_of, launchable, round_to

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}

# Elements per program and warps: 2048 elements over 4 warps is 16 per thread, two 16-byte bf16
# vector loads per tensor; large enough that per-program overhead vanishes, small enough to keep
# thousands of programs in flight. Fixed (no autotuning): one configuration, one launch.
# `python -m benchmarks.sweep_swiglu` (H200, 2026-11-27, bf16, CUDA-graph replays): the backward
# that also writes y (the default op's, six streams) 122 µs at N=8192 I=4864 and 681 µs at
# N=16384 I=14336 (97% of copy) with 4 warps, against 128 / 806 µs with 8 (Inductor's kernels for
# the same math: 118 / 758); the forward and the five-stream backward are within 1-3% either way.
BLOCK = 2048
NUM_WARPS = 4

_K0 = math.sqrt(2.0 / math.pi)
_K1 = 0.044715
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
# gelu_tanh is evaluated through ½(1 + tanh z) = σ(2z) and ½(1 − tanh² z) = 2σ(2z)(1 − σ(2z)):
# the same function without the cancellation 1 + tanh z suffers in the negative tail.
@triton.jit
def _act(g, ACT: tl.constexpr):
    """act(g) in fp32: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation)."""
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))           # g·Φ(g)
    else:
        z2 = 1.5957691216057308 * (g + 0.044715 * g * g * g)                # 2z = 2k₀(g + k₁g³)
        a = g / (1.0 + tl.exp(-z2))                                         # g·σ(2z)
    return a


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32, sharing the transcendental between the two."""
    if ACT == 0:
        s = 1.0 / (1.0 + tl.exp(-g))                                       # σ(g)
        a = g * s
        d = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))            # Φ(g)
        a = g * cdf
        d = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327           # Φ + g·φ
    else:
        g2 = g * g
        s = 1.0 / (1.0 + tl.exp(-1.5957691216057308 * (g + 0.044715 * g2 * g)))  # σ(2z)
        a = g * s
        d = s + 2.0 * g * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * g2)
    return a, d


@triton.jit
def swiglu_fwd_kernel(
    G, U, Y,                      # gate, up (inputs), y (output): same shape
    n,                            # ROWS: columns per row; else: total elements
    stride_g, stride_u,           # ROWS: row strides in elements (columns are contiguous)
    ACT: tl.constexpr,            # 0 silu, 1 gelu, 2 gelu_tanh
    ROUND: tl.constexpr,          # rounding code of the inputs' dtype (ROUND_CODES)
    ROWS: tl.constexpr,           # False: flat contiguous 1-D; True: grid (rows, column blocks)
    BLOCK: tl.constexpr,
):
    if ROWS:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g_off = row * stride_g + cols
        u_off = row * stride_u + cols
        y_off = row * n + cols     # y is contiguous
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # numel can pass 2³¹
        mask = offs < n
        g_off = offs
        u_off = offs
        y_off = offs
    g = tl.load(G + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + u_off, mask=mask, other=0.0).to(tl.float32)
    a = _act(g, ACT)
    y = round_to(round_to(a, ROUND) * u, ROUND)     # rounded to nearest-even before the store
    tl.store(Y + y_off, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_bwd_math(dy, g, u, ACT: tl.constexpr, ROUND: tl.constexpr):
    """(dg, du, y) in fp32 from dy, g, u (any float dtype; dy holds values of the inputs' dtype),
    each rounded as eager rounds it; y = act(g)·u is the forward's output again, bit for bit
    (the forward kernel's ``_act`` and roundings, so a dW computed from it is the dW of a saved
    y). Shared by the pass's kernel and the GEMM with this in its epilogue (swiglu_gemm)."""
    dy = dy.to(tl.float32)
    g = g.to(tl.float32)
    u = u.to(tl.float32)
    a, d = _act_and_grad(g, ACT)
    a = round_to(a, ROUND)
    da = round_to(dy * u, ROUND)
    dg = round_to(da * d, ROUND)
    du = round_to(dy * a, ROUND)
    y = round_to(round_to(_act(g, ACT), ROUND) * u, ROUND)
    return dg, du, y


@triton.jit
def swiglu_bwd_kernel(
    DY, G, U, DG, DU,             # dy, gate, up; dg, du: outputs, which may be G and U themselves
    Y,                            # STORE_Y: y = act(g)·u recomputed (may be DY itself), else unused
    n,                            # ROWS: columns per row; else: total elements
    stride_dy, stride_g, stride_u, stride_dg, stride_du, stride_y,
    ACT: tl.constexpr, ROUND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    STORE_Y: tl.constexpr,
):
    # In place (DG is G, DU is U, Y is DY): every element is loaded before this program stores
    # it, and no other program touches it, so no element is read after it was overwritten.
    if ROWS:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        dy_off = row * stride_dy + cols
        g_off = row * stride_g + cols
        u_off = row * stride_u + cols
        dg_off = row * stride_dg + cols
        du_off = row * stride_du + cols
        y_off = row * stride_y + cols
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy_off = offs
        g_off = offs
        u_off = offs
        dg_off = offs
        du_off = offs
        y_off = offs
    dy = tl.load(DY + dy_off, mask=mask, other=0.0)
    g = tl.load(G + g_off, mask=mask, other=0.0)
    u = tl.load(U + u_off, mask=mask, other=0.0)
    dg, du, y = swiglu_bwd_math(dy, g, u, ACT, ROUND)
    tl.store(DG + dg_off, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + du_off, du.to(DU.dtype.element_ty), mask=mask)
    if STORE_Y:  # (unstored, y's computation is dropped by the compiler)
        tl.store(Y + y_off, y.to(Y.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host launchers: plain tensors in, so tests call them on CPU tensors under TRITON_INTERPRET=1.
# ---------------------------------------------------------------------------------------------
def row_view(t: Tensor) -> Tensor | None:
    """``t`` viewed as [M, I] with unit column stride, or None where its leading dims don't
    collapse into one row stride (e.g. a chunk of a fused projection does: rows 2I apart)."""
    if t.is_contiguous():                 # the common case, without the walk over the strides
        return t.view(math.prod(t.shape[:-1]), t.shape[-1])
    cols = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    lead = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    collapsible = (t.stride(-1) == 1 or cols == 1) and all(
        outer[1] == inner[0] * inner[1] for outer, inner in zip(lead, lead[1:]))
    if collapsible and (not lead or lead[-1][1] >= cols):   # rows must not overlap
        return t.view(rows, cols)
    return None


def as_rows(t: Tensor) -> Tensor:
    """``t`` as [M, I] with unit column stride: a view where :func:`row_view` finds one, else a
    contiguous copy."""
    rows = row_view(t)
    return rows if rows is not None else t.contiguous().view(math.prod(t.shape[:-1]), t.shape[-1])


def _layout(*rows: Tensor) -> tuple[bool, tuple]:
    """(ROWS flag, grid) for [M, I] row views: flat 1-D when every one is contiguous."""
    m, n = rows[0].shape
    if all(r.stride(0) == n or m == 1 for r in rows):
        return False, (triton.cdiv(m * n, BLOCK),)
    return True, (m, triton.cdiv(n, BLOCK))


def swiglu_forward(gate: Tensor, up: Tensor, y: Tensor, activation: int) -> None:
    """y = round(act(gate)) · up for [M, I] row views (unit column stride, any row stride);
    ``y`` is contiguous."""
    m, n = gate.shape
    if m * n == 0:
        return
    rows, grid = _layout(gate, up)
    launchable(swiglu_fwd_kernel, gate)[grid](
        gate, up, y, n if rows else m * n, gate.stride(0), up.stride(0),
        ACT=activation, ROUND=ROUND_CODES[gate.dtype], ROWS=rows, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )


def swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor, dg: Tensor, du: Tensor,
                    activation: int, y: Tensor | None = None) -> None:
    """(dg, du) of y = round(act(gate)) · up for [M, I] row views (any row strides); ``dg`` and
    ``du`` may be ``gate`` and ``up`` themselves (the in-place backward). With ``y``, the same
    pass also writes the forward's output y into it (``y`` may be ``dy`` itself)."""
    m, n = gate.shape
    if m * n == 0:
        return
    rows, grid = _layout(dy, gate, up, dg, du, *([y] if y is not None else []))
    launchable(swiglu_bwd_kernel, gate)[grid](
        dy, gate, up, dg, du, dy if y is None else y, n if rows else m * n,
        dy.stride(0), gate.stride(0), up.stride(0), dg.stride(0), du.stride(0),
        dy.stride(0) if y is None else y.stride(0),
        ACT=activation, ROUND=ROUND_CODES[gate.dtype], ROWS=rows, BLOCK=BLOCK,
        STORE_Y=y is not None, num_warps=NUM_WARPS,
    )


# ---------------------------------------------------------------------------------------------
# Plain-torch reference: the test oracle (in float64) and the op's implementation off CUDA.
# ---------------------------------------------------------------------------------------------
def activation_reference(g: Tensor, activation: int) -> Tensor:
    if activation == ACTIVATIONS["silu"]:
        return F.silu(g)
    if activation == ACTIVATIONS["gelu"]:
        return F.gelu(g)
    if activation == ACTIVATIONS["gelu_tanh"]:
        return F.gelu(g, approximate="tanh")
    raise ValueError(f"unknown activation code {activation}")


def activation_grad_reference(g: Tensor, activation: int) -> Tensor:
    """act'(g), written out (the formulas of the module docstring)."""
    if activation == ACTIVATIONS["silu"]:
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if activation == ACTIVATIONS["gelu"]:
        return 0.5 * (1 + torch.erf(g * _INV_SQRT2)) + g * torch.exp(-0.5 * g * g) * _INV_SQRT_2PI
    if activation == ACTIVATIONS["gelu_tanh"]:
        t = torch.tanh(_K0 * (g + _K1 * g.pow(3)))
        return 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * _K0 * (1 + 3 * _K1 * g * g)
    raise ValueError(f"unknown activation code {activation}")


def _round_to(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).to(t.dtype) if dtype != t.dtype and t.dtype.itemsize > dtype.itemsize else t


def swiglu_reference(gate: Tensor, up: Tensor, activation: int) -> Tensor:
    acc = torch.promote_types(gate.dtype, torch.float32)
    a = _round_to(activation_reference(gate.to(acc), activation), gate.dtype)
    return (a * up.to(acc)).to(gate.dtype)


def swiglu_backward_reference(dy: Tensor, gate: Tensor, up: Tensor,
                              activation: int) -> tuple[Tensor, Tensor]:
    acc = torch.promote_types(gate.dtype, torch.float32)
    g, u, dyf = gate.to(acc), up.to(acc), dy.to(acc)
    a = _round_to(activation_reference(g, activation), gate.dtype)
    da = _round_to(dyf * u, gate.dtype)
    dg = da * activation_grad_reference(g, activation)
    du = dyf * a
    return dg.to(gate.dtype), du.to(up.dtype)


# ---------------------------------------------------------------------------------------------
# The registered ops (triton_op: Inductor emits the launch in its own generated code).
# ---------------------------------------------------------------------------------------------
def _launches_kernels(t: Tensor) -> bool:
    """CUDA tensors go to the Triton kernels, others to the plain-torch reference (a function,
    so that a CPU test can trace the CUDA path's graph without launching anything)."""
    return t.device.type == "cuda"


def _swiglu_value(gate: Tensor, up: Tensor, activation: int) -> Tensor:
    """act(gate) · up: the kernel on CUDA, the reference elsewhere."""
    if not _launches_kernels(gate):
        return swiglu_reference(gate, up, activation)
    g, u = as_rows(gate), as_rows(up)
    y = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    swiglu_forward(g, u, y, activation)
    return y.view(gate.shape)


@triton_op("chronicals::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor, activation: int, inplace_backward: bool = False) -> Tensor:
    """act(gate) · up; ``activation`` is a code of :data:`ACTIVATIONS`.

    ``inplace_backward``: the caller promises that nothing reads ``gate`` or ``up``, nor any
    tensor sharing their storage, after this op's backward; the backward may then write
    d gate and d up over them (they are returned as the gradients). Eager, it does so unless
    :func:`_may_overwrite` finds a reason not to; compiled, Inductor's backward does so where
    :class:`ReuseSavedInputs` proves it safe, and writes fresh buffers otherwise."""
    return _swiglu_value(gate, up, activation)


@triton_op("chronicals::swiglu_backward", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor, activation: int) -> tuple[Tensor, Tensor]:
    """(d gate, d up), contiguous, of the shape of ``gate``."""
    if not _launches_kernels(gate):
        return swiglu_backward_reference(dy, gate, up, activation)
    return _backward_into_new(dy, gate, up, activation, with_y=False)


def _backward_into_new(dy: Tensor, gate: Tensor, up: Tensor, activation: int, with_y: bool
                       ) -> tuple[Tensor, ...]:
    """The backward kernel into new contiguous buffers of gate's shape: (d gate, d up), and
    act(gate)·up again ``with_y``."""
    g, u, d = as_rows(gate), as_rows(up), as_rows(dy)
    out = [torch.empty(g.shape, dtype=t.dtype, device=gate.device)
           for t in (gate, up, gate)[:3 if with_y else 2]]
    swiglu_backward(d, g, u, *out[:2], activation, *out[2:])
    return tuple(t.view(gate.shape) for t in out)


@triton_op("chronicals::swiglu_backward_", mutates_args=("gate", "up"))
def swiglu_bwd_inplace(dy: Tensor, gate: Tensor, up: Tensor, activation: int) -> None:
    """Overwrite ``gate`` with d gate and ``up`` with d up (same layouts as before).

    Under AOTAutograd this is traced as a functional kernel call whose outputs are clones of
    gate and up; :class:`ReuseSavedInputs` removes the clones in Inductor's backward."""
    if not _launches_kernels(gate):
        # An opaque mutating op, not the plain-torch reference inlined: compiled on CPU, the
        # backward graph then holds a functionalized write into g and u like the CUDA kernel's,
        # which is what the CPU tests of ReuseSavedInputs need to see.
        torch.ops.chronicals.swiglu_backward_reference_(dy, gate, up, activation)
        return
    g, u, d = row_view(gate), row_view(up), as_rows(dy)
    if g is None or u is None:
        # No [M, I] view of the storage (e.g. column-major): compute in [M, I] copies, copy back.
        g, u = as_rows(gate).clone(), as_rows(up).clone()
        swiglu_backward(d, g, u, g, u, activation)
        gate.copy_(g.view(gate.shape))
        up.copy_(u.view(up.shape))
        return
    swiglu_backward(d, g, u, g, u, activation)


@torch.library.custom_op("chronicals::swiglu_backward_reference_", mutates_args=("gate", "up"))
def _swiglu_backward_reference_(dy: Tensor, gate: Tensor, up: Tensor, activation: int) -> None:
    dg, du = swiglu_backward_reference(dy, gate, up, activation)
    gate.copy_(dg)
    up.copy_(du)


@_swiglu_backward_reference_.register_fake
def _(dy: Tensor, gate: Tensor, up: Tensor, activation: int) -> None:
    return None


def _setup_context(ctx, inputs, output) -> None:
    gate, up, activation, inplace_backward = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation
    ctx.inplace_backward = inplace_backward


def _backward(ctx, dy: Tensor):
    gate, up = ctx.saved_tensors
    if ctx.inplace_backward and _may_overwrite(dy, gate, up):
        torch.ops.chronicals.swiglu_backward_(dy, gate, up, ctx.activation)
        dg, du = gate, up
    else:
        dg, du = torch.ops.chronicals.swiglu_backward(dy, gate, up, ctx.activation)
    return (dg if ctx.needs_input_grad[0] else None,
            du if ctx.needs_input_grad[1] else None, None, None)


swiglu.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# SwiGLU with the down projection taken in (Config.swiglu_save_hidden=False)
# ---------------------------------------------------------------------------------------------
# The down projection linear(h, W_down) of h = act(g)·u needs h for its dW. Kept as a value of
# the graph, h is saved for backward beside g and u (Inductor's partition does the same for its
# own fused kernel): three [N, I] tensors a layer at the peak of memory. Inside one op, the
# backward has h written again by the SwiGLU backward pass, which reads g and u anyway (one
# more write of [N, I]), so only g and u (and W_down) are saved:
#
#     forward    h = act(g)·u;  y = h W_downᵀ + b                 saved: g, u, W_down
#     backward   dh = dy W_down;  (dg, du, h) = one pass over dh, g, u
#                dW_down = dyᵀ h;  db = Σ_rows dy
#
# On Hopper (``fused_gemm``, the default) dh = dy W_down and the pass are one kernel
# (kernels/swiglu_gemm.py, Gluon): dh never reaches memory, and the step is shorter
# (1.06x at Qwen2.5-0.5B's shape, session 10). Elsewhere, or where that kernel can't run, cuBLAS
# and the pass.
@triton_op("chronicals::swiglu_linear", mutates_args=())
def swiglu_linear(gate: Tensor, up: Tensor, weight: Tensor, bias: Tensor | None,
                  activation: int, fused_gemm: bool = True) -> Tensor:
    """linear(act(gate) · up, weight, bias), saving only gate, up and weight for backward;
    ``fused_gemm``: the backward's dh GEMM and SwiGLU backward as one kernel where it can."""
    return F.linear(_swiglu_value(gate, up, activation), weight, bias)


def fused_gemm_unusable(dy: Tensor, weight: Tensor, gate: Tensor) -> str | None:
    """Why swiglu_linear's backward can't use the fused GEMM here (None: it can)."""
    if gate.device.type != "cuda":
        return "CUDA only"
    try:
        from . import swiglu_gemm
    except Exception as e:  # noqa: BLE001 (a Triton without Gluon's Hopper API)
        return f"triton.experimental.gluon unavailable: {type(e).__name__}: {e}"
    return swiglu_gemm.unusable(dy, weight, gate)


def _swiglu_linear_backward_gemm_fake(dy: Tensor, weight: Tensor, gate: Tensor, up: Tensor,
                                      activation: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(gate, memory_format=torch.contiguous_format) for _ in range(3))


# registered on the dispatcher directly (kernels/_library.py): 24 calls a step
@opaque_op("swiglu_linear_backward_gemm", _swiglu_linear_backward_gemm_fake)
def swiglu_linear_backward_gemm(dy: Tensor, weight: Tensor, gate: Tensor, up: Tensor,
                                activation: int) -> tuple[Tensor, Tensor, Tensor]:
    """(d gate, d up, act(gate)·up) of ``linear(act(gate)·up, weight)`` from its output's
    gradient ``dy``, by the fused GEMM; cuBLAS and the pass where that kernel declines at run
    time (alignment, a failed compile). Opaque to Inductor (a Gluon kernel)."""
    from . import swiglu_gemm
    out = swiglu_gemm.swiglu_linear_backward(dy, weight, gate, up, activation)
    if out is None:
        return _backward_into_new(dy @ weight, gate, up, activation, with_y=True)
    return out


@triton_op("chronicals::swiglu_backward_recompute", mutates_args=())
def swiglu_bwd_recompute(dy: Tensor, gate: Tensor, up: Tensor, activation: int
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """(d gate, d up, act(gate)·up), contiguous, of the shape of ``gate``: the backward and the
    forward's output again, in one pass."""
    if not _launches_kernels(gate):
        # Opaque, as the kernel call is on CUDA: traced inline, its recomputation of act(g)
        # would be merged with the forward's and saved instead of recomputed.
        return torch.ops.chronicals.swiglu_backward_recompute_reference(dy, gate, up, activation)
    return _backward_into_new(dy, gate, up, activation, with_y=True)


@torch.library.custom_op("chronicals::swiglu_backward_recompute_reference", mutates_args=())
def _swiglu_bwd_recompute_reference(dy: Tensor, gate: Tensor, up: Tensor, activation: int
                                    ) -> tuple[Tensor, Tensor, Tensor]:
    dg, du = swiglu_backward_reference(dy, gate, up, activation)
    return dg, du, swiglu_reference(gate, up, activation)


@_swiglu_bwd_recompute_reference.register_fake
def _(dy: Tensor, gate: Tensor, up: Tensor, activation: int) -> tuple[Tensor, Tensor, Tensor]:
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format),
            torch.empty_like(gate, memory_format=torch.contiguous_format))


def _setup_context_linear(ctx, inputs, output) -> None:
    gate, up, weight, _bias, activation, *fused_gemm = inputs
    ctx.save_for_backward(gate, up, weight)
    ctx.activation = activation
    ctx.fused_gemm = fused_gemm[0] if fused_gemm else True


def _backward_linear(ctx, dy: Tensor):
    gate, up, weight = ctx.saved_tensors
    need_gate, need_up, need_weight, need_bias = ctx.needs_input_grad[:4]
    rows = dy.reshape(-1, dy.shape[-1])                       # [N, O]
    d_weight = d_bias = None
    if need_weight:
        if ctx.fused_gemm and fused_gemm_unusable(dy, weight, gate) is None:
            dg, du, h = torch.ops.chronicals.swiglu_linear_backward_gemm(dy, weight, gate, up,
                                                                         ctx.activation)
        else:
            dg, du, h = torch.ops.chronicals.swiglu_backward_recompute(dy @ weight, gate, up,
                                                                       ctx.activation)
        d_weight = rows.t() @ h.reshape(-1, h.shape[-1])     # [O, I]
    else:
        dg, du = torch.ops.chronicals.swiglu_backward(dy @ weight, gate, up, ctx.activation)
    if need_bias:
        d_bias = rows.sum(0)
    return (dg if need_gate else None, du if need_up else None, d_weight, d_bias, None, None)


swiglu_linear.register_autograd(_backward_linear, setup_context=_setup_context_linear)


# ---------------------------------------------------------------------------------------------
# When the backward may overwrite g and u
# ---------------------------------------------------------------------------------------------
def _tracing(*tensors: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return torch.compiler.is_compiling() or any(
        isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def _may_overwrite(dy: Tensor, gate: Tensor, up: Tensor) -> bool:
    """Eager: whether the backward may write over the saved ``gate`` and ``up``, given the
    caller's promise (``inplace_backward``) that nothing else reads them afterwards.

    Traced (AOTAutograd), always: the write is functionalized, and whether Inductor's backward
    really writes in place is decided per graph by :class:`ReuseSavedInputs`, which checks the
    same things on the graph. Eager, refused when
    - the autograd graph is kept (``retain_graph``/``create_graph``): a second backward would
      read the overwritten g and u;
    - g or u is a leaf or a view of one: the caller's own tensor, never ours to overwrite;
    - g and u overlap, or dy shares storage with either: the kernel would read elements it had
      already overwritten.
    Other autograd nodes that saved g or u would fail loudly on their next unpack (the write
    bumps the version counter), not read wrong values.
    """
    if _tracing(dy, gate, up):
        return True
    if autograd_graph_kept():
        return False
    for t in (gate, up):
        if t.is_leaf or (t._base is not None and t._base.is_leaf):
            return False
    if _same_storage(gate, up) and not disjoint(gate, up):
        return False
    return not (_same_storage(dy, gate) or _same_storage(dy, up))


def _same_storage(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def _static(*values) -> bool:
    return all(isinstance(v, int) for v in values)


def disjoint(a: Tensor, b: Tensor) -> bool:
    """True if views ``a`` and ``b`` of one storage provably share no element (False when
    unsure: symbolic sizes, layouts other than the ones below).

    Proven: element ranges that don't meet, or the same row layout (equal sizes and strides,
    unit column stride, every outer stride a multiple of the row stride r) with column windows
    [off mod r, off mod r + I) that don't meet inside a row — two pieces of one fused
    projection cut on the last dim.
    """
    def span(t: Tensor) -> tuple[int, int]:
        hi = t.storage_offset() + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        return t.storage_offset(), hi

    dims = (*a.shape, *a.stride(), *b.shape, *b.stride(), a.storage_offset(), b.storage_offset())
    if not _static(*dims):
        return False
    if a.numel() == 0 or b.numel() == 0:
        return True
    (lo_a, hi_a), (lo_b, hi_b) = span(a), span(b)
    if hi_a < lo_b or hi_b < lo_a:
        return True
    if a.dim() == 0 or a.shape != b.shape or a.stride() != b.stride() or a.stride(-1) != 1:
        return False
    outer = [stride for size, stride in zip(a.shape[:-1], a.stride()[:-1]) if size > 1]
    if not outer:
        return False
    r, n = min(outer), a.shape[-1]
    if r <= 0 or any(stride % r for stride in outer):
        return False
    col_a, col_b = a.storage_offset() % r, b.storage_offset() % r
    return col_a + n <= r and col_b + n <= r and (col_a + n <= col_b or col_b + n <= col_a)


# ---------------------------------------------------------------------------------------------
# Inductor: the in-place write, kept in place in the compiled backward
# ---------------------------------------------------------------------------------------------
# Why a pass is needed. AOTAutograd functionalizes ``swiglu_backward_``: the backward graph holds
# a functional kernel call whose outputs are declared clones of g and u. In the compiled
# backward, g and u are graph inputs (saved activations), and Inductor's reinplacing
# (fx_passes/reinplace.py, torch 2.11 as 2.13) never lets a kernel write into a graph input
# that the program does not itself mutate, so the clones stay: two extra copies and buffers.
#
# Why writing into them is sound anyway. AOTAutograd marks "donated buffers"
# (``fw_metadata.bw_donated_idxs``): saved tensors sharing storage with no forward input, no
# forward output and no backward output, which the compiled backward owns (it steals them from
# ctx) and which Inductor itself already reuses in place after their last read. A backward that
# keeps its graph (retain_graph/create_graph) is compiled without donated buffers, or refused
# with a clear error by AOTAutograd if it was compiled with them. So a saved g or u may be
# overwritten when its storage is donated (or is an intermediate of the backward, as under
# activation checkpointing), nothing reads that storage after the kernel, and no other tensor
# the kernel reads overlaps what it writes. That is what ReuseSavedInputs checks before it
# drops the clones; where it can't prove it, it gives the kernel fresh output buffers instead
# (the out-of-place backward, no copy of g and u; only under symbolic shapes, where it builds no
# buffers, do Inductor's clones stay).
def _storage(node) -> int | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if not isinstance(val, Tensor) or not torch._C._has_storage(val):
        return None
    return val.untyped_storage()._cdata


def _is_tangent(node: torch.fx.Node) -> bool:
    desc = node.meta.get("desc")
    return node.name.startswith("tangents") or type(desc).__name__ == "TangentAOTInput"


class _Graph:
    """Who shares storage with whom, and where nodes sit, in one backward graph."""

    def __init__(self, graph: torch.fx.Graph, donated_idxs) -> None:
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.backward = any(_is_tangent(p) for p in placeholders)
        donated = {placeholders[i] for i in (donated_idxs or ()) if 0 <= i < len(placeholders)}
        self.inputs: dict[int, torch.fx.Node] = {}
        self.donated: set[int] = set()
        self.by_storage: dict[int, list[torch.fx.Node]] = {}
        for n in graph.nodes:
            key = _storage(n)
            if key is None:
                continue
            self.by_storage.setdefault(key, []).append(n)
            if n.op in ("placeholder", "get_attr"):
                self.inputs[key] = n
                if n in donated:
                    self.donated.add(key)

    def may_overwrite(self, node: torch.fx.Node, written: list[torch.fx.Node],
                      read: list[torch.fx.Node]) -> bool:
        """Whether ``node`` may write ``written`` in place, reading ``read`` (which may list the
        written tensors themselves: read before written, element by element)."""
        vals = {id(t): t.meta.get("val") for t in (*written, *read)}
        if not all(isinstance(v, Tensor) for v in vals.values() if v is not None) or any(
                vals[id(w)] is None for w in written):
            return False
        for w in written:
            key = _storage(w)
            if key is None:
                return False
            if key in self.inputs and key not in self.donated:
                return False         # a graph input that isn't ours: the caller still has it
            if self._used_after(key, node):
                return False
            for other in (*written, *read):
                if other is w or _storage(other) != key:
                    continue
                if vals[id(other)] is None:
                    return False
                same = _same_view(vals[id(other)], vals[id(w)])
                if same and other in written:
                    return False     # written twice
                if not same and not disjoint(vals[id(other)], vals[id(w)]):
                    return False
        return True

    def _used_after(self, key: int, node: torch.fx.Node) -> bool:
        at = self.order[node]
        for view in self.by_storage.get(key, ()):
            for user in view.users:
                if self.order[user] > at and not _meta_only(user):
                    return True
        return False


def _meta_only(node: torch.fx.Node) -> bool:
    aten = torch.ops.aten
    return node.target in (aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
                           aten.sym_storage_offset.default)


def _same_view(a: Tensor, b: Tensor) -> bool:
    return (a.shape == b.shape and a.stride() == b.stride()
            and a.storage_offset() == b.storage_offset())


class ReuseSavedInputs(ChainedPostGradPass):
    """Inductor post-grad pass (``post_grad_custom_post_pass``): in backward graphs, the
    functionalized ``swiglu_backward_`` writes d gate, d up into the saved g, u where that is
    sound (see the comment above), else into fresh buffers; other graphs are left alone.

    It runs before Inductor's own reinplacing, which it leaves to decide every other clone."""

    def run(self, graph: torch.fx.Graph) -> None:
        from torch._inductor.utils import get_donated_idxs

        ours = [n for n in graph.nodes if _kernel_call(n) or _reference_call(n)]
        if ours:
            g = _Graph(graph, get_donated_idxs())
            if g.backward:
                in_place = not _reorders_before_reinplacing()
                for node in ours:
                    if _kernel_call(node):
                        _reuse_in_kernel_call(graph, g, node, in_place)
                    elif in_place:
                        _reuse_in_reference_call(graph, g, node)
                graph.lint()

    def cache_key(self) -> tuple:
        from torch._inductor.utils import get_donated_idxs

        # The decisions depend on the donated buffers, which Inductor's FX-graph cache key does
        # not include: a backward compiled without them (retain_graph) must not hit an entry
        # compiled with them.
        return (tuple(get_donated_idxs() or ()),)


def _kernel_call(node: torch.fx.Node) -> bool:
    """The functionalized launch of :func:`swiglu_bwd_inplace`'s kernel (outputs DG, DU are
    G, U)."""
    if not launch_of(node, swiglu_bwd_kernel):
        return False
    args = node.kwargs["kwargs"]
    return args["DG"] is args["G"] and args["DU"] is args["U"]


def _reference_call(node: torch.fx.Node) -> bool:
    return (node.target is torch.ops.higher_order.auto_functionalized_v2
            and node.args[0] is torch.ops.chronicals.swiglu_backward_reference_.default)


def _reorders_before_reinplacing() -> bool:
    """Whether a post-grad pass that runs between this one and Inductor's reinplacing may move
    nodes by their data edges alone. Writing in place here, as reinplacing does later, leaves
    the readers of the written g, u without an edge to the kernel; Inductor keeps such passes
    before reinplacing for that reason, so this one stays functional when one is configured."""
    from torch._inductor import config
    from torch._inductor.codegen.common import custom_backend_passes

    distributed = getattr(config, "aten_distributed_optimizations", None)
    return (any(getattr(config, f"bucket_{c}_fx", "none") != "none"
                for c in ("all_gathers", "reduce_scatters", "all_reduces"))
            or bool(getattr(distributed, "enable_overlap_scheduling", False))
            or any(p is not None for p in custom_backend_passes.values()))


def _reuse_in_kernel_call(graph: torch.fx.Graph, g: _Graph, node: torch.fx.Node,
                          in_place: bool) -> None:
    """Drop DG, DU from the call's clones (the kernel then writes G, U) and read the results
    from G, U; or, where that is not proven (or ``in_place`` is off), point DG, DU at fresh
    buffers of their layout, which Inductor's reinplacing then writes without a clone."""
    args = dict(node.kwargs["kwargs"])
    if not {"DG", "DU"} <= set(node.kwargs["tensors_to_clone"]):
        return
    written = [args["DG"], args["DU"]]
    read = [v for k, v in args.items() if isinstance(v, torch.fx.Node) and k not in ("DG", "DU")]
    if in_place and g.may_overwrite(node, written, read):
        # The results are read from what the kernel wrote, as Inductor's reinplacing does.
        for user in list(node.users):
            if user.target is operator.getitem and user.args[1] in ("DG", "DU"):
                user.replace_all_uses_with(args[user.args[1]])
                graph.erase_node(user)
        _set_clones(node, [k for k in node.kwargs["tensors_to_clone"] if k not in ("DG", "DU")])
        return
    fresh = _fresh_buffers(graph, node, written)
    if fresh is None:
        return                  # symbolic shapes: Inductor's clones of G, U stay
    from torch.fx.immutable_collections import immutable_dict

    args["DG"], args["DU"] = fresh
    node.kwargs = immutable_dict({**node.kwargs, "kwargs": immutable_dict(args)})
    if "eager_input_vals" in node.meta:
        vals, kwvals = node.meta["eager_input_vals"]
        # immutable_dict as the node's own kwargs: torch 2.11's pattern matcher maps the node's
        # kwargs and these together (pytree) and refuses a dict against an immutable_dict
        inner = immutable_dict({**kwvals["kwargs"], "DG": fresh[0].meta["val"],
                                "DU": fresh[1].meta["val"]})
        node.meta["eager_input_vals"] = (vals, immutable_dict({**kwvals, "kwargs": inner}))


def _set_clones(node: torch.fx.Node, clones: list[str]) -> None:
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    node.kwargs = immutable_dict({**node.kwargs, "tensors_to_clone": immutable_list(clones)})
    if "eager_input_vals" in node.meta:       # Inductor reads the call's arguments from here too
        args, kwargs = node.meta["eager_input_vals"]
        node.meta["eager_input_vals"] = (
            args, immutable_dict({**kwargs, "tensors_to_clone": immutable_list(clones)}))


def _fresh_buffers(graph: torch.fx.Graph, node: torch.fx.Node,
                   views: list[torch.fx.Node]) -> list[torch.fx.Node] | None:
    """A new buffer for each of ``views`` with its sizes and strides (the kernel's stride
    arguments were fixed at tracing), or None under symbolic shapes. One buffer each, even for
    views of one storage: Inductor's reinplacing writes at most one tensor per storage in place
    and would clone the other."""
    from torch._guards import detect_fake_mode

    vals = [v.meta["val"] for v in views]
    if not all(_static(*t.shape, *t.stride()) for t in vals):
        return None
    mode = detect_fake_mode(vals)
    aten = torch.ops.aten
    out = []
    with graph.inserting_before(node):
        for t in vals:
            numel = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
            buf = graph.call_function(aten.empty.memory_format, ([numel],),
                                      {"dtype": t.dtype, "device": t.device})
            args = (buf, list(t.shape), list(t.stride()), 0)
            view = graph.call_function(aten.as_strided.default, args)
            with mode:
                buf.meta["val"] = torch.empty(numel, dtype=t.dtype, device=t.device)
                view.meta["val"] = torch.as_strided(buf.meta["val"], *args[1:])
            out.append(view)
    return out


def _reuse_in_reference_call(graph: torch.fx.Graph, g: _Graph, node: torch.fx.Node) -> None:
    """CPU twin of :func:`_reuse_in_kernel_call` for the reference op's auto_functionalized_v2
    call: where proven, decompose it here with no clones (Inductor's reinplacing, which runs
    later, would recompute its clones for every base and clone graph inputs). Otherwise left to
    Inductor (clones: fine for a reference)."""
    from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2_dense
    from torch._inductor.pattern_matcher import (CallFunctionVarArgs, PatternMatcherPass,
                                                 register_graph_pattern)
    from torch.utils import _pytree as pytree

    bases = list(node.kwargs["_all_bases"])
    read = [node.kwargs["dy"]]
    if not bases or not g.may_overwrite(node, bases, read):
        return
    matcher = PatternMatcherPass()

    @register_graph_pattern(CallFunctionVarArgs(torch.ops.higher_order.auto_functionalized_v2),
                            extra_check=lambda match: match.nodes[0] is node, pass_dict=matcher)
    def _(match, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))

        def decompose(*flat):
            args, kwargs = pytree.tree_unflatten(flat, spec)
            return auto_functionalized_v2_dense(args[0], (), **kwargs)

        match.replace_by_example(decompose, flat, run_functional_passes=False)

    matcher.apply(graph)
