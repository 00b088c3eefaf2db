"""The one small dataclass of options, validated where it is built."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

# Report keys, in pipeline order. Every report carries all of them, 0 where nothing matched.
OP_NAMES: tuple[str, ...] = ("rmsnorm", "swiglu", "rope", "attention", "linear_cross_entropy",
                             "lora", "projections")
# The passes that run unless ``passes`` says otherwise: all of them. ("lora" gives fp32 adapters'
# products autocast's precision; on an H200, LoRA r=32: 1.29x torch.compile, losses within 0.012
# of eager's, benchmarks/RESULTS.md session 9, call 1. "projections", one GEMM for grouped-query
# attention's q/k/v: +3.0% a step, +1.5% with CUDA graphs, Qwen2.5-0.5B shape, session 25.)
DEFAULT_PASSES: tuple[str, ...] = OP_NAMES

_COMPILERS = ("inductor", "aot_eager", "eager")
# Config.attention_backend's choices (kernels/attention.py dispatches on them)
ATTENTION_BACKENDS = ("sdpa", "cudnn", "flash", "triton")


@dataclass(frozen=True)
class Config:
    """Options of the ``chronicals`` backend.

    Pass them as ``torch.compile(model, backend="chronicals", options={...})`` or as keyword
    arguments of :func:`chronicals.optimize`. Any other key of ``options`` is an Inductor
    option and goes to Inductor unchanged.
    """

    # Which passes run (names of OP_NAMES). Default: DEFAULT_PASSES, all of them. Ops whose
    # pass is off are left to Inductor.
    passes: tuple[str, ...] = DEFAULT_PASSES
    # What compiles the rewritten graph: "inductor" (the point of the exercise); "aot_eager"
    # (AOTAutograd traces forward and backward, no code generation) or "eager" (the rewritten
    # graph op by op): for debugging a mismatch, and fast tests.
    compiler: str = "inductor"
    # If a pass raises, the default is to log it, leave the graph as it was, and go on
    # (the original subgraph runs). strict=True raises instead: for tests and CI.
    strict: bool = False
    # linear + cross-entropy: keep the [N, V] logits alive for the model's output even when
    # the loss is computed in the same graph (costs the memory the fused op saves).
    keep_logits: bool = False
    # RMSNorm: where the normalized output feeds several projections (q, k, v; gate, up), their
    # input gradients go into our backward kernel unsummed, and it adds them (in fp32) as it
    # reads the rows — Inductor's post-grad graph, as its own norm backward does; False leaves
    # the sum to an Inductor kernel before ours (a launch and an [N, H] round trip a norm).
    rmsnorm_grad_sum: bool = True
    # SwiGLU: take a down projection that reads nothing else into the op (False, default):
    # only g and u are saved, and the SwiGLU backward pass writes act(g)·u again for the down
    # projection's dW — one [N, I] tensor less a layer at the peak of memory, one more write
    # of it in backward (H200, Qwen2.5-0.5B B=8 T=1024: peak 10.7 → 9.1 GiB, step 1–2% slower);
    # or keep act(g)·u saved for the down projection's backward, as Inductor does (True).
    swiglu_save_hidden: bool = False
    # SwiGLU with the down projection taken in, on Hopper: its backward's dh = dy W_down GEMM
    # carries the SwiGLU backward in its epilogue (one warp-specialized Gluon kernel; dh never
    # reaches memory). H200, bf16, Qwen2.5-0.5B's down projection at 8k tokens: 201.5 µs against
    # 234.4 for cuBLAS + the SwiGLU kernel (the default tile, session 14). Results equal the unfused path's up to
    # the GEMM's fp32 accumulation order. Off, or off Hopper: cuBLAS + the SwiGLU kernel.
    swiglu_fused_gemm: bool = True
    # LoRA: adapters whose A products read one input (q/k/v of a layer, gate/up) share one GEMM
    # over their concatenated A weights: fewer, larger GEMMs and launches. Measured on an H200,
    # LoRA r=32, Qwen2.5-0.5B shape (benchmarks/RESULTS.md, session 9): 1.05x at 6 layers, no
    # gain at 24 (0.97x, inside the host-bound step's spread), so off by default. Forward values
    # unchanged; in backward their dx terms are summed inside one GEMM (rounded once instead of
    # once per adapter and per sum), so gradients upstream differ from autocast's by that
    # rounding. Off: each adapter's GEMMs apart, autocast's results exactly.
    lora_concat_a: bool = False
    # Kernel for causal attention on CUDA: "sdpa" (PyTorch's dispatcher picks cuDNN or flash;
    # measured fastest on an H200), or force "cudnn", "flash", or our "triton" kernel. Packed
    # documents always use the document-masked Triton kernel.
    attention_backend: str = "sdpa"
    # Options for Inductor (anything torch._inductor.config accepts).
    inductor: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        passes = (self.passes,) if isinstance(self.passes, str) else tuple(self.passes)
        unknown = [p for p in passes if p not in OP_NAMES]
        if unknown:
            raise ValueError(f"unknown pass(es) {unknown}; choose from {list(OP_NAMES)}")
        object.__setattr__(self, "passes", passes)
        if self.compiler not in _COMPILERS:
            raise ValueError(f"compiler must be one of {_COMPILERS}, got {self.compiler!r}")
        object.__setattr__(self, "inductor", dict(self.inductor))
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                             f"got {self.attention_backend!r}")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "Config" | None) -> "Config":
        """Split ``torch.compile``'s ``options=`` into our fields and Inductor's options."""
        if isinstance(options, Config):
            return options
        options = dict(options or {})
        ours = {f.name for f in dataclasses.fields(cls)}
        mine = {k: options.pop(k) for k in list(options) if k in ours}
        inductor = dict(mine.pop("inductor", {}))
        inductor.update(options)
        return cls(**mine, inductor=inductor)
