"""The fused loss's logits GEMM with the row statistics in its epilogue
(kernels/linear_ce_gemm.py, Gluon, Hopper only): its logits against cuBLAS's, its statistics
against their reference, the whole op against the cuBLAS path. The combine and second row pass
that read its statistics are tested on the CPU in test_linear_ce.py."""

from __future__ import annotations

import pytest
import torch

from chronicals_fx.kernels import linear_ce as K
from chronicals_fx.kernels import linear_ce_gemm as L

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _fresh_failure_lists(monkeypatch):
    """A kernel failure recorded by one test must not switch the kernels off for the next."""
    monkeypatch.setattr(L, "_failed", [])
    monkeypatch.setattr(L, "_dh_failed", [])


def _hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


needs_hopper = pytest.mark.skipif(not _hopper(), reason="the Gluon kernel is written for sm_90")


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _record_launches(monkeypatch, maker: str, what) -> list:
    """Wraps ``L.<maker>`` (a make_*launch): each call appends ``what(args)`` to the list
    returned, then builds the launch as before."""
    launches = []
    original = getattr(L, maker)

    def spy(*a, **kw):
        launches.append(what(a))
        return original(*a, **kw)

    monkeypatch.setattr(L, maker, spy)
    return launches


def _inputs(c, hidden, vocab):
    g = torch.Generator(device="cuda").manual_seed(c + vocab)
    h = torch.randn(c, hidden, device="cuda", generator=g).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * hidden ** -0.5).bfloat16()
    y = torch.randint(0, vocab, (c,), device="cuda", generator=g)
    y[::7] = -100
    return h, w, y


@needs_hopper
@pytest.mark.parametrize("tile", [L.NARROW_TILE, L.WIDE_TILE], ids=["narrow", "wide"])
@pytest.mark.parametrize("softcap,smoothing", [(0.0, False), (30.0, True)])
@pytest.mark.parametrize("c,hidden,vocab", [(300, 256, 5000), (768, 896, 151936)])
def test_logits_and_tile_stats(c, hidden, vocab, softcap, smoothing, tile):
    """Both tiles the product picks from, on ragged rows and columns and issue 5's H=896 chunk:
    the logits within a bf16 step of cuBLAS's (fp32 accumulation order only), the statistics
    those logits give."""
    h, w, _ = _inputs(c, hidden, vocab)
    x = torch.full((c, vocab), float("nan"), device="cuda", dtype=torch.bfloat16)
    stats = L.tile_stats_buffers(c, hidden, vocab, smoothing, h.device, tile)
    L.make_launch(h, w, x, *stats, 1.0, softcap, tile)()
    assert _rel(x, torch.mm(h, w.t())) <= 2 ** -7
    want = L.tile_stats_reference(x, tile.bn, 1.0, softcap, smoothing)
    for got, ref in zip(stats, want):
        if ref is not None:
            assert _rel(got, ref) <= 1e-5


@needs_hopper
def test_the_fused_loss_uses_it_and_equals_the_cublas_path(monkeypatch):
    """Gradients in the forward over 3 chunks (the last partial), label smoothing and z-loss:
    the kernel ran for every chunk, and loss, dH, dW equal the cuBLAS path's to bf16 rounding."""
    h, w, y = _inputs(700, 256, 5000)
    launches = _record_launches(monkeypatch, "make_launch", lambda a: a[0].shape[0])
    args = (h, w, None, y, -100, "mean", 0.1, 1.0, 0.0, 1e-4, True, True, False)
    got = K.lce_forward_with_grads(*args, rows=256)
    assert launches == [256, 256, 188] and not L._failed
    monkeypatch.setenv("CHRONICALS_LCE_GEMM", "0")
    want = K.lce_forward_with_grads(*args, rows=256)
    assert len(launches) == 3
    assert _rel(got[0], want[0]) <= 1e-5
    assert _rel(got[1], want[1]) <= 1e-2 and _rel(got[2], want[2]) <= 1e-2


@needs_hopper
@pytest.mark.parametrize("tile", [L.NARROW_TILE, L.WIDE_TILE], ids=["narrow", "wide"])
@pytest.mark.parametrize("c,vocab,hidden", [(300, 5000, 520), (1024, 128256, 4096)])
def test_dh_gemm_equals_cublas(c, vocab, hidden, tile):
    """dH_c = d_c @ W by the Gluon GEMM (opt-in in the op): ragged tiles and issue 5's H=4096
    chunk, within a bf16 step of cuBLAS's (fp32 accumulation order only)."""
    g = torch.Generator(device="cuda").manual_seed(c)
    d = (torch.randn(c, vocab, device="cuda", generator=g) * 1e-3).bfloat16()
    w = torch.randn(vocab, hidden, device="cuda", generator=g).bfloat16()
    out = torch.full((c, hidden), float("nan"), device="cuda", dtype=torch.bfloat16)
    L.make_dh_launch(d, w, out, tile)()
    assert torch.isfinite(out).all() and _rel(out, torch.mm(d, w)) <= 2 ** -7


@needs_hopper
def test_the_fused_loss_takes_dh_from_it_when_asked(monkeypatch):
    """CHRONICALS_LCE_DH_GEMM=1 through the op: 1024-row chunks at H=4096 (128 output tiles, as
    at issue 5's shape): the Gluon dH GEMM ran for both chunks, and dH equals the cuBLAS path's
    to bf16 rounding (d is the same: the loss and dW are unchanged)."""
    h, w, y = _inputs(2048, 4096, 2048)
    launches = _record_launches(monkeypatch, "make_dh_launch", lambda a: a[0].shape[0])
    args = (h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0, True, True, False)
    want = K.lce_forward_with_grads(*args, rows=1024)
    assert launches == []
    monkeypatch.setenv("CHRONICALS_LCE_DH_GEMM", "1")
    got = K.lce_forward_with_grads(*args, rows=1024)
    assert launches == [1024, 1024] and not L._dh_failed
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert _rel(got[1], want[1]) <= 2 ** -7
