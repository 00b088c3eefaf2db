"""SwiGLU launch-parameter sweep: the forward and backward kernels alone (no autograd), bf16.

    python -m benchmarks.sweep_swiglu

The backward as the default SwiGLU op runs it in a model (``swiglu_save_hidden=False``): it
reads dy, g, u and writes dg, du and y = act(g)·u again (for the down projection's dW) — six
[N, I] streams — and, for comparison, without y (five streams, what Inductor's fused backward
moves when the forward saved y). Each (BLOCK, warps) is replayed from a CUDA graph; GB/s on the
streams' bytes against the copy bandwidth of the same run. Inductor's own kernels for the same
math (``torch.compile`` of the pointwise functions) are timed the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import copy_bandwidth_gbps, graphed_ms
from chronicals_fx.kernels import swiglu as K

SHAPES = ((8192, 4864), (16384, 14336))
BLOCKS = (1024, 2048, 4096, 8192)
WARPS = (4, 8, 16)
SILU = K.ACTIVATIONS["silu"]


def inductor_backward(dy, g, u, with_y: bool):
    gf, uf, dyf = g.float(), u.float(), dy.float()
    s = torch.sigmoid(gf)
    a = (gf * s).to(g.dtype).float()
    dg = ((dyf * uf).to(g.dtype).float() * s * (1 + gf * (1 - s))).to(g.dtype)
    du = (dyf * a).to(g.dtype)
    if with_y:
        return dg, du, (a * uf).to(g.dtype)
    return dg, du


def sweep_shape(n: int, i: int, copy: float, compiled: dict, forward) -> None:
    g, u, dy = (torch.randn(n, i, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dg, du, y = (torch.empty_like(g) for _ in range(3))
    stream_bytes = g.numel() * g.element_size()
    print(f"## N={n} I={i} (one stream {stream_bytes / 1e6:.0f} MB)", flush=True)

    def report(name, ms, streams):
        gbps = streams * stream_bytes / ms / 1e6
        print(f"{name:<44} {ms * 1e3:7.1f} us  {gbps:5.0f} GB/s  {100 * gbps / copy:3.0f}% copy",
              flush=True)

    report("inductor forward", graphed_ms(lambda: forward(g, u)), 3)
    report("inductor backward + y", graphed_ms(lambda: compiled[True](dy, g, u)), 6)
    report("inductor backward", graphed_ms(lambda: compiled[False](dy, g, u)), 5)
    default = (K.BLOCK, K.NUM_WARPS)
    for block, warps in ((b, w) for b in BLOCKS for w in WARPS):
        K.BLOCK, K.NUM_WARPS = block, warps
        tag = f"BLOCK={block} warps={warps}{' (default)' if (block, warps) == default else ''}"
        report(f"ours forward {tag}", graphed_ms(lambda: K.swiglu_forward(g, u, y, SILU)), 3)
        report(f"ours backward + y {tag}",
               graphed_ms(lambda: K.swiglu_backward(dy, g, u, dg, du, SILU, y)), 6)
        report(f"ours backward {tag}",
               graphed_ms(lambda: K.swiglu_backward(dy, g, u, dg, du, SILU)), 5)
    K.BLOCK, K.NUM_WARPS = default


def main() -> None:
    copy = copy_bandwidth_gbps()
    print(f"# {torch.cuda.get_device_name()} copy {copy:.0f} GB/s; default BLOCK={K.BLOCK} "
          f"warps={K.NUM_WARPS}")
    compiled = {with_y: torch.compile(lambda dy, g, u, w=with_y: inductor_backward(dy, g, u, w))
                for with_y in (False, True)}
    forward = torch.compile(lambda g, u: F.silu(g) * u)
    for n, i in SHAPES:
        sweep_shape(n, i, copy, compiled, forward)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help only
    main()
