"""``round_to`` (kernels/_triton.py), the rounding every kernel uses to follow eager's rounding
points: against torch's own conversions, bit for bit, specials included. Under
TRITON_INTERPRET=1 on CPU, natively on GPU; and compiled for sm_90a without a GPU, where the
PTX shows whether the compiler kept every rounding."""

from __future__ import annotations

import re
import sys

import pytest
import torch
import triton
import triton.language as tl

from chronicals_fx.kernels._triton import INTERPRETED, ROUND_CODES, round_to
from tests.conftest import DEVICE


@triton.jit
def _round_kernel(X, Y, n, CODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, round_to(tl.load(X + offs, mask=mask), CODE), mask=mask)


def _from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


# NaNs of every kind the GPU makes or a tensor can hold: the canonical NaN of CUDA's fp32
# arithmetic (0x7FFFFFFF, what 0/0 or exp(inf - inf) give), its negative, quiet and signalling
# NaNs with payloads low and high; then the edges of rounding: the largest finite values (which
# round up to inf), ties to even, subnormals, ±0, ±inf.
NANS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FBFFFFF, 0x7FFF8000,
        0x7FFF7FFF, 0xFF800001]
EDGES = [0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x3F808001,
         0x00000001, 0x80008000, 0x00018000, 0x00000000, 0x80000000, 0x7F800000, 0xFF800000]


# fp16's own edges: its largest finite value 65504, the overflow tie 65520 (rounds to inf) and
# values either side, its smallest normal 2⁻¹⁴, subnormal ties (2.5 · 2⁻²⁴, 3.5 · 2⁻²⁴)
HALF_EDGES = [65504.0, 65519.0, 65520.0, 65521.0, -65520.0, 2.0 ** -14, 2.0 ** -14 - 2.0 ** -26,
              2.5 * 2.0 ** -24, 3.5 * 2.0 ** -24, -2.5 * 2.0 ** -24, 2.0 ** -25, 1.0 + 2.0 ** -11,
              1.0 + 3 * 2.0 ** -11]


def _inputs() -> torch.Tensor:
    return torch.cat([_from_bits(NANS + EDGES), torch.tensor(HALF_EDGES),
                      torch.randn(4096) * 1e3, torch.randn(4096) * 1e-39,
                      torch.randn(4096) * 1e-6, torch.randn(4096) * 3e4]).to(DEVICE)


# every code a kernel can be given: bf16 on the bits (1) and, compiled, by conversion (3)
CODES = [(torch.bfloat16, 1), (torch.float16, 2)] + ([] if INTERPRETED else [(torch.bfloat16, 3)])
assert set(CODES) >= set(ROUND_CODES.items()) - {(torch.float32, 0)}


@pytest.mark.parametrize("dtype,code", CODES)
def test_specials_round_as_torch_rounds(dtype, code):
    x = _inputs()
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), code, 1024)
    want = x.to(dtype).float()
    nan = want.isnan()
    lost = [hex(b) for b, is_nan in zip(NANS, y.isnan().tolist()) if not is_nan]
    assert not lost, f"NaN in, not NaN out: {lost}"
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan], want[~nan])


@triton.jit
def _products_kernel(A, B, C, D, Y, n, CODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask)
    b = tl.load(B + offs, mask=mask)
    c = tl.load(C + offs, mask=mask)
    d = tl.load(D + offs, mask=mask)
    y = round_to(round_to(a * b, CODE) - round_to(c * d, CODE), CODE)
    tl.store(Y + offs, y, mask=mask)


@pytest.mark.parametrize("dtype,code", CODES)
def test_rounded_products_are_not_contracted(dtype, code):
    """rnd(rnd(a·b) − rnd(c·d)), RoPE's and SwiGLU's pattern, equals eager in ``dtype``: the
    compiler may not fold a rounding away and fuse the products into an FMA (it did for fp16
    on an H200 while the rounding was a conversion round trip)."""
    a, b, c, d = (torch.randn(1 << 14).to(dtype).to(DEVICE) for _ in range(4))
    y = torch.empty(a.shape, device=DEVICE)
    _products_kernel[(triton.cdiv(a.numel(), 1024),)](*(t.float() for t in (a, b, c, d)), y,
                                                      a.numel(), code, 1024)
    assert torch.equal(y, (a * b - c * d).float())


# ---------------------------------------------------------------------------------------------
# The same patterns compiled for sm_90a here, without a GPU: the H200 failure above came from the
# compiler, not the arithmetic, so CI (interpreter only) checks the generated PTX. Each code
# leaves its own marks, (instruction pattern, values rounded by one): the mask clearing 16
# (bf16, CODE 1) or 13 (fp16) low bits; for CODE 3 a conversion to bf16, or the compiler's
# native bf16 multiply where the operands are bf16 values (an exact product rounded once: the
# same value as rounding the fp32 product).
# ---------------------------------------------------------------------------------------------
ROUNDING_MARKS = {
    1: [(r"and\.b32\s.*-65536;", 1)],
    2: [(r"and\.b32\s.*-8192;", 1)],
    3: [(r"cvt\.rn\.bf16x2\.f32\s", 2), (r"cvt\.rn\.bf16\.f32\s", 1),
        (r"(mul|add|sub|fma)(\.rn)?\.bf16x2\s", 2), (r"(mul|add|sub|fma)(\.rn)?\.bf16\s", 1)],
}


def _compiled_functions(monkeypatch, module) -> None:
    """Under TRITON_INTERPRET=1 ``@triton.jit`` makes interpreted functions, which Triton's
    compiler can't take: put JITFunctions of them in ``module``'s namespace."""
    for name, value in list(vars(module).items()):
        if type(value).__name__ == "InterpretedFunction":
            monkeypatch.setattr(module, name, triton.JITFunction(value.fn))


def _sm90_ptx(kernel, *args, **kwargs) -> str:
    """PTX of ``kernel`` launched with ``args`` (CPU tensors do), compiled for sm_90a."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, _ = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, None)
    src = ASTSource(kernel, signature, constexprs, attrs)
    return compile(src, target=target, options=options.__dict__).asm["ptx"]


def _roundings(ptx: str, code: int) -> int:
    """Values rounded to ``code``'s precision, counted by their marks in ``ptx``."""
    return sum(per * sum(1 for line in ptx.splitlines() if re.search(pattern, line))
               for pattern, per in ROUNDING_MARKS[code])


@pytest.mark.parametrize("code", sorted(ROUNDING_MARKS))
def test_compiled_products_keep_every_rounding(monkeypatch, code):
    """rnd(rnd(a·b) − rnd(c·d)) for sm_90a: no FMA, and three roundings for every value a
    thread holds (1024 values over 4 warps: 8). With fp16 as a conversion round trip, Triton
    removed all three."""
    _compiled_functions(monkeypatch, sys.modules[__name__])
    x = torch.empty(1024)
    kernel = globals()["_products_kernel"]
    ptx = _sm90_ptx(kernel, x, x, x, x, x, 1024, code, 1024, num_warps=4)
    assert "fma.rn.f32" not in ptx
    assert _roundings(ptx, code) >= 3 * 8


@pytest.mark.parametrize("dtype,code", [(torch.float16, 2), (torch.bfloat16, 1),
                                        (torch.bfloat16, 3)])
def test_compiled_rope_rounds_every_product(monkeypatch, dtype, code):
    """RoPE's kernel for sm_90a at the shape that failed on an H200 (fp16, D=64): each rotated
    pair, rnd(rnd(x_i·c_i) − rnd(x_j·s_i)) and rnd(rnd(x_j·c_j) + rnd(x_i·s_j)), keeps its six
    roundings and has no FMA (with fp16 as a conversion round trip: no rounding, 20 FMAs)."""
    from triton.runtime.jit import JITFunction

    from chronicals_fx.kernels import _triton, rope as K
    _compiled_functions(monkeypatch, K)
    _compiled_functions(monkeypatch, _triton)
    monkeypatch.setattr(K, "round_to", _triton.round_to)
    monkeypatch.setattr(K, "launchable", lambda kernel, like: kernel)
    monkeypatch.setitem(K.ROUND_CODES, dtype, code)
    launches = []
    monkeypatch.setattr(JITFunction, "run",
                        lambda self, *args, grid, warmup, **kw: launches.append((self, args, kw)))
    B, T, HQ, HK, D = 2, 33, 12, 4, 64
    q, k = torch.empty(B, T, HQ, D, dtype=dtype), torch.empty(B, T, HK, D, dtype=dtype)
    cos = torch.empty(1, T, D // 2, dtype=dtype)
    K.rope_launch(q, k, cos, cos, torch.empty_like(q), torch.empty_like(k), interleaved=False,
                  half=True, round_dtype=dtype)
    (kernel, args, kwargs), = launches
    ptx = _sm90_ptx(kernel, *args, **kwargs)
    assert "fma.rn.f32" not in ptx
    # one program rotates a token's (BLOCK_HQ + BLOCK_HK) heads × BLOCK_P pairs
    pairs = (kwargs["BLOCK_HQ"] + kwargs["BLOCK_HK"]) * kwargs["BLOCK_P"]
    assert _roundings(ptx, code) >= 6 * pairs // (32 * kwargs["num_warps"])
