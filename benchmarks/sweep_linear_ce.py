"""Linear + cross-entropy sweep: the gradients-in-the-forward CUDA path against Inductor.

    python -m benchmarks.sweep_linear_ce [--quick]

bf16, N=8192 at the two reference shapes, 10% of labels ignored, forward + backward with an
upstream gradient g ≠ 1 (as benchmarks.ops gives: the saved grads are then scaled in place) and
with g = 1 (nothing to scale). Per configuration: median ms (triton.testing.do_bench, plain
launches) and the peak memory above the inputs (torch.cuda.max_memory_allocated, dH and dW
included), and the largest relative difference of loss / dH / dW from Inductor's (bf16 both:
a sanity check, not the float64 accuracy test — that is tests/kernels/test_linear_ce.py).

What is swept (the module's hooks, see chronicals_fx/kernels/linear_ce.py): C, the rows per
token chunk (ROW_CHUNK_ROWS; None = the default policy, a [C, V] buffer ≤ 256 MiB), then at
the default C the Triton row passes' (columns per program, BLOCK_V, warps), each with pass 1's
two statistics variants: ROW_STATS = "lanes" (lane-wise, the default) and "tile". ``--quick``:
the default configuration and the previous one (PREVIOUS). On Hopper the fused logits GEMM
(kernels/linear_ce_gemm.py) replaces pass 1, so there the statistics variants and pass 1's
tilings differ only in a run with ``CHRONICALS_LCE_GEMM=0``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from chronicals_fx.kernels import linear_ce as K

SHAPES = ((8192, 896, 151936, 0.6), (8192, 4096, 128256, 1.4))   # N, H, V, memory budget GB
ROWS = (512, 768, 1024)                       # C; the default policy's is printed per shape
TILES = ((8192, 2048, 8), (32768, 2048, 8), (16384, 1024, 4), (4096, 1024, 4))  # cols, BLOCK_V, warps
DEFAULT_TILES = (K.ROW_SPLIT_COLS, K.ROW_BLOCK_V, K.ROW_WARPS)
# row-pass variants: pass 1's statistics (ROW_STATS)
DEFAULT_VARIANT = K.ROW_STATS
# the default until session 6 (2026-11-27): per-tile statistics, 8192 columns per program,
# BLOCK_V 2048, 4 warps
PREVIOUS = (None, (8192, 2048, 4), "tile")
G = 0.37


def eager_loss(h, w, y):
    return F.cross_entropy((h @ w.T).float(), y)


def ours(h, w, y):
    return K.linear_cross_entropy_loss(h, w, y)


def inputs(n, hidden, vocab):
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hidden, device="cuda", generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=gen) * hidden ** -0.5).bfloat16()
    y = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    y[torch.rand(n, device="cuda", generator=gen) < 0.1] = -100
    return h, w.requires_grad_(), y


def step(fn, h, w, y, g):
    h.grad = w.grad = None
    loss = fn(h, w, y)
    loss.backward(g)
    return loss


def measure(fn, h, w, y, g):
    """(ms, peak extra GB, (loss, dH, dW)) of one forward + backward."""
    step(fn, h, w, y, g)                                   # compile / JIT outside the numbers
    h.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = step(fn, h, w, y, g)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 1e9
    out = (loss.detach(), h.grad, w.grad)
    ms = do_bench(lambda: step(fn, h, w, y, g), warmup=10, rep=40, return_mode="median")
    return ms, extra, out


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def configure(rows, tiles, variant=DEFAULT_VARIANT):
    K.ROW_CHUNK_ROWS = rows
    K.ROW_SPLIT_COLS, K.ROW_BLOCK_V, K.ROW_WARPS = tiles
    K.ROW_STATS = variant


def variant_name(variant):
    return f"stats={variant}"


def configs(quick):
    """(rows, tiles, variant) to time: the default and the previous default first, then other
    C and the row-pass tiles with both statistics variants."""
    out = [(None, DEFAULT_TILES, DEFAULT_VARIANT), PREVIOUS]
    if quick:
        return out
    out += [(rows, DEFAULT_TILES, DEFAULT_VARIANT) for rows in ROWS]
    out += [(None, tiles, variant) for tiles in TILES for variant in K.ROW_STATS_KINDS]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true",
                        help="the default configuration and the previous default only")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timing rounds, every configuration once per round (interleaved: "
                             "the GPU's clock drifts over a run); the median is reported")
    args = parser.parse_args()
    start = time.time()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; g = {G} unless said; "
          f"median of {args.rounds} interleaved rounds")
    inductor = torch.compile(eager_loss, dynamic=False)
    for n, hidden, vocab, budget in SHAPES:
        h, w, y = inputs(n, hidden, vocab)
        flop = 6 * n * hidden * vocab
        g = torch.tensor(G, device="cuda")
        one = torch.tensor(1.0, device="cuda")
        print(f"## N={n} H={hidden} V={vocab}: budget {budget} GB, default C="
              f"{K.row_chunk(n, vocab, 2)}, default tiles (cols, BLOCK_V, warps)={DEFAULT_TILES}",
              flush=True)
        # (name, configuration or None for Inductor, upstream gradient)
        runs = [("inductor", None, g), ("inductor g=1", None, one)]
        for rows, tiles, variant in configs(args.quick):
            name = f"ours C={rows or 'default'} tiles={tiles} {variant_name(variant)}"
            runs.append((name, (rows, tiles, variant), g))
            if (rows, tiles, variant) == (None, DEFAULT_TILES, DEFAULT_VARIANT):
                runs.append((name + " g=1", (rows, tiles, variant), one))
        times = {name: [] for name, _, _ in runs}
        extra, errors = {}, {}
        ref = (step(inductor, h, w, y, g).detach(), h.grad, w.grad)    # one step, not timed
        for _ in range(args.rounds):
            for name, config, grad in runs:
                if config is not None:
                    configure(*config)
                try:
                    ms, extra[name], out = measure(inductor if config is None else ours,
                                                   h, w, y, grad)
                except torch.cuda.OutOfMemoryError as exc:
                    print(f"{name}: out of memory ({exc})", flush=True)
                    continue
                times[name].append(ms)
                if config is not None and grad is g:
                    errors[name] = max(rel(a, b) for a, b in zip(out, ref))
                torch.cuda.empty_cache()
        configure(None, DEFAULT_TILES)
        for name, _, _ in runs:
            if not times[name]:
                continue
            ms = statistics.median(times[name])
            line = (f"{name:<72} {ms:7.2f} ms {flop / ms / 1e9:5.0f} TFLOP/s "
                    f"{extra[name]:6.3f} GB  (rounds {' '.join(f'{t:.2f}' for t in times[name])})")
            if name in errors:
                line += f"  max rel diff vs inductor {errors[name]:.1e}"
            print(line + ("" if extra[name] <= budget else "  OVER BUDGET"), flush=True)
        del h, w, y, ref
        torch.cuda.empty_cache()
    print(f"# {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
