"""Host time per call of the ops that launch kernels from Python at run time, with
``fast_launch`` on and off (kernels/_triton.py); their outputs compared bit for bit.

    python -m benchmarks.host_launch [--calls 40] [--rounds 2]

The ops: the fused SwiGLU-backward GEMM (``swiglu_linear_backward_gemm``, one per layer in the
backward) and the fused loss with its gradients (``linear_cross_entropy_grad_in_forward``), at
Qwen2.5-0.5B's shapes for B=8, T=1024 (N=8192, H=896, I=4864, V=151936), bf16. ``host µs`` is
the time to enqueue a call (no sync inside the loop), ``call µs`` the time per call with the
GPU's work finished. The modes alternate over ``--rounds``.
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
    h, w_head = rand(n, hidden), rand(vocab, hidden, scale=0.02)
    labels = torch.randint(0, vocab, (n,), generator=g, device="cuda")
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    for name, call in op_calls().items():
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
    return 0 if all(r[-1] == "bit-equal" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
