"""The experimental persistent TMA GEMM kernels of benchmarks/swiglu_gemm_tma.py (plain
dh = dy @ W, and with the SwiGLU backward in the epilogue) on tiny shapes: under TRITON_INTERPRET=1 on CPU (tensor
descriptors included), natively on a GPU with TMA (compute capability 9.0+).

The check itself is benchmarks/sweep_swiglu_tma.py's ``check_small`` (also its --check-cpu):
dh within one bf16 rounding of the exact product; dg, du, y within bf16 tolerance of float64;
y bit for bit the pass's and the forward kernel's; interpreted, also dg, du bit for bit the
SwiGLU pass's on the plain kernel's dh (same tiles: the same accumulation); one
tile configuration per kernel option (epilogue split, TMA / pointer / prefetched loads, TMA /
pointer stores, two programs per SM, W in either layout), and a ragged shape (TMA zero fill
and clipping). About 4 s interpreted."""

from __future__ import annotations

import pytest
import torch

from benchmarks.sweep_swiglu_tma import check_small
from tests.conftest import DEVICE


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA descriptors need compute capability 9.0+")
def test_tma_gemm_kernels_match_references():
    assert check_small(DEVICE, verbose=False, exact_vs_pass=DEVICE == "cpu") == []
