"""``round_to`` (kernels/_triton.py), the rounding every kernel uses to follow eager's rounding
points: against torch's own conversions, bit for bit, specials included. Under
TRITON_INTERPRET=1 on CPU, natively on GPU."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from chronicals_fx.kernels._triton import ROUND_CODES, round_to
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_specials_round_as_torch_rounds(dtype):
    x = torch.cat([_from_bits(NANS + EDGES), torch.randn(4096) * 1e3,
                   torch.randn(4096) * 1e-39]).to(DEVICE)
    y = torch.empty_like(x)
    _round_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), ROUND_CODES[dtype], 1024)
    want = x.to(dtype).float()
    nan = want.isnan()
    lost = [hex(b) for b, is_nan in zip(NANS, y.isnan().tolist()) if not is_nan]
    assert not lost, f"NaN in, not NaN out: {lost}"
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan], want[~nan])
