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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._triton import ROUND_CODES, launchable, round_to

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
ACTIVATION_NAMES = {code: name for name, code in ACTIVATIONS.items()}

# Elements per program and warps: 2048 bf16 elements over 8 warps is 8 per thread, one 16-byte
# vector load per tensor; large enough that per-program overhead vanishes, small enough to keep
# thousands of programs in flight. Fixed (no autotuning): one configuration, one launch.
BLOCK = 2048
NUM_WARPS = 8

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
def swiglu_bwd_kernel(
    DY, G, U, DG, DU,             # dy (contiguous rows), gate, up; dg, du (contiguous outputs)
    n,                            # ROWS: columns per row; else: total elements
    stride_dy, stride_g, stride_u,
    ACT: tl.constexpr, ROUND: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    if ROWS:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        dy_off = row * stride_dy + cols
        g_off = row * stride_g + cols
        u_off = row * stride_u + cols
        out_off = row * n + cols
    else:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dy_off = offs
        g_off = offs
        u_off = offs
        out_off = offs
    dy = tl.load(DY + dy_off, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + u_off, mask=mask, other=0.0).to(tl.float32)
    a, d = _act_and_grad(g, ACT)
    da = round_to(dy * u, ROUND)
    dg = round_to(da * d, ROUND)
    du = round_to(dy * round_to(a, ROUND), ROUND)
    tl.store(DG + out_off, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + out_off, du.to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host launchers: plain tensors in, so tests call them on CPU tensors under TRITON_INTERPRET=1.
# ---------------------------------------------------------------------------------------------
def as_rows(t: Tensor) -> Tensor:
    """``t`` as [M, I] with unit column stride: a view when the leading dims collapse into one
    row stride (e.g. a chunk of a fused projection: rows 2I apart), else a contiguous copy."""
    cols = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    lead = [(size, stride) for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size != 1]
    collapsible = (t.stride(-1) == 1 or cols == 1) and all(
        outer[1] == inner[0] * inner[1] for outer, inner in zip(lead, lead[1:]))
    if collapsible and (not lead or lead[-1][1] >= cols):   # rows must not overlap
        return t.view(rows, cols)
    return t.contiguous().view(rows, cols)


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
                    activation: int) -> None:
    """(dg, du) of y = round(act(gate)) · up for [M, I] row views; ``dg``, ``du`` contiguous."""
    m, n = gate.shape
    if m * n == 0:
        return
    rows, grid = _layout(dy, gate, up)
    launchable(swiglu_bwd_kernel, gate)[grid](
        dy, gate, up, dg, du, n if rows else m * n, dy.stride(0), gate.stride(0), up.stride(0),
        ACT=activation, ROUND=ROUND_CODES[gate.dtype], ROWS=rows, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
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
@triton_op("chronicals::swiglu", mutates_args=())
def swiglu(gate: Tensor, up: Tensor, activation: int) -> Tensor:
    """act(gate) · up; ``activation`` is a code of :data:`ACTIVATIONS`."""
    if gate.device.type != "cuda":
        return swiglu_reference(gate, up, activation)
    g, u = as_rows(gate), as_rows(up)
    y = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    swiglu_forward(g, u, y, activation)
    return y.view(gate.shape)


@triton_op("chronicals::swiglu_backward", mutates_args=())
def swiglu_bwd(dy: Tensor, gate: Tensor, up: Tensor, activation: int) -> tuple[Tensor, Tensor]:
    """(d gate, d up), contiguous, of the shape of ``gate``."""
    if gate.device.type != "cuda":
        return swiglu_backward_reference(dy, gate, up, activation)
    g, u, d = as_rows(gate), as_rows(up), as_rows(dy)
    dg = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(g.shape, dtype=up.dtype, device=gate.device)
    swiglu_backward(d, g, u, dg, du, activation)
    return dg.view(gate.shape), du.view(gate.shape)


def _setup_context(ctx, inputs, output) -> None:
    gate, up, activation = inputs
    ctx.save_for_backward(gate, up)
    ctx.activation = activation


def _backward(ctx, dy: Tensor):
    gate, up = ctx.saved_tensors
    dg, du = torch.ops.chronicals.swiglu_backward(dy, gate, up, ctx.activation)
    return (dg if ctx.needs_input_grad[0] else None,
            du if ctx.needs_input_grad[1] else None, None)


swiglu.register_autograd(_backward, setup_context=_setup_context)
