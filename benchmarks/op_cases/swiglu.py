"""SwiGLU / GeGLU cases: y = act(g) · u over [N, I] (Llama/Qwen MLP widths).

ideal bytes = 8 tensors of N·I elements: forward reads g, u and writes y; backward reads dy,
g, u and writes dg, du. The fused-projection case (Phi-3's gate_up_proj split by ``chunk``)
moves the same bytes in the op, plus what autograd's chunk backward costs to assemble the
[N, 2I] gradient (a concatenation in every variant) — its % copy is not comparable to the
separate-projection cases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import OpCase

SILU, GELU_TANH = 0, 2  # chronicals_fx.kernels.swiglu.ACTIVATIONS


def eager_silu(g, u):
    return F.silu(g) * u


def eager_gelu_tanh(g, u):
    return F.gelu(g, approximate="tanh") * u


def eager_fused(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def _liger(name: str):
    """Liger's autograd Function, or None when liger_kernel is not importable."""
    try:
        if name == "silu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction as fn
        else:
            from liger_kernel.ops.geglu import LigerGELUMulFunction as fn
    except ImportError:
        return None
    return fn.apply


def cases(device: str, dtype: torch.dtype) -> list[OpCase]:
    size = dtype.itemsize

    def two_inputs(n, i):
        def inputs():
            g = (2 * torch.randn(n, i, device=device)).to(dtype).requires_grad_()
            u = torch.randn(n, i, device=device, dtype=dtype, requires_grad=True)
            return g, u
        return inputs

    def variants(eager, code, liger_name):
        out = {
            "eager": eager,
            "inductor": torch.compile(eager, dynamic=False),
            "chronicals": lambda g, u: torch.ops.chronicals.swiglu(g, u, code),
        }
        liger = _liger(liger_name)
        if liger is not None:
            # Last on purpose: Liger's backward writes dg, du into the saved inputs' storage
            # (the inputs themselves), so every variant after it would run on clobbered data.
            out["liger"] = liger
        return out

    out = []
    for n, i in ((8192, 4864), (16384, 14336)):
        out.append(OpCase("swiglu", f"silu N={n} I={i}", 8 * n * i * size, two_inputs(n, i),
                          variants(eager_silu, SILU, "silu")))
    n, i = 8192, 4864
    out.append(OpCase("swiglu", f"gelu_tanh N={n} I={i}", 8 * n * i * size, two_inputs(n, i),
                      variants(eager_gelu_tanh, GELU_TANH, "gelu_tanh")))

    def fused_inputs():
        return ((2 * torch.randn(n, 2 * i, device=device)).to(dtype).requires_grad_(),)

    def chronicals_fused(gu):
        g, u = gu.chunk(2, dim=-1)                 # row-strided views: read in place, no copy
        return torch.ops.chronicals.swiglu(g, u, SILU)

    fused = {"eager": eager_fused, "inductor": torch.compile(eager_fused, dynamic=False),
             "chronicals": chronicals_fused}
    liger = _liger("silu")
    if liger is not None:
        fused["liger"] = lambda gu: liger(*gu.chunk(2, dim=-1))   # copies to contiguous inside
    out.append(OpCase("swiglu", f"silu fused gate_up chunk N={n} I={i}", 8 * n * i * size,
                      fused_inputs, fused))
    return out
