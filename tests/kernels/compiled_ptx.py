"""Rounding kernels compiled for sm_90a without a GPU, their roundings counted in the PTX.

The interpreter runs a kernel's Python, not the compiler's output, and the compiler may drop a
rounding the Python does (Triton folded fp16's conversion round trip: RoPE's rounded products
became FMAs on an H200). Each rounding code leaves its own marks, (instruction pattern, values
rounded by one): the mask clearing 16 (bf16 on the bits, CODE 1) or 13 (fp16, CODE 2) low bits;
a conversion to bf16 (CODE 3) or fp16 (CODE 2, below its normal range and by a conversion round
trip as it once was), or native arithmetic in that type, which the compiler picks where the
operands are already of it (an exact product rounded once: the same value).

Run in a process of its own, ``TRITON_INTERPRET=0 python -m tests.kernels.compiled_ptx``:
under the interpreter Triton's own ``@jit`` library functions (``tl.sum``) are interpreted
ones, which the compiler can't take. Prints a JSON object, case → {"roundings": marks found in
the PTX, "expected": the kernel's rounding points and stores per thread, "fma": FMAs in any
precision}.
"""

from __future__ import annotations

import json
import re

import torch
import triton
import triton.language as tl

from benchmarks.offline_compile import compile_offline
from chronicals_fx.kernels._triton import round_to


def _conversions(half: str) -> list[tuple[str, int]]:
    """Marks of rounding to ``half`` ("bf16", "f16") by the hardware: conversions (the stores'
    included), and native arithmetic in it (one or two values an instruction)."""
    return [(rf"cvt\.rn\.{half}x2\.f32\s", 2), (rf"cvt\.rn\.{half}\.f32\s", 1),
            (rf"\b(mul|add|sub)(\.rn)?\.{half}x2\s", 2),
            (rf"\b(mul|add|sub)(\.rn)?\.{half}\s", 1)]


# an FMA in any precision rounds a product and a sum once, where eager rounds twice
FMA = re.compile(r"\bfma\.rn(\.ftz)?(\.sat)?\.(f32|f16|bf16)(x2)?\b")

ROUNDING_MARKS = {
    1: [(r"and\.b32\s.*-65536;", 1)],
    2: [(r"and\.b32\s.*-8192;", 1), *_conversions("f16")],
    3: _conversions("bf16"),
}
CODES = {1: torch.bfloat16, 2: torch.float16, 3: torch.bfloat16}


@triton.jit
def products_kernel(A, B, C, D, Y, n, CODE: tl.constexpr, BLOCK: tl.constexpr):
    """y = rnd(rnd(a·b) − rnd(c·d)) in fp32 ``Y`` from a, b, c, d of the rounding's dtype:
    RoPE's and SwiGLU's pattern, with the operands from which the compiler can form
    half-precision arithmetic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask).to(tl.float32)
    b = tl.load(B + offs, mask=mask).to(tl.float32)
    c = tl.load(C + offs, mask=mask).to(tl.float32)
    d = tl.load(D + offs, mask=mask).to(tl.float32)
    y = round_to(round_to(a * b, CODE) - round_to(c * d, CODE), CODE)
    tl.store(Y + offs, y, mask=mask)


def roundings(ptx: str, code: int) -> int:
    """Values rounded to ``code``'s precision, counted by their marks in ``ptx``."""
    return sum(per * sum(1 for line in ptx.splitlines() if re.search(pattern, line))
               for pattern, per in ROUNDING_MARKS[code])


def sm90_ptx(kernel, *args, **kwargs) -> str:
    """PTX of ``kernel`` launched with ``args`` (CPU tensors do), compiled for sm_90a."""
    return compile_offline(kernel, args, kwargs, arch=90).asm["ptx"]


def launched_ptx(launch) -> tuple[str, dict]:
    """PTX and launch options of the one kernel ``launch()`` starts (on CPU tensors: the
    launch is caught before it runs)."""
    from triton.runtime.jit import JITFunction
    launches = []
    run = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kw: launches.append((self, args, kw))
    try:
        launch()
    finally:
        JITFunction.run = run
    (kernel, args, kwargs), = launches
    return sm90_ptx(kernel, *args, **kwargs), kwargs


# Each case, given a dtype and its rounding code: (a launch on CPU tensors, the marks one program
# leaves, from its launch options and whether its stores' conversions count: 1 or 0 a store).
def _products(dtype, code):
    """Three roundings a value; the output is fp32 (no store conversion)."""
    x, y = torch.empty(1024, dtype=dtype), torch.empty(1024)

    def launch():
        products_kernel[(1,)](x, x, x, x, y, 1024, code, 1024, num_warps=4)
    return launch, lambda kw, stores: 3 * 1024


def _rope(dtype, code):
    """The shape that failed on an H200 (fp16, D=64): a program rotates a token's (BLOCK_HQ +
    BLOCK_HK) heads × BLOCK_P pairs, six roundings a pair (four products, a sum, a difference)."""
    from chronicals_fx.kernels import rope as K
    B, T, HQ, HK, D = 2, 33, 12, 4, 64
    q, k = torch.empty(B, T, HQ, D, dtype=dtype), torch.empty(B, T, HK, D, dtype=dtype)
    cos = torch.empty(1, T, D // 2, dtype=dtype)

    def launch():
        K.rope_launch(q, k, cos, cos, torch.empty_like(q), torch.empty_like(k),
                      interleaved=False, half=True, round_dtype=dtype)
    return launch, lambda kw, stores: ((6 + 2 * stores)
                                       * (kw["BLOCK_HQ"] + kw["BLOCK_HK"]) * kw["BLOCK_P"])


def _swiglu(backward: bool):
    """BLOCK elements a program: the forward rounds act(g) and y and stores y, the backward
    rounds act(g), dy·u, dg and du and stores dg, du."""
    def case(dtype, code):
        from chronicals_fx.kernels import swiglu as S
        g = torch.empty(64, 2048, dtype=dtype)

        def launch():
            if backward:
                S.swiglu_backward(g, g, g, torch.empty_like(g), torch.empty_like(g), 0)
            else:
                S.swiglu_forward(g, g, torch.empty_like(g), 0)
        roundings, stored = (4, 2) if backward else (2, 1)
        return launch, lambda kw, stores: (roundings + stored * stores) * kw["BLOCK"]
    return case


def _rms_norm(dtype, code):
    """The forward as HF Llama's in ``dtype``: rnd(x·r), rnd(that · w) and the output's
    rounding for each value of the BLOCK_M × BLOCK_H tile, then its store (the weight's
    rounding, per column, is not counted)."""
    from chronicals_fx.kernels import rmsnorm as R
    x = torch.empty(64, 896, dtype=dtype)

    def launch():
        R.rms_norm_forward(x, torch.empty(896, dtype=dtype), torch.empty_like(x), 1e-6, 0.0,
                           dtype, dtype, dtype)
    return launch, lambda kw, stores: (3 + stores) * kw["BLOCK_M"] * kw["BLOCK_H"]


KERNELS = {"products": _products, "rope": _rope, "swiglu_forward": _swiglu(False),
           "swiglu_backward": _swiglu(True), "rms_norm_forward": _rms_norm}


def measure() -> dict:
    from chronicals_fx.kernels import _triton
    out = {}
    for name, case in KERNELS.items():
        for code, dtype in CODES.items():
            _triton.ROUND_CODES[dtype] = code     # what the launchers pass for this dtype
            launch, per_program = case(dtype, code)
            ptx, kwargs = launched_ptx(launch)
            # codes 2 and 3 count conversions, so a store to the half dtype shows as one more
            stores = int(code != 1)
            out[f"{name}-code{code}"] = {
                "roundings": roundings(ptx, code),
                "expected": per_program(kwargs, stores) // (32 * kwargs.get("num_warps", 4)),
                "fma": len(FMA.findall(ptx)),
            }
    return out


if __name__ == "__main__":
    print(json.dumps(measure()))
