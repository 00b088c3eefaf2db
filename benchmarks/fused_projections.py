"""Would one GEMM for the projections that share an input beat one GEMM each?

    python -m benchmarks.fused_projections

A decoder layer projects the same normalized hidden states three times for attention (q, k, v;
k and v narrow under grouped-query attention) and twice for a gated MLP (gate, up). Here each
set runs forward + backward (dX and every dW, bias included) compiled by Inductor two ways —
one linear per projection, and the weights concatenated into one linear whose output is split —
replayed from CUDA graphs (no launch cost: the kernels' own time). bf16, N = 8192 tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import graphed_ms

N = 8192
CASES = (  # name, hidden, output widths, bias
    ("Qwen2.5-0.5B q/k/v", 896, (896, 128, 128), True),
    ("Qwen2.5-0.5B gate/up", 896, (4864, 4864), False),
    ("Llama-3-8B q/k/v", 4096, (4096, 1024, 1024), False),
)


def separate(x, weights, biases):
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


def fused(x, weights, biases):
    bias = torch.cat(biases) if biases[0] is not None else None
    y = F.linear(x, torch.cat(weights), bias)
    return list(y.split([w.shape[0] for w in weights], dim=-1))


def fwd_bwd_ms(fn, x, weights, biases, grads) -> float:
    params = [x, *weights, *(b for b in biases if b is not None)]

    def step():
        for p in params:
            p.grad = None
        outs = fn(x, weights, biases)
        torch.autograd.backward(outs, grads)

    return graphed_ms(step, rep=200)


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, N={N}, bf16, "
          f"fwd + bwd, Inductor, CUDA-graph replays")
    for name, hidden, widths, has_bias in CASES:
        def tensor(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        x = tensor(N, hidden).requires_grad_()
        weights = [(tensor(w, hidden) * hidden ** -0.5).requires_grad_() for w in widths]
        biases = [tensor(w).requires_grad_() if has_bias else None for w in widths]
        grads = [tensor(N, w) for w in widths]
        flop = 6 * N * hidden * sum(widths)
        times = {}
        for label, fn in (("one GEMM each", separate), ("concatenated", fused)):
            times[label] = fwd_bwd_ms(torch.compile(fn), x, weights, biases, grads)
        base = times["one GEMM each"]
        for label, ms in times.items():
            print(f"{name:<22} {label:<14} {ms * 1e3:8.1f} us  {flop / ms / 1e9:5.0f} TFLOP/s  "
                  f"{base / ms:.2f}x", flush=True)


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help only
    main()
