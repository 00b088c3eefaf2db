"""lm_head + cross-entropy cases: hidden [N, H] and W [V, H] (both needing grads), int64 labels
with about 10% ignored (-100); each variant returns the scalar mean loss.

flops = 6·N·H·V: the useful work (forward logits 2NHV; backward dH and dW 4NHV), the same for
every variant so the TFLOP/s column compares speed. "chronicals" is what the pass uses in
training: the gradients computed in the forward, 6NHV, row chunks (docs/linear_ce.md);
"chronicals_recompute" the forward-only op with its recomputing backward (8NHV: the backward
computes the logits again), which the pass uses only when no gradient is needed at compile time.
"chronicals_cublas_logits" is "chronicals" with cuBLAS computing the logits and the first row
pass reading them, instead of the Gluon GEMM with the row statistics in its epilogue
(kernels/linear_ce_gemm.py, Hopper); "chronicals_dh_gemm" also takes dH_c = d_c @ W off cuBLAS
onto the same Gluon main loop (opt-in, CHRONICALS_LCE_DH_GEMM=1).
Liger computes 6NHV, Cut Cross-Entropy 8NHV.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from benchmarks.harness import OpCase

SHAPES = ((8192, 896, 151936), (8192, 4096, 128256))   # Qwen2.5-0.5B-like, Llama-3-8B-like
IGNORED = 0.1


def eager(h, w, labels):
    return F.cross_entropy((h @ w.T).float(), labels)


def chronicals(h, w, labels):
    from chronicals_fx.kernels.linear_ce import linear_cross_entropy_loss

    return linear_cross_entropy_loss(h, w, labels, grad_in_forward=True)


def _chronicals_with(variable: str, value: str):
    """``chronicals`` with an environment switch of kernels/linear_ce_gemm.py set for the call
    (read at each call, and at CUDA-graph capture)."""
    def run(h, w, labels):
        os.environ[variable] = value
        try:
            return chronicals(h, w, labels)
        finally:
            del os.environ[variable]
    return run


chronicals_cublas_logits = _chronicals_with("CHRONICALS_LCE_GEMM", "0")
chronicals_dh_gemm = _chronicals_with("CHRONICALS_LCE_DH_GEMM", "1")   # opt-in until measured


def chronicals_recompute(h, w, labels):
    loss, _ = torch.ops.chronicals.linear_cross_entropy(h, w, None, labels, -100, "mean", 0.0,
                                                        1.0, 0.0, 0.0, torch.float32)
    return loss


def _liger():
    """Liger's fused linear cross-entropy (its default: weight grad accumulated in the input
    dtype), and with accum_dtype=float32 where the installed version has it."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction as L
    except ImportError:
        return {}
    import inspect

    params = list(inspect.signature(L.forward).parameters)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    variants = {"liger": lambda h, w, y: first(L.apply(h, w, y))}
    if "accum_dtype" in params:
        # apply() takes positional arguments only: fill the defaults up to accum_dtype.
        defaults = [p.default for p in inspect.signature(L.forward).parameters.values()][4:]
        names = params[4:]
        args = dict(zip(names, defaults))
        args["accum_dtype"] = torch.float32
        tail = [args[n] for n in names[:names.index("accum_dtype") + 1]]
        variants["liger_fp32_accum"] = lambda h, w, y: first(L.apply(h, w, y, *tail))
    return variants


def _cut_ce():
    try:
        import cut_cross_entropy as cce
    except ImportError:
        return {}
    return {
        # its default filters small gradients (filter_eps="high"): not exact
        "cut_ce": lambda h, w, y: cce.linear_cross_entropy(h, w, y),
        "cut_ce_exact": lambda h, w, y: cce.linear_cross_entropy(h, w, y, filter_eps=None),
    }


def cases(device: str, dtype: torch.dtype) -> list[OpCase]:
    from chronicals_fx.kernels import linear_ce as kernel

    variants = {"eager": eager, "inductor": torch.compile(eager, dynamic=False), "chronicals": chronicals,
                "chronicals_cublas_logits": chronicals_cublas_logits,
                "chronicals_dh_gemm": chronicals_dh_gemm,
                "chronicals_recompute": chronicals_recompute,
                **_liger(), **_cut_ce()}
    out = []
    for n, hidden, vocab in SHAPES:
        def inputs(n=n, hidden=hidden, vocab=vocab):
            # Drawn on the CPU: a peer whose CUDA-graph capture failed can leave the CUDA
            # generator unusable for the next case.
            g = torch.Generator().manual_seed(0)
            h = torch.randn(n, hidden, generator=g).to(device, dtype)
            w = (torch.randn(vocab, hidden, generator=g) * hidden ** -0.5).to(device, dtype)
            labels = torch.randint(0, vocab, (n,), generator=g)
            labels[torch.rand(n, generator=g) < IGNORED] = -100
            return h.requires_grad_(), w.requires_grad_(), labels.to(device)
        out.append(OpCase("linear_cross_entropy", f"N={n} H={hidden} V={vocab}",
                          kernel.ideal_bytes(n, hidden, vocab, dtype.itemsize), inputs, variants,
                          flops=6 * n * hidden * vocab))
    return out
