"""RMSNorm cases: Llama-style (fp32 statistics, cast back, weight multiply in the input dtype),
alone and fed by a residual add (h = a + b; both h and the norm are outputs, as in a decoder).

The chronicals variants call the registered ops inside torch.compile, as they run in a model:
Inductor then emits the kernel launches and fuses the small reductions around them.
"""

from __future__ import annotations

import torch

from benchmarks.harness import OpCase

EPS = 1e-6


def eager(x, w):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def eager_add(a, b, w):
    h = a + b
    return h, eager(h, w)


def ours(x, w):
    return torch.ops.chronicals.rms_norm(x, w, EPS, 0.0, x.dtype, w.dtype, x.dtype, x.dtype)


def ours_add(a, b, w):
    return torch.ops.chronicals.add_rms_norm(a, b, w, EPS, 0.0, a.dtype, w.dtype, a.dtype, a.dtype)


def _static(fn):
    # one compiled function per case: shared across shapes it would recompile with dynamic
    # shapes and measure a slower kernel than a model of fixed shape gets
    return torch.compile(fn, dynamic=False)


def cases(device: str, dtype: torch.dtype) -> list[OpCase]:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        liger = {"liger": lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama", False)}
    except ImportError:
        liger = {}

    out = []
    size = dtype.itemsize
    for n, h in ((8192, 896), (16384, 4096)):
        def inputs(n=n, h=h):
            x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
            return x, w

        def inputs_add(n=n, h=h):
            a = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_()
            return a, b, w
        plain = {"eager": eager, "inductor": _static(eager), "chronicals": _static(ours), **liger}
        fused = {"eager": eager_add, "inductor": _static(eager_add),
                 "chronicals": _static(ours_add)}
        # fwd: read x, write y; bwd: read x and dy, write dx (the weight is negligible)
        out.append(OpCase("rmsnorm", f"N={n} H={h}", 5 * n * h * size, inputs, plain))
        # fwd: read a, b, write h, y; bwd: read h, dy, dh, write dh_total (da = db)
        out.append(OpCase("rmsnorm", f"N={n} H={h} +residual", 8 * n * h * size, inputs_add, fused))
    return out
