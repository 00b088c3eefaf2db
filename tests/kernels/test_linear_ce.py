"""Fused linear + cross-entropy: the plain-torch reference and the Triton path (under
TRITON_INTERPRET=1 on CPU) against float64 eager ``F.cross_entropy`` on materialized logits;
the registered op under torch.compile; GPU tests at real shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import chronicals  # noqa: F401  (registers the ops)
from chronicals_fx.kernels import _triton
from chronicals_fx.kernels import linear_ce as K
from tests.conftest import DEVICE


def eager_loss(h, w, b, y, ignore_index=-100, reduction="mean", label_smoothing=0.0, scale=1.0,
               softcap=0.0, z_loss=0.0):
    """What the op computes, written the obvious way on materialized [N, V] logits."""
    x = h @ w.t() if b is None else h @ w.t() + b
    z = softcap * torch.tanh(x * scale / softcap) if softcap else x * scale
    loss = F.cross_entropy(z, y, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if z_loss:
        valid = y != ignore_index
        zl = (z_loss * torch.logsumexp(z, -1).square() * valid).sum()
        loss = loss + (zl / valid.sum() if reduction == "mean" else zl)
    return loss


def make(n, hidden, vocab, dtype=torch.float64, bias=False, ignore_every=4, seed=0,
         device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * hidden ** -0.5 * 3
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        y[::ignore_every] = -100
    move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return move(h), move(w), move(b), y.to(device)


def float64_truth(h, w, b, y, **kw):
    leaves = [t.detach().double().cpu().requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    loss = eager_loss(leaves[0], leaves[1], leaves[2] if b is not None else None, y.cpu(), **kw)
    grads = torch.autograd.grad(loss, leaves) if loss.requires_grad and torch.isfinite(loss) else None
    return loss.detach(), grads


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


CONFIGS = {
    "plain": {},
    "sum": dict(reduction="sum"),
    "smoothing": dict(label_smoothing=0.1),
    "softcap": dict(softcap=4.0),
    "scale_softcap_smoothing": dict(scale=0.7, softcap=3.0, label_smoothing=0.2),
    "scale": dict(scale=0.125),
    "z_loss": dict(z_loss=1e-3),
    "z_loss_sum_smoothing": dict(z_loss=1e-2, reduction="sum", label_smoothing=0.05),
    "ignore_index_0": dict(ignore_index=0),
}


def _kw(cfg):
    return dict(ignore_index=cfg.get("ignore_index", -100), reduction=cfg.get("reduction", "mean"),
                label_smoothing=cfg.get("label_smoothing", 0.0), scale=cfg.get("scale", 1.0),
                softcap=cfg.get("softcap", 0.0), z_loss=cfg.get("z_loss", 0.0))


def _labels_for(cfg, y):
    """With ignore_index=0, the rows to ignore carry 0 (and -100 would be an invalid class)."""
    return torch.where(y == -100, 0, y) if cfg.get("ignore_index") == 0 else y


def _args(cfg):
    kw = _kw(cfg)
    return (kw["ignore_index"], kw["reduction"], kw["label_smoothing"], kw["scale"], kw["softcap"],
            kw["z_loss"])


# ---------------------------------------------------------------------------------------------
# Reference (plain torch, chunked): exact in float64
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("bias", [False, True])
def test_reference_equals_float64_eager(name, bias):
    cfg = CONFIGS[name]
    h, w, b, y = make(29, 16, 150, bias=bias)
    y = _labels_for(cfg, y)
    truth, grads = float64_truth(h, w, b, y, **_kw(cfg))
    loss, lse = K.linear_cross_entropy_reference(h, w, b, y, *_args(cfg), chunk=64)
    assert rel(loss, truth) < 1e-12
    one = torch.tensor(1.0, dtype=torch.float64)
    got = K.linear_cross_entropy_backward_reference(one, h, w, b, y, lse, *_args(cfg), chunk=64)
    for g_got, g_want in zip(got, grads):
        assert rel(g_got, g_want) < 1e-12


# ---------------------------------------------------------------------------------------------
# Triton path under the interpreter: fp32 compute, several chunks (the last one partial)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["plain", "sum", "scale_softcap_smoothing", "z_loss_sum_smoothing"])
def test_triton_path_equals_float64(name):
    cfg = CONFIGS[name]
    h, w, b, y = make(37, 24, 211, dtype=torch.float32, bias=name == "plain", seed=3, device=DEVICE)
    truth, grads = float64_truth(h, w, b, y, **_kw(cfg))
    loss, lse = K.lce_forward(h, w, b, y, *_args(cfg), chunk=64)
    assert loss.dtype == torch.float32 and lse.shape == (37,)
    assert rel(loss, truth) < 1e-5
    got = K.lce_backward(torch.tensor(1.0, device=DEVICE), h, w, b, y, lse, *_args(cfg),
                         True, True, b is not None, chunk=64)
    for g_got, g_want in zip(got, grads):
        assert g_got.dtype == torch.float32
        assert rel(g_got, g_want) < 1e-5


def test_triton_path_bf16_within_bf16_error():
    h, w, _, y = make(48, 32, 160, dtype=torch.bfloat16, seed=4, device=DEVICE)
    truth, (dh_t, dw_t) = float64_truth(h, w, None, y)
    loss, lse = K.lce_forward(h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0, chunk=128)
    assert rel(loss, truth) < 1e-3
    dh, dw, db = K.lce_backward(torch.tensor(1.0, device=DEVICE), h, w, None, y, lse, -100, "mean",
                                0.0, 1.0, 0.0, 0.0, True, True, False, chunk=128)
    assert dh.dtype == dw.dtype == torch.bfloat16 and db is None
    assert rel(dh, dh_t) < 1e-2 and rel(dw, dw_t) < 1e-2


def test_triton_path_upstream_gradient_and_partial_grads():
    """g scales every gradient; grads not asked for are not computed."""
    h, w, _, y = make(20, 16, 100, dtype=torch.float32, seed=5, device=DEVICE)
    _, (dh_t, _) = float64_truth(h, w, None, y)
    loss, lse = K.lce_forward(h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0, chunk=32)
    dh, dw, db = K.lce_backward(torch.tensor(-2.5, device=DEVICE), h, w, None, y, lse, -100, "mean",
                                0.0, 1.0, 0.0, 0.0, True, False, False, chunk=32)
    assert dw is None and db is None
    assert rel(dh, -2.5 * dh_t) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_path_every_label_ignored_matches_eager(reduction):
    """Eager: "mean" over no tokens is nan, "sum" is 0; the gradients are 0 either way."""
    h, w, _, y = make(16, 16, 100, dtype=torch.float32, seed=6, device=DEVICE)
    y[:] = -100
    loss, lse = K.lce_forward(h, w, None, y, -100, reduction, 0.1, 1.0, 0.0, 0.0, chunk=64)
    want = eager_loss(h, w, None, y, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, equal_nan=True)
    dh, dw, _ = K.lce_backward(torch.tensor(1.0, device=DEVICE), h, w, None, y, lse, -100,
                               reduction, 0.1, 1.0, 0.0, 0.0, True, True, False, chunk=64)
    assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))


# ---------------------------------------------------------------------------------------------
# Gradients in the forward (the training mode): reference, Triton path, op and autograd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("bias", [False, True])
def test_with_grads_reference_equals_float64_eager(name, bias):
    """Token chunks of whole rows (the last one partial), grads for g = 1."""
    cfg = CONFIGS[name]
    h, w, b, y = make(29, 16, 150, bias=bias)
    y = _labels_for(cfg, y)
    truth, grads = float64_truth(h, w, b, y, **_kw(cfg))
    loss, *got = K.linear_cross_entropy_with_grads_reference(h, w, b, y, *_args(cfg), True, True,
                                                             True, rows=8)
    assert rel(loss, truth) < 1e-12
    got = [g for g in got if g is not None]
    assert len(got) == len(grads)
    for g_got, g_want in zip(got, grads):
        assert g_got.dtype == torch.float64 and rel(g_got, g_want) < 1e-12


# The row passes' variants (module hook ROW_STATS): pass 1 with lane-wise statistics (the
# default) or per-tile statistics.
ROW_VARIANTS = ("tile", "lanes")


def _row_variant(monkeypatch, variant):
    monkeypatch.delenv("CHRONICALS_LCE_STATS", raising=False)
    monkeypatch.setattr(K, "ROW_STATS", variant)


@pytest.mark.parametrize("variant", ROW_VARIANTS)
@pytest.mark.parametrize("name", ["plain", "scale_softcap_smoothing", "z_loss_sum_smoothing",
                                  "ignore_index_0"])
def test_grad_in_forward_path_equals_float64(name, variant, monkeypatch):
    """The Triton row passes: several token chunks (the last partial), several column slices per
    row and tiles per slice (the last ones partial; V = 150 is no multiple of BLOCK_V = 32)."""
    _row_variant(monkeypatch, variant)
    cfg = CONFIGS[name]
    h, w, b, y = make(19, 24, 150, dtype=torch.float32, bias=True, seed=8, device=DEVICE)
    y = _labels_for(cfg, y)
    truth, grads = float64_truth(h, w, b, y, **_kw(cfg))
    loss, *got = K.lce_forward_with_grads(h, w, b, y, *_args(cfg), True, True, True, rows=8,
                                          cols=64, block_v=32)
    assert loss.dtype == torch.float32 and rel(loss, truth) < 1e-5
    for g_got, g_want in zip(got, grads):
        assert g_got.dtype == torch.float32 and rel(g_got, g_want) < 1e-5


def test_grad_in_forward_path_bf16_within_bf16_error():
    """bf16: logits and d rounded to bf16 as eager rounds them, dW summed over 3 token chunks in
    bf16 (fp32 inside each GEMM)."""
    h, w, _, y = make(48, 32, 160, dtype=torch.bfloat16, seed=4, device=DEVICE)
    truth, (dh_t, dw_t) = float64_truth(h, w, None, y)
    loss, dh, dw, db = K.lce_forward_with_grads(h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0,
                                                True, True, False, rows=16)
    assert dh.dtype == dw.dtype == torch.bfloat16 and db is None
    assert rel(loss, truth) < 1e-3 and rel(dh, dh_t) < 1e-2 and rel(dw, dw_t) < 1e-2


def test_grad_in_forward_path_many_chunks_sum_dw_in_fp32(monkeypatch):
    """Beyond DW_LOW_PRECISION_MAX_CHUNKS token chunks dW is summed in fp32 and rounded once."""
    h, w, _, y = make(48, 32, 160, dtype=torch.bfloat16, seed=4, device=DEVICE)
    _, (_, dw_t) = float64_truth(h, w, None, y)
    sums = []
    accumulate = K._accumulate_mm
    monkeypatch.setattr(K, "_accumulate_mm", lambda acc, a, b: (sums.append(acc.dtype),
                                                                accumulate(acc, a, b)))
    monkeypatch.setattr(K, "DW_LOW_PRECISION_MAX_CHUNKS", 2)
    _, _, dw, _ = K.lce_forward_with_grads(h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0,
                                           False, True, False, rows=8)
    assert sums == [torch.float32] * 6
    assert dw.dtype == torch.bfloat16 and rel(dw, dw_t) < 1e-2


def test_grad_in_forward_path_partial_grads():
    h, w, _, y = make(20, 16, 100, dtype=torch.float32, seed=5, device=DEVICE)
    _, (dh_t, dw_t) = float64_truth(h, w, None, y)
    _, dh, dw, db = K.lce_forward_with_grads(h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0,
                                             False, True, False, rows=8)
    assert dh is None and db is None and rel(dw, dw_t) < 1e-5
    _, dh, dw, _ = K.lce_forward_with_grads(h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0,
                                            True, False, False, rows=8)
    assert dw is None and rel(dh, dh_t) < 1e-5


@pytest.mark.parametrize("variant", ROW_VARIANTS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_in_forward_path_every_label_ignored_matches_eager(reduction, variant, monkeypatch):
    """"mean" over no tokens is nan, "sum" is 0, as eager; the gradients are exactly 0."""
    _row_variant(monkeypatch, variant)
    h, w, b, y = make(16, 16, 100, dtype=torch.float32, bias=True, seed=6, device=DEVICE)
    y[:] = -100
    loss, dh, dw, db = K.lce_forward_with_grads(h, w, b, y, -100, reduction, 0.1, 1.0, 0.0, 0.0,
                                                True, True, True, rows=8, cols=64, block_v=32)
    want = eager_loss(h, w, b, y, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(loss, want, equal_nan=True)
    for g in (dh, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


def _rows_float64(x, labels, row_w, scale=1.0, softcap=0.0, label_smoothing=0.0, z_loss=0.0):
    """(d, lse, zt, zsum) of the row passes, in float64 from the same logits (0 on ignored rows)."""
    z, dz = K._transform_torch(x.double(), scale, softcap)
    lse = torch.logsumexp(z, 1)
    valid = row_w != 0
    hot = F.one_hot(torch.where(valid, labels, 0), x.shape[1]).double()
    p = torch.softmax(z, 1) * (1.0 + 2.0 * z_loss * lse)[:, None]
    d = (p - (1.0 - label_smoothing) * hot - label_smoothing / x.shape[1]) * dz
    d = torch.where(valid[:, None], d * row_w.double()[:, None], 0.0)
    stats = [torch.where(valid, t, 0.0) for t in (lse, (z * hot).sum(1), z.sum(1))]
    return (d, *stats)


@pytest.mark.parametrize("variant", ROW_VARIANTS)
@pytest.mark.parametrize("cfg", [dict(label_smoothing=0.1, z_loss=1e-3), dict(softcap=30.0)],
                         ids=["smoothing_z_loss", "softcap"])
def test_row_passes_large_logits_equal_float64(variant, cfg, monkeypatch):
    """lce_rows on hand-made fp32 logits of magnitude 100 (exp(100) overflows fp32: only
    max-shifted exponentials stay finite): rows of ±100, one +100 among −100s, all equal, the max
    in the partial last tile, an ignored row, against float64 from the same logits. V = 150:
    several slices and tiles, the last ones partial."""
    _row_variant(monkeypatch, variant)
    x, labels, row_w = _large_logits()
    _check_rows(x, labels, row_w, cfg)


@pytest.mark.parametrize("tile", [16, 128])
@pytest.mark.parametrize("cfg", [dict(), dict(label_smoothing=0.1, z_loss=1e-3),
                                 dict(softcap=30.0)], ids=["plain", "smoothing_z_loss", "softcap"])
def test_row_passes_from_tile_stats_equal_float64(cfg, tile):
    """The same rows with pass 1 replaced by the combine of per-tile statistics, as the fused
    logits GEMM stores them (kernels/linear_ce_gemm.py; here from its plain-torch reference).
    Tiles of 16 and 128 columns: 10 and 2 tiles a row (the last partial) against pass 2's 3
    slices of 64, so a tile count taken for the slice count (or back) shows."""
    from chronicals_fx.kernels import linear_ce_gemm
    x, labels, row_w = _large_logits()
    kw = dict(scale=1.0, softcap=0.0, label_smoothing=0.0) | cfg
    tiles = linear_ce_gemm.tile_stats_reference(x, tile, kw["scale"], kw["softcap"],
                                                bool(kw["label_smoothing"]))
    _check_rows(x, labels, row_w, cfg,
                tuple(t.to(DEVICE) if t is not None else None for t in tiles))


def _large_logits():
    g = torch.Generator().manual_seed(11)
    c, vocab = 7, 150
    x = torch.randn(c, vocab, generator=g) * 3
    x[1, ::7] = 100.0                                  # large among small
    x[2] = -100.0
    x[2, 37] = 100.0                                   # one +100 among −100s
    x[3] = 100.0                                       # every logit the max
    x[4] = torch.where(torch.rand(vocab, generator=g) < 0.5, 100.0, -100.0)    # ignored row
    x[5] = -100.0
    x[5, -3:] = 99.0                                   # the max in the last, partial tile
    x[6] = torch.where(torch.arange(vocab) % 2 == 0, 100.0, -100.0)
    labels = torch.randint(0, vocab, (c,), generator=g)
    labels[0], labels[3], labels[4] = 64, vocab - 1, -100    # a slice's first column; the last
    row_w = torch.rand(c, generator=g) + 0.5
    row_w[4] = 0.0
    return x, labels, row_w


def _check_rows(x, labels, row_w, cfg, tile_stats=None):
    c, vocab = x.shape
    kw = dict(scale=1.0, softcap=0.0, label_smoothing=0.0, z_loss=0.0) | cfg
    d_want, *stats_want = _rows_float64(x, labels, row_w, **kw)
    d = x.clone().to(DEVICE)
    stats = torch.full((3, c), 7.0, device=DEVICE)     # lse, zt, zsum: every entry written
    K.lce_rows(d, labels.to(DEVICE), row_w.to(DEVICE), *stats, kw["scale"], kw["softcap"],
               kw["label_smoothing"], kw["z_loss"], cols=64, block_v=32, tile_stats=tile_stats)
    assert torch.isfinite(d).all() and torch.equal(d[4].cpu(), torch.zeros(vocab))
    assert rel(d, d_want) < 1e-5
    for got, want in zip(stats[:3 if kw["label_smoothing"] else 2], stats_want):
        assert rel(got, want) < 1e-5 and got[4] == 0


def test_row_variant_environment_overrides_hooks(monkeypatch):
    """$CHRONICALS_LCE_STATS, read per call, wins over the ROW_STATS hook."""
    _row_variant(monkeypatch, "tile")
    assert K._row_variant() == "tile"
    monkeypatch.setenv("CHRONICALS_LCE_STATS", "lanes")
    assert K._row_variant() == "lanes"
    monkeypatch.setattr(K, "ROW_STATS", "lanes")
    monkeypatch.setenv("CHRONICALS_LCE_STATS", "tile")
    assert K._row_variant() == "tile"
    monkeypatch.setenv("CHRONICALS_LCE_STATS", "warp")
    with pytest.raises(ValueError, match="row statistics"):
        K._row_variant()


def test_scale_inplace_kernel():
    """g == 1: nothing written; otherwise x·g in place, for contiguous and transposed tensors."""
    x = torch.randn(33, 70, device=DEVICE)
    before = x.clone()
    version = x._version
    K.scale_inplace(x, torch.tensor(1.0, device=DEVICE), block=256)
    assert torch.equal(x, before)
    K.scale_inplace(x, torch.tensor(-2.5, device=DEVICE), block=256)
    assert torch.equal(x, before * -2.5) and x._version > version
    xt = before.clone().t()
    K.scale_inplace(xt, torch.tensor(0.5, device=DEVICE, dtype=torch.bfloat16), block=256)
    assert torch.equal(xt, before.t() * 0.5)


# ---------------------------------------------------------------------------------------------
# The kernels' own fast_launch keys (_launch_key): a key must fix everything Triton specializes
# on, or a compiled kernel is launched with arguments it was not compiled for (a kernel compiled
# for aligned pointers, on a misaligned slice). Under the interpreter fast_launch leaves the
# kernels to it, so the keys are checked as keys (against the key fast_launch would build from
# every argument); the gpu-marked twins run the launches for real.
# ---------------------------------------------------------------------------------------------
def test_launch_key_holds_dtype_alignment_and_values():
    buf = torch.zeros(64)
    key = K._launch_key((buf[4:8], buf[8:]), 150, 0.5, True)
    assert key == K._launch_key((buf[8:12], torch.ones(3)), 150, 0.5, True)   # other pointers
    assert key != K._launch_key((buf[5:9], buf[8:]), 150, 0.5, True)          # 4 bytes off 16
    assert key != K._launch_key((buf[4:8].double(), buf[8:]), 150, 0.5, True)
    assert key != K._launch_key((buf[4:8], buf[8:]), 151, 0.5, True)
    assert key != K._launch_key((buf[4:8], buf[8:]), 150, 0.25, True)
    assert key != K._launch_key((buf[4:8], buf[8:]), 150, 0.5, False)


class _RecordedLaunch:
    """Stands in for ``fast_launch``: records (kernel, caller's key, args, kwargs) of each
    launch, then launches as fast_launch does."""

    def __init__(self, launches):
        self.launches = launches

    def __call__(self, kernel, key=None):
        real, launches = _triton.fast_launch(kernel, key), self.launches

        class Launcher:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((kernel, key, args, kwargs))
                    return real[grid](*args, **kwargs)
                return launch
        return Launcher()


def _recorded_launches(monkeypatch):
    launches = []
    monkeypatch.setattr(K, "fast_launch", _RecordedLaunch(launches))
    return launches


def _jit_key(args, kwargs):
    """The key fast_launch builds from every argument: what the JIT specializes on, or finer."""
    return (tuple(map(_triton._arg_key, args)),
            tuple((name, _triton._arg_key(v)) for name, v in kwargs.items()))


def _check_keys_fix_specialization(launches, at_least):
    """Each caller's key stands for one argument key (no two launches with one caller's key and
    two specializations), and the launches saw ``at_least`` caller's keys a kernel."""
    by_kernel = {}
    for kernel, key, args, kwargs in launches:
        assert key is not None, f"{kernel.__name__} launched without a caller's key"
        seen = by_kernel.setdefault(kernel.__name__, {})
        assert seen.setdefault(key, _jit_key(args, kwargs)) == _jit_key(args, kwargs), (
            f"{kernel.__name__}: one key for two specializations")
    assert by_kernel and all(len(keys) >= at_least for keys in by_kernel.values()), {
        name: len(keys) for name, keys in by_kernel.items()}


# Chunks at these row offsets of the [N] vectors: int64 labels 16-byte aligned at even offsets,
# fp32 vectors at multiples of 4 — both, labels only, neither.
ROW_OFFSETS = (0, 1, 2, 4, 6)


def _rows_at_offsets(monkeypatch, cfg, tile_stats, fast, offsets=ROW_OFFSETS, c=3, vocab=150,
                     width=150, tile=16, **tiling):
    """lce_rows over chunks of c rows at ``offsets`` of [N] vectors (as lce_forward_with_grads
    slices them), on ``vocab`` columns of logits of row stride ``width`` (tile statistics of
    ``tile`` columns): (d, lse, zt, zsum) of each chunk, with fast_launch on or off."""
    monkeypatch.setattr(_triton, "FAST_LAUNCH", fast)
    x, labels, row_w = (t[:c] for t in _large_logits())
    x, labels = x[:, :vocab], labels.clamp(max=vocab - 1)
    kw = dict(scale=1.0, softcap=0.0, label_smoothing=0.0, z_loss=0.0) | cfg
    tiles = None
    if tile_stats:
        from chronicals_fx.kernels import linear_ce_gemm
        tiles = linear_ce_gemm.tile_stats_reference(x, tile, kw["scale"], kw["softcap"],
                                                    bool(kw["label_smoothing"]))
        tiles = tuple(t.to(DEVICE) if t is not None else None for t in tiles)
    n = max(offsets) + c
    labels_n = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    row_w_n = torch.zeros(n, device=DEVICE)
    out = []
    for r0 in offsets:
        rows = slice(r0, r0 + c)
        labels_n[rows], row_w_n[rows] = labels, row_w
        stats = torch.full((3, n), 7.0, device=DEVICE)
        d = torch.zeros(c, width, device=DEVICE)[:, :vocab]
        d.copy_(x)
        K.lce_rows(d, labels_n[rows], row_w_n[rows], *(t[rows] for t in stats), kw["scale"],
                   kw["softcap"], kw["label_smoothing"], kw["z_loss"], tile_stats=tiles,
                   **(dict(cols=64, block_v=32) | tiling))
        out.append((d, *stats[:, rows]))
    return out


# One thing changed at a time from the first configuration (each at the first two offsets), so
# a key that left it out would stand for two specializations. (7 rows, and slices of 60
# columns, keep the slice count and the alignment of the statistics buffers: only n, or cols,
# changes; softcap 1.0 keeps the value passed for "no softcap".)
ROW_KEY_CHANGES = [dict(z_loss=1e-3), dict(label_smoothing=0.1), dict(label_smoothing=0.2),
                   dict(softcap=30.0), dict(softcap=20.0), dict(softcap=1.0), dict(scale=0.5),
                   dict(c=7), dict(vocab=130), dict(width=160), dict(tile=32), dict(cols=60),
                   dict(block_v=16), dict(warps=2), dict(variant="tile")]
_CFG_KEYS = ("z_loss", "label_smoothing", "softcap", "scale")


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")   # softcap 1 on logits of 100
@pytest.mark.parametrize("tile_stats", [False, True], ids=["row_stats", "tile_stats"])
def test_row_pass_keys_fix_what_the_jit_specializes_on(tile_stats, monkeypatch):
    """Both row passes' caller's keys, over chunks whose [N] slices differ in alignment, and over
    changes of each scalar, constexpr and launch option: never one key for two
    specializations."""
    launches = _recorded_launches(monkeypatch)
    _rows_at_offsets(monkeypatch, {}, tile_stats, fast=True)
    for change in ROW_KEY_CHANGES:
        change = dict(change)
        _row_variant(monkeypatch, change.pop("variant", "lanes"))
        cfg = {k: change.pop(k) for k in _CFG_KEYS if k in change}
        _rows_at_offsets(monkeypatch, cfg, tile_stats, fast=True, offsets=ROW_OFFSETS[:2],
                         **change)
    # the three alignment cases at least, and more with the changes
    _check_keys_fix_specialization(launches, at_least=3 + len(ROW_KEY_CHANGES) // 2)


@pytest.mark.parametrize("tile_stats", [False, True], ids=["row_stats", "tile_stats"])
def test_row_passes_keyed_launches_equal_the_jit(tile_stats, monkeypatch):
    """The keyed launches give exactly what the JIT gives, chunk by chunk. On a GPU the aligned
    chunk comes first, so a kernel compiled for aligned pointers is in fast_launch's cache when
    the misaligned chunks come."""
    cfg = dict(label_smoothing=0.1, z_loss=1e-3, softcap=30.0)
    fast = _rows_at_offsets(monkeypatch, cfg, tile_stats, fast=True)
    jit = _rows_at_offsets(monkeypatch, cfg, tile_stats, fast=False)
    for r0, got, want in zip(ROW_OFFSETS, fast, jit):
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"chunk at row {r0}"


@pytest.mark.gpu
@pytest.mark.parametrize("tile_stats", [False, True], ids=["row_stats", "tile_stats"])
def test_gpu_row_passes_keyed_launches_equal_the_jit(tile_stats, monkeypatch):
    """The same with compiled kernels (``pytest -m gpu``): fast_launch's cache in play."""
    test_row_passes_keyed_launches_equal_the_jit(tile_stats, monkeypatch)


# ---------------------------------------------------------------------------------------------
# The [N] kernels: the row weights, and the loss from the row statistics
# ---------------------------------------------------------------------------------------------
def _row_vectors(n, ignore_every=3, seed=12):
    """(lse, zt, zsum, labels) [n] as the row passes leave them; the ignored rows' statistics
    nan and ±inf (which must not reach the loss)."""
    g = torch.Generator().manual_seed(seed)
    lse = torch.rand(n, generator=g) * 4 + 8
    zt, zsum = torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) * 300
    labels = torch.randint(0, 1000, (n,), generator=g)
    labels[::ignore_every] = -100
    lse[::ignore_every] = float("nan")
    zt[::2 * ignore_every], zsum[ignore_every::2 * ignore_every] = float("inf"), float("-inf")
    return lse, zt, zsum, labels


# (reduction, ε, λ)
LOSS_CFGS = {
    "mean": ("mean", 0.0, 0.0),
    "sum": ("sum", 0.0, 0.0),
    "smoothing_z_loss": ("mean", 0.1, 1e-3),
    "sum_smoothing_z_loss": ("sum", 0.2, 1e-2),
}


_REFERENCES = {name: getattr(K, name) for name in ("finish_loss_reference",
                                                   "row_weights_reference")}


def _no_reference(monkeypatch, name):
    """Make the plain-torch fallback ``name`` fail: the kernel must be what runs. Returns the
    real one."""
    real = _REFERENCES[name]

    def fail(*args, **kwargs):
        raise AssertionError(f"{name} ran, not the kernel")
    monkeypatch.setattr(K, name, fail)
    return real


def _check_finish_loss(monkeypatch, n, cfg):
    reduction, smoothing, z_loss = cfg
    reference = _no_reference(monkeypatch, "finish_loss_reference")
    lse, zt, zsum, labels = _row_vectors(n)
    args = (1000, -100, reduction, smoothing, z_loss)
    loss = K.finish_loss(*(t.to(DEVICE) for t in (lse, zt, zsum, labels)), *args)
    truth = reference(lse.double(), zt.double(), zsum.double(), labels, *args)
    assert loss.dtype == torch.float32 and loss.shape == () and loss.device.type == DEVICE
    assert torch.isfinite(truth) and abs(loss.item() - truth.item()) < 1e-6 * abs(truth.item())


def _check_row_weights(monkeypatch, n, grad, reduction):
    """Exactly the torch reference's weights (one IEEE division), which are float64's rounded
    to fp32 (a division rounded twice, to 53 bits and then 24, is rounded once); 0 on ignored
    rows."""
    reference = _no_reference(monkeypatch, "row_weights_reference")
    *_, labels = _row_vectors(n)
    w = K.row_weights(None if grad is None else grad.to(DEVICE), labels.to(DEVICE), -100,
                      reduction, torch.float32)
    g = torch.tensor(1.0) if grad is None else grad
    assert w.dtype == torch.float32 and w.shape == labels.shape
    assert torch.equal(w.cpu(), reference(g, labels, -100, reduction, torch.float32))
    assert torch.equal(w.cpu(), reference(g, labels, -100, reduction, torch.float64).float())


GRADS = {"one": None, "fp32": torch.tensor(0.37), "bf16": torch.tensor(-2.5, dtype=torch.bfloat16)}


@pytest.mark.parametrize("name", sorted(LOSS_CFGS))
def test_finish_loss_kernel_equals_float64(name, monkeypatch):
    """Over three tiles of VEC_BLOCK rows (the last partial)."""
    _check_finish_loss(monkeypatch, 2 * K.VEC_BLOCK + 777, LOSS_CFGS[name])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n", [0, 5])
def test_finish_loss_kernel_every_row_ignored(reduction, n, monkeypatch):
    """No valid row (or no row): "mean" is nan (eager's 0/0), "sum" is 0."""
    reference = _no_reference(monkeypatch, "finish_loss_reference")
    lse, zt, zsum, labels = _row_vectors(n)
    labels[:] = -100
    args = (1000, -100, reduction, 0.1, 1e-3)
    loss = K.finish_loss(*(t.to(DEVICE) for t in (lse, zt, zsum, labels)), *args)
    torch.testing.assert_close(loss.cpu(), reference(lse, zt, zsum, labels, *args), equal_nan=True)
    assert loss.isnan() if reduction == "mean" else loss.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("grad", sorted(GRADS))
def test_row_weights_kernel_equals_reference(grad, reduction, monkeypatch):
    """g = 1 (no tensor), fp32 and bf16; over three tiles of VEC_BLOCK rows."""
    _check_row_weights(monkeypatch, 2 * K.VEC_BLOCK + 777, GRADS[grad], reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_row_weights_kernel_every_row_ignored(reduction, monkeypatch):
    """No valid row: every weight 0 (a mean over no rows divides by 1, not 0: no nan)."""
    _no_reference(monkeypatch, "row_weights_reference")
    labels = torch.full((9,), 0, device=DEVICE)
    w = K.row_weights(torch.tensor(3.0, device=DEVICE), labels, 0, reduction, torch.float32)
    assert torch.equal(w, torch.zeros(9, device=DEVICE))
    assert K.row_weights(None, labels[:0], 0, reduction, torch.float32).shape == (0,)


@pytest.mark.gpu
def test_gpu_vector_kernels_at_real_length(monkeypatch):
    """The [N] kernels compiled, at a real N (12 chunks of 8192 tokens and a partial one)."""
    for cfg in LOSS_CFGS.values():
        _check_finish_loss(monkeypatch, 100_003, cfg)
    for grad in GRADS.values():
        for reduction in ("mean", "sum"):
            _check_row_weights(monkeypatch, 100_003, grad, reduction)
    test_finish_loss_kernel_every_row_ignored("mean", 5, monkeypatch)


def test_vector_kernels_leave_float64_to_the_reference():
    lse, zt, zsum, labels = (t.double() if t.is_floating_point() else t
                             for t in _row_vectors(10))
    loss = K.finish_loss(lse, zt, zsum, labels, 1000, -100, "mean", 0.1, 0.0)
    assert loss.dtype == torch.float64
    assert torch.equal(loss, K.finish_loss_reference(lse, zt, zsum, labels, 1000, -100, "mean",
                                                     0.1, 0.0))
    w = K.row_weights(None, labels, -100, "mean", torch.float64)
    assert w.dtype == torch.float64 and torch.equal(w, K.row_weights_reference(
        torch.tensor(1.0, dtype=torch.float64), labels, -100, "mean", torch.float64))


# (reduction, ε, λ, V, ignore_index): one changed at a time
VECTOR_KEY_CHANGES = [("mean", 0.0, 0.0, 1000, -100), ("sum", 0.0, 0.0, 1000, -100),
                      ("mean", 0.1, 0.0, 1000, -100), ("mean", 0.2, 0.0, 1000, -100),
                      ("mean", 0.1, 0.0, 999, -100), ("mean", 0.0, 1e-3, 1000, -100),
                      ("mean", 0.0, 1e-2, 1000, -100), ("mean", 0.0, 0.0, 1000, 0)]


def test_vector_kernels_keys_fix_what_the_jit_specializes_on(monkeypatch):
    """The [N] kernels' caller's keys over [N] vectors at offsets of other alignments, of other
    lengths (1 is a constant to Triton, 16 a multiple of 16), and over changes of each scalar."""
    launches = _recorded_launches(monkeypatch)
    monkeypatch.setattr(_triton, "FAST_LAUNCH", True)
    lse, zt, zsum, labels = (t.to(DEVICE) for t in _row_vectors(40))
    for r0 in ROW_OFFSETS:
        for n in (30, 16, 1):
            rows = slice(r0, r0 + n)
            for reduction, smoothing, z_loss, vocab, ignore in VECTOR_KEY_CHANGES:
                K.finish_loss(lse[rows], zt[rows], zsum[rows], labels[rows], vocab, ignore,
                              reduction, smoothing, z_loss)
                K.row_weights(None, labels[rows], ignore, reduction, torch.float32)
                K.row_weights(lse[0], labels[rows], ignore, reduction, torch.float32)
    _check_keys_fix_specialization(launches, at_least=2)


def test_grad_in_forward_path_takes_the_vector_kernels(monkeypatch):
    """lce_forward_with_grads gets its row weights and its loss from the [N] kernels."""
    for name in ("finish_loss_reference", "row_weights_reference"):
        _no_reference(monkeypatch, name)
    h, w, _, y = make(12, 16, 100, dtype=torch.float32, seed=5, device=DEVICE)
    truth, _ = float64_truth(h, w, None, y, label_smoothing=0.1)
    loss, *_ = K.lce_forward_with_grads(h, w, None, y, -100, "mean", 0.1, 1.0, 0.0, 0.0, True,
                                        False, False, rows=8, cols=64, block_v=32)
    assert rel(loss, truth) < 1e-5


def _gif_leaves(bias=True, seed=9):
    h, w, b, y = make(20, 16, 60, dtype=torch.float32, bias=bias, seed=seed)
    return [t.clone().requires_grad_() for t in (h, w, b) if t is not None], y


@pytest.mark.parametrize("g", [1.0, -3.0, 0.37])
def test_grad_in_forward_op_scales_by_upstream_gradient(g):
    """The loss is not the last output (loss·g, e.g. loss / grad-accumulation steps): the saved
    grads are multiplied by g (in place)."""
    leaves, y = _gif_leaves()
    truth = [t.detach().clone().requires_grad_() for t in leaves]
    loss = K.linear_cross_entropy_loss(leaves[0], leaves[1], y, leaves[2])
    assert "grad_in_forward" in type(loss.grad_fn).__name__
    (g * loss).backward()
    (g * eager_loss(*truth, y)).backward()
    for a, e in zip(leaves, truth):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6)


def test_grad_in_forward_op_backward_allocates_no_grad_sized_tensor():
    """Backward only scales the grads computed in the forward and hands them to .grad: no
    tensor of dH's or dW's shape is created (autograd would otherwise pass zero tensors the size
    of the op's non-differentiable grad outputs — a second dW, measured as +1.05 GB on the GPU
    at H=4096) and the leaves' .grad are the forward's tensors themselves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(
                (args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                # new storage: not an in-place update (mul_) or a view (detach)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                    self.shapes.append(tuple(t.shape))
            return out

    leaves, y = _gif_leaves(bias=False)
    h, w = leaves
    loss, dh, dw, _ = torch.ops.chronicals.linear_cross_entropy_grad_in_forward(
        h, w, None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0, torch.float32, True, True, False)
    forward_grads = (dh.data_ptr(), dw.data_ptr())
    del dh, dw
    with Allocations() as mode:
        (0.37 * loss).backward()
    assert tuple(h.shape) not in mode.shapes and tuple(w.shape) not in mode.shapes, mode.shapes
    assert (h.grad.data_ptr(), w.grad.data_ptr()) == forward_grads


def test_grad_in_forward_op_retain_graph_backward_twice():
    """With the graph kept the saved grads are not scaled in place: a second backward is right."""
    leaves, y = _gif_leaves()
    truth = [t.detach().clone().requires_grad_() for t in leaves]
    loss = K.linear_cross_entropy_loss(*leaves[:2], y, leaves[2])
    (0.5 * loss).backward(retain_graph=True)
    (-2.0 * loss).backward()
    (-1.5 * eager_loss(*truth, y)).backward()
    for a, e in zip(leaves, truth):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6)


def test_grad_in_forward_op_frozen_weight_and_no_grad():
    """Only the grads asked for are computed; no gradient needed: the forward-only op."""
    leaves, y = _gif_leaves(bias=False)
    h, w = leaves[0], leaves[1].detach()
    loss = K.linear_cross_entropy_loss(h, w, y)
    loss.backward()
    h_e = h.detach().clone().requires_grad_()
    eager_loss(h_e, w, None, y).backward()
    torch.testing.assert_close(h.grad, h_e.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        loss = K.linear_cross_entropy_loss(h, w, y)
    assert loss.grad_fn is None
    forward_only = K.linear_cross_entropy_loss(h, w, y, grad_in_forward=False)
    assert "grad_in_forward" not in type(forward_only.grad_fn).__name__
    torch.testing.assert_close(forward_only, eager_loss(h, w, None, y))


def test_grad_in_forward_op_refuses_a_grad_it_did_not_compute():
    leaves, y = _gif_leaves(bias=False)
    loss, *_ = torch.ops.chronicals.linear_cross_entropy_grad_in_forward(
        leaves[0], leaves[1], None, y, -100, "mean", 0.0, 1.0, 0.0, 0.0, torch.float32,
        True, False, False)
    with pytest.raises(RuntimeError, match="need_weight=False"):
        loss.backward()


def test_grad_in_forward_op_passes_opcheck():
    h, w, b, y = make(12, 8, 40, dtype=torch.float32, bias=True)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, -100, "mean", 0.1, 1.0,
            2.0, 0.0, torch.float32, True, True, True)
    torch.library.opcheck(torch.ops.chronicals.linear_cross_entropy_grad_in_forward.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_row_chunk_policy():
    """The buffer ≤ ROW_CHUNK_BYTES, C a multiple of 128; with dH and dW (bf16) the extra memory
    stays within the budgets of the two reference shapes (0.6 GB and 1.4 GB)."""
    for n, hidden, vocab, budget in [(8192, 896, 151936, 0.6e9), (8192, 4096, 128256, 1.4e9)]:
        rows = K.row_chunk(n, vocab, 2)
        assert rows % 128 == 0 and rows * vocab * 2 <= K.ROW_CHUNK_BYTES
        assert rows * vocab * 2 + 2 * (vocab * hidden + n * hidden) < budget - 10e6
    assert K.row_chunk(100, 50, 4) == 100 and K.row_chunk(0, 50, 4) == 1


def test_vocab_chunk_policy():
    # Real shapes: ≤ 256 MiB of [N, Vc] logits, powers of two, whole vocab when small.
    for n, hidden, vocab in [(8192, 896, 151936), (8192, 4096, 128256), (65536, 4096, 128256),
                             (1024, 64, 50000)]:
        c = K.vocab_chunk(n, hidden, vocab, 2)
        assert (c == vocab or c & (c - 1) == 0) and n * c * 2 <= K.MAX_CHUNK_BYTES
    assert K.vocab_chunk(16, 32, 300, 4) == 300


# ---------------------------------------------------------------------------------------------
# The registered op: autograd, fake tensors, torch.compile
# ---------------------------------------------------------------------------------------------
def test_registered_op_passes_opcheck():
    h, w, b, y = make(12, 8, 40, dtype=torch.float32, bias=True)
    args = (h.requires_grad_(), w.requires_grad_(), b.requires_grad_(), y, -100, "mean", 0.1, 1.0,
            2.0, 0.0, torch.float32)
    torch.library.opcheck(torch.ops.chronicals.linear_cross_entropy.default, args,
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def _op_loss(h, w, y, **kw):
    return K.linear_cross_entropy_loss(h, w, y, **kw)


@pytest.mark.parametrize("all_ignored", [False, True])
def test_op_under_torch_compile_with_ignored_labels(all_ignored):
    """Device-side token count: no host sync, no graph break; nan like eager when nothing counts."""
    h, w, _, y = make(24, 16, 90, dtype=torch.float32, seed=7)
    if all_ignored:
        y[:] = -100
    compiled = torch.compile(_op_loss, backend="aot_eager", fullgraph=True)
    leaves_c = [t.clone().requires_grad_() for t in (h, w)]
    leaves_e = [t.clone().requires_grad_() for t in (h, w)]
    got = compiled(*leaves_c, y)
    want = eager_loss(*leaves_e, None, y)
    torch.testing.assert_close(got, want, equal_nan=True)
    (got / 4).backward()
    (want / 4).backward()
    for a, e in zip(leaves_c, leaves_e):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# GPU: real shapes, float64 truth, memory bound
# ---------------------------------------------------------------------------------------------
def _gpu_real_inputs(n, hidden, vocab):
    torch.manual_seed(0)
    h = torch.randn(n, hidden, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda") * hidden ** -0.5).bfloat16().requires_grad_()
    y = torch.randint(0, vocab, (n,), device="cuda")
    y[torch.rand(n, device="cuda") < 0.1] = -100
    return h, w, y


REAL_SHAPES = [(8192, 896, 151936, 0.6), (8192, 4096, 128256, 1.4)]


@pytest.mark.gpu
@pytest.mark.parametrize("g", [1.0, 0.37])
@pytest.mark.parametrize("n,hidden,vocab,extra_gb", REAL_SHAPES)
def test_gpu_real_shapes_bf16(n, hidden, vocab, extra_gb, g):
    """Training (gradients in the forward), the loss scaled by g afterwards (g = 1: the saved
    grads are returned as they are; else scaled in place): memory within budget, grads included."""
    h, w, y = _gpu_real_inputs(n, hidden, vocab)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = K.linear_cross_entropy_loss(h, w, y)
    assert "grad_in_forward" in type(loss.grad_fn).__name__
    (loss * g).backward()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    assert peak <= extra_gb, f"peak extra memory {peak:.3f} GB (grads included)"
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = F.cross_entropy(h64 @ w64.t(), y)
    (truth * g).backward()
    assert rel(loss, truth) < 1e-3
    assert rel(h.grad, h64.grad) < 1e-2 and rel(w.grad, w64.grad) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("n,hidden,vocab,extra_gb", REAL_SHAPES)
def test_gpu_real_shapes_bf16_forward_only(n, hidden, vocab, extra_gb):
    """No gradient needed: the forward-only op (a few MB beyond its [N, Vc] buffer)."""
    h, w, y = _gpu_real_inputs(n, hidden, vocab)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        loss = K.linear_cross_entropy_loss(h, w, y)
    torch.cuda.synchronize()
    assert (torch.cuda.max_memory_allocated() - base) / 1e9 <= extra_gb
    truth = F.cross_entropy(h.detach().double() @ w.detach().double().t(), y)
    assert rel(loss, truth) < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gpu_configs_fp32(name):
    cfg = CONFIGS[name]
    h, w, b, y = make(300, 64, 5000, dtype=torch.float32, bias=True, device="cuda")
    y = _labels_for(cfg, y)
    truth, grads = float64_truth(h, w, b, y, **_kw(cfg))
    loss, lse = K.lce_forward(h, w, b, y, *_args(cfg), chunk=1024)
    assert rel(loss, truth) < 1e-5
    got = K.lce_backward(torch.tensor(1.0, device="cuda"), h, w, b, y, lse, *_args(cfg),
                         True, True, True, chunk=1024)
    for g_got, g_want in zip(got, grads):
        assert rel(g_got, g_want) < 1e-4
    # gradients in the forward: 3 token chunks (the last partial), several column slices
    loss, *got = K.lce_forward_with_grads(h, w, b, y, *_args(cfg), True, True, True, rows=128,
                                          cols=1024)
    assert rel(loss, truth) < 1e-5
    for g_got, g_want in zip(got, grads):
        assert rel(g_got, g_want) < 1e-4


@pytest.mark.gpu
def test_gpu_forward_only_op_trains_too():
    """grad_in_forward=False in training: the forward-only op's backward recomputes (8NHV)."""
    h, w, y = _gpu_real_inputs(8192, 896, 151936)
    loss = K.linear_cross_entropy_loss(h, w, y, grad_in_forward=False)
    (loss * 0.37).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    truth = F.cross_entropy(h64 @ w64.t(), y)
    (truth * 0.37).backward()
    assert rel(loss, truth) < 1e-3
    assert rel(h.grad, h64.grad) < 1e-2 and rel(w.grad, w64.grad) < 1e-2
