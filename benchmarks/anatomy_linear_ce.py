"""Where the fused linear+CE's time goes, piece by piece, against the unchunked GEMMs.

    python -m benchmarks.anatomy_linear_ce

bf16, N=8192 at the two reference shapes (benchmarks/sweep_linear_ce.py). For each token-chunk
size C (the default policy's and the alternatives), the three cuBLAS GEMMs of one chunk of the
gradients-in-the-forward mode are timed alone (triton.testing.do_bench, median) and summed over
the ⌈N / C⌉ chunks:

    logits  x_c = H_c @ Wᵀ            [C, H] × [H, V]
    dH      dH_c = d_c @ W            [C, V] × [V, H]   (K = V, few output tiles: split over V
                                                         into s batched GEMMs as an alternative)
    dW      dW (+)= d_cᵀ @ H_c        [V, C] × [C, H]   (the first chunk beta = 0, then beta = 1)

against the same three GEMMs over all N rows at once (what Inductor runs, holding [N, V]).
Then the two Triton row passes on one [C, V] chunk for several tiles: time, and the bandwidth
of their 3 · C · V · 2 bytes (read, read, write).
"""

from __future__ import annotations

import time

import torch
import triton
from triton.testing import do_bench

from chronicals_fx.kernels import linear_ce as K

from .sweep_linear_ce import SHAPES, inputs

CHUNK_ROWS = (768, 1024, 2048)
SPLITS = (2, 4, 8)
ROW_TILES = ((8192, 2048, 4), (8192, 2048, 8), (16384, 4096, 8), (4096, 1024, 4),
             (16384, 2048, 8), (32768, 4096, 8))


def ms(fn) -> float:
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def chunk_gemms(h, w, dw, rows: int) -> None:
    """Print one chunk's three GEMMs (and dH split over V) for C = rows, summed over N."""
    n, hidden = h.shape
    vocab = w.shape[0]
    chunks = triton.cdiv(n, rows)
    hc = h[:rows]
    x = torch.randn(rows, vocab, device="cuda", dtype=h.dtype) * 1e-3
    dh = torch.empty(rows, hidden, device="cuda", dtype=h.dtype)
    t_x = ms(lambda: torch.mm(hc, w.t(), out=x))
    t_dh = ms(lambda: torch.mm(x, w, out=dh))
    t_dw0 = ms(lambda: torch.mm(x.t(), hc, out=dw))
    t_dw1 = ms(lambda: dw.addmm_(x.t(), hc))
    total = chunks * (t_x + t_dh) + t_dw0 + (chunks - 1) * t_dw1
    flop = 2 * rows * hidden * vocab
    print(f"C={rows:5d} x{chunks:2d}: logits {t_x:.3f}  dH {t_dh:.3f}  dW first {t_dw0:.3f}"
          f"  dW accumulate {t_dw1:.3f} ms per chunk ({flop / t_x / 1e9:.0f} / "
          f"{flop / t_dh / 1e9:.0f} / {flop / t_dw1 / 1e9:.0f} TFLOP/s); "
          f"{total:.2f} ms for all N", flush=True)
    for s in SPLITS:
        if vocab % s:
            continue
        xs = x.view(rows, s, vocab // s).transpose(0, 1)            # [s, C, V/s], no copy
        ws = w.view(s, vocab // s, hidden)
        t_split = ms(lambda xs=xs, ws=ws: dh.copy_(
            torch.bmm(xs, ws, out_dtype=torch.float32).sum(0)))
        print(f"    dH split over V in {s}: {t_split:.3f} ms per chunk "
              f"({flop / t_split / 1e9:.0f} TFLOP/s)", flush=True)


def gemm_table(h, w) -> None:
    dw = torch.empty_like(w)
    for rows in (*CHUNK_ROWS, h.shape[0]):
        if rows <= h.shape[0]:
            chunk_gemms(h, w, dw, rows)
            torch.cuda.empty_cache()


def row_table(h, w, labels, vocab: int) -> None:
    rows = K.row_chunk(h.shape[0], vocab, h.element_size())
    x0 = torch.mm(h[:rows].detach(), w.detach().t())
    x = torch.empty_like(x0)
    y = labels[:rows].contiguous()
    f32 = {"dtype": torch.float32, "device": "cuda"}
    row_w = K.row_weights(torch.ones((), **f32), y, -100, "mean", torch.float32)
    lse, zt, zsum = torch.empty((3, rows), **f32)
    moved = 3 * x.numel() * x.element_size()
    copy = ms(lambda: x.copy_(x0))
    print(f"row passes on [{rows}, {vocab}] (copy of the chunk: {copy:.3f} ms, "
          f"{2 * x.numel() * x.element_size() / copy / 1e6:.0f} GB/s):", flush=True)
    default = K.ROW_STATS
    for stats in K.ROW_STATS_KINDS:
        K.ROW_STATS = stats
        for cols, block_v, warps in ROW_TILES:
            def run(tiles=(cols, block_v, warps)):
                x.copy_(x0)
                K.lce_rows(x, y, row_w, lse, zt, zsum, 1.0, 0.0, 0.0, 0.0, *tiles)
            t = ms(run) - copy
            print(f"  stats={stats:5s} cols={cols:5d} BLOCK_V={block_v:4d} warps={warps}: "
                  f"{t:.3f} ms, {moved / t / 1e6:.0f} GB/s", flush=True)
    K.ROW_STATS = default


def main() -> None:
    start = time.time()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    for n, hidden, vocab, _ in SHAPES:
        print(f"## N={n} H={hidden} V={vocab}", flush=True)
        h, w, y = inputs(n, hidden, vocab)
        with torch.no_grad():
            gemm_table(h.detach(), w.detach())
            row_table(h, w, y, vocab)
        del h, w, y
        torch.cuda.empty_cache()
    print(f"# {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
