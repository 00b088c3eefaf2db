"""The accumulating GEMM C += Aᵀ B (kernels/gemm_accumulate.py, Gluon, Hopper only) against an
fp32 reference and cuBLAS, directly and as the fused loss's dW accumulation; where it can't
run, the cuBLAS fallback (CPU)."""

from __future__ import annotations

import pytest
import torch

from chronicals_fx.kernels import gemm_accumulate as G
from chronicals_fx.kernels import linear_ce as K


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="the Gluon kernel is written for sm_90")


def test_off_hopper_it_declines_with_a_reason_and_cublas_computes_it(monkeypatch):
    a, b = torch.randn(5, 16), torch.randn(5, 8)
    c = torch.randn(16, 8)
    assert "Hopper" in G.unusable(c, a, b)
    assert "do not agree" in G.unusable(c, a, b[:, :4]) or "Hopper" in G.unusable(c, a, b[:, :4])
    want = c.clone().addmm_(a.t(), b)
    G.accumulate_at_b(c, a, b)
    assert torch.equal(c, want)
    monkeypatch.setenv("CHRONICALS_GEMM_ACCUMULATE", "0")
    assert "CHRONICALS_GEMM_ACCUMULATE=0" in G.unusable(c, a, b)


def _inputs(k, m, n, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    a = (torch.randn(k, m, device="cuda", generator=gen) * 1e-2).to(dtype)
    b = torch.randn(k, n, device="cuda", generator=gen).to(dtype)
    c = torch.randn(m, n, device="cuda", generator=gen).to(dtype)
    return a, b, c


@pytest.mark.gpu
@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,m,n", [(64, 128, 256), (200, 1000, 520), (1, 136, 264),
                                   (1024, 128256, 4096)])
def test_equals_one_rounding_of_the_fp32_sum(k, m, n, dtype):
    """Ragged tiles in M, N and K, one K block, and issue 5's H=4096 chunk: the result is the
    fp32 sum Aᵀ B + C rounded once (half a step of the dtype), as cuBLAS's addmm (one step)."""
    a, b, c = _inputs(k, m, n, dtype, seed=k + m)
    assert G.unusable(c, a, b) is None
    want = c.float().addmm(a.t().float(), b.float())
    cublas = c.clone().addmm_(a.t(), b)
    G.accumulate_at_b(c, a, b)
    assert not G._failed, G._failed
    step = torch.finfo(dtype).eps
    floor = 1e-3
    err = ((c.float() - want).abs() / want.abs().clamp_min(floor)).max().item()
    assert err <= 0.51 * step, err
    vs = ((c.float() - cublas.float()).abs() / cublas.float().abs().clamp_min(floor)).max()
    assert vs.item() <= 1.01 * step


@pytest.mark.gpu
@needs_hopper
def test_the_fused_loss_accumulates_dw_with_it(monkeypatch):
    """Gradients in the forward over 4 token chunks: the kernel ran for the 3 accumulating
    ones, and dW agrees with the cuBLAS path to the few roundings both make."""
    torch.manual_seed(0)
    h = torch.randn(500, 256, device="cuda").bfloat16()
    w = (torch.randn(5000, 256, device="cuda") * 256 ** -0.5).bfloat16()
    y = torch.randint(0, 5000, (500,), device="cuda")
    args = (h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0, True, True, False)
    launches = []
    original = G.make_launch

    def spy(*a, **kw):
        launches.append(a[0].shape)
        return original(*a, **kw)

    monkeypatch.setattr(G, "make_launch", spy)
    loss, dh, dw, _ = K.lce_forward_with_grads(*args, rows=128)
    assert len(launches) == 3 and not G._failed
    monkeypatch.setenv("CHRONICALS_GEMM_ACCUMULATE", "0")
    loss_ref, dh_ref, dw_ref, _ = K.lce_forward_with_grads(*args, rows=128)
    assert len(launches) == 3
    assert torch.equal(loss, loss_ref) and torch.equal(dh, dh_ref)
    # 4 roundings to bf16 each way, in the same places: a few steps of dW's scale at most
    scale = dw_ref.float().abs().max()
    assert ((dw.float() - dw_ref.float()).abs().max() / scale).item() <= 4 * 2 ** -8
