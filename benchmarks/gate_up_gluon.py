"""Prototype (not in the product; never run on a GPU yet): the gated MLP's forward as one GEMM
with the SwiGLU forward in its epilogue.

    g = x @ W_gateᵀ,  u = x @ W_upᵀ        (x [M, K]; W_gate, W_up [N, K], nn.Linear's layout)
    y = round(round(act(g)) · u)           the SwiGLU forward pass's math and rounding points
                                           (kernels/swiglu.py), on g, u rounded to the dtype

Unfused (Inductor or our pass): two cuBLAS GEMMs write g and u, then a pass reads both and
writes y: [M, N] streams 2 + 3. Here g, u never come back from memory: 3 streams, written from
the epilogue while the next tile's wgmma runs. At the Qwen2.5-0.5B shape (M=8192 K=896 N=4864,
bf16) the pass moves 240 MB (~65 µs at ~3.7 TB/s) against ~240 µs for the two GEMMs: if the
epilogue hides behind the main loop, ~50 µs a layer, ~1.2 ms a step of ~69 (NEXT_RUNS, issue 3).

One output tile is [BM, BN/2] of g and the same of u: the B tile [BN, BK] takes W_gate's rows
[n, n + BN/2) in its first half and W_up's in its second (two TMA loads onto one barrier), so
the K loop is kernels/_gluon.py's ``mma_partition`` unchanged, over a virtual [M, 2N] output
whose tile t holds [g | u] of output columns [t·BN/2, (t+1)·BN/2). The epilogue reads g's
and u's halves of the rounded tile from shared memory piece by piece and stores g, u, y.

    python -m benchmarks.gate_up_gluon --offline     sm_90a compile, ptxas figures (no GPU)
    python -m benchmarks.gate_up_gluon --gpu-check   against cuBLAS + the SwiGLU pass
    python -m benchmarks.gate_up_gluon --bench       CUDA-graph medians, Qwen and large shapes
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from chronicals_fx.kernels._gluon import (GemmTile, launcher, mma_partition, num_sms,
                                          piece_layout, tile_walk, tma_descriptor,
                                          ws_gemm_buffers, ws_launch_kwargs)
from chronicals_fx.kernels._triton import ROUND_CODES, round_to, tile_coords
from chronicals_fx.kernels.swiglu import _act
from chronicals_fx.kernels.swiglu_gemm import _store_piece


@gluon.jit
def _load_partition(x_desc, wg_desc, wu_desc, a_bufs, b_bufs, ab_ready, ab_empty, M, N2, K,
                    GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr):
    """kernels/_gluon.py's loader with B's tile from two weights: rows [0, HALF) of the slot
    from W_gate, [HALF, 2·HALF) from W_up, both landing on the slot's one barrier."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    HALF: gl.constexpr = wg_desc.block_type.shape[0]
    STAGES: gl.constexpr = a_bufs.shape[0]
    num_tiles, num_pid_in_group, num_pid_m = tile_walk(M, N2, BLOCK_M, 2 * HALF, GROUP_M)
    k_tiles = gl.cdiv(K, BLOCK_K)
    prod = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        for ki in range(k_tiles):
            s = prod % STAGES
            mbarrier.wait(ab_empty.index(s), ((prod // STAGES) & 1) ^ 1)
            bar = ab_ready.index(s)
            mbarrier.expect(bar, x_desc.block_type.nbytes + 2 * wg_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, ki * BLOCK_K], bar,
                                            a_bufs.index(s))
            b = b_bufs.index(s)
            tma.async_copy_global_to_shared(wg_desc, [pid_n * HALF, ki * BLOCK_K], bar,
                                            b.slice(0, HALF, dim=0))
            tma.async_copy_global_to_shared(wu_desc, [pid_n * HALF, ki * BLOCK_K], bar,
                                            b.slice(HALF, HALF, dim=0))
            prod += 1


@gluon.jit
def _epilogue_partition(dh_bufs, dh_ready, dh_empty, G, U, Y, M, N,
                        ACT: gl.constexpr, ROUND: gl.constexpr, SPLIT: gl.constexpr,
                        GROUP_M: gl.constexpr, NUM_PROGS: gl.constexpr):
    DH_BUFS: gl.constexpr = dh_bufs.shape[0]
    BLOCK_M: gl.constexpr = dh_bufs.shape[1]
    HALF: gl.constexpr = dh_bufs.shape[2] // 2
    WIDTH: gl.constexpr = HALF // SPLIT
    layout: gl.constexpr = piece_layout(WIDTH, gl.num_warps())
    rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(rows * N, 1) + gl.expand_dims(cols, 0)
    num_tiles, num_pid_in_group, num_pid_m = tile_walk(M, 2 * N, BLOCK_M, 2 * HALF, GROUP_M)
    tiles = 0
    for tile_id in range(gl.program_id(0), num_tiles, NUM_PROGS):
        pid_m, pid_n = tile_coords(tile_id, num_pid_in_group, num_pid_m, GROUP_M)
        off_m = pid_m * BLOCK_M
        base = off_m.to(gl.int64) * N + pid_n * HALF
        rows_left = M - off_m
        d = tiles % DH_BUFS
        mbarrier.wait(dh_ready.index(d), (tiles // DH_BUFS) & 1)
        for j in gl.static_range(SPLIT):
            gu = dh_bufs.index(d)
            g = gu.slice(j * WIDTH, WIDTH, dim=1).load(layout)
            u = gu.slice(HALF + j * WIDTH, WIDTH, dim=1).load(layout)
            if j + 1 == SPLIT:
                gl.thread_barrier()      # every warp has read the tile: it may take the next
                mbarrier.arrive(dh_empty.index(d), count=1)
            a = round_to(_act(g.to(gl.float32), ACT), ROUND)
            y = round_to(a * u.to(gl.float32), ROUND)
            at = base + j * WIDTH
            _store_piece(G, g, at, offs, rows_left, False, layout)
            _store_piece(U, u, at, offs, rows_left, False, layout)
            _store_piece(Y, y, at, offs, rows_left, False, layout)
        tiles += 1


@gluon.jit
def gate_up_swiglu_kernel(
    x_desc, wg_desc, wu_desc,     # x [M, K] in [BM, BK] blocks; W_gate, W_up [N, K] in [BN/2, BK]
    G, U, Y,                      # [M, N] contiguous out: g, u, y = act(g)·u
    M, N, K,
    ACT: gl.constexpr, ROUND: gl.constexpr, SPLIT: gl.constexpr,
    STAGES: gl.constexpr, DH_BUFS: gl.constexpr, GROUP_M: gl.constexpr,
    NUM_PROGS: gl.constexpr, EPI_WARPS: gl.constexpr, EPI_REGS: gl.constexpr,
    LOAD_REGS: gl.constexpr,
):
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    a_bufs, b_bufs, dh_bufs, ab_ready, ab_empty, dh_ready, dh_empty = ws_gemm_buffers(
        x_desc, wg_desc, STAGES, DH_BUFS, True, B_PARTS=2)

    gl.warp_specialize([
        (mma_partition, (a_bufs, b_bufs, ab_ready, ab_empty, dh_bufs, dh_ready, dh_empty,
                         M, 2 * N, K, BLOCK_K, True, GROUP_M, NUM_PROGS)),
        (_load_partition, (x_desc, wg_desc, wu_desc, a_bufs, b_bufs, ab_ready, ab_empty,
                           M, 2 * N, K, GROUP_M, NUM_PROGS)),
        (_epilogue_partition, (dh_bufs, dh_ready, dh_empty, G, U, Y, M, N, ACT, ROUND, SPLIT,
                               GROUP_M, NUM_PROGS)),
    ], [1, EPI_WARPS], [LOAD_REGS, EPI_REGS])


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tile(GemmTile):
    def tag(self) -> str:
        return "gate-up " + super().tag()[len("gluon-ws "):]


CONFIGS = [
    Tile(split=2),                              # pieces [128, 32] of g and of u
    Tile(split=1),
    Tile(split=4),
    Tile(split=2, stages=3),
    Tile(split=2, dh_bufs=1),
    Tile(split=2, epi_warps=4, epi_regs=192),
]


def make_launch(x: Tensor, w_gate: Tensor, w_up: Tensor, g: Tensor, u: Tensor, y: Tensor,
                activation: int, tile: Tile = CONFIGS[0]):
    m, k = x.shape
    n = w_gate.shape[0]
    half = tile.bn // 2
    for t in (x, w_gate, w_up, g, u, y):
        assert t.is_contiguous() and t.dtype == x.dtype and t.data_ptr() % 16 == 0
    assert w_up.shape == w_gate.shape == (n, k) and n % half == 0 and k > 0 and m > 0
    assert half % tile.split == 0 and (half // tile.split) % 8 == 0
    progs = num_sms(x.device)
    programs = min(progs, triton.cdiv(m, tile.bm) * (n // half))
    rounding = 3 if tile.hw_round and x.dtype == torch.bfloat16 else ROUND_CODES[x.dtype]
    args = (tma_descriptor(x, [tile.bm, tile.bk]), tma_descriptor(w_gate, [half, tile.bk]),
            tma_descriptor(w_up, [half, tile.bk]), g, u, y, m, n, k)
    kwargs = dict(ACT=activation, ROUND=rounding, **ws_launch_kwargs(tile, progs))
    return launcher(gate_up_swiglu_kernel, (programs,), args, kwargs)


def unfused(x: Tensor, w_gate: Tensor, w_up: Tensor, activation: int):
    """What runs without the kernel: two cuBLAS GEMMs and the SwiGLU forward pass."""
    from chronicals_fx.kernels import swiglu as S
    g, u = x @ w_gate.t(), x @ w_up.t()
    y = torch.empty_like(g)
    S.swiglu_forward(g, u, y, activation)
    return g, u, y


def _offline_main() -> int:
    from benchmarks.swiglu_gemm_gluon import compile_offline, ptxas_usage
    bf = {"dtype": torch.bfloat16}
    m, k, n = 1000, 896, 4864
    failures = 0
    for tile in CONFIGS:
        try:
            outs = [torch.empty(m, n, **bf) for _ in range(3)]
            launch = make_launch(torch.empty(m, k, **bf), torch.empty(n, k, **bf),
                                 torch.empty(n, k, **bf), *outs, 0, tile)
            r = ptxas_usage(compile_offline(launch))
            print(f"ok   {tile.tag():<60} regs {r['regs']} spill st/ld {r['spill_stores']}/"
                  f"{r['spill_loads']} B, smem {r['smem_triton']} B", flush=True)
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"FAIL {tile.tag()}: {type(e).__name__}: {' '.join(str(e).split())[:600]}",
                  flush=True)
    return 1 if failures else 0


def _inputs(m: int, k: int, n: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(torch.bfloat16)
    return rnd(m, k), rnd(n, k, scale=k ** -0.5), rnd(n, k, scale=k ** -0.5)


def _gpu_check_main() -> int:
    """g, u against cuBLAS's (fp32 accumulation in another order: within bf16 rounding), y bit
    for bit the SwiGLU pass's on the kernel's own g, u; ragged M included."""
    from chronicals_fx.kernels import swiglu as S
    failures = 0
    # (1100, ...): 9 row blocks, a partial GROUP_M group walked by programs of several tiles
    for m, k, n in ((256, 128, 256), (200, 136, 320), (1000, 896, 4864), (1100, 200, 1024)):
        x, wg, wu = _inputs(m, k, n, seed=m)
        want = unfused(x, wg, wu, 0)
        for tile in CONFIGS:
            got = [torch.full((m, n), float("nan"), device="cuda", dtype=x.dtype)
                   for _ in range(3)]
            try:
                make_launch(x, wg, wu, *got, 0, tile)()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"FAIL M={m} K={k} N={n} {tile.tag()}: {type(e).__name__}: "
                      f"{' '.join(str(e).split())[:400]}", flush=True)
                continue
            err = max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                      for a, b in zip(got[:2], want[:2]))
            y_pass = torch.empty_like(got[2])
            S.swiglu_forward(got[0], got[1], y_pass, 0)
            ok = err <= 1e-2 and torch.equal(got[2], y_pass)
            failures += not ok
            print(f"{'ok  ' if ok else 'FAIL'} M={m} K={k} N={n} {tile.tag()}: g/u err {err:.1e}"
                  f", y == pass(g, u) {torch.equal(got[2], y_pass)}", flush=True)
    return 1 if failures else 0


def _bench_main() -> int:
    from triton.testing import do_bench_cudagraph
    shapes = {"qwen": (8192, 896, 4864), "large": (16384, 4096, 14336)}
    for name, (m, k, n) in shapes.items():
        x, wg, wu = _inputs(m, k, n)
        w_cat = torch.cat([wg, wu])
        g, u, y = (torch.empty(m, n, device="cuda", dtype=x.dtype) for _ in range(3))
        gu = torch.empty(m, 2 * n, device="cuda", dtype=x.dtype)
        from chronicals_fx.kernels import swiglu as S
        rows = {
            "cuBLAS x2": lambda: (torch.mm(x, wg.t(), out=g), torch.mm(x, wu.t(), out=u)),
            "cuBLAS x2 + pass": lambda: (torch.mm(x, wg.t(), out=g), torch.mm(x, wu.t(), out=u),
                                         S.swiglu_forward(g, u, y, 0)),
            "cuBLAS [W_gate; W_up] + pass": lambda: (
                torch.mm(x, w_cat.t(), out=gu), S.swiglu_forward(gu[:, :n], gu[:, n:], y, 0)),
        }
        for tile in CONFIGS:
            rows[tile.tag()] = make_launch(x, wg, wu, g, u, y, 0, tile)
        print(f"=== {name}: M={m} K={k} N={n} ({4 * m * k * n / 1e9:.1f} GFLOP)", flush=True)
        for label, fn in rows.items():
            try:
                fn()
                us = do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
                print(f"  {label:<62} {us:8.1f} us  {4 * m * k * n / us / 1e6:6.0f} TFLOP/s",
                      flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"  {label:<62} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_gpu_check_main() if "--gpu-check" in sys.argv
             else _bench_main() if "--bench" in sys.argv else _offline_main())
