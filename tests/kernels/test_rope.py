"""RoPE kernel against float64 references: under TRITON_INTERPRET=1 on CPU, natively on GPU.

The oracle is the module's reference run in float64 with the kernel's rounding points; the
reference itself is checked against autograd of eager's formula (rotate-half / interleaved,
written out as HF and GPT-J write them). With bf16/fp16 q and cos of the same dtype every
product is exact in fp32, so the kernel must equal the oracle bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from chronicals_fx.kernels import rope as K
from tests.conftest import DEVICE


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN output"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotate_pairs(x):
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def eager_rope(x, cos, sin, interleaved, half):
    """Eager's formula on x [B, T, H, D], cos/sin [Bc, Tc, W] (W = R/2 if half)."""
    if half:
        cos, sin = ((torch.repeat_interleave(t, 2, -1) if interleaved else torch.cat((t, t), -1))
                    for t in (cos, sin))
    R = cos.shape[-1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    xr = x[..., :R]
    rot = _rotate_pairs(xr) if interleaved else _rotate_half(xr)
    return torch.cat((xr * c + rot * s, x[..., R:]), dim=-1)


def _angles(bc, T, R, half, dtype, device=DEVICE):
    """cos/sin of real angles (|c|, |s| ≤ 1, c² + s² = 1 per pair), as HF builds them."""
    inv = 1.0 / (10000 ** (torch.arange(0, R, 2, dtype=torch.float64) / R))
    pos = torch.arange(T, dtype=torch.float64)[None, :, None] + torch.arange(bc)[:, None, None] * 3
    theta = pos * inv                                            # (bc, T, R/2)
    if not half:
        theta = torch.cat((theta, theta), -1)
        theta = theta + 0.1 * torch.randn_like(theta)            # rows need not repeat
    return theta.cos().to(dtype).to(device), theta.sin().to(dtype).to(device)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("half", [False, True])
def test_reference_equals_autograd_of_eager_formula(interleaved, half):
    """The float64 reference (forward and its written-out backward) is eager's math."""
    B, T, H, D, R = 2, 5, 3, 12, 8
    x = torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True)
    cos, sin = _angles(B, T, R, half, torch.float64, "cpu")
    y = eager_rope(x, cos, sin, interleaved, half)
    dy = torch.randn_like(y)
    y.backward(dy)
    kw = {"interleaved": interleaved, "half": half, "round_dtype": torch.float64,
          "out_dtype": torch.float64}
    torch.testing.assert_close(K.rope_rotate_reference(x.detach(), cos, sin, **kw), y.detach())
    torch.testing.assert_close(K.rope_rotate_reference(dy, cos, sin, backward=True, **kw), x.grad)


CASES = [  # B, T, Hq, Hk, D, R, interleaved, half, dtype, seq_dim, cos batch
    (2, 5, 4, 2, 64, 64, False, True, torch.bfloat16, 2, 1),   # HF Llama-like, GQA
    (2, 3, 3, 1, 80, 80, False, True, torch.float32, 2, 2),    # head dim 80, per-batch cos
    (1, 4, 2, 2, 96, 96, False, False, torch.float16, 1, 1),   # full rows, [B, T, H, D]
    (2, 3, 5, 5, 128, 64, False, True, torch.float32, 2, 1),   # partial rotary
    (1, 2, 20, 4, 256, 256, True, True, torch.bfloat16, 1, 1),  # interleaved, heads loop
    (2, 2, 3, 2, 24, 16, True, False, torch.float32, 1, 2),    # interleaved partial full rows
    (3, 2, 6, 0, 64, 48, False, True, torch.bfloat16, 2, 1),   # q only, partial R=48
]


def _strided(B, T, H, D, dtype, seq_dim):
    """A non-contiguous input like HF's: [B, H, T, D] as the transpose of [B, T, H, D] storage,
    or [B, T, H, D] cut out of a wider fused projection."""
    if seq_dim == 2:
        return torch.randn(B, T, H, D, device=DEVICE).to(dtype).transpose(1, 2)
    fused = torch.randn(B, T, H + 1, D, device=DEVICE).to(dtype)
    return fused[:, :, 1:, :]


@pytest.mark.parametrize("B,T,Hq,Hk,D,R,interleaved,half,dtype,seq_dim,cb", CASES)
def test_launcher_forward_and_backward(B, T, Hq, Hk, D, R, interleaved, half, dtype, seq_dim, cb):
    q = _strided(B, T, Hq, D, dtype, seq_dim)
    k = _strided(B, T, Hk, D, dtype, seq_dim) if Hk else None
    cos, sin = _angles(cb, T, R, half, dtype)
    kw = {"interleaved": interleaved, "half": half, "round_dtype": dtype}
    for backward in (False, True):
        q_out = torch.full_like(q, float("nan"))
        k_out = torch.full_like(k, float("nan")) if k is not None else None
        K.rope_launch(K._bthd(q, seq_dim), None if k is None else K._bthd(k, seq_dim), cos, sin,
                      K._bthd(q_out, seq_dim), None if k is None else K._bthd(k_out, seq_dim),
                      backward=backward, **kw)
        for x, out in ((q, q_out), (k, k_out)):
            if x is None:
                continue
            want = K.rope_rotate_reference(K._bthd(x, seq_dim).double(), cos.double(),
                                           sin.double(), out_dtype=torch.float64,
                                           backward=backward, **kw)
            want = K._bthd(want, seq_dim)
            if dtype == torch.float32:
                assert rel_err(out, want) < 1e-6
            else:  # products of two bf16/fp16 values are exact in fp32: same roundings
                assert not torch.isnan(out).any()
                assert torch.equal(out, want.to(dtype)), f"max diff {(out.double() - want).abs().max()}"


def test_mixed_precision_rounds_products_to_the_wider_dtype():
    """bf16 q times fp32 cos: eager multiplies in fp32 and returns fp32 (no bf16 rounding)."""
    B, T, H, D = 1, 3, 2, 64
    q = torch.randn(B, T, H, D, device=DEVICE).to(torch.bfloat16)
    cos, sin = _angles(1, T, D, True, torch.float32)
    out = torch.full(q.shape, float("nan"), device=DEVICE)
    K.rope_launch(q, None, cos, sin, out, None, interleaved=False, half=True,
                  round_dtype=torch.float32)
    want = eager_rope(q.float(), cos, sin, interleaved=False, half=True)
    assert rel_err(out, want) < 1e-6


def test_registered_op_matches_eager_autograd_in_bf16():
    """The op (its reference path off CUDA, the kernel on CUDA) against eager autograd of HF's
    formula in bf16: forward and both gradients bit for bit."""
    B, T, Hq, Hk, D = 2, 6, 4, 2, 32
    q = torch.randn(B, T, Hq, D, device=DEVICE).to(torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, device=DEVICE).to(torch.bfloat16).transpose(1, 2).requires_grad_()
    cos, sin = _angles(1, T, D, True, torch.bfloat16)
    cos_full, sin_full = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)

    def eager(x):  # HF apply_rotary_pos_emb, unsqueeze_dim=1
        return x * cos_full.unsqueeze(1) + _rotate_half(x) * sin_full.unsqueeze(1)

    bf16 = torch.bfloat16
    q_op, k_op = torch.ops.chronicals.rope(q, k, cos, sin, 2, False, True, bf16, bf16, bf16)
    q_e, k_e = eager(q), eager(k)
    assert torch.equal(q_op, q_e) and torch.equal(k_op, k_e)
    dq_out, dk_out = torch.randn_like(q_e), torch.randn_like(k_e)
    grads_op = torch.autograd.grad((q_op, k_op), (q, k), (dq_out, dk_out))
    grads_e = torch.autograd.grad((q_e, k_e), (q, k), (dq_out, dk_out))
    for got, want in zip(grads_op, grads_e):
        assert got.dtype == want.dtype and torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# GPU: real shapes, every supported head dim, through the registered op
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("B,T,Hq,Hk,D", [(8, 1024, 14, 2, 64), (4, 4096, 32, 8, 128)])
def test_gpu_benchmark_shapes_equal_eager_bf16(B, T, Hq, Hk, D):
    """At the benchmark shapes, bf16: the op equals HF's eager formula bit for bit (forward),
    and its gradients equal eager autograd's."""
    torch.manual_seed(0)
    bf16 = torch.bfloat16
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=bf16).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=bf16).transpose(1, 2).requires_grad_()
    cos, sin = _angles(1, T, D, True, bf16, "cuda")
    cos_full, sin_full = torch.cat((cos, cos), -1).unsqueeze(1), torch.cat((sin, sin), -1).unsqueeze(1)
    q_e = q * cos_full + _rotate_half(q) * sin_full
    k_e = k * cos_full + _rotate_half(k) * sin_full
    q_op, k_op = torch.ops.chronicals.rope(q, k, cos, sin, 2, False, True, bf16, bf16, bf16)
    assert torch.equal(q_op, q_e) and torch.equal(k_op, k_e)
    assert q_op.stride() == q.stride()  # output keeps HF's [B, T, H, D] storage
    dq_out, dk_out = torch.randn_like(q_e), torch.randn_like(k_e)
    grads_op = torch.autograd.grad((q_op, k_op), (q, k), (dq_out, dk_out))
    grads_e = torch.autograd.grad((q_e, k_e), (q, k), (dq_out, dk_out))
    for got, want in zip(grads_op, grads_e):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_gpu_head_dims_and_dtypes(D, dtype, interleaved):
    B, T, Hq, Hk = 2, 333, 12, 4
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(B, T, Hk, D, device="cuda", dtype=dtype).transpose(1, 2)
    for half in (True, False):
        cos, sin = _angles(1, T, D, half, dtype, "cuda")
        for backward in (False, True):
            run = torch.ops.chronicals.rope_backward if backward else torch.ops.chronicals.rope
            extra = (dtype, dtype) if backward else (dtype, dtype, dtype)
            q_out, k_out = run(q, k, cos, sin, 2, interleaved, half, *extra)
            for x, out in ((q, q_out), (k, k_out)):
                want = K.rope_rotate_reference(
                    x.transpose(1, 2).double(), cos.double(), sin.double(), interleaved=interleaved,
                    half=half, round_dtype=dtype, out_dtype=torch.float64, backward=backward)
                want = want.transpose(1, 2)
                if dtype == torch.float32:
                    assert rel_err(out, want) < 1e-6
                else:
                    assert torch.equal(out, want.to(dtype))
