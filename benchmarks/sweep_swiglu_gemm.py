"""The SwiGLU work folded into the down projection's GEMMs, against cuBLAS + the SwiGLU pass.

    python -m benchmarks.sweep_swiglu_gemm [--quick]

Per shape (M tokens, O model width, I intermediate width; bf16, CUDA-graph replays, median):

- backward: dh = dy @ W_down, then (dg, du, y) from dh, g, u. Unfused: cuBLAS + the SwiGLU
  backward pass (what the op ran before); fused: kernels/swiglu_gemm.py, one row per tile
  configuration. Also the pass without y (the five-stream backward Inductor runs after saving y).
- forward, an experiment: y_down = (act(g)·u) @ W_downᵀ with act(g)·u formed in the GEMM's
  prologue (never written) against the SwiGLU forward pass + cuBLAS.
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
import triton.language as tl
from triton.testing import do_bench

from benchmarks.harness import _time
from chronicals_fx.kernels import swiglu as S
from chronicals_fx.kernels import swiglu_gemm as K
from chronicals_fx.kernels._triton import round_to

SHAPES = ((8192, 896, 4864), (16384, 4096, 14336))     # Qwen2.5-0.5B; Llama-3-8B at 2× tokens
BWD_CONFIGS = [(bm, bn, bk, w, st, p)
               for bm, bn, bk, w, st in ((128, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                                         (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                                         (64, 128, 64, 4, 4), (128, 64, 64, 4, 4),
                                         (128, 128, 32, 4, 5))
               for p in (True, False)]
FWD_CONFIGS = ((128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
               (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 32, 4, 5))
SILU = S.ACTIVATIONS["silu"]


@triton.jit
def swiglu_down_proj_fwd_kernel(G, U, W, OUT, M, N, K, stride_g, stride_u, stride_w, stride_o,
                                ROUND: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr):
    """OUT[M, N] = (silu(g)·u)[M, K] @ W[N, K]ᵀ, the product formed per tile in registers."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    g_ptrs = G + (rows % M)[:, None] * stride_g + ks[None, :]
    u_ptrs = U + (rows % M)[:, None] * stride_u + ks[None, :]
    w_ptrs = W + (cols % N)[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        g = tl.load(g_ptrs, mask=ks[None, :] < k_left, other=0.0).to(tl.float32)
        u = tl.load(u_ptrs, mask=ks[None, :] < k_left, other=0.0).to(tl.float32)
        h = round_to(round_to(g / (1.0 + tl.exp(-g)), ROUND) * u, ROUND).to(W.dtype.element_ty)
        b = tl.load(w_ptrs, mask=ks[:, None] < k_left, other=0.0)
        acc = tl.dot(h, b, acc)
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(OUT + rows[:, None] * stride_o + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask)


def fused_forward(g, u, w, out, config):
    bm, bn, bk, warps, stages = config
    m, k = g.shape
    n = w.shape[0]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    swiglu_down_proj_fwd_kernel[grid](g, u, w, out, m, n, k, g.stride(0), u.stride(0),
                                      w.stride(0), out.stride(0), ROUND=1, BLOCK_M=bm,
                                      BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps,
                                      num_stages=stages)


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


def run_shape(m, o, i, quick: bool, rows: list) -> None:
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
        rows.append((f"{m}x{o}x{i}", f"bwd fused {config}", f"{ms * 1e3:.1f}",
                     f"{tflops(m, i, o, ms):.0f}", f"{base / ms:.2f}",
                     " ".join(f"{e:.1e}" for e in errs) + ("" if exact_y else " Y DIFFERS")))

    # forward experiment
    out = torch.empty(m, o, **bf)
    want_out = (S.swiglu_reference(g[r].double(), u[r].double(), SILU) @ w.double().t())

    def unfused_fwd():
        S.swiglu_forward(g, u, dh, SILU)
        torch.mm(dh, w.t(), out=out)

    unfused_fwd()
    fbase = graphed_ms(unfused_fwd)
    rows.append((f"{m}x{o}x{i}", "fwd pass + cuBLAS", f"{fbase * 1e3:.1f}", "", "1.00",
                 f"{rel(out[r], want_out):.1e}"))
    for config in FWD_CONFIGS[:2] if quick else FWD_CONFIGS:
        out.fill_(float("nan"))
        fused_forward(g, u, w, out, config)
        torch.cuda.synchronize()
        err = rel(out[r], want_out)
        ms = graphed_ms(lambda c=config: fused_forward(g, u, w, out, c))
        rows.append((f"{m}x{o}x{i}", f"fwd prologue {config}", f"{ms * 1e3:.1f}",
                     f"{tflops(m, o, i, ms):.0f}", f"{fbase / ms:.2f}", f"{err:.1e}"))

    # the op through autograd, as in a model, and Inductor's fused equivalent
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
    ref = timings["Inductor linear(silu(g)*u) fwd+bwd"]
    for name, ms in timings.items():
        rows.append((f"{m}x{o}x{i}", name, f"{ms * 1e3:.1f}", "", f"{ref / ms:.2f} vs Ind", ""))
    del leaves, gd, ud, yd, want, inductor
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two tile configurations only")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton "
          f"{triton.__version__}; shipped config {K.CONFIG}")
    rows: list = []
    for m, o, i in SHAPES:
        run_shape(m, o, i, args.quick, rows)
    from tabulate import tabulate
    print(tabulate(rows, headers=("shape MxOxI", "variant", "us", "TFLOP/s", "speedup",
                                  "rel err dg du y (fwd: out)")))


if __name__ == "__main__":
    main()
