"""The fused SwiGLU-backward GEMM (kernels/swiglu_gemm.py, Gluon, Hopper only): against cuBLAS
plus the SwiGLU kernel, directly and through ``swiglu_linear``'s backward. GPU only: Gluon has
no interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chronicals_fx.kernels import swiglu as K

pytestmark = pytest.mark.gpu


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="the Gluon kernel is written for sm_90")


def _inputs(m, k, n, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)

    return rnd(m, k), rnd(k, n, scale=k ** -0.5), rnd(m, n, scale=2.0), rnd(m, n)


@needs_hopper
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("shape", [(1000, 520, 768), (8192, 896, 4864)])
def test_fused_gemm_equals_cublas_and_the_pass(activation, shape):
    """dg, du within bf16 rounding of cuBLAS + the pass (only dh's fp32 accumulation order
    differs), y bit for bit the pass's (the forward's value): ragged tiles and Qwen2.5-0.5B's
    down projection at 8k tokens."""
    from chronicals_fx.kernels import swiglu_gemm

    code = K.ACTIVATIONS[activation]
    dy, w, g, u = _inputs(*shape)
    got = swiglu_gemm.swiglu_linear_backward(dy, w, g, u, code)
    assert got is not None and not swiglu_gemm._failed, swiglu_gemm._failed
    want = [torch.empty_like(g) for _ in range(3)]
    K.swiglu_backward(dy @ w, g, u, want[0], want[1], code, want[2])
    assert torch.equal(got[2], want[2])
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b)


@needs_hopper
def test_swiglu_linear_backward_takes_the_fused_gemm():
    """Through autograd: gradients with the fused GEMM equal those without (dW_down bit for
    bit: the same y through the same cuBLAS GEMM), and the fused kernel did run."""
    from chronicals_fx.kernels import swiglu_gemm

    m, h, i = 2048, 896, 4864
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    wg, wu = ((torch.randn(h, i, device="cuda", dtype=torch.bfloat16) / h ** 0.5)
              for _ in range(2))
    wd = torch.randn(h, i, device="cuda", dtype=torch.bfloat16) / i ** 0.5
    runs = []
    original = swiglu_gemm.swiglu_linear_backward

    def spy(*args):
        out = original(*args)
        runs.append(out is not None)
        return out

    grads = {}
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, wg, wu, wd)]
        g, u = leaves[0] @ leaves[1], leaves[0] @ leaves[2]
        out = torch.ops.chronicals.swiglu_linear(g, u, leaves[3], None, 0, fused)
        swiglu_gemm.swiglu_linear_backward = spy
        try:
            F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32)).backward()
        finally:
            swiglu_gemm.swiglu_linear_backward = original
        grads[fused] = [t.grad for t in leaves]
    assert runs == [True], runs
    assert torch.equal(grads[True][3], grads[False][3])
    for a, b in zip(grads[True][:3], grads[False][:3]):
        torch.testing.assert_close(a, b)


@needs_hopper
def test_leading_dimensions_are_read_as_rows():
    """dy [B, T, K], gate and up [B, T, N] (as a decoder layer's backward passes them, no views
    made): the values of the [M, ·] call, outputs of gate's shape; through the registered op
    (kernels/_library.py) too, each output a new tensor."""
    from chronicals_fx.kernels import swiglu_gemm

    dy, w, g, u = _inputs(8 * 1024, 896, 4864)
    flat = swiglu_gemm.swiglu_linear_backward(dy, w, g, u, 0)
    lead = [t.view(8, 1024, -1) for t in (dy, g, u)]
    nd = swiglu_gemm.swiglu_linear_backward(lead[0], w, lead[1], lead[2], 0)
    op = torch.ops.chronicals.swiglu_linear_backward_gemm(lead[0], w, lead[1], lead[2], 0)
    assert not swiglu_gemm._failed, swiglu_gemm._failed
    for a, b, c in zip(nd, op, flat):
        assert a.shape == b.shape == (8, 1024, 4864)
        assert torch.equal(a.view_as(c), c) and torch.equal(b.view_as(c), c)
    pointers = {t.data_ptr() for t in (*nd, *op, dy, w, g, u)}
    assert len(pointers) == 10
