"""Document-attention Triton kernels (under TRITON_INTERPRET=1 on CPU, natively on a GPU)
against float64 references; the references against autograd of dense masked softmax attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from chronicals_fx.kernels import attention as A
from tests.conftest import DEVICE


def _documents(lengths: list[list[int]]) -> torch.Tensor:
    """Document ids [B, T] (nondecreasing per row) from per-row document lengths."""
    return torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])


def _rel(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _dense(q, k, v, bounds, scale):
    """Plain masked softmax attention (float64), differentiated by autograd: the oracle."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~A.document_mask(bounds), float("-inf"))
    return torch.softmax(s, -1) @ v


def test_document_bounds():
    ids = _documents([[2, 3, 1], [6]])
    start, end = A.document_bounds(ids, 2)
    assert start.tolist() == [[0, 0, 2, 2, 2, 5], [0] * 6]
    assert end.tolist() == [[2, 2, 5, 5, 5, 6], [6] * 6]
    # one row broadcast to the batch
    start, end = A.document_bounds(ids[:1], 3)
    assert start.shape == (3, 6) and (start == start[0]).all()


def test_reference_matches_autograd_of_dense_attention():
    torch.manual_seed(0)
    B, H, HK, T, D = 2, 4, 2, 11, 5
    bounds = A.document_bounds(_documents([[3, 1, 7], [11]]), B)
    q, k, v = (torch.randn(B, h, T, D, dtype=torch.float64, requires_grad=True)
               for h in (H, HK, HK))
    out, lse = A.document_attention_reference(q, k, v, bounds, 0.4)
    want = _dense(q, k, v, bounds, 0.4)
    torch.testing.assert_close(out, want)
    do = torch.randn_like(out)
    want.backward(do)
    grads = A.document_attention_backward_reference(do, q, k, v, out, lse, bounds, 0.4)
    for got, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, x.grad)


def test_op_autograd_on_cpu():
    """The registered op (CPU: the reference) with its registered backward, vs autograd."""
    torch.manual_seed(1)
    B, H, HK, T, D = 1, 2, 1, 9, 4
    bounds = A.document_bounds(_documents([[4, 5]]), B)
    q, k, v = (torch.randn(B, h, T, D, dtype=torch.float64, requires_grad=True)
               for h in (H, HK, HK))
    assert torch.autograd.gradcheck(
        lambda q, k, v: torch.ops.chronicals.document_attention(q, k, v, bounds, 0.5)[0],
        (q, k, v))


CASES = [  # (B, Hq, Hk, T, D, document lengths per row)
    (2, 4, 2, 37, 12, [[10, 1, 26], [37]]),          # GQA, odd head dim, a 1-token document
    (1, 2, 1, 50, 16, [[50]]),                       # plain causal, MQA
    (2, 3, 3, 33, 8, [[1] * 33, [5, 9, 2, 17]]),     # every token its own document
    (1, 2, 2, 70, 32, [[16, 16, 38]]),               # documents aligned to the tiles
]


@pytest.mark.parametrize("B,H,HK,T,D,lengths", CASES)
def test_triton_kernels_vs_float64(B, H, HK, T, D, lengths):
    torch.manual_seed(T)
    q, k, v = (torch.randn(B, h, T, D, device=DEVICE) for h in (H, HK, HK))
    # strided K/V as transformers makes them: [B, T, Hk, D] viewed as [B, Hk, T, D]
    k = k.transpose(1, 2).contiguous().transpose(1, 2)
    bounds = A.document_bounds(_documents(lengths).to(DEVICE), B)
    scale = D ** -0.5
    out = torch.full((B, H, T, D), float("nan"), device=DEVICE)
    lse = torch.full((B, H, T), float("nan"), device=DEVICE)
    A.document_attention_forward(q, k, v, bounds[0], out, lse, scale)
    ref_out, ref_lse = A.document_attention_reference(q.double(), k.double(), v.double(), bounds,
                                                      scale)
    assert _rel(out, ref_out) < 1e-5
    assert (lse.double() - ref_lse).abs().max() < 1e-5

    do = torch.randn(B, H, T, D, device=DEVICE)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    A.document_attention_backward(do, q, k, v, out, lse, bounds[0], bounds[1], dq, dk, dv, scale)
    want = A.document_attention_backward_reference(do.double(), q.double(), k.double(),
                                                   v.double(), ref_out, ref_lse, bounds, scale)
    for name, got, ref in zip("qkv", (dq, dk, dv), want):
        assert _rel(got, ref) < 1e-5, name


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_op_low_precision(D, dtype):
    torch.manual_seed(0)
    B, H, HK, T = 2, 8, 2, 1000
    lengths = [[1, 200, 299, 500], [1000]]
    bounds = A.document_bounds(_documents(lengths).to(DEVICE), B)
    q, k, v = (torch.randn(B, T, h, D, device=DEVICE, dtype=dtype).transpose(1, 2)
               .requires_grad_() for h in (H, HK, HK))
    out = torch.ops.chronicals.document_attention(q, k, v, bounds, D ** -0.5)[0]
    do = torch.randn_like(out)
    out.backward(do)
    refs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want = _dense(*refs, bounds, D ** -0.5)
    want.backward(do.double())
    assert _rel(out, want) < 1e-2
    for x, r in zip((q, k, v), refs):
        assert _rel(x.grad, r.grad) < 2e-2


@pytest.mark.gpu
def test_gpu_sdpa_backends_agree():
    """Every causal backend of :func:`attention` against float64 (bf16, GQA)."""
    torch.manual_seed(0)
    q = torch.randn(2, 8, 512, 64, device=DEVICE, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 2, 512, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    want = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(4, 1),
                                          v.double().repeat_interleave(4, 1), is_causal=True)
    for backend in A.BACKENDS:
        got = A.attention(q, k, v, 0.125, 0.0, True, backend)
        assert _rel(got, want) < 1e-2, backend
