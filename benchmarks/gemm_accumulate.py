"""The accumulating Gluon GEMM (chronicals_fx/kernels/gemm_accumulate.py) against cuBLAS.

    python -m benchmarks.gemm_accumulate

C += Aᵀ B as the fused loss runs it (A = d_c [C, V], B = H_c [C, H], C = dW [V, H], bf16), at
the two reference shapes' chunk sizes. First every tile configuration is checked on small and
ragged shapes and at the timed ones against an fp32 reference (and cuBLAS's addmm, which
rounds the same sum once: at most one bf16 step apart); then each is timed
(``do_bench_cudagraph`` medians) against cuBLAS's addmm (beta = 1) and mm (beta = 0, the
bound: C not read). A configuration that fails its check is not timed.
"""

from __future__ import annotations

import sys
import time

import torch
import triton
from tabulate import tabulate
from triton.testing import do_bench_cudagraph

from chronicals_fx.kernels import gemm_accumulate as G

TILES = [G.DEFAULT_TILE, G.AccumulateTile(128, 128, 64, 4), G.AccumulateTile(128, 128, 64, 5),
         G.AccumulateTile(128, 256, 64, 2)]
# (K = chunk rows, M = V, N = H): issue 5's two shapes at the default chunk (row_chunk)
TIMED = ((1024, 128256, 4096), (768, 151936, 896))
CHECKED = ((64, 128, 256), (200, 1000, 520), (1, 136, 264), (333, 4104, 1032))


def _inputs(k, m, n, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = (torch.randn(k, m, device="cuda", generator=g) * 1e-2).to(dtype)
    b = torch.randn(k, n, device="cuda", generator=g).to(dtype)
    c = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    return a, b, c


def check(tile: G.AccumulateTile, k: int, m: int, n: int, dtype=torch.bfloat16) -> str | None:
    """None if the kernel's C equals the fp32 reference to one rounding; else what differs."""
    a, b, c = _inputs(k, m, n, dtype, seed=k + m + n)
    want = c.float().addmm(a.t().float(), b.float())
    cublas = c.clone().addmm_(a.t(), b)
    got = c.clone()
    G.make_launch(got, a, b, tile)()
    torch.cuda.synchronize()
    # one rounding of the same fp32 sum (summed in another order): within half a step of the
    # reference, one step of cuBLAS's
    step = torch.finfo(dtype).eps
    err = ((got.float() - want).abs() / want.abs().clamp_min(1e-3)).max().item()
    vs_cublas = ((got.float() - cublas.float()).abs() / cublas.float().abs().clamp_min(1e-3)
                 ).max().item()
    if err > 0.51 * step or vs_cublas > 1.01 * step or not torch.isfinite(got).all():
        return f"max rel err {err:.2e} vs fp32, {vs_cublas:.2e} vs cuBLAS (one step {step:.1e})"
    return None


def main() -> int:
    start = time.time()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
          f"{triton.__version__}", flush=True)
    good = []
    for tile in TILES:
        failures = [f"{shape} {dtype}: {why}" for shape in CHECKED + TIMED
                    for dtype in (torch.bfloat16, torch.float16)
                    if (why := check(tile, *shape, dtype=dtype))]
        print(f"{'ok  ' if not failures else 'FAIL'} {tile.tag()}: "
              f"{'; '.join(failures) or 'every shape, bf16 and fp16'}", flush=True)
        if not failures:
            good.append(tile)
    rows = []
    for k, m, n in TIMED:
        a, b, c = _inputs(k, m, n)
        flop = 2 * k * m * n
        timed = {"cuBLAS addmm (beta = 1)": lambda a=a, b=b, c=c: c.addmm_(a.t(), b),
                 "cuBLAS mm (beta = 0, C not read)":
                     lambda a=a, b=b, c=c: torch.mm(a.t(), b, out=c)}
        for tile in good:
            timed[f"gluon {tile.tag()}"] = G.make_launch(c, a, b, tile)
        base = None
        for name, fn in timed.items():
            t = do_bench_cudagraph(fn, rep=200) * 1e3
            base = base or t
            rows.append((f"K={k} M={m} N={n}", name, f"{t:.1f}", f"{flop / t / 1e6:.0f}",
                         f"{base / t:.3f}x"))
            print(*rows[-1], flush=True)
        del timed, a, b, c
        torch.cuda.empty_cache()
    print(tabulate(rows, headers=("shape", "variant", "µs", "TFLOP/s", "vs addmm")))
    print(f"# {time.time() - start:.0f} s")
    return 0 if len(good) == len(TILES) else 1


if __name__ == "__main__":
    sys.exit(main())
