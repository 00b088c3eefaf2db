"""Host time per call of the ops that launch kernels from Python at run time, with
``fast_launch`` on and off (kernels/_triton.py); their outputs compared bit for bit.

    python -m benchmarks.host_launch [--calls 40] [--rounds 2] [--breakdown] [--profile]

The ops: the fused SwiGLU-backward GEMM (``swiglu_linear_backward_gemm``, one per layer in the
backward) and the fused loss with its gradients (``linear_cross_entropy_grad_in_forward``), at
Qwen2.5-0.5B's shapes for B=8, T=1024 (N=8192, H=896, I=4864, V=151936), bf16. ``host µs`` is
the time to enqueue a call (no sync inside the loop), ``call µs`` the time per call with the
GPU's work finished. The modes alternate over ``--rounds``. ``--breakdown`` also times the
parts of one SwiGLU-backward GEMM call on their own (host µs each): the op's dispatch, its
body, building the launch (descriptors), the launch by ``fast_launch``, and the compiled
kernel's own launcher with every argument ready (the descriptors' encoding and the driver call).
``--profile`` prints a cProfile of the op's calls (the Python functions its host time is in).
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

import chronicals_fx.kernels.linear_ce  # noqa: F401  (registers the ops)
import chronicals_fx.kernels.swiglu  # noqa: F401
from chronicals_fx.kernels import _triton


def op_calls(n: int = 8192, hidden: int = 896, inter: int = 4864, vocab: int = 151936):
    """{name: a call of the op on fixed random inputs}."""
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, **bf16) * scale

    dy, w_down = rand(n, hidden, scale=1e-3), rand(hidden, inter, scale=0.02)
    gate, up = rand(n, inter), rand(n, inter)
    h, w_head, labels = loss_inputs(n, hidden, vocab)
    labels[::7] = -100
    ops = torch.ops.chronicals
    return {
        "swiglu_linear_backward_gemm": lambda: ops.swiglu_linear_backward_gemm(
            dy, w_down, gate, up, 0),
        "linear_cross_entropy_grad_in_forward": lambda: ops.linear_cross_entropy_grad_in_forward(
            h, w_head, None, labels, -100, "mean", 0.0, 1.0, 0.0, 0.0, torch.float32, True,
            True, False),
    }


def time_calls(call, calls: int) -> tuple[float, float, tuple]:
    """(host µs, call µs) per call of ``calls`` back-to-back calls, and the last output."""
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        out = call()
    enqueued = time.perf_counter()
    torch.cuda.synchronize()
    end = time.perf_counter()
    return (enqueued - start) * 1e6 / calls, (end - start) * 1e6 / calls, out


def swiglu_inputs(n: int, hidden: int, inter: int) -> tuple:
    """(dy [n, hidden], W_down [hidden, inter], gate, up [n, inter]): random bf16 inputs of one
    SwiGLU-backward GEMM call (``swiglu_linear_backward_gemm``)."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    return (torch.randn(n, hidden, **bf16), torch.randn(hidden, inter, **bf16),
            torch.randn(n, inter, **bf16), torch.randn(n, inter, **bf16))


def swiglu_breakdown(calls: int, n: int = 8192, hidden: int = 896, inter: int = 4864
                     ) -> list[list]:
    """Host µs per call of the parts of one fused SwiGLU-backward GEMM call (see the module's
    docstring), each timed alone over ``calls`` calls."""
    from chronicals_fx.kernels import swiglu_gemm

    dy, w_down, gate, up = swiglu_inputs(n, hidden, inter)
    dg, du, y = (torch.empty_like(gate) for _ in range(3))
    launch = swiglu_gemm.make_launch(dy, w_down, gate, up, dg, du, y, 0)
    compiled = launch()
    values = [*launch.args] + [launch.kwargs.get(p.name, p.default)
                               for p in launch.kernel.params[len(launch.args):]]
    grid = launch.grid + (1,) * (3 - len(launch.grid))
    op = torch.ops.chronicals.swiglu_linear_backward_gemm

    def op_no_grad():
        with torch.no_grad():        # as in a compiled backward, where autograd is off
            return op(dy, w_down, gate, up, 0)

    parts = {
        "op (dispatch + body + launch)": lambda: op(dy, w_down, gate, up, 0),
        "op under no_grad": op_no_grad,
        "body (swiglu_linear_backward)": lambda: swiglu_gemm.swiglu_linear_backward(
            dy, w_down, gate, up, 0),
        "3 outputs (empty_like)": lambda: [torch.empty_like(gate) for _ in range(3)],
        "make_launch (4 descriptors)": lambda: swiglu_gemm.make_launch(
            dy, w_down, gate, up, dg, du, y, 0),
        "launch by fast_launch": launch,
        "compiled kernel's launcher": lambda: compiled[grid](*values),
    }
    rows = []
    for name, part in parts.items():
        host, total, _ = time_calls(part, calls)
        rows.append([name, calls, f"{host:.1f}", f"{total:.1f}"])
    return rows


def loss_inputs(n: int = 8192, hidden: int = 896, vocab: int = 151936) -> tuple:
    """(h [n, hidden], lm_head weight [vocab, hidden], labels [n]): random bf16 inputs of one
    fused-loss call, the same on every call."""
    g = torch.Generator(device="cuda").manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h = torch.randn(n, hidden, generator=g, **bf16)
    weight = torch.randn(vocab, hidden, generator=g, **bf16) * 0.02
    labels = torch.randint(0, vocab, (n,), generator=g, device="cuda")
    return h, weight, labels


def loss_breakdown(calls: int, n: int = 8192, hidden: int = 896, vocab: int = 151936
                   ) -> list[list]:
    """Host µs per call of the parts of one fused-loss call (the op, its function, the [N]-sized
    torch ops before and after the chunk loop, and each step of one token chunk), each timed
    alone over ``calls`` calls. The chunk's row passes turn its logits into d in place, so the
    values after the first call are not a loss's: host time only."""
    from chronicals_fx.kernels import linear_ce as L

    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    h, weight, labels = loss_inputs(n, hidden, vocab)
    f32 = dict(dtype=torch.float32, device="cuda")
    rows = L.row_chunk(n, vocab, h.element_size())
    r0, r1 = rows, 2 * rows                            # the second chunk
    x = torch.empty((rows, vocab), **bf16)
    row_w = L.row_weights(torch.ones((), **f32), labels, -100, "mean", torch.float32)
    lse, zt, zsum = torch.empty((3, n), **f32)
    dh, dw = torch.empty_like(h), torch.empty_like(weight)
    stats = L._tile_stats_buffers(h, weight, None, rows, 0.0)
    op = torch.ops.chronicals.linear_cross_entropy_grad_in_forward
    args = (h, weight, None, labels, -100, "mean", 0.0, 1.0, 0.0, 0.0)
    parts = {
        "op (dispatch + body)": lambda: op(*args, torch.float32, True, True, False),
        "lce_forward_with_grads": lambda: L.lce_forward_with_grads(*args, True, True, False),
        "row_weights": lambda: L.row_weights(torch.ones((), **f32), labels, -100, "mean",
                                             torch.float32),
        "finish_loss": lambda: L.finish_loss(lse, zt, None, labels, vocab, -100, "mean", 0.0,
                                             0.0),
        "chunk: 7 row slices": lambda: (h[r0:r1], labels[r0:r1], row_w[r0:r1], lse[r0:r1],
                                        zt[r0:r1], zsum[r0:r1], dh[r0:r1]),
        "chunk: logits GEMM + tile statistics": lambda: L._logits_with_tile_stats(
            h[r0:r1], weight, x, stats, 1.0, 0.0),
        "chunk: row passes (combine + d)": lambda: L.lce_rows(
            x, labels[r0:r1], row_w[r0:r1], lse[r0:r1], zt[r0:r1], zsum[r0:r1], 1.0, 0.0, 0.0,
            0.0, tile_stats=stats),
        "chunk: dH mm": lambda: torch.mm(x, weight, out=dh[r0:r1]),
        "chunk: dW addmm": lambda: dw.addmm_(x.t(), h[r0:r1]),
    }
    out = []
    for name, part in parts.items():
        host, total, _ = time_calls(part, calls)
        out.append([name, calls, f"{host:.1f}", f"{total:.1f}"])
    return out


def _profiled(call, calls: int, top: int) -> str:
    """cProfile of ``calls`` back-to-back calls of ``call`` (after 2 warm-up calls and with the
    GPU idle at the start), the ``top`` functions by own time."""
    import cProfile
    import io
    import pstats

    for _ in range(2):
        call()
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        call()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def profile_loss(calls: int, top: int = 30) -> str:
    """cProfile of the fused loss's function (not the op: through the dispatcher torch books the
    whole body to one wrapper), by own time."""
    from chronicals_fx.kernels import linear_ce as L

    h, weight, labels = loss_inputs()
    args = (h, weight, None, labels, -100, "mean", 0.0, 1.0, 0.0, 0.0, True, True, False)
    return _profiled(lambda: L.lce_forward_with_grads(*args), calls, top)


def profile_op(calls: int, top: int = 25, n: int = 8192, hidden: int = 896, inter: int = 4864
               ) -> str:
    """cProfile of back-to-back SwiGLU-backward GEMM ops: the Python functions the op's host
    time is spent in, by own time."""
    dy, w_down, gate, up = swiglu_inputs(n, hidden, inter)
    op = torch.ops.chronicals.swiglu_linear_backward_gemm
    return _profiled(lambda: op(dy, w_down, gate, up, 0), calls, top)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="cProfile the SwiGLU-backward GEMM op's calls (Python functions, "
                        "own time)")
    p.add_argument("--loss-breakdown", action="store_true",
                   help="time the parts of one fused-loss call (host µs each)")
    p.add_argument("--profile-loss", action="store_true",
                   help="cProfile the fused loss's function (Python functions, own time)")
    p.add_argument("--only-breakdowns", action="store_true",
                   help="skip the launch-path comparison")
    args = p.parse_args(argv)
    rows = []
    for name, call in ([] if args.only_breakdowns else op_calls().items()):
        calls = args.calls if "swiglu" in name else max(4, args.calls // 8)
        times: dict[bool, list] = {False: [], True: []}
        outputs = {}
        for _ in range(args.rounds):
            for fast in (False, True):
                _triton.FAST_LAUNCH = fast
                host, total, outputs[fast] = time_calls(call, calls)
                times[fast].append((host, total))
        _triton.FAST_LAUNCH = True
        equal = all(torch.equal(a, b) for a, b in zip(outputs[False], outputs[True]))
        for fast in (False, True):
            host = min(h for h, _ in times[fast])
            total = min(t for _, t in times[fast])
            rows.append([name, "fast_launch" if fast else "Triton JIT", calls, f"{host:.1f}",
                         f"{total:.1f}", "bit-equal" if equal else "DIFFERENT"])
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {__import__('triton').__version__}  (best of {args.rounds} rounds)")
    print(tabulate(rows, headers=["op", "launch path", "calls", "host µs", "call µs",
                                  "outputs"]))
    if args.breakdown:
        print(tabulate(swiglu_breakdown(args.calls), headers=[
            "part of a SwiGLU-backward GEMM call", "calls", "host µs", "call µs"]))
    if args.loss_breakdown:
        print(tabulate(loss_breakdown(max(4, args.calls // 4)), headers=[
            "part of a fused-loss call", "calls", "host µs", "call µs"]))
    if args.profile:
        print(profile_op(args.calls))
    if args.profile_loss:
        print(profile_loss(max(4, args.calls // 8)))
    return 0 if all(r[-1] == "bit-equal" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
