"""The SwiGLU work folded into the down projection's GEMMs, against cuBLAS + the SwiGLU pass.

    python -m benchmarks.sweep_swiglu_gemm [--quick]

Per shape (M tokens, O model width, I intermediate width; bf16, CUDA-graph replays, median):

- backward: dh = dy @ W_down, then (dg, du, y) from dh, g, u. Unfused: cuBLAS + the SwiGLU
  backward pass (what the op ran before); fused: kernels/swiglu_gemm.py, one row per tile
  configuration. Also the pass without y (the five-stream backward Inductor runs after saving y).
- the op as a model runs it: ``swiglu_linear`` forward + backward through autograd, fused vs
  unfused ($CHRONICALS_SWIGLU_GEMM), and Inductor's ``linear(silu(g)·u, W)`` for the same.

Correctness first: every fused configuration's dg, du, y against float64 (relative norm error)
beside the unfused path's error, and y bit for bit against the forward kernel's.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from benchmarks.harness import _time
from chronicals_fx.kernels import swiglu as S
from chronicals_fx.kernels import swiglu_gemm as K

SHAPES = ((8192, 896, 4864), (16384, 4096, 14336))     # Qwen2.5-0.5B; Llama-3-8B at 2× tokens
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, SPLIT). Session 7's first sweep (no epilogue split,
# K masked) reached 175-192 TFLOP/s at the small shape, 0.56-0.61x of cuBLAS + the pass: spills.
BWD_CONFIGS = [(128, 128, 64, 8, 3, 1), (128, 128, 64, 8, 3, 2), (128, 128, 64, 8, 3, 4),
               (128, 128, 64, 8, 4, 2), (128, 128, 64, 4, 3, 4), (128, 256, 64, 8, 3, 2),
               (128, 256, 64, 8, 3, 4), (128, 256, 64, 8, 4, 4), (256, 128, 64, 8, 3, 4),
               (64, 128, 64, 4, 4, 1), (64, 128, 64, 4, 4, 2), (64, 256, 64, 4, 3, 4),
               (128, 64, 64, 4, 4, 1), (128, 64, 64, 4, 4, 2)]
SILU = S.ACTIVATIONS["silu"]


def graphed_ms(step) -> float:
    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")


def rel(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def tflops(m, n, k, ms) -> float:
    return 2 * m * n * k / ms / 1e9


def run_shape(m, o, i, quick: bool, rows: list) -> dict:
    """Appends table rows; returns {config: ms} of the fused backward and 'unfused': ms."""
    torch.manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, o, **bf)
    g = (x @ torch.randn(o, i, **bf).div(o ** 0.5)).mul(1.5)
    u = x @ torch.randn(o, i, **bf).div(o ** 0.5)
    w = torch.randn(o, i, **bf).div(i ** 0.5)                     # W_down [O, I]
    dy = torch.randn(m, o, **bf)
    dg, du, y, dh = (torch.empty_like(g) for _ in range(4))
    print(f"## M={m} O={o} I={i}", flush=True)

    # float64 reference (on a slice of rows: the full one would need M·I·8 bytes several times)
    r = slice(0, 1024)
    gd, ud = (t[r].double().requires_grad_() for t in (g, u))
    yd = S.swiglu_reference(gd, ud, SILU)
    yd.backward(dy[r].double() @ w.double())
    want = (gd.grad, ud.grad, yd.detach())

    def unfused_bwd(with_y=True):
        torch.mm(dy, w, out=dh)
        S.swiglu_backward(dh, g, u, dg, du, SILU, y if with_y else None)

    unfused_bwd()
    err_unfused = [rel(t[r], ref) for t, ref in zip((dg, du, y), want)]
    y_forward = torch.empty_like(g)
    S.swiglu_forward(g, u, y_forward, SILU)
    base = graphed_ms(unfused_bwd)
    base5 = graphed_ms(lambda: unfused_bwd(False))
    times = {"unfused": base}
    rows.append((f"{m}x{o}x{i}", "bwd cuBLAS + pass (+y)", f"{base * 1e3:.1f}", "", "1.00",
                 " ".join(f"{e:.1e}" for e in err_unfused)))
    rows.append((f"{m}x{o}x{i}", "bwd cuBLAS + pass (no y)", f"{base5 * 1e3:.1f}", "",
                 f"{base / base5:.2f}", ""))
    for config in BWD_CONFIGS[:2] if quick else BWD_CONFIGS:
        for t in (dg, du, y):
            t.fill_(float("nan"))
        K.down_proj_swiglu_backward(dy, w, g, u, dg, du, y, SILU, config)
        torch.cuda.synchronize()
        errs = [rel(t[r], ref) for t, ref in zip((dg, du, y), want)]
        exact_y = torch.equal(y, y_forward)
        ms = graphed_ms(lambda c=config: K.down_proj_swiglu_backward(dy, w, g, u, dg, du, y,
                                                                     SILU, c))
        if exact_y and max(errs) <= 1.05 * max(err_unfused):
            times[config] = ms
        print(f"bwd fused {config} {ms * 1e3:.1f} us", flush=True)
        rows.append((f"{m}x{o}x{i}", f"bwd fused {config}", f"{ms * 1e3:.1f}",
                     f"{tflops(m, i, o, ms):.0f}", f"{base / ms:.2f}",
                     " ".join(f"{e:.1e}" for e in errs) + ("" if exact_y else " Y DIFFERS")))

    # the op through autograd, as in a model (fused: with this shape's fastest configuration),
    # and Inductor's fused equivalent
    fused = {c: ms for c, ms in times.items() if c != "unfused"}
    if fused:
        os.environ["CHRONICALS_SWIGLU_GEMM_CONFIG"] = ",".join(
            str(int(v)) for v in min(fused, key=fused.get))
    leaves = [t.detach().requires_grad_() for t in (g, u, w)]
    inductor = torch.compile(lambda a, b, c: F.linear(F.silu(a) * b, c))
    timings = {}
    for name, fn, env in (
            ("op fwd+bwd unfused", lambda a, b, c: torch.ops.chronicals.swiglu_linear(
                a, b, c, None, SILU), "0"),
            ("op fwd+bwd fused", lambda a, b, c: torch.ops.chronicals.swiglu_linear(
                a, b, c, None, SILU), "1"),
            ("Inductor linear(silu(g)*u) fwd+bwd", inductor, "1")):
        os.environ["CHRONICALS_SWIGLU_GEMM"] = env
        timings[name], note = _time(fn, leaves, (dy,))
        if note:
            print(name, note)
    os.environ.pop("CHRONICALS_SWIGLU_GEMM")
    os.environ.pop("CHRONICALS_SWIGLU_GEMM_CONFIG", None)
    ref = timings["Inductor linear(silu(g)*u) fwd+bwd"]
    for name, ms in timings.items():
        rows.append((f"{m}x{o}x{i}", name, f"{ms * 1e3:.1f}", "", f"{ref / ms:.2f} vs Ind", ""))
    del leaves, gd, ud, yd, want, inductor
    torch.cuda.empty_cache()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two tile configurations only")
    parser.add_argument("--best", help="write the fastest configuration at the first shape here")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton "
          f"{triton.__version__}; shipped config {K.CONFIG}")
    rows: list = []
    times = [run_shape(m, o, i, args.quick, rows) for m, o, i in SHAPES]
    fused = {c: ms for c, ms in times[0].items() if c != "unfused"}
    best = min(fused, key=fused.get) if fused else None
    if best is not None:
        print(f"fastest correct configuration at {SHAPES[0]}: {best} {fused[best] * 1e3:.1f} us "
              f"vs unfused {times[0]['unfused'] * 1e3:.1f} us")
    if args.best:
        with open(args.best, "w") as f:
            f.write(",".join(str(int(v)) for v in best) if best and fused[best] < times[0]["unfused"]
                    else "")
    from tabulate import tabulate
    print(tabulate(rows, headers=("shape MxOxI", "variant", "us", "TFLOP/s", "speedup",
                                  "rel err dg du y (fwd: out)")))


if __name__ == "__main__":
    main()
