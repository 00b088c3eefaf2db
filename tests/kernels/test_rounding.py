"""``round_to`` (kernels/_triton.py), the rounding every kernel uses to follow eager's rounding
points: against torch's own conversions, bit for bit, specials included. Under
TRITON_INTERPRET=1 on CPU, natively on GPU; and compiled for sm_90a without a GPU, where the
PTX shows whether the compiler kept every rounding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from chronicals_fx.kernels._triton import INTERPRETED, ROUND_CODES, round_to
from tests.kernels.compiled_ptx import KERNELS, ROUNDING_MARKS, products_kernel
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
    # by the bits: −0 must stay −0
    assert torch.equal(y[~nan].view(torch.int32), want[~nan].view(torch.int32))


@pytest.mark.parametrize("dtype,code", CODES)
def test_rounded_products_are_not_contracted(dtype, code):
    """rnd(rnd(a·b) − rnd(c·d)) on ``dtype`` values, RoPE's and SwiGLU's pattern, equals eager
    in ``dtype``: the compiler may not fold a rounding away into half-precision FMAs (it did for
    fp16 on an H200 while the rounding was a conversion round trip)."""
    a, b, c, d = (torch.randn(1 << 14).to(dtype).to(DEVICE) for _ in range(4))
    y = torch.empty(a.shape, device=DEVICE)
    products_kernel[(triton.cdiv(a.numel(), 1024),)](a, b, c, d, y, a.numel(), code, 1024)
    assert torch.equal(y, (a * b - c * d).float())


@pytest.fixture(scope="module")
def compiled_roundings() -> dict:
    """tests/kernels/compiled_ptx.py's counts, from a process without the interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "tests.kernels.compiled_ptx"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", sorted(ROUNDING_MARKS))
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_compiled_kernels_keep_their_roundings(compiled_roundings, kernel, code):
    """Compiled for sm_90a (no GPU needed), each rounding kernel keeps a rounding for every
    rounding point of its eager formula and every value a thread holds (one point fewer is a
    value a thread fewer: 8-16 marks), plus the conversions of its stores; the rounding pattern
    and RoPE's rotation have no FMA in any precision. With fp16 as a conversion round trip,
    both fail."""
    found = compiled_roundings[f"{kernel}-code{code}"]
    assert found["roundings"] >= found["expected"], found
    if kernel in ("products", "rope"):
        assert found["fma"] == 0, found
