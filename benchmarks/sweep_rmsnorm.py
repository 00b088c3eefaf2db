"""Tile sweep for the RMSNorm kernels (GPU): the numbers behind the defaults in _tiles().

Each configuration's forward and backward are captured in a CUDA graph and replayed, so host
overhead is out of the numbers. Prints the best per shape; the full table goes to $OUT.

    python -m benchmarks.sweep_rmsnorm [terms | prefetch]

``terms``: the backward as a decoder runs it (Qwen2.5-0.5B, 8192 × 896, bf16): dy given as 1, 2
or 3 unsummed terms (q/k/v, gate/up) plus the residual's dh, per tile, without and with the next
band prefetched; and dW's reduction of the programs' partial sums (ours at its tiles and at
64 × 64, against torch's sum). ``prefetch``: the backward (one term, dh) at every shape, with and
without the prefetch, on tiles around the one in use.
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
from tabulate import tabulate

from benchmarks.harness import graphed_ms
from chronicals_fx.kernels import rmsnorm as K

SHAPES = ((8192, 896), (16384, 4096), (8192 * 2, 128))
HEADERS = ("shape", "pass", "BLOCK_M", "warps", "progs/SM", "µs", "GB/s")


def main() -> None:
    bf = torch.bfloat16
    rows = []
    for n, h in SHAPES:
        x = torch.randn(n, h, device="cuda", dtype=bf)
        w = torch.randn(h, device="cuda", dtype=bf)
        dy = torch.randn_like(x)
        y, dx = torch.empty_like(x), torch.empty_like(x)
        tensor_bytes = n * h * 2
        block_h = triton.next_power_of_2(h)
        for bm, nw in itertools.product((1, 2, 4, 8, 16, 32), (2, 4, 8, 16)):
            if not 256 <= bm * block_h <= 16384:
                continue
            f = graphed_ms(lambda: K.rms_norm_forward(x, w, y, 1e-6, 0.0, bf, bf, bf, bm, nw))
            rows.append((f"{n}x{h}", "fwd", bm, nw, "", round(f * 1000, 1), round(2 * tensor_bytes / f / 1e6)))
            for per_sm in (1, 2, 4, 8):
                b = graphed_ms(lambda: K.rms_norm_backward(dy, x, w, dx, 1e-6, 0.0, bf, bf, True,
                                                           bm, nw, per_sm))
                rows.append((f"{n}x{h}", "bwd", bm, nw, per_sm, round(b * 1000, 1),
                             round(3 * tensor_bytes / b / 1e6)))
        # printed per shape, so a call cut off at its limit still reports the shapes done
        fwd_tile = K._forward_tiles(h)
        bwd_m, bwd_warps, bwd_per_sm, _ = K._backward_tiles(h)
        shape_rows = [r for r in rows if r[0] == f"{n}x{h}"]
        best = [min((r for r in shape_rows if r[1] == p), key=lambda r: r[5]) for p in ("fwd", "bwd")]
        default = [r for r in shape_rows
                   if (r[1] == "fwd" and r[2:4] == (fwd_tile[0], fwd_tile[2]))
                   or (r[1] == "bwd" and r[2:5] == (bwd_m, bwd_warps, bwd_per_sm))]
        print(tabulate(best + [("default",) + r[1:] for r in default], headers=HEADERS), flush=True)
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep_rmsnorm.txt"), "w") as f:
            f.write(tabulate(rows, headers=HEADERS))

def backward_terms(n: int = 8192, h: int = 896) -> None:
    bf = torch.bfloat16
    x, dh = (torch.randn(n, h, device="cuda", dtype=bf) for _ in range(2))
    w = torch.randn(h, device="cuda", dtype=bf)
    dys = [torch.randn(n, h, device="cuda", dtype=bf) for _ in range(3)]
    dx = torch.empty_like(x)
    rows = []
    for terms, bm, nw, per_sm in itertools.product((1, 2, 3), (4, 8), (4, 8), (2, 4)):
        b = graphed_ms(lambda: K.rms_norm_backward(dys[0], x, w, dx, 1e-6, 0.0, bf, bf, True, bm,
                                                   nw, per_sm, dh=dh,
                                                   dy_terms=tuple(dys[1:terms]), prefetch=False))
        rows.append((terms, bm, nw, per_sm, round(b * 1000, 1),
                     round((3 + terms) * n * h * 2 / b / 1e6)))
    table = [min((r for r in rows if r[0] == t), key=lambda r: r[4]) for t in (1, 2, 3)]
    print(tabulate(table, headers=("no prefetch: dy terms", "BLOCK_M", "warps", "progs/SM",
                                   "µs (+ dW)", "GB/s")), flush=True)

    # the next band's loads issued before this band is reduced (PREFETCH), per tile
    prefetched = []
    for terms, bm, nw, per_sm in itertools.product((1, 2, 3), (2, 4, 8), (4, 8), (1, 2, 4)):
        b = graphed_ms(lambda: K.rms_norm_backward(dys[0], x, w, dx, 1e-6, 0.0, bf, bf, True,
                                                   bm, nw, per_sm, dh=dh,
                                                   dy_terms=tuple(dys[1:terms]), prefetch=True))
        prefetched.append((terms, bm, nw, per_sm, round(b * 1000, 1)))
    table = [min((r for r in prefetched if r[0] == t), key=lambda r: r[4]) for t in (1, 2, 3)]
    table += [("tile in use",) + r[1:] for r in prefetched
              if r[1:4] == K._backward_tiles(h)[:3]]
    print(tabulate(table, headers=("prefetch: dy terms", "BLOCK_M", "warps", "progs/SM",
                                   "µs (+ dW)")), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep_rmsnorm_terms.txt"), "w") as f:
        f.write(tabulate(rows + [("prefetch",) + r for r in prefetched]))

    dw = torch.empty(h, device="cuda", dtype=bf)
    reductions = []
    for p in (264, 528, 1056):
        partial = torch.randn(p, h, device="cuda")
        for name, (bp, bh) in (("ours", K._dw_tiles(h)), ("ours 64x64", (64, 64))):
            t = graphed_ms(lambda: K.rms_norm_dw_kernel[(triton.cdiv(h, bh),)](
                partial, dw, p, h, K.ROUND_CODES[bf], BLOCK_P=bp, BLOCK_H=bh, num_warps=4))
            reductions.append((p, f"{name} ({bp}x{bh})", round(t * 1000, 2)))
        t = graphed_ms(lambda: dw.copy_(partial.sum(0)))
        reductions.append((p, "torch sum(0) + cast", round(t * 1000, 2)))
    print(tabulate(reductions, headers=("partials", "dW reduction", "µs")), flush=True)


def prefetch_sweep() -> None:
    """The backward (with dh, one dy term) at every shape, with and without PREFETCH, on tiles
    around the one in use."""
    bf = torch.bfloat16
    rows = []
    for n, h in SHAPES:
        x, dy, dh = (torch.randn(n, h, device="cuda", dtype=bf) for _ in range(3))
        w = torch.randn(h, device="cuda", dtype=bf)
        dx = torch.empty_like(x)
        bm0, _, nw0 = K._tiles(h)
        for prefetch, bm, nw, per_sm in itertools.product(
                (False, True), sorted({max(1, bm0 // 2), bm0, 2 * bm0}), sorted({nw0, max(2, nw0 // 2)}),
                (1, 2, 4)):
            b = graphed_ms(lambda: K.rms_norm_backward(dy, x, w, dx, 1e-6, 0.0, bf, bf, True, bm, nw,
                                                       per_sm, dh=dh, prefetch=prefetch))
            rows.append((f"{n}x{h}", prefetch, bm, nw, per_sm, round(b * 1000, 1),
                         round(4 * n * h * 2 / b / 1e6)))
        shape_rows = [r for r in rows if r[0] == f"{n}x{h}"]
        table = [min((r for r in shape_rows if r[1] == p), key=lambda r: r[5]) for p in (False, True)]
        *tile, prefetch = K._backward_tiles(h)
        table += [("in use",) + r[1:] for r in shape_rows if r[1] == prefetch and r[2:5] == tuple(tile)]
        print(tabulate(table, headers=("shape", "prefetch", "BLOCK_M", "warps", "progs/SM",
                                       "µs (+ dW)", "GB/s")), flush=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", choices=("terms", "prefetch"),
                        help="terms: the backward as a decoder runs it, and dW's reduction; "
                             "prefetch: the backward with and without PREFETCH (default: the "
                             "tile sweep of every shape)")
    {None: main, "terms": backward_terms, "prefetch": prefetch_sweep}[parser.parse_args().mode]()
