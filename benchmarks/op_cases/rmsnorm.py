"""RMSNorm cases: Llama-style (fp32 statistics, cast back, weight multiply in the input dtype)."""

from __future__ import annotations

import torch

from benchmarks.harness import OpCase

EPS = 1e-6


def eager(x, w):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def cases(device: str, dtype: torch.dtype) -> list[OpCase]:
    inductor = torch.compile(eager)

    def chronicals(x, w):
        return torch.ops.chronicals.rms_norm(x, w, EPS, 0.0, x.dtype, w.dtype, x.dtype, x.dtype)

    variants = {"eager": eager, "inductor": inductor, "chronicals": chronicals}
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        variants["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)
    except ImportError:
        pass

    out = []
    for n, h in ((8192, 896), (16384, 4096)):
        def inputs(n=n, h=h):
            x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
            return x, w
        size = dtype.itemsize
        # fwd: read x, write y; bwd: read x and dy, write dx (the weight is negligible)
        out.append(OpCase("rmsnorm", f"N={n} H={h}", 5 * n * h * size, inputs, variants))
    return out
