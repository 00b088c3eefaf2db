"""Can a Hopper-style Triton GEMM with the SwiGLU backward in its epilogue beat cuBLAS + the
SwiGLU pass? (benchmarks/swiglu_gemm_tma.py: persistent grid, TMA tensor descriptors, tutorial 09.)

    python -m benchmarks.sweep_swiglu_tma [--quick] [--shapes qwen|qwen_wt|large|all|a,b]
                                          [--gluon | --no-gluon] [--gluon-only]
    python -m benchmarks.sweep_swiglu_tma --check-cpu      # Triton interpreter, tiny shapes

Per shape (bf16; dy [M, K], W = W_down [K, N] as nn.Linear stores it (N contiguous); g, u [M, N]):

  (a) cuBLAS  dh = torch.mm(dy, W)
  (b) cuBLAS + the SwiGLU backward pass writing dg, du and y = act(g)·u    (what the op runs)
  (c) cuBLAS + the pass without y
  (d) the plain persistent TMA GEMM (stores dh): how close Triton's main loop gets to cuBLAS
  (e) the fused kernel: the same main loop; the epilogue reads g, u and writes dg, du, y, so dh
      never reaches memory (5 [M, N] streams instead of cuBLAS's 1 + the pass's 6)
  (f) (d) and (e) in Gluon (benchmarks/swiglu_gemm_gluon.py, rows tagged "gluon"): explicit
      TMA + mbarrier pipeline and asynchronous wgmma, the tile's g and u loaded into shared
      memory before its K loop. ``--gluon`` (default: on where the module imports and the GPU
      is compute capability 9.x); ``--gluon-only`` skips the Triton (d), (e) configurations.

Every configuration timed is checked first, on its outputs NaN-poisoned beforehand: dh against
cuBLAS's, dg and du against cuBLAS + pass (max |difference| / max |value|; above 2e-2 it is
flagged and not ranked: only the fp32 accumulation order differs, then one bf16 rounding), and
y bit for bit against the pass's y (the same math on the same g, u). A configuration that fails
to compile or to launch (out of shared memory, ...) prints one line and the sweep goes on.

Timing: ``triton.testing.do_bench_cudagraph`` (median; the launches replayed from a CUDA graph
on a side stream), else ``do_bench`` (median), in µs; TFLOP/s = 2·M·N·K / time. The kernels
compile first in parallel worker processes (``--jobs``; into Triton's on-disk cache, which the
timed launches then load). The log also goes to $OUT/sweep_swiglu_tma.log when $OUT is set.

Shapes: qwen M=8192 K=896 N=4864 (Qwen2.5-0.5B's down projection at 8k tokens); qwen_wt the
same with W stored transposed ([N, K], K contiguous: tutorial 09's B layout; the kernels get
Wᵀ, cuBLAS the same tensor); large M=16384 K=4096 N=14336 (Llama-3-8B at 16k tokens).
"""

from __future__ import annotations

import os
import sys

# The interpreter is chosen when the kernels are decorated, so before anything imports them.
if __name__ == "__main__" and "--check-cpu" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import contextlib
import time
import traceback
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from chronicals_fx.kernels import swiglu as S
from benchmarks import swiglu_gemm_tma as T
from benchmarks.swiglu_gemm_tma import Tile

SILU = S.ACTIVATIONS["silu"]
DEVICE = "cuda"
TOL = 2e-2          # max |got - want| / max |want| above which a configuration is not ranked

# name: (M, K, N, W stored [N, K])
SHAPES = {
    "qwen": (8192, 896, 4864, False),
    "qwen_wt": (8192, 896, 4864, True),
    "large": (16384, 4096, 14336, False),
}

# Configurations. Register and shared-memory figures in the comments: Triton 3.6 compiled
# offline for sm_90a (ptxas -v); the sweep prints the GPU's own per configuration. 227 KiB of
# shared memory per program at most; two programs per SM need each ≤ ~113 KiB and ≤ 128
# registers per thread at 8 warps (≤ 255 at 4).
PLAIN = [
    Tile(128, 128, 64, 4, 3, 1),
    Tile(128, 128, 64, 4, 4, 2),
    Tile(128, 128, 64, 8, 3, 1),
    Tile(128, 128, 64, 8, 3, 2),            # 112 KiB smem, 96 regs
    Tile(128, 128, 64, 8, 4, 1),
    Tile(128, 128, 64, 8, 4, 2),
    Tile(128, 128, 128, 4, 3, 2),
    Tile(128, 128, 128, 8, 3, 1),           # 224 KiB
    Tile(128, 128, 128, 8, 3, 2),
    Tile(128, 256, 64, 8, 3, 1),
    Tile(128, 256, 64, 8, 3, 2),            # 176 KiB, 163 regs
    Tile(128, 256, 64, 8, 4, 2),            # 224 KiB (4 stages without the split: too much)
    Tile(128, 128, 64, 8, 3, 2, flatten=False),
    Tile(128, 256, 64, 8, 3, 2, flatten=False),
    Tile(128, 128, 64, 4, 3, 2, ctas=2),    # 112 KiB, 160 regs: two programs per SM
    Tile(64, 128, 64, 4, 4, 1, ctas=2),
]
FUSED = [
    # g, u via TMA per epilogue piece; dg, du, y via TMA (the design asked about)
    Tile(128, 128, 64, 8, 3, 1),            # 255 regs, no spill
    Tile(128, 128, 64, 8, 3, 2),            # 173 regs
    Tile(128, 128, 64, 8, 3, 4),            # 130 regs, 112 KiB
    Tile(128, 128, 64, 8, 4, 2),
    Tile(128, 128, 64, 8, 4, 4),
    Tile(128, 128, 128, 8, 3, 2),           # 224 KiB
    Tile(128, 128, 128, 8, 3, 4),
    Tile(128, 256, 64, 8, 3, 4),            # 255 regs (split 2: spills), 176 KiB
    Tile(128, 128, 64, 8, 3, 2, flatten=False),
    Tile(128, 128, 64, 8, 3, 4, flatten=False),
    # two programs per SM: one's epilogue (waiting on g, u) overlaps the other's main loop
    Tile(128, 128, 64, 4, 3, 4, ctas=2),            # 255 regs x 128 threads, 112 KiB
    Tile(128, 128, 64, 8, 3, 4, ctas=2, maxnreg=128),
    Tile(64, 128, 64, 4, 3, 4, ctas=2),             # 131 regs, 80 KiB
    Tile(64, 128, 64, 4, 3, 2, ctas=2),             # 174 regs, 88 KiB
    Tile(64, 128, 64, 4, 4, 4, ctas=2),             # 104 KiB
    # pointer loads / stores in the epilogue (no TMA store waits, loads not waited at issue)
    Tile(128, 128, 64, 8, 3, 4, load="ptr"),
    Tile(128, 128, 64, 8, 3, 4, store_tma=False),
    Tile(128, 128, 64, 8, 3, 4, load="ptr", store_tma=False),
    Tile(64, 128, 64, 4, 3, 4, ctas=2, load="ptr", store_tma=False),
    # g, u of the whole tile loaded before the K loop (flattened, it spills kilobytes)
    Tile(128, 128, 64, 8, 3, 4, flatten=False, load="prefetch"),
    Tile(128, 128, 64, 8, 3, 2, flatten=False, load="prefetch", store_tma=False),
    Tile(64, 128, 64, 4, 3, 4, flatten=False, ctas=2, load="prefetch"),
]
QUICK_PLAIN = [PLAIN[3], PLAIN[10], PLAIN[14]]
QUICK_FUSED = [FUSED[1], FUSED[2], FUSED[11], FUSED[12], FUSED[17], FUSED[19]]
# Gluon configurations (GluonTile): their lists live in benchmarks/swiglu_gemm_gluon.py, which
# is imported only when they run (it needs triton.experimental.gluon; never on the CPU check).
# tl.range(warp_specialize=True): Triton 3.6 documents it for Blackwell; compiled offline for
# sm_90a it gave the same PTX as without at 8 warps and failed at 4. Only with --ws.
WS = [Tile(128, 128, 64, 8, 3, 2, flatten=False, ws=True)]
TOP_FOR_WT = 4      # qwen_wt re-runs this many of qwen's fastest configurations of each kernel
                    # (and of each family, Triton and Gluon, apart)


def is_gluon(tile) -> bool:
    return getattr(tile, "gluon", False)


def load_gluon():
    """(the Gluon module, None), or (None, why not)."""
    try:
        from benchmarks import swiglu_gemm_gluon as G
        return G, None
    except Exception as e:  # noqa: BLE001
        return None, short_error(e)


def plain_launch(dy, w, dh, tile, w_kmajor):
    """make_plain_launch of the tile's family (Triton Tile or GluonTile)."""
    if is_gluon(tile):
        from benchmarks import swiglu_gemm_gluon as G
        return G.make_plain_gluon_launch(dy, w, dh, tile, w_kmajor)
    return T.make_plain_launch(dy, w, dh, tile, w_kmajor)


def fused_launch(dy, w, g, u, dg, du, y, tile, activation, w_kmajor):
    """make_fused_launch of the tile's family (Triton Tile or GluonTile)."""
    if is_gluon(tile):
        from benchmarks import swiglu_gemm_gluon as G
        return G.make_fused_gluon_launch(dy, w, g, u, dg, du, y, tile, activation, w_kmajor)
    return T.make_fused_launch(dy, w, g, u, dg, du, y, tile, activation, w_kmajor)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
class Log:
    """print(), and the same lines appended to $OUT/sweep_swiglu_tma.log when $OUT is set
    (the file is started afresh by ``start``, from main: importing this module writes nothing)."""

    def __init__(self) -> None:
        self.path = None

    def start(self) -> None:
        out = os.environ.get("OUT", "").strip()
        if out:
            os.makedirs(out, exist_ok=True)
            self.path = os.path.join(out, "sweep_swiglu_tma.log")
            open(self.path, "w").close()

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


log = Log()


@dataclass
class Row:
    name: str
    us: float = float("nan")
    tflops: float = float("nan")
    err: float = float("nan")       # worst max-relative error of the outputs checked
    ok: bool = False                # correct, so ranked
    note: str = ""


@dataclass
class ShapeResult:
    name: str
    m: int
    k: int
    n: int
    base: dict = field(default_factory=dict)      # baseline name → Row
    plain: list = field(default_factory=list)     # (Tile, Row)
    fused: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------
class Bench:
    """Median µs of a launch: CUDA-graph replays on a side stream when that works, else
    do_bench; ``method`` says which (one method for every number of the run, if it can)."""

    def __init__(self, rep_ms: int) -> None:
        self.rep = rep_ms
        self.method = "do_bench_cudagraph"
        x = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        try:
            do_bench_cudagraph(lambda: torch.mm(x, x), rep=5, return_mode="median")
        except Exception as e:      # noqa: BLE001
            log(f"# do_bench_cudagraph unusable ({short_error(e)}); using do_bench")
            self.method = "do_bench"
            sync_quietly()

    def us(self, fn) -> tuple[float, str]:
        if self.method == "do_bench_cudagraph":
            try:
                return 1e3 * do_bench_cudagraph(fn, rep=self.rep, return_mode="median"), ""
            except Exception as e:  # noqa: BLE001
                sync_quietly()
                note = f"graph failed ({type(e).__name__}); do_bench"
                return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median"), note
        return 1e3 * do_bench(fn, warmup=25, rep=100, return_mode="median"), ""


def sync_quietly() -> None:
    """Wait for the device after a failed launch; a fault that broke the CUDA context is
    reported by the next launch instead of here."""
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (NaN if got holds a NaN: an unwritten output)."""
    scale = want.float().abs().max()
    return ((got.float() - want.float()).abs().max() / scale).item()


def tflops(m: int, n: int, k: int, us: float) -> float:
    return 2 * m * n * k / us / 1e6


def short_error(e: BaseException) -> str:
    """One line: the exception's type and message (or, without one, where it was raised)."""
    text = " ".join(str(e).split())
    if not text and e.__traceback__ is not None:
        frame = traceback.extract_tb(e.__traceback__)[-1]
        text = f"at {os.path.basename(frame.filename)}:{frame.lineno}"
    return f"{type(e).__name__}: {text[:160]}"


def kernel_stats(kernel) -> str:
    """Registers, spills and shared memory of a compiled kernel, as far as Triton tells."""
    try:
        regs, spills = getattr(kernel, "n_regs", "?"), getattr(kernel, "n_spills", "?")
        return f"regs {regs} spills {spills} smem {kernel.metadata.shared // 1024}K"
    except Exception:           # noqa: BLE001
        return ""


# ---------------------------------------------------------------------------------------------
# Parallel compilation: each worker launches ``warmup`` on small tensors whose specialization
# (bf16, 16-byte aligned, sizes divisible by 16; descriptors: dtype and block shape) is the real
# shapes', so the timed launches find the compiled kernels in Triton's on-disk cache.
# ---------------------------------------------------------------------------------------------
def _warm_one(kind: str, tile: Tile, w_kmajor: bool) -> tuple:
    t0 = time.time()
    try:
        m = k = n = 256
        bf = {"device": "cuda", "dtype": torch.bfloat16}
        dy = torch.empty(m, k, **bf)
        w = torch.empty((n, k) if w_kmajor else (k, n), **bf)
        outs = [torch.empty(m, n, **bf) for _ in range(5)]
        if kind == "plain":
            plain_launch(dy, w, outs[0], tile, w_kmajor)(warmup=True)
        else:
            fused_launch(dy, w, *outs, tile, SILU, w_kmajor)(warmup=True)
        return kind, tile, w_kmajor, None, time.time() - t0
    except Exception as e:      # noqa: BLE001
        return kind, tile, w_kmajor, short_error(e), time.time() - t0


class Precompiler:
    """Compiles (kind, Tile, w_kmajor) jobs in worker processes (spawned: CUDA), in the order
    given, while the main process goes on. Without workers, or if the pool breaks, nothing is
    compiled ahead: each kernel then compiles at its first launch."""

    def __init__(self, jobs: list[tuple], workers: int) -> None:
        self.futures = {}
        self.pool = None
        self.t0 = time.time()
        if workers <= 0 or not jobs:
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        try:
            ctx = multiprocessing.get_context("spawn")
            self.pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx)
            self.futures = {job: self.pool.submit(_warm_one, *job) for job in jobs}
        except Exception as e:  # noqa: BLE001
            log(f"# parallel compile unavailable ({short_error(e)}): compiling at first launch")
            self.futures = {}
        log(f"# compiling {len(self.futures)} kernels ahead in {workers} processes")

    def wait(self, jobs: list[tuple]) -> None:
        """Block until ``jobs`` are compiled. A job that failed in a worker is only reported
        here: its first launch compiles it again and reports its own error."""
        errors, done = [], 0
        for job in jobs:
            future = self.futures.get(job)
            if future is None:
                continue
            try:
                err = future.result()[3]
                done += 1
            except Exception as e:  # noqa: BLE001 (a broken pool)
                err = f"worker: {short_error(e)}"
            if err:
                tag = job[1].tag() if job[0] == "plain" else job[1].fused_tag()
                errors.append(f"{job[0]} {tag}{' W[N,K]' if job[2] else ''}: {err}")
        if done:
            log(f"# {done} kernels compiled ahead, {time.time() - self.t0:.0f} s since the "
                f"start of compilation; {len(errors)} failed there"
                + "".join(f"\n#   {e}" for e in errors[:3]))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# One shape
# ---------------------------------------------------------------------------------------------
def make_inputs(m: int, k: int, n: int, w_kmajor: bool, device="cuda", seed: int = 0) -> dict:
    """Seeded bf16 inputs with O(1) values: dy, g ~ N(0, 1) (g x 2: the activation's bend),
    u ~ N(0, 1), W ~ N(0, 1/K) so dh = dy @ W ~ N(0, 1). ``w_op``: W as the kernels get it
    ([K, N], or [N, K] contiguous when ``w_kmajor``); ``w_mm``: the same tensor as cuBLAS's
    [K, N] operand."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(torch.bfloat16)

    dy, g, u = randn(m, k), randn(m, n, scale=2.0), randn(m, n)
    w = randn(k, n, scale=k ** -0.5)
    w_op = w.t().contiguous() if w_kmajor else w
    return {"dy": dy, "g": g, "u": u, "w_op": w_op, "w_mm": w_op.t() if w_kmajor else w_op}


def time_baselines(dy, w_mm, g, u, dh_ref, bench: Bench) -> dict:
    """(a) cuBLAS, (b) cuBLAS + pass with y, (c) without y, and the pass alone (for the bounds
    of the summary), into buffers of their own."""
    m, k = dy.shape
    n = g.shape[1]
    dh, dg, du, y = (torch.empty_like(g) for _ in range(4))
    baselines = {
        "cuBLAS mm": lambda: torch.mm(dy, w_mm, out=dh),
        "cuBLAS + pass (y)": lambda: (torch.mm(dy, w_mm, out=dh),
                                      S.swiglu_backward(dh, g, u, dg, du, SILU, y)),
        "cuBLAS + pass (no y)": lambda: (torch.mm(dy, w_mm, out=dh),
                                         S.swiglu_backward(dh, g, u, dg, du, SILU)),
        "pass alone (y)": lambda: S.swiglu_backward(dh_ref, g, u, dg, du, SILU, y),
    }
    rows = {}
    for label, fn in baselines.items():
        try:
            fn()
            us, note = bench.us(fn)
            row = Row(label, us, tflops(m, n, k, us), ok=True, note=note)
        except Exception as e:  # noqa: BLE001
            row = Row(label, note=short_error(e))
        rows[label] = row
        log(f"{label:<70} {row.us:9.1f} us  {row.tflops:6.0f} TFLOP/s  {row.note}")
    return rows


def run_shape(name: str, plain: list, fused: list, bench: Bench) -> ShapeResult:
    m, k, n, w_kmajor = SHAPES[name]
    res = ShapeResult(name, m, k, n)
    layout = "Wt [N, K] K-contiguous" if w_kmajor else "W [K, N] N-contiguous"
    log(f"\n## {name}: M={m} K={k} N={n}, {layout}; {len(plain)} plain + {len(fused)} fused "
        f"configurations")
    x = make_inputs(m, k, n, w_kmajor, device=DEVICE)
    dy, g, u, w_op, w_mm = x["dy"], x["g"], x["u"], x["w_op"], x["w_mm"]

    def empty():
        return torch.empty(m, n, device=DEVICE, dtype=torch.bfloat16)

    # reference: cuBLAS + the pass (and the forward kernel's y, which the pass's must equal)
    dh_ref, dg_ref, du_ref, y_ref, y_fwd = (empty() for _ in range(5))
    torch.mm(dy, w_mm, out=dh_ref)
    S.swiglu_backward(dh_ref, g, u, dg_ref, du_ref, SILU, y_ref)
    S.swiglu_forward(g, u, y_fwd, SILU)
    torch.cuda.synchronize()
    log(f"# pass y == forward kernel y: {torch.equal(y_ref, y_fwd)}")
    del y_fwd

    res.base = time_baselines(dy, w_mm, g, u, dh_ref, bench)
    cublas = res.base["cuBLAS mm"].us
    unfused = res.base["cuBLAS + pass (y)"].us

    # (d) plain persistent TMA GEMM: dh against cuBLAS's
    dh = empty()

    def check_plain():
        err = max_rel(dh, dh_ref)
        return err, err <= TOL, ""

    for tile in plain:
        row = measure(f"plain {tile.tag()}", lambda t=tile: plain_launch(
            dy, w_op, dh, t, w_kmajor), (dh,), check_plain, bench, (m, n, k))
        res.plain.append((tile, row))
        log(f"{row.name:<70} {row.us:9.1f} us  {row.tflops:6.0f} TFLOP/s  "
            f"{100 * cublas / row.us:4.0f}% cuBLAS  err {row.err:.1e}  {row.note}")

    # (e) fused GEMM + SwiGLU backward: dg, du against cuBLAS + pass, y bit for bit the pass's
    dg, du, y = empty(), empty(), empty()

    def check_fused():
        err = max(max_rel(dg, dg_ref), max_rel(du, du_ref))
        y_exact = torch.equal(y, y_ref)
        return err, err <= TOL and y_exact, "" if y_exact else "Y DIFFERS"

    for tile in fused:
        row = measure(f"fused {tile.fused_tag()}", lambda t=tile: fused_launch(
            dy, w_op, g, u, dg, du, y, t, SILU, w_kmajor), (dg, du, y), check_fused, bench,
            (m, n, k))
        res.fused.append((tile, row))
        log(f"{row.name:<70} {row.us:9.1f} us  {row.tflops:6.0f} TFLOP/s  "
            f"{unfused / row.us:5.2f}x unfused  err {row.err:.1e}  {row.note}")
    return res


def measure(name: str, make_launch, outputs: tuple, check, bench: Bench, mnk: tuple) -> Row:
    """One configuration: launch once on NaN-poisoned ``outputs`` (compiling it, unless it was
    compiled ahead), ``check()`` → (error, correct, flag), then time it. Any failure (compile,
    out of resources, launch) becomes the row's note."""
    row = Row(name)
    try:
        launch = make_launch()
        for t in outputs:
            t.fill_(float("nan"))
        t0 = time.time()
        kernel = launch()
        torch.cuda.synchronize()
        first = time.time() - t0
        row.err, row.ok, flag = check()
        row.us, note = bench.us(launch)
        row.tflops = tflops(*mnk, row.us)
        row.note = " ".join(s for s in (
            kernel_stats(kernel), f"first launch {first:.1f}s", note, flag,
            "" if row.ok else "WRONG: not ranked") if s)
    except Exception as e:      # noqa: BLE001
        sync_quietly()
        row.note = short_error(e)
    return row


def best(rows: list) -> tuple | None:
    ranked = [(t, r) for t, r in rows if r.ok and r.us == r.us]
    return min(ranked, key=lambda tr: tr[1].us) if ranked else None


def summary(res: ShapeResult) -> None:
    b = res.base
    mm, unf, unf5, pas = (b[key].us for key in (
        "cuBLAS mm", "cuBLAS + pass (y)", "cuBLAS + pass (no y)", "pass alone (y)"))
    m, k, n = res.m, res.k, res.n
    log(f"\n=== {res.name}: M={m} K={k} N={n} ({2 * m * n * k / 1e9:.1f} GFLOP) ===")
    log(f"  {'cuBLAS mm':<74} {mm:8.1f} us  {tflops(m, n, k, mm):5.0f} TFLOP/s")
    log(f"  {'cuBLAS + pass (y)':<74} {unf:8.1f} us")
    log(f"  {'cuBLAS + pass (no y)':<74} {unf5:8.1f} us")
    bp = best(res.plain)
    if bp:
        t, r = bp
        log(f"  {'best plain TMA ' + t.tag():<74} {r.us:8.1f} us  {r.tflops:5.0f} TFLOP/s  "
            f"{100 * mm / r.us:.0f}% of cuBLAS's speed")
    else:
        log("  best plain TMA: none correct")
    bf = best(res.fused)
    if bf:
        t, r = bf
        log(f"  {'best fused ' + t.fused_tag():<74} {r.us:8.1f} us  {r.tflops:5.0f} TFLOP/s  "
            f"{unf / r.us:.2f}x vs cuBLAS + pass (y), {unf5 / r.us:.2f}x vs (no y)")
    else:
        log("  best fused: none correct")
    if any(is_gluon(t) for t, _ in res.plain + res.fused):
        # each family's best apart (the lines above rank both together)
        for fam, rows, tag in (("Triton plain", res.plain, "tag"), ("Gluon plain", res.plain, "tag"),
                               ("Triton fused", res.fused, "fused_tag"),
                               ("Gluon fused", res.fused, "fused_tag")):
            fb = best([(t, r) for t, r in rows if is_gluon(t) == fam.startswith("Gluon")])
            if fb:
                t, r = fb
                vs = (f"{100 * mm / r.us:.0f}% of cuBLAS's speed" if "plain" in fam else
                      f"{unf / r.us:.2f}x vs cuBLAS + pass (y)")
                log(f"  {'  best ' + fam + ': ' + getattr(t, tag)():<74} {r.us:8.1f} us  "
                    f"{r.tflops:5.0f} TFLOP/s  {vs}")
            elif any(is_gluon(t) == fam.startswith("Gluon") for t, _ in rows):
                log(f"    best {fam}: none correct")
    # The epilogue moves 5 of the pass's 6 [M, N] streams: at the pass's bandwidth that is
    # 5/6 of its time; the fused kernel lies between perfect overlap and none.
    epi = pas * 5 / 6
    log(f"  bounds from this run: perfect overlap max(mm, 5/6 pass) {max(mm, epi):.1f} us, "
        f"no overlap mm + 5/6 pass {mm + epi:.1f} us")


# ---------------------------------------------------------------------------------------------
# CPU check (Triton interpreter): the kernels against float64 and against the pass, bit for bit
# ---------------------------------------------------------------------------------------------
CHECK_TILES = [     # small blocks: the interpreter is slow; covers every option of the kernels
    (Tile(32, 32, 32, 4, 2, 1), False),
    (Tile(32, 32, 32, 4, 2, 2, ctas=2), False),
    (Tile(32, 32, 32, 4, 2, 4, flatten=False, load="ptr", store_tma=False), False),
    (Tile(32, 32, 32, 4, 2, 4, load="prefetch"), False),
    (Tile(32, 32, 32, 4, 2, 2, load="prefetch", store_tma=False), True),
    (Tile(32, 32, 32, 4, 2, 4, load="ptr"), True),
]


# (M, K, N) and the CHECK_TILES run at it: the second shape is ragged in M, K and N (TMA's
# zero fill of loads, clipping of stores, pieces wholly outside), on the tiles using TMA there
CHECK_SHAPES = (((64, 64, 64), (0, 1, 2, 3, 4, 5)), ((40, 48, 48), (0, 3, 5)))


def check_small(device: str = "cpu", shapes=CHECK_SHAPES, tiles=CHECK_TILES,
                verbose: bool = True, exact_vs_pass: bool = True) -> list[str]:
    """The kernels at tiny shapes, on CHECK_TILES. Per tile: plain dh within one bf16 rounding
    of the exact product; fused dg, du, y within bf16 tolerance of float64 (relative norm,
    max relative); y bit for bit the pass's and the forward kernel's; with ``exact_vs_pass``
    also fused dg, du bit for bit the pass's on the plain kernel's dh (same tiles, so the same
    accumulation: certain in the interpreter, expected on a GPU). Returns the failures (empty:
    all passed)."""
    failures = []
    for si, ((m, k, n), which) in enumerate(shapes):
        for tile, w_kmajor in (tiles[i] for i in which):
            x = make_inputs(m, k, n, w_kmajor, device=device, seed=si)
            dy, g, u, w_op, w_mm = x["dy"], x["g"], x["u"], x["w_op"], x["w_mm"]

            nan = partial(torch.full, (m, n), float("nan"), dtype=torch.bfloat16, device=device)

            dh, dg, du, y = nan(), nan(), nan(), nan()
            T.make_plain_launch(dy, w_op, dh, replace(tile, split=min(tile.split, 2)),
                                w_kmajor)()
            T.make_fused_launch(dy, w_op, g, u, dg, du, y, tile, SILU, w_kmajor)()
            # the pass and the forward kernel on the plain kernel's dh
            dg_p, du_p, y_p, y_f = nan(), nan(), nan(), nan()
            S.swiglu_backward(dh, g, u, dg_p, du_p, SILU, y_p)
            S.swiglu_forward(g, u, y_f, SILU)
            # float64 references (no rounding anywhere)
            dh64 = dy.double() @ w_mm.double()
            g64, u64 = g.double(), u.double()
            dg64, du64 = S.swiglu_backward_reference(dh64, g64, u64, SILU)
            y64 = S.swiglu_reference(g64, u64, SILU)

            def rel_norm(a, b):
                return ((a.double() - b).norm() / b.norm()).item()

            def rel_max(a, b):
                return ((a.double() - b).abs().max() / b.abs().max()).item()

            # dh: one bf16 rounding (≤ 2^-8 relative) plus fp32 accumulation error
            dh_ok = bool(((dh.double() - dh64).abs() <= dh64.abs() * 2 ** -8 + 1e-5).all())
            errs = {f"{nm} {kind}": fn(got, want)
                    for nm, got, want in (("dg", dg, dg64), ("du", du, du64), ("y", y, y64))
                    for kind, fn in (("norm", rel_norm), ("max", rel_max))}
            tol_ok = all(v <= (1.2e-2 if "norm" in key else TOL) for key, v in errs.items())
            exact = {"y=pass": torch.equal(y, y_p), "y=forward": torch.equal(y, y_f)}
            if exact_vs_pass:
                exact |= {"dg=pass": torch.equal(dg, dg_p), "du=pass": torch.equal(du, du_p)}
            ok = dh_ok and tol_ok and all(exact.values())
            line = (f"{'ok  ' if ok else 'FAIL'} M={m} K={k} N={n} {tile.fused_tag()}"
                    f"{' W[N,K]' if w_kmajor else ''}: dh within 1 rounding {dh_ok}; "
                    + " ".join(f"{key} {v:.1e}" for key, v in errs.items()) + "; "
                    + " ".join(f"{key} {v}" for key, v in exact.items()))
            if verbose:
                print(line, flush=True)
            if not ok:
                failures.append(line)
    return failures


# ---------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations per kernel")
    parser.add_argument("--shapes", default="all",
                        help="qwen, qwen_wt, large, all, or a comma-separated list")
    parser.add_argument("--ws", action="store_true",
                        help="also tl.range(warp_specialize=True) configurations")
    parser.add_argument("--gluon", action=argparse.BooleanOptionalAction, default=None,
                        help="also the Gluon kernels (default: when importable and the GPU is "
                             "compute capability 9.x)")
    parser.add_argument("--gluon-only", action="store_true",
                        help="of the Triton/Gluon kernels only the Gluon ones (baselines kept)")
    parser.add_argument("--gluon-set", choices=("all", "ws"), default="all",
                        help="ws: the warp-specialized fused configurations, the best "
                             "earlier Gluon fused one and one plain")
    parser.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1),
                        help="processes compiling ahead (0: compile at first launch)")
    parser.add_argument("--rep", type=int, default=20, help="ms of replays per timing")
    parser.add_argument("--check-cpu", action="store_true",
                        help="Triton-interpreter check of the kernels on tiny shapes, no GPU")
    args = parser.parse_args()

    if args.check_cpu:
        t0 = time.time()
        failures = check_small("cpu")
        print(f"{'FAILED' if failures else 'passed'}: {len(failures)} failure(s), "
              f"{time.time() - t0:.1f} s (triton {triton.__version__}, interpreter "
              f"{os.environ.get('TRITON_INTERPRET')})")
        return 1 if failures else 0

    log.start()
    t_start = time.time()
    # qwen_wt runs last: it re-runs qwen's fastest configurations
    names = list(SHAPES) if args.shapes == "all" else [s.strip() for s in args.shapes.split(",")]
    names = sorted(dict.fromkeys(s for s in names if s in SHAPES), key=lambda s: s == "qwen_wt")
    names = names or ["qwen"]
    plain = QUICK_PLAIN if args.quick else PLAIN
    fused = QUICK_FUSED if args.quick else FUSED
    if args.ws:
        plain, fused = plain + WS, fused + WS
    props = torch.cuda.get_device_properties(0)
    log(f"# {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}; shapes {names}; "
        f"{'quick' if args.quick else 'full'} sweep; capability {props.major}.{props.minor}")
    if props.major < 9:
        log("# TMA descriptors need compute capability 9.0+: the Triton kernels will fail")
    use_gluon = args.gluon if args.gluon is not None else (props.major == 9 or args.gluon_only)
    if args.gluon_only:
        plain, fused = [], []
    if use_gluon or args.gluon_only:
        G, why = load_gluon()
        if G is None:
            log(f"# Gluon kernels unavailable: {why}")
        else:
            if args.gluon_set == "ws":
                g_plain, g_fused = G.QUICK_PLAIN, G.WS_CONFIGS + G.FUSED_CONFIGS[3:4] + G.HW_ROUND_FUSED
            elif args.quick:
                g_plain, g_fused = G.QUICK_PLAIN, G.QUICK_FUSED + G.WS_CONFIGS[:2]
            else:
                g_plain, g_fused = G.PLAIN_CONFIGS, G.FUSED_CONFIGS + G.WS_CONFIGS
            plain, fused = plain + g_plain, fused + g_fused
            log(f"# Gluon: {len(g_plain)} plain + {len(g_fused)} fused configurations"
                f"{'' if props.major == 9 else ' (written for Hopper: sm_90)'}")

    def lists(name: str, results: dict) -> tuple[list, list]:
        """The configurations run at a shape: qwen_wt re-runs qwen's fastest correct ones."""
        if name == "qwen_wt" and "qwen" in results:
            def top(rows):
                ranked = sorted(((t, r) for t, r in rows if r.ok and r.us == r.us),
                                key=lambda tr: tr[1].us)
                chosen = [t for t, _ in ranked[:TOP_FOR_WT]]
                for fam in (False, True):       # each family's best few too
                    chosen += [t for t, _ in ranked if is_gluon(t) == fam][:TOP_FOR_WT // 2]
                return list(dict.fromkeys(chosen))
            triton_too = not args.gluon_only
            return (top(results["qwen"].plain) or (QUICK_PLAIN if triton_too else []),
                    top(results["qwen"].fused) or (QUICK_FUSED if triton_too else []))
        return plain, fused

    def jobs_of(name: str, p: list, f: list) -> list[tuple]:
        w_kmajor = SHAPES[name][3]
        return [("plain", t, w_kmajor) for t in p] + [("fused", t, w_kmajor) for t in f]

    # Compile ahead, in parallel, in the order the shapes run (qwen_wt, whose configurations
    # are known only after qwen, last: every configuration with W transposed, compiling while
    # the other shapes are timed).
    jobs = []
    for name in names:
        jobs += [j for j in jobs_of(name, plain, fused) if j not in jobs]
    pre = Precompiler(jobs, args.jobs)

    bench = Bench(args.rep)
    log(f"# timing: {bench.method}, median, rep {args.rep} ms")
    results = {}
    for name in names:
        p, f = lists(name, results)
        pre.wait(jobs_of(name, p, f))
        try:
            results[name] = run_shape(name, p, f, bench)
        except Exception as e:  # noqa: BLE001
            log(f"## {name} failed: {short_error(e)}")
            log(traceback.format_exc())
        torch.cuda.empty_cache()
    pre.close()

    log("\n# ---------------------------------------------------------------- summary")
    for res in results.values():
        try:
            summary(res)
        except Exception as e:  # noqa: BLE001
            log(f"summary of {res.name} failed: {short_error(e)}")
    log(f"\n# total {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    code = main()
    sys.exit(code if "--check-cpu" in sys.argv else 0)
