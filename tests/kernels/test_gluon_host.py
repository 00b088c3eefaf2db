"""The Gluon GEMMs' host side on the CPU (kernels/_gluon.py, kernels/swiglu_gemm.py): TMA
descriptors built without the dataclass's checks hold what ``TensorDescriptor.from_tensor``
would, and a launch's ``fast_launch`` key tells apart exactly what the kernel specializes on.
Nothing is launched: the kernels themselves are tested on a GPU (test_swiglu_gemm.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

gluon_host = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")

from chronicals_fx.kernels import _gluon  # noqa: E402
from chronicals_fx.kernels import swiglu_gemm  # noqa: E402


def _fields(desc) -> dict:
    return {f.name: getattr(desc, f.name) for f in dataclasses.fields(desc)}


def test_descriptor_holds_what_from_tensor_would():
    assert _gluon._DESCRIPTOR_DEFAULTS is not None      # the fast path, on this Triton
    t = torch.empty(256, 128, dtype=torch.bfloat16)
    fast = _gluon.tma_descriptor(t, [128, 64])
    checked = gluon_host.TensorDescriptor.from_tensor(
        t, [128, 64], _gluon._nvmma_layout((128, 64), t.dtype))
    a, b = _fields(fast), _fields(checked)
    assert a.pop("base") is b.pop("base") is t
    assert {k: list(v) if k in ("shape", "strides") else v for k, v in a.items()} == \
        {k: list(v) if k in ("shape", "strides") else v for k, v in b.items()}


def test_rows_reads_a_contiguous_tensor_as_its_matrix():
    t = torch.empty(4, 64, 128, dtype=torch.float16)
    fast = _gluon.tma_descriptor(t, [64, 32], rows=256)
    view = gluon_host.TensorDescriptor.from_tensor(
        t.view(256, 128), [64, 32], _gluon._nvmma_layout((64, 32), t.dtype))
    assert fast.base.data_ptr() == view.base.data_ptr()
    assert (fast.shape, fast.strides) == ([256, 128], [128, 1])
    assert (list(view.shape), list(view.strides)) == ([256, 128], [128, 1])
    assert fast.block_shape == view.block_shape and fast.layout == view.layout


def _launch(m=512, k=128, n=256, dtype=torch.bfloat16, activation=0, lead=()):
    dy = torch.empty(*lead, m, k, dtype=dtype)
    w = torch.empty(k, n, dtype=dtype)
    gate, up, dg, du, y = (torch.empty(*lead, m, n, dtype=dtype) for _ in range(5))
    return swiglu_gemm.make_launch(dy, w, gate, up, dg, du, y, activation)


def test_swiglu_gemm_key_follows_what_the_kernel_specializes_on():
    """New buffers of the same shapes: the same key (no argument is keyed); leading dimensions
    read as rows: the [M, ·] call's key and values; another M, N, dtype or activation: another
    key."""
    base = _launch()
    assert _launch().key == base.key
    folded = _launch(m=128, lead=(4,))
    assert folded.key == base.key and folded.args[7:] == base.args[7:] == (512, 256, 128)
    for other in (_launch(m=520), _launch(n=384), _launch(dtype=torch.float16),
                  _launch(activation=1)):
        assert other.key != base.key
    assert base.kwargs["EVEN_M"] and not _launch(m=520).kwargs["EVEN_M"]
