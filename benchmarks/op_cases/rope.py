"""RoPE cases: HF Llama's ``apply_rotary_pos_emb`` on q and k (GQA), bf16, [B, H, T, D] layout
as HF produces it (q, k are transposes of [B, T, H, D] projections), cos/sin [1, T, D] in the
model dtype built from positions as HF's rotary module does.

ideal_bytes = 4 · (|q| + |k|): forward reads q, k and writes q', k'; backward reads dq', dk' and
writes dq, dk. cos/sin ([1, T, D], read once per token) are left out: ≤ 2.5% at these shapes.

Variants:
  eager         HF's formula written out (rotate_half by slicing, cat, two products, a sum)
  inductor      torch.compile of eager
  chronicals    torch.ops.chronicals.rope as the pass emits it for HF graphs: the pass proves
                cos/sin hold each angle twice (``cat((freqs, freqs))``) and hands the kernel the
                first half of each row
  chronicals_compiled   eager compiled with the chronicals backend (the pass + Inductor): here
                cos/sin are inputs, so it reads full rows
  liger         liger_kernel's LigerRopeFunction (when importable). It rotates q and k *in place*
                (their [B, T, H, D] storage is already contiguous, so its ``.contiguous()`` is a
                no-op): it runs last so that no other variant sees rotated inputs.
"""

from __future__ import annotations

import torch

from benchmarks.harness import OpCase


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def eager(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _cos_sin(T: int, D: int, device, dtype, base: float = 10000.0):
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    freqs = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)[None]            # (1, T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def cases(device: str, dtype: torch.dtype) -> list[OpCase]:
    from chronicals_fx.backend import chronicals_backend

    # dynamic=False: each shape compiled for itself, as a training run with fixed shapes is.
    inductor = torch.compile(eager, dynamic=False)
    compiled = torch.compile(eager, backend=chronicals_backend, dynamic=False)

    def chronicals(q, k, cos, sin):
        half = cos.shape[-1] // 2
        return torch.ops.chronicals.rope(q, k, cos[..., :half], sin[..., :half], 2, False, True,
                                         q.dtype, q.dtype, q.dtype)

    variants = {"eager": eager, "inductor": inductor, "chronicals": chronicals,
                "chronicals_compiled": compiled}
    try:
        from liger_kernel.ops.rope import LigerRopeFunction

        def liger(q, k, cos, sin):
            out = LigerRopeFunction.apply(q, k, cos, sin)
            return out[0], out[1]  # older releases also return cos, sin

        variants["liger"] = liger
    except ImportError:
        pass

    out = []
    for B, T, Hq, Hk, D in ((8, 1024, 14, 2, 64), (4, 4096, 32, 8, 128)):
        def inputs(B=B, T=T, Hq=Hq, Hk=Hk, D=D):
            q = torch.randn(B, T, Hq, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
            k = torch.randn(B, T, Hk, D, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
            return (q, k, *_cos_sin(T, D, device, dtype))
        qk_bytes = B * T * (Hq + Hk) * D * dtype.itemsize
        out.append(OpCase("rope", f"B={B} T={T} Hq={Hq} Hk={Hk} D={D}", 4 * qk_bytes, inputs,
                          variants))
    return out
