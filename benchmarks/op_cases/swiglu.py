"""SwiGLU / GeGLU cases: y = act(g) · u over [N, I] (Llama/Qwen MLP widths).

ideal bytes = 8 tensors of N·I elements: forward reads g, u and writes y; backward reads dy,
g, u and writes dg, du. The fused-projection case (Phi-3's gate_up_proj split by ``chunk``)
moves the same bytes in the op, plus what autograd's chunk backward costs to assemble the
[N, 2I] gradient (a concatenation in every variant) — its % copy is not comparable to the
separate-projection cases.

The "after projections" case feeds the MLP's input x and the gate/up weights instead of g and u
(x → g = x·W_gᵀ, u = x·W_uᵀ → act(g)·u), because that is how a model calls the op: g and u are
fresh intermediates the op's backward may overwrite (``chronicals_compiled``, the pass inside
torch.compile, writes dg and du over them, as Liger's Function does). Called on leaf g and u, as in
the other cases, the op must not overwrite them: its extra memory there includes dg and du. The
GEMMs dominate this case's time; compare its extra MiB.
"""

from __future__ import annotations

import functools

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
    out.append(_after_projections(device, dtype, 16384, 4096, 14336))
    out.append(_after_fused_projection(device, dtype, 8192, 3072, 8192))
    return out


def eager_mlp_gate(x, w_gate, w_up):
    return F.silu(F.linear(x, w_gate)) * F.linear(x, w_up)


def eager_mlp_fused_gate(x, w_gate_up):
    gate, up = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


def _after_fused_projection(device: str, dtype: torch.dtype, n: int, h: int, i: int) -> OpCase:
    """Phi-3's gate_up_proj: one projection to [N, 2I], chunked. The pass's op gets the halves
    as views; its backward returns dg and du, which the chunk's backward concatenates (a copy
    Inductor's own kernel avoids by writing the [N, 2I] gradient directly)."""
    from chronicals_fx.backend import chronicals_backend
    from chronicals_fx.config import Config

    def inputs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        w = (torch.randn(2 * i, h, generator=g) * h ** -0.5).to(device, dtype).requires_grad_()
        return x, w

    backend = functools.partial(chronicals_backend, options=Config(passes=("swiglu",)))
    variants = {"eager": eager_mlp_fused_gate,
                "inductor": torch.compile(eager_mlp_fused_gate, dynamic=False),
                "chronicals_compiled": torch.compile(eager_mlp_fused_gate, backend=backend,
                                                     dynamic=False)}
    return OpCase("swiglu", f"silu after a fused gate_up projection N={n} H={h} I={i}",
                  8 * n * i * dtype.itemsize, inputs, variants, flops=3 * 2 * 2 * n * h * i)


def _after_projections(device: str, dtype: torch.dtype, n: int, h: int, i: int) -> OpCase:
    from chronicals_fx.backend import chronicals_backend
    from chronicals_fx.config import Config

    def inputs():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, h, generator=g).to(device, dtype).requires_grad_()
        w_gate = (torch.randn(i, h, generator=g) * h ** -0.5).to(device, dtype).requires_grad_()
        w_up = (torch.randn(i, h, generator=g) * h ** -0.5).to(device, dtype).requires_grad_()
        return x, w_gate, w_up

    backend = functools.partial(chronicals_backend, options=Config(passes=("swiglu",)))
    variants = {"eager": eager_mlp_gate,
                "inductor": torch.compile(eager_mlp_gate, dynamic=False),
                "chronicals_compiled": torch.compile(eager_mlp_gate, backend=backend,
                                                     dynamic=False)}
    liger = _liger("silu")
    if liger is not None:
        variants["liger"] = lambda x, wg, wu: liger(F.linear(x, wg), F.linear(x, wu))
    return OpCase("swiglu", f"silu after projections N={n} H={h} I={i}", 8 * n * i * dtype.itemsize,
                  inputs, variants, flops=3 * 2 * 2 * n * h * i)
