"""The down projection's GEMM with the SwiGLU backward in its epilogue, against float64: under
TRITON_INTERPRET=1 on CPU (small tiles), natively on GPU (the shipped tiles, real shapes)."""

from __future__ import annotations

import pytest
import torch

from chronicals_fx.kernels import swiglu as S
from chronicals_fx.kernels import swiglu_gemm as K
from tests.conftest import DEVICE
from tests.kernels.test_swiglu import ACTS, TOLERANCE, rel_err

SMALL_TILES = (16, 32, 16, 4, 2)    # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages (SPLIT varies)


def _inputs(m, k, n, dtype, device=DEVICE, fused=False):
    """dy [m, k], W_down [k, n], gate / up [m, n] (``fused``: halves of one [m, 2n] tensor)."""
    dy = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(k, n, device=device) / k ** 0.5).to(dtype)
    if fused:
        g, u = torch.randn(m, 2 * n, device=device).mul(2.5).to(dtype).chunk(2, dim=-1)
    else:
        g = (2.5 * torch.randn(m, n, device=device)).to(dtype)
        u = torch.randn(m, n, device=device).to(dtype)
    return dy, w, g, u


def _reference(dy, w, g, u, activation):
    """(dg, du, y) in float64 by autograd through linear(swiglu_reference(g, u), W_downᵀ)."""
    gd, ud = (t.detach().double().requires_grad_() for t in (g, u))
    y = S.swiglu_reference(gd, ud, S.ACTIVATIONS[activation])
    y.backward(dy.double() @ w.double())          # dh = dy W_down
    return gd.grad, ud.grad, y.detach()


def _launch(dy, w, g, u, activation, with_y, config):
    dg, du = (torch.full(g.shape, float("nan"), dtype=g.dtype, device=g.device) for _ in "ab")
    y = torch.full_like(dg, float("nan")) if with_y else None
    K.down_proj_swiglu_backward(dy, w, g, u, dg, du, y, S.ACTIVATIONS[activation], config)
    return dg, du, y


CASES = ([(act, torch.bfloat16, 2, 40) for act in ACTS]
         + [("silu", torch.bfloat16, 1, 48), ("silu", torch.bfloat16, 4, 48),
            ("gelu", torch.float16, 4, 40), ("gelu_tanh", torch.float16, 1, 48)])


@pytest.mark.parametrize("activation, dtype, split, k", CASES)
def test_matches_float64_with_ragged_tiles(activation, dtype, split, k):
    """m, n not multiples of the tiles (wrapped rows and columns), k with and without the
    masked K tail; the epilogue in 1, 2 and 4 column pieces."""
    dy, w, g, u = _inputs(37, k, 70, dtype)
    dg, du, y = _launch(dy, w, g, u, activation, True, (*SMALL_TILES, split))
    want = _reference(dy, w, g, u, activation)
    for got, ref in zip((dg, du, y), want):
        assert rel_err(got, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_y_is_the_forward_kernels_output_bit_for_bit(dtype):
    """The down projection's dW reads this y: it must be what the forward wrote."""
    dy, w, g, u = _inputs(33, 32, 48, dtype)
    _, _, y = _launch(dy, w, g, u, "silu", True, (*SMALL_TILES, 2))
    want = torch.empty_like(y)
    S.swiglu_forward(g, u, want, S.ACTIVATIONS["silu"])
    assert torch.equal(y, want)


def test_row_strided_gate_and_up_without_y():
    """g and u as the two halves of one fused projection (row stride 2n), and no y written."""
    dy, w, g, u = _inputs(20, 32, 24, torch.bfloat16, fused=True)
    assert g.stride(0) == 48
    dg, du, y = _launch(dy, w, g, u, "gelu_tanh", False, (*SMALL_TILES, 2))
    assert y is None
    want = _reference(dy, w, g, u, "gelu_tanh")
    for got, ref in zip((dg, du), want):
        assert rel_err(got, ref) < TOLERANCE[torch.bfloat16]


def test_registered_op_off_cuda_is_the_reference():
    """On CPU the op computes dh = dy @ W and the SwiGLU reference backward (opcheck: schema,
    fake tensor, autograd registration)."""
    dy, w, g, u = _inputs(6, 8, 10, torch.float32, device="cpu")
    dg, du, y = torch.ops.chronicals.down_proj_swiglu_backward(dy, w, g, u, 0, True)
    want_dg, want_du = S.swiglu_backward_reference(dy @ w, g, u, 0)
    assert torch.equal(dg, want_dg) and torch.equal(du, want_du)
    assert torch.equal(y, S.swiglu_reference(g, u, 0))
    torch.library.opcheck(torch.ops.chronicals.down_proj_swiglu_backward.default,
                          (dy, w, g, u, 0, False))


def test_switch_reads_the_environment(monkeypatch):
    dy, w, g, u = _inputs(4, 8, 8, torch.bfloat16, device="cpu")
    assert K.fusable(dy, w, g)
    assert not K.fusable(dy.float(), w.float(), g.float())      # fp32: cuBLAS path (exact fp32)
    monkeypatch.setenv("CHRONICALS_SWIGLU_GEMM", "0")
    assert not K.fusable(dy, w, g)


# ---------------------------------------------------------------------------------------------
# GPU: the shipped tiles at a real shape, and the op through autograd against the unfused path.
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTS)
def test_gpu_real_shape_matches_float64(activation):
    dy, w, g, u = _inputs(2048, 896, 4864, torch.bfloat16, device="cuda")
    dg, du, y = _launch(dy, w, g, u, activation, True, None)
    want = _reference(dy, w, g, u, activation)
    for got, ref in zip((dg, du, y), want):
        assert rel_err(got, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_swiglu_linear_grads_fused_equal_unfused(monkeypatch):
    """swiglu_linear's backward through the fused GEMM against the cuBLAS + SwiGLU-pass path:
    both near float64, and the fused one no further from it."""
    x = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16)
    g, u = (x @ torch.randn(1024, 2816, device="cuda", dtype=torch.bfloat16).div(32)
            for _ in "gu")
    w = torch.randn(1024, 2816, device="cuda", dtype=torch.bfloat16).div(53)
    dy = torch.randn(4, 512, 1024, device="cuda", dtype=torch.bfloat16)

    def grads():
        leaves = [t.detach().requires_grad_() for t in (g, u, w)]
        torch.ops.chronicals.swiglu_linear(*leaves, None, 0).backward(dy)
        return [t.grad for t in leaves]

    fused = grads()
    monkeypatch.setenv("CHRONICALS_SWIGLU_GEMM", "0")
    unfused = grads()
    leaves = [t.detach().double().requires_grad_() for t in (g, u, w)]
    (S.swiglu_reference(*leaves[:2], 0) @ leaves[2].t()).backward(dy.double())
    for got_f, got_u, ref in zip(fused, unfused, (t.grad for t in leaves)):
        assert rel_err(got_f, ref) <= 1.1 * rel_err(got_u, ref) + 1e-4
        assert rel_err(got_f, ref) < TOLERANCE[torch.bfloat16]
