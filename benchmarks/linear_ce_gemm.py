"""The fused loss's logits GEMM with the row statistics in its epilogue
(chronicals_fx/kernels/linear_ce_gemm.py) against cuBLAS + the statistics pass, per chunk.

    python -m benchmarks.linear_ce_gemm

First each tile configuration is checked: the logits within a bf16 step of cuBLAS's (only the
fp32 accumulation order differs), the per-tile statistics equal to their plain-torch reference
computed from the kernel's own logits, and a whole fused-loss call (gradients in the forward,
several chunks, the last partial) equal to the cuBLAS path's — on ragged and real shapes, with
and without soft-capping and label smoothing. Then one chunk is timed at issue 5's two shapes
(``do_bench_cudagraph`` medians): the logits alone (cuBLAS / fused), and the logits plus both
row passes (the chunk's whole forward part; x becomes d). A configuration that fails its check
is not timed.

Then the dH GEMM of a chunk, dH_c = d_c @ W (opt-in in the product: CHRONICALS_LCE_DH_GEMM=1):
the same main loop with a plain store epilogue, checked against cuBLAS (a bf16 step) and timed
against it at both shapes.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import torch
import triton
from tabulate import tabulate
from triton.testing import do_bench_cudagraph

from chronicals_fx.kernels import linear_ce as K
from chronicals_fx.kernels import linear_ce_gemm as L

# The product's pick for each hidden size (kernels/linear_ce_gemm.py: tile_for, with the
# sweep's findings) and the runners-up of session 11 calls 2 and 4.
TILES = [L.NARROW_TILE, L.WIDE_TILE, replace(L.NARROW_TILE, epi_warps=8, epi_regs=128),
         replace(L.WIDE_TILE, split=16, epi_regs=128)]
# (rows C of a chunk, H, V): issue 5's shapes at their default chunk (row_chunk)
TIMED = ((768, 896, 151936), (1024, 4096, 128256))
CHECKED = ((300, 256, 5000), (128, 64, 1000)) + TIMED


def _inputs(c, hidden, vocab, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(c, hidden, device="cuda", generator=g).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * hidden ** -0.5).bfloat16()
    y = torch.randint(0, vocab, (c,), device="cuda", generator=g)
    y[torch.rand(c, device="cuda", generator=g) < 0.1] = -100
    return h, w, y


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def check(tile, c, hidden, vocab) -> list[str]:
    h, w, y = _inputs(c, hidden, vocab, seed=c + vocab)
    bad = []
    for softcap, smoothing in ((0.0, 0.0), (30.0, 0.1)):
        x = torch.full((c, vocab), float("nan"), device="cuda", dtype=torch.bfloat16)
        stats = L.tile_stats_buffers(c, hidden, vocab, bool(smoothing), h.device, tile)
        L.make_launch(h, w, x, *stats, 1.0, softcap, tile)()
        torch.cuda.synchronize()
        want = torch.mm(h, w.t())
        if _rel(x, want) > 2 ** -7 or not torch.isfinite(x).all():
            bad.append(f"logits {_rel(x, want):.1e} from cuBLAS's")
        ref = L.tile_stats_reference(x, tile.bn, 1.0, softcap, bool(smoothing))
        for name, got, exp in zip(("max", "sum exp", "sum z"), stats, ref):
            if got is not None and _rel(got, exp) > 1e-5:
                bad.append(f"tile {name} {_rel(got, exp):.1e} (softcap {softcap})")
    # the whole op, 3+ chunks (the last partial): fused against cuBLAS
    rows = max(128, c // 3 // 128 * 128)
    args = (h, w, None, y, -100, "mean", 0.1, 1.0, 0.0, 1e-4, True, True, False)
    got = K.lce_forward_with_grads(*args, rows=rows)
    os.environ["CHRONICALS_LCE_GEMM"] = "0"
    try:
        want = K.lce_forward_with_grads(*args, rows=rows)
    finally:
        del os.environ["CHRONICALS_LCE_GEMM"]
    for name, a, b in zip(("loss", "dH", "dW"), got[:3], want[:3]):
        if _rel(a, b) > (1e-5 if name == "loss" else 2e-2):
            bad.append(f"op {name} {_rel(a, b):.1e} from the cuBLAS path")
    return bad


def time_chunk(c, hidden, vocab, tiles) -> list[tuple]:
    """One chunk's logits, alone and with both row passes: cuBLAS, then each fused tile."""
    h, w, y = _inputs(c, hidden, vocab)
    x = torch.empty(c, vocab, device="cuda", dtype=torch.bfloat16)
    f32 = dict(dtype=torch.float32, device="cuda")
    row_w = K.row_weights(torch.ones((), **f32), y, -100, "mean", torch.float32)
    lse, zt, zsum = torch.empty((3, c), **f32)

    def rows(stats=None):
        K.lce_rows(x, y, row_w, lse, zt, zsum, 1.0, 0.0, 0.0, 0.0, tile_stats=stats)

    timed = {"cuBLAS logits": lambda: torch.mm(h, w.t(), out=x),
             "cuBLAS logits + both row passes": lambda: (torch.mm(h, w.t(), out=x), rows())}
    for tile in tiles:
        stats = L.tile_stats_buffers(c, hidden, vocab, False, h.device, tile)
        launch = L.make_launch(h, w, x, *stats, 1.0, 0.0, tile)
        timed[f"fused logits ({tile.tag()})"] = launch
        timed[f"fused logits + combine + pass 2 ({tile.tag()})"] = (
            lambda launch=launch, stats=stats: (launch(), rows(stats)))
    return _timed_rows(timed, c, hidden, vocab, rep=200)


def time_dh(c, hidden, vocab, tiles) -> tuple[list[tuple], list[str]]:
    """dH_c = d_c @ W: each tile checked against cuBLAS, then timed with it."""
    g = torch.Generator(device="cuda").manual_seed(c)
    d = (torch.randn(c, vocab, device="cuda", generator=g) * 1e-3).bfloat16()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * hidden ** -0.5).bfloat16()
    out = torch.empty(c, hidden, device="cuda", dtype=torch.bfloat16)
    want = torch.mm(d, w)
    bad, timed = [], {"cuBLAS dH": lambda: torch.mm(d, w, out=out)}
    for tile in tiles:
        out.fill_(float("nan"))
        L.make_dh_launch(d, w, out, tile)()
        torch.cuda.synchronize()
        if not torch.isfinite(out).all() or _rel(out, want) > 2 ** -7:
            bad.append(f"dH C={c} H={hidden} {tile.tag()}: {_rel(out, want):.1e} from cuBLAS")
            continue
        timed[f"gluon dH ({tile.tag()})"] = L.make_dh_launch(d, w, out, tile)
    return _timed_rows(timed, c, hidden, vocab, rep=100), bad


def _timed_rows(timed: dict, c, hidden, vocab, rep: int) -> list[tuple]:
    """Each callable's CUDA-graph median, a table row each (printed as it comes), with the
    rate of one [C, H] × [H, V] GEMM's 2·C·H·V FLOPs."""
    flop = 2 * c * hidden * vocab
    table = []
    for name, fn in timed.items():
        t = do_bench_cudagraph(fn, rep=rep) * 1e3
        table.append((f"C={c} H={hidden} V={vocab}", name, f"{t:.1f}", f"{flop / t / 1e6:.0f}"))
        print(*table[-1], flush=True)
    return table


def main() -> int:
    start = time.time()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)
    good = []
    for tile in TILES:
        bad = [f"{shape}: {b}" for shape in CHECKED for b in check(tile, *shape)]
        print(f"{'ok  ' if not bad else 'FAIL'} {tile.tag()}: {'; '.join(bad) or 'every shape'}",
              flush=True)
        if not bad:
            good.append(tile)
    table = []
    for shape in TIMED:
        table += time_chunk(*shape, good)
        torch.cuda.empty_cache()
    dh_failures = []
    for shape in TIMED:
        rows, bad = time_dh(*shape, [L.WIDE_TILE, L.NARROW_TILE])
        table += rows
        dh_failures += bad
        torch.cuda.empty_cache()
    for b in dh_failures:
        print("FAIL", b, flush=True)
    print(tabulate(table, headers=("chunk", "variant", "µs", "GEMM TFLOP/s")))
    print(f"# {time.time() - start:.0f} s")
    return 0 if len(good) == len(TILES) and not dh_failures else 1


if __name__ == "__main__":
    sys.exit(main())
