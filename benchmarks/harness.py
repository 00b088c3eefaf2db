"""Per-op forward+backward measurement: time, bandwidth against the copy ceiling measured in
the same run, peak memory above the inputs, and error against a float64 reference."""

from __future__ import annotations

import functools

import gc
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


@dataclass
class OpCase:
    op: str                                   # report key, e.g. "rmsnorm"
    shape: str                                # e.g. "N=16384 H=4096"
    ideal_bytes: int                          # fewest bytes fwd+bwd must move (each once)
    inputs: Callable[[], tuple[Tensor, ...]]  # fresh inputs; leaves needing grads have requires_grad
    variants: dict[str, Callable[..., Tensor | tuple]]  # name -> forward; "eager" is the baseline
    flops: int = 0                            # fwd+bwd floating-point operations, when it matters
    reference: bool = True                    # check against "eager" run in float64


@dataclass
class Result:
    op: str
    shape: str
    variant: str
    ms: float
    gbps: float
    pct_copy: float
    tflops: float
    extra_mib: float
    max_rel_err: float
    note: str = ""
    errors: dict = field(default_factory=dict)


def _as_tuple(x) -> tuple[Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _rel(got: Tensor, want: Tensor) -> float:
    if torch.isnan(got).any() and not torch.isnan(want).any():
        return float("inf")
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def _run(fn, inputs, grad_outputs):
    for t in inputs:
        t.grad = None
    outs = _as_tuple(fn(*inputs))
    pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return outs


def copy_bandwidth_gbps(device="cuda", nbytes=2 << 30) -> float:
    """Device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    from triton.testing import do_bench

    ms = do_bench(functools.partial(dst.copy_, src), warmup=25, rep=200, return_mode="median")
    return 2 * nbytes / ms / 1e6


def matmul_tflops(device="cuda", n=8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    from triton.testing import do_bench

    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / ms / 1e9


def graphed_ms(step: Callable[[], object], rep: int = 100) -> float:
    """Median ms of ``step`` replayed from a CUDA graph: host-side work (Python, autograd, op
    dispatch, launch cost) is out of the number, which is the kernels' own time. ``step`` runs
    three times first, on a side stream as capture requires (compilation, autotuning and the
    allocator's first blocks must not happen during capture), then once under capture.
    ``rep``: milliseconds of replays do_bench times."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return do_bench(graph.replay, warmup=25, rep=rep, return_mode="median")


def _time(fn, inputs, grad_outputs) -> tuple[float, str]:
    """Median ms of forward+backward from a CUDA graph (:func:`graphed_ms`); falls back to plain
    launches for variants that can't be captured (the note says so)."""
    from triton.testing import do_bench

    def step():
        _run(fn, inputs, grad_outputs)   # which sets the inputs' grads to None first

    try:
        return graphed_ms(step), ""
    except Exception as exc:
        torch.cuda.synchronize()
        ms = do_bench(step, warmup=25, rep=100, return_mode="median")
        return ms, f"no CUDA graph ({type(exc).__name__})"


def measure_case(case: OpCase, copy_gbps: float, only: list[str] | None = None) -> list[Result]:

    torch.manual_seed(0)
    inputs = case.inputs()
    outs = _as_tuple(case.variants["eager"](*inputs))
    gen = torch.Generator(device=inputs[0].device).manual_seed(1)
    grad_outputs = [torch.randn(o.shape, device=o.device, dtype=o.dtype, generator=gen)
                    if o.requires_grad else None for o in outs]
    del outs

    # The reference: eager in float64 (or in the input dtype when that is too costly).
    ref_inputs = tuple((t.detach().double() if case.reference and t.is_floating_point() else t.detach())
                       .requires_grad_(t.requires_grad) for t in inputs)
    ref_grads_out = [g.double() if (case.reference and g is not None) else g for g in grad_outputs]
    ref_outs = [o.detach() for o in _run(case.variants["eager"], ref_inputs, ref_grads_out)]
    ref_grads = [t.grad for t in ref_inputs]
    del ref_inputs
    gc.collect()
    torch.cuda.empty_cache()

    results = []
    for name, fn in case.variants.items():
        if only and name not in only and name != "eager":
            continue
        try:
            outs = _run(fn, inputs, grad_outputs)  # warm-up: compiles, autotunes
            errors = {f"out{i}": _rel(o, r) for i, (o, r) in enumerate(zip(outs, ref_outs))
                      if o.is_floating_point()}
            errors.update({f"grad{i}": _rel(t.grad, g) for i, (t, g) in enumerate(zip(inputs, ref_grads))
                           if g is not None})
            del outs
            for t in inputs:
                t.grad = None
            gc.collect()
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            _run(fn, inputs, grad_outputs)
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
            ms, note = _time(fn, inputs, grad_outputs)
            gbps = case.ideal_bytes / ms / 1e6
            results.append(Result(case.op, case.shape, name, ms, gbps, 100 * gbps / copy_gbps,
                                  case.flops / ms / 1e9 if case.flops else 0.0, extra / 2**20,
                                  max(errors.values()) if errors else 0.0, note=note,
                                  errors=errors))
        except Exception as exc:  # a peer failing must not hide the others' numbers
            results.append(Result(case.op, case.shape, name, float("nan"), 0, 0, 0, 0,
                                  float("nan"), note=f"{type(exc).__name__}: {str(exc)[:120]}"))
        for t in inputs:
            t.grad = None
        gc.collect()
        torch.cuda.empty_cache()
    return results
