"""Tile sweep for the RMSNorm kernels (GPU): the numbers behind the defaults in _tiles()."""

from __future__ import annotations

import itertools
import os

import torch
from tabulate import tabulate
from triton.testing import do_bench

from chronicals_fx.kernels import rmsnorm as K


def main() -> None:
    bf = torch.bfloat16
    rows = []
    for n, h in ((16384, 4096), (8192, 896), (65536, 128)):
        x = torch.randn(n, h, device="cuda", dtype=bf)
        w = torch.randn(h, device="cuda", dtype=bf)
        dy = torch.randn_like(x)
        y, dx = torch.empty_like(x), torch.empty_like(x)
        tensor_bytes = n * h * 2
        for bm, nw in itertools.product((1, 2, 4, 8, 16), (4, 8, 16)):
            if bm * triton_pow2(h) > 32768:
                continue
            f = do_bench(lambda: K.rms_norm_forward(x, w, y, 1e-6, 0.0, bf, bf, bf, bm, nw),
                         warmup=10, rep=50, return_mode="median")
            rows.append((f"{n}x{h}", "fwd", bm, nw, "", f"{f * 1000:.0f}", f"{2 * tensor_bytes / f / 1e6:.0f}"))
            for per_sm in (2, 4, 8, 16):
                b = do_bench(lambda: K.rms_norm_backward(dy, x, w, dx, 1e-6, 0.0, bf, bf, True, bm, nw, per_sm),
                             warmup=10, rep=50, return_mode="median")
                rows.append((f"{n}x{h}", "bwd", bm, nw, per_sm, f"{b * 1000:.0f}", f"{3 * tensor_bytes / b / 1e6:.0f}"))
    best = {}
    for r in rows:
        key = (r[0], r[1])
        if key not in best or float(r[5]) < float(best[key][5]):
            best[key] = r
    print(tabulate(rows, headers=("shape", "pass", "BLOCK_M", "warps", "progs/SM", "µs", "GB/s")),
          file=open(os.path.join(os.environ.get("OUT", "/tmp"), "sweep_rmsnorm.txt"), "w"))
    print(tabulate(sorted(best.values()), headers=("shape", "pass", "BLOCK_M", "warps", "progs/SM", "µs", "GB/s")))


def triton_pow2(h: int) -> int:
    import triton

    return triton.next_power_of_2(h)


if __name__ == "__main__":
    main()
