"""The SwiGLU elementwise work folded into the down projection's GEMMs (bf16 / fp16).

Around ``y = h W_downᵀ`` with ``h = act(g)·u`` (g, u, h: [M, I]; W_down: [O, I]; dy: [M, O]),
the unfused backward is a cuBLAS GEMM that writes dh = dy W_down to memory and a Triton pass
that reads it back with g and u:

    unfused   dh = dy @ W_down              cuBLAS, writes dh                  [M, I] x1
              (dg, du, h) = pass(dh, g, u)  reads dh, g, u; writes dg, du, h   [M, I] x6
    fused     one Triton GEMM over dy, W_down whose epilogue, per [BLOCK_M, BLOCK_N] tile of
              dh still in registers, reads that tile of g and u and writes dg, du, h
                                                                               [M, I] x5

so dh never reaches memory: two [M, I] streams fewer (2·M·I·2 bytes; at M=8192 I=4864, 160 MB a
layer). The math and rounding points are the SwiGLU backward's (kernels/swiglu.py), with dh
rounded to the inputs' dtype first, as cuBLAS's bf16 output is; only the order of the fp32
accumulation inside the GEMM differs from cuBLAS's.

The kernel is tutorial 03's matmul (Triton docs: grouped program order, fp32 accumulator) with
the SwiGLU backward as epilogue, done in column pieces of the tile (``SPLIT``, as the persistent
matmul tutorial's epilogue subtiling) so that g, u and the three results fit in registers beside
the accumulator.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._triton import ROUND_CODES, launchable, round_to
from .swiglu import (_act, _act_and_grad, as_rows, swiglu_backward_reference,
                     swiglu_reference)

# Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT): set from benchmarks/sweep_swiglu_gemm.py.
CONFIG = (128, 128, 64, 8, 3, 2)
GROUP_M = 8
FUSED_DTYPES = (torch.bfloat16, torch.float16)


def _config() -> tuple:
    """CONFIG, or $CHRONICALS_SWIGLU_GEMM_CONFIG ("BM,BN,BK,warps,stages,split"; for sweeps)."""
    forced = os.environ.get("CHRONICALS_SWIGLU_GEMM_CONFIG", "").strip()
    return tuple(int(v) for v in forced.split(",")) if forced else CONFIG


def enabled() -> bool:
    """The fused backward is on unless $CHRONICALS_SWIGLU_GEMM is 0 (read per call: for A/B runs)."""
    return os.environ.get("CHRONICALS_SWIGLU_GEMM", "1").strip() != "0"


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _epilogue(dh, rows, cols, M, N, G, U, DG, DU, Y, stride_g, stride_u, stride_dg, stride_du,
              stride_y, ACT: tl.constexpr, ROUND: tl.constexpr, STORE_Y: tl.constexpr):
    """The SwiGLU backward of one [BLOCK_M, n] piece of the dh tile (fp32 in registers)."""
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    u = u.to(tl.float32)
    dh = round_to(dh, ROUND)                      # cuBLAS's output dtype
    a, d = _act_and_grad(g, ACT)
    a = round_to(a, ROUND)
    da = round_to(dh * u, ROUND)
    dg = round_to(da * d, ROUND)
    du = round_to(dh * a, ROUND)
    tl.store(DG + rows[:, None] * stride_dg + cols[None, :], dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows[:, None] * stride_du + cols[None, :], du.to(DU.dtype.element_ty), mask=mask)
    if STORE_Y:
        # bit for bit the forward kernel's y (its _act and roundings)
        y = round_to(round_to(_act(g, ACT), ROUND) * u, ROUND)
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty),
                 mask=mask)


@triton.jit
def down_proj_swiglu_bwd_kernel(
    DY, W,                        # dy [M, K] (unit column stride), W_down [K, N] (unit col stride)
    G, U,                         # gate, up [M, N] (unit column stride)
    DG, DU, Y,                    # outputs [M, N]: d gate, d up, act(g)·u (STORE_Y)
    M, N, K,
    stride_dy, stride_w, stride_g, stride_u, stride_dg, stride_du, stride_y,
    ACT: tl.constexpr, ROUND: tl.constexpr, STORE_Y: tl.constexpr,
    EVEN_K: tl.constexpr,         # K % BLOCK_K == 0: no mask in the K loop
    SPLIT: tl.constexpr,          # the epilogue in 1, 2 or 4 column pieces (register pressure)
    FP32_DOT: tl.constexpr,       # Triton's interpreter multiplies bf16 dot operands as raw bits
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row blocks share each column block of W while it sits in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    # dh tile = dy[rows, :] @ W[:, cols]; out-of-range rows/cols wrap (their results are masked)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    col0 = pid_n * BLOCK_N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = DY + (rows % M)[:, None] * stride_dy + ks[None, :]
    b_ptrs = W + ks[:, None].to(tl.int64) * stride_w + ((col0 + tl.arange(0, BLOCK_N)) % N)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=ks[None, :] < K - k * BLOCK_K, other=0.0)
            b = tl.load(b_ptrs, mask=ks[:, None] < K - k * BLOCK_K, other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_w

    # the epilogue's arguments after (dh piece, rows, cols), spelled once
    if SPLIT == 1:
        _epilogue(acc, rows, col0 + tl.arange(0, BLOCK_N), M, N, G, U, DG, DU, Y, stride_g,
                  stride_u, stride_dg, stride_du, stride_y, ACT, ROUND, STORE_Y)
    elif SPLIT == 2:
        # [BM, BN] → two [BM, BN/2] column halves
        h: tl.constexpr = BLOCK_N // 2
        left, right = tl.split(acc.reshape(BLOCK_M, 2, h).permute(0, 2, 1))
        _epilogue(left, rows, col0 + tl.arange(0, h), M, N, G, U, DG, DU, Y, stride_g,
                  stride_u, stride_dg, stride_du, stride_y, ACT, ROUND, STORE_Y)
        _epilogue(right, rows, col0 + h + tl.arange(0, h), M, N, G, U, DG, DU, Y, stride_g,
                  stride_u, stride_dg, stride_du, stride_y, ACT, ROUND, STORE_Y)
    else:
        # four [BM, BN/4] quarters: columns q·j + c of the tile, j = 0..3, as split pairs
        q: tl.constexpr = BLOCK_N // 4
        quarters = acc.reshape(BLOCK_M, 2, 2, q).permute(0, 3, 2, 1)   # [BM, q, 2(j%2), 2(j//2)]
        even, odd = tl.split(quarters)                                 # j//2 = 0 | 1
        a0, a1 = tl.split(even)
        a2, a3 = tl.split(odd)
        _epilogue(a0, rows, col0 + tl.arange(0, q), M, N, G, U, DG, DU, Y, stride_g,
                  stride_u, stride_dg, stride_du, stride_y, ACT, ROUND, STORE_Y)
        _epilogue(a1, rows, col0 + q + tl.arange(0, q), M, N, G, U, DG, DU, Y, stride_g,
                  stride_u, stride_dg, stride_du, stride_y, ACT, ROUND, STORE_Y)
        _epilogue(a2, rows, col0 + 2 * q + tl.arange(0, q), M, N, G, U, DG, DU, Y, stride_g,
                  stride_u, stride_dg, stride_du, stride_y, ACT, ROUND, STORE_Y)
        _epilogue(a3, rows, col0 + 3 * q + tl.arange(0, q), M, N, G, U, DG, DU, Y, stride_g,
                  stride_u, stride_dg, stride_du, stride_y, ACT, ROUND, STORE_Y)


def fusable(dy: Tensor, weight: Tensor, gate: Tensor) -> bool:
    """Whether :func:`down_proj_swiglu_backward` serves these (else: cuBLAS + the SwiGLU pass)."""
    return (enabled() and gate.dtype in FUSED_DTYPES and dy.dtype == gate.dtype
            and weight.dtype == gate.dtype)


def down_proj_swiglu_backward(dy: Tensor, weight: Tensor, gate: Tensor, up: Tensor,
                              dg: Tensor, du: Tensor, y: Tensor | None, activation: int,
                              config: tuple | None = None) -> None:
    """dh = dy @ weight and the SwiGLU backward of it, in one kernel.

    dy [M, K], weight [K, N] (the down projection's [O, I] weight: K = O, N = I), gate, up, dg,
    du, y [M, N]: every one with unit column stride (any row stride). Writes dg, du, and y =
    act(gate)·up when ``y`` is given."""
    m, n = gate.shape
    k = dy.shape[1]
    if m * n == 0:
        return
    block_m, block_n, block_k, warps, stages, split = config or _config()
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    out_y = dg if y is None else y
    launchable(down_proj_swiglu_bwd_kernel, gate)[grid](
        dy, weight, gate, up, dg, du, out_y, m, n, k,
        dy.stride(0), weight.stride(0), gate.stride(0), up.stride(0), dg.stride(0),
        du.stride(0), out_y.stride(0),
        ACT=activation, ROUND=ROUND_CODES[gate.dtype], STORE_Y=y is not None,
        EVEN_K=k % block_k == 0, SPLIT=split, FP32_DOT=_interpreted(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
        num_warps=warps, num_stages=stages,
    )


@triton_op("chronicals::down_proj_swiglu_backward", mutates_args=())
def down_proj_swiglu_bwd(dy: Tensor, weight: Tensor, gate: Tensor, up: Tensor, activation: int,
                         with_y: bool) -> list[Tensor]:
    """[d gate, d up] (+ [act(gate)·up] ``with_y``) of ``linear(act(gate)·up, weight)`` for its
    upstream gradient ``dy``; contiguous, of gate's shape. On CUDA one GEMM with the SwiGLU
    backward in its epilogue; elsewhere the plain-torch reference."""
    if not gate.is_cuda:
        dg, du = swiglu_backward_reference(dy @ weight, gate, up, activation)
        return [dg, du, swiglu_reference(gate, up, activation)][:3 if with_y else 2]
    g, u, d = as_rows(gate), as_rows(up), as_rows(dy)
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = [torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
           for _ in range(3 if with_y else 2)]
    down_proj_swiglu_backward(d, w, g, u, out[0], out[1], out[2] if with_y else None, activation)
    return [t.view(gate.shape) for t in out]
