"""RMSNorm kernels against float64 references: under TRITON_INTERPRET=1 on CPU, natively on GPU."""

from __future__ import annotations

import pytest
import torch

from chronicals_fx.kernels import rmsnorm as K
from tests.conftest import DEVICE

# Relative-norm error bounds per storage dtype: fp32 arithmetic lands far under 1e-5; outputs
# stored in bf16/fp16 carry one rounding of 2^-9 / 2^-12 relative.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN output"
    return ((got.double() - want).norm() / want.norm()).item()


def _reference_with_grads(x, w, dy, eps, offset):
    xd = x.double().requires_grad_()
    wd = w.double().requires_grad_() if w is not None else None
    f64 = torch.float64
    y = K.rms_norm_reference(xd, wd, eps, offset, f64, f64, f64, f64)
    y.backward(dy.double())
    return y.detach(), xd.grad, (wd.grad if wd is not None else None)


CASES = [  # (rows, hidden, dtype, has_weight, offset)
    (5, 123, torch.float32, True, 0.0),
    (37, 64, torch.bfloat16, True, 0.0),
    (3, 1000, torch.float16, True, 0.0),
    (9, 896, torch.bfloat16, True, 1.0),
    (17, 7, torch.float32, False, 0.0),
    (130, 16, torch.bfloat16, True, 0.0),
    (40, 600, torch.float32, False, 0.0),   # prefetching backward, two bands a program
]


@pytest.mark.parametrize("prefetch", [False, True])
def test_backward_with_zero_eps_keeps_padding_rows_out_of_dw(prefetch):
    """eps = 0 (a hand-written norm without one): the last band's padding rows load as zeros,
    whose 1/rms is inf; dW must still be finite and equal the reference."""
    rows, hidden = 7, 600
    x = torch.randn(rows, hidden, device=DEVICE)
    w = torch.randn(hidden, device=DEVICE)
    dy = torch.randn(rows, hidden, device=DEVICE)
    _, dx_ref, dw_ref = _reference_with_grads(x, w, dy, 0.0, 0.0)
    dx = torch.full_like(x, float("nan"))
    dw = K.rms_norm_backward(dy, x, w, dx, 0.0, 0.0, torch.float32, torch.float32, True,
                             block_m=2, programs_per_sm=1, prefetch=prefetch)
    assert torch.isfinite(dw).all()
    assert rel_err(dx, dx_ref) < TOLERANCE[torch.float32]
    assert rel_err(dw, dw_ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("rows,hidden,dtype,has_weight,offset", CASES)
def test_forward_and_backward_vs_float64(rows, hidden, dtype, has_weight, offset):
    eps = 1e-6
    x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    w = (torch.randn(hidden, device=DEVICE) * 0.5).to(dtype) if has_weight else None
    dy = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    y_ref, dx_ref, dw_ref = _reference_with_grads(x, w, dy, eps, offset)

    y = torch.full_like(x, float("nan"))
    K.rms_norm_forward(x, w, y, eps, offset, dtype, dtype, dtype)
    dx = torch.full_like(x, float("nan"))
    dw = K.rms_norm_backward(dy, x, w, dx, eps, offset, dtype, dtype, compute_dw=has_weight)

    tol = TOLERANCE[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(dx, dx_ref) < tol
    if has_weight:
        assert dw.dtype == torch.float32
        assert rel_err(dw, dw_ref) < tol
    else:
        assert dw is None


def test_rounding_points_follow_eager():
    """Llama rounds the normalized value to bf16 before the weight multiply. The kernel rounds
    at the same points (to nearest-even), so it agrees with eager bit for bit except where the
    two fp32 reductions of mean(x²) differ in their last bit: at most one bf16 ulp."""
    x = torch.randn(64, 256, device=DEVICE).to(torch.bfloat16)
    w = torch.randn(256, device=DEVICE).to(torch.bfloat16)
    eager = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    got = torch.full_like(x, float("nan"))
    K.rms_norm_forward(x, w, got, 1e-6, 0.0, torch.bfloat16, torch.bfloat16, torch.bfloat16)
    diff = (got.float() - eager.float()).abs()
    assert (diff <= eager.float().abs() * 2 ** -7).all()
    assert (diff == 0).float().mean() > 0.99


def test_op_dispatch_matches_reference_on_strided_4d_input():
    """The registered op on a non-contiguous 4-D view (per-head norm after a transpose)."""
    x = torch.randn(2, 6, 3, 32, device=DEVICE).transpose(1, 2)          # (B, H, T, D), strided
    w = torch.randn(32, device=DEVICE)
    f32 = torch.float32
    y = torch.ops.chronicals.rms_norm(x, w, 1e-6, 0.0, f32, f32, f32, f32)
    want = K.rms_norm_reference(x.double(), w.double(), 1e-6)
    assert y.shape == x.shape
    assert rel_err(y, want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", [(16384, 4096), (8192, 896), (4096 * 14, 64)])
def test_real_shapes_bf16_on_gpu(rows, hidden):
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device="cuda")).to(torch.bfloat16).requires_grad_()
    bf = torch.bfloat16
    y = torch.ops.chronicals.rms_norm(x, w, 1e-6, 0.0, bf, bf, bf, bf)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = _reference_with_grads(x.detach(), w.detach(), dy, 1e-6, 0.0)
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(x.grad, dx_ref) < 1e-2
    assert rel_err(w.grad, dw_ref) < 1e-2


@pytest.mark.parametrize("rows,hidden,dtype", [(7, 96, torch.float32), (33, 200, torch.bfloat16)])
def test_fused_residual_add_forward_and_backward(rows, hidden, dtype):
    """h = a + b is written and normalized in one pass; the backward adds dh into dx."""
    a, b, dy, dh = (torch.randn(rows, hidden, device=DEVICE).to(dtype) for _ in range(4))
    w = torch.randn(hidden, device=DEVICE).to(dtype)
    h = torch.full_like(a, float("nan"))
    y = torch.full_like(a, float("nan"))
    K.rms_norm_forward(a, w, y, 1e-6, 0.0, dtype, dtype, dtype, residual=b, h_out=h)
    h_ref = (a.double() + b.double())
    tol = TOLERANCE[dtype]
    assert rel_err(h, h_ref) < tol
    # the norm reads the stored (rounded) h, as eager does
    y_ref, dx_ref, dw_ref = _reference_with_grads(h, w, dy, 1e-6, 0.0)
    assert rel_err(y, y_ref) < tol
    dx = torch.full_like(a, float("nan"))
    dw = K.rms_norm_backward(dy, h, w, dx, 1e-6, 0.0, dtype, dtype, True, dh=dh)
    assert rel_err(dx, dx_ref + dh.double()) < tol
    assert rel_err(dw, dw_ref) < tol


@pytest.mark.parametrize("terms,dtype,prefetch", [(2, torch.float32, False),
                                                   (3, torch.bfloat16, True),
                                                   (4, torch.bfloat16, False)])
def test_backward_sums_the_gradient_terms_of_y(terms, dtype, prefetch):
    """dy given as 2–4 unsummed terms (y read by q, k, v or gate, up projections), one of them a
    strided view: the kernel sums them in fp32 as it reads the rows, so dx and dw are those of
    the summed gradient; with dh as well (the residual's gradient). Several bands of rows a
    program (BLOCK_M 2), so the prefetching loop's carried rows and last masked band count."""
    rows, hidden = 21, 136
    x = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    w = (torch.randn(hidden, device=DEVICE) * 0.5).to(dtype)
    wide = torch.randn(rows, 2 * hidden, device=DEVICE).to(dtype)
    dys = [wide[:, :hidden]] + [torch.randn(rows, hidden, device=DEVICE).to(dtype)
                                 for _ in range(terms - 1)]
    dh = torch.randn(rows, hidden, device=DEVICE).to(dtype)
    dy_sum = sum(d.double() for d in dys)
    _, dx_ref, dw_ref = _reference_with_grads(x, w, dy_sum, 1e-6, 0.0)
    dx = torch.full_like(x, float("nan"))
    dw = K.rms_norm_backward(dys[0], x, w, dx, 1e-6, 0.0, dtype, dtype, True, block_m=2,
                             programs_per_sm=1, dh=dh, dy_terms=tuple(dys[1:]),
                             prefetch=prefetch)
    tol = TOLERANCE[dtype]
    assert rel_err(dx, dx_ref + dh.double()) < tol
    assert rel_err(dw, dw_ref) < tol
    with pytest.raises(ValueError, match="at most 4 terms"):
        K.rms_norm_backward(dys[0], x, w, dx, 1e-6, 0.0, dtype, dtype, True,
                            dy_terms=(dh,) * K.MAX_DY_TERMS)


def test_add_rms_norm_op_gradients_match_unfused():
    a, b = (torch.randn(4, 5, 24, device=DEVICE, requires_grad=True) for _ in range(2))
    w = torch.randn(24, device=DEVICE, requires_grad=True)
    f32 = torch.float32
    h, y = torch.ops.chronicals.add_rms_norm(a, b, w, 1e-6, 0.0, f32, f32, f32, f32)
    (h.sin().sum() + (y * y).sum()).backward()
    grads = [t.grad.clone() for t in (a, b, w)]
    for t in (a, b, w):
        t.grad = None
    h2 = a + b
    y2 = K.rms_norm_reference(h2, w, 1e-6)
    (h2.sin().sum() + (y2 * y2).sum()).backward()
    for got, t in zip(grads, (a, b, w)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dw_reduction_sums_every_partial_row_and_column_rounded_once(dtype):
    """The weight-gradient reduction over the backward programs' fp32 partials: more rows than
    one block of BLOCK_P (the loop), a ragged last column block, one rounding to the dtype."""
    g = torch.Generator().manual_seed(3)
    p, h = 150, 89
    block_p, block_h = K._dw_tiles(h)
    block_p = 128                                            # two loads of the rows, the last ragged
    partial = torch.randn(p, h, generator=g).to(DEVICE)
    dw = torch.full((h,), float("nan"), dtype=dtype, device=DEVICE)
    K.rms_norm_dw_kernel[(-(-h // block_h),)](partial, dw, p, h, K.ROUND_CODES[dtype],
                                              BLOCK_P=block_p, BLOCK_H=block_h)
    want = partial.double().sum(0)
    assert torch.isfinite(dw).all()
    # one rounding to bf16 (half a step, relative) on top of fp32's summation error (~1e-5 of
    # the terms' scale here)
    err = ((dw.double() - want).abs() / want.abs().clamp_min(1.0)).max().item()
    assert err <= (0.5 * torch.finfo(dtype).eps if dtype == torch.bfloat16 else 0.0) + 1e-5


class _NormThroughBackwardOp(torch.autograd.Function):
    """RMSNorm in plain torch, backward through the registered backward op alone (the forward
    kernel would be traced too, and the forward graph runs on CPU)."""

    @staticmethod
    def forward(ctx, x, w, out_dtype=None):
        ctx.save_for_backward(x, w)
        return K.rms_norm_reference(x, w, 1e-6, out_dtype=out_dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        f32 = torch.float32
        dx, dw = torch.ops.chronicals.rms_norm_backward(dy, x, w, 1e-6, 0.0, f32, f32, True)
        return dx, dw, None


@pytest.mark.skipif(torch.cuda.is_available(), reason="traces the CUDA path on CPU and runs it "
                    "interpreted; on a GPU the backend test below runs that path natively")
@pytest.mark.parametrize("consumers,terms,low", [(1, 1, None), (2, 2, None), (3, 3, None),
                                                 (5, 4, None), (3, 3, torch.bfloat16)])
def test_cuda_path_backward_takes_the_consumers_gradients_unsummed(monkeypatch, consumers,
                                                                    terms, low):
    """The CUDA path's backward graph, traced on CPU: the normalized output read by 1, 2, 3 or
    5 projections (q, k, v-like). After Inductor's post-grad passes with
    SumGradientsIntoBackward, the backward kernel gets the projections' input gradients as its
    dy terms and the adds are gone (5 consumers: four terms, one add left inside the last).
    The rewritten graph is then run, its kernels interpreted: every gradient equals eager's.
    ``low``: an fp32 norm whose result is written in bf16 (the pass's choice under autocast)
    and read by bf16 projections: the bf16 terms are taken in too and added in fp32, so x's and
    w's gradients are those of the fp32 sum of the terms (not autograd's bf16 adds)."""
    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import detect_fake_mode
    from torch._higher_order_ops import triton_kernel_wrap
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._inductor import config as inductor_config
    from torch._inductor.fx_passes.post_grad import post_grad_passes
    from torch._inductor.virtualized import V
    from torch.library import wrap_triton

    interpreted = {}
    for name in ("rms_norm_bwd_kernel", "_load_bwd_rows", "rms_norm_dw_kernel", "round_to"):
        fn = getattr(K, name)
        compiled = triton.JITFunction(getattr(fn, "fn", fn))
        interpreted[id(compiled)] = fn
        monkeypatch.setattr(K, name, compiled)
    monkeypatch.setattr(K, "_launches_kernels", lambda t: True)
    monkeypatch.setattr(K, "launchable", lambda kernel, like: wrap_triton(kernel))
    # What Triton's IR analysis finds on a GPU; here there is no target to compile for.
    written = {"rms_norm_bwd_kernel": ["DX", "DW_PARTIAL"], "rms_norm_dw_kernel": ["DW"]}
    monkeypatch.setattr(triton_kernel_wrap, "get_mutated_tensors",
                        lambda idx, *args: written[kernel_side_table.get_kernel(idx).fn.__name__])
    graphs = []

    def backward_compiler(gm, example_inputs):
        with inductor_config.patch(post_grad_custom_post_pass=K.SumGradientsIntoBackward()), \
                V.set_fake_mode(detect_fake_mode(example_inputs)):
            post_grad_passes(gm, is_inference=False)
        gm.recompile()
        graphs.append(gm.graph)
        for idx, kernel in list(kernel_side_table.id_to_kernel.items()):
            jit = getattr(kernel, "fn", None) if not isinstance(kernel, triton.JITFunction) \
                else kernel     # launch options (num_warps) wrap it in an Autotuner
            if id(jit) in interpreted:
                kernel_side_table.id_to_kernel[idx] = interpreted[id(jit)]
        for helper in ("round_to", "_load_bwd_rows"):      # what they call
            monkeypatch.setattr(K, helper, interpreted[id(getattr(K, helper))])
        return gm

    def term(y, p, i):
        return ((y @ p).float() ** (i + 1)).sum()

    def f(x, w, *projections):
        y = _NormThroughBackwardOp.apply(x, w, low)
        return sum(term(y, p, i) for i, p in enumerate(projections))

    hidden = 48
    x, w = torch.randn(2, 5, hidden), torch.randn(hidden)
    projections = [(torch.randn(hidden, 8 * (i + 1)) * 0.2).to(low or torch.float32)
                   for i in range(consumers)]
    leaves = [t.requires_grad_() for t in (x, w, *projections)]
    backend = aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=backward_compiler)
    torch.compile(f, backend=backend)(*leaves).backward()
    got = [t.grad.clone() for t in leaves]

    [call] = [n for n in graphs[-1].nodes
              if n.target is torch.ops.higher_order.triton_kernel_wrapper_mutation
              and "N_DY" in n.kwargs["kwargs"]]
    args = call.kwargs["kwargs"]
    assert args["N_DY"] == terms
    adds = [n for n in graphs[-1].nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == consumers - terms
    dy_slots = [args["DY"], *(args[f"DY{i}"] for i in range(1, terms))]
    assert len(set(dy_slots)) == terms

    for t in leaves:
        t.grad = None
    y = K.rms_norm_reference(x, w, 1e-6, out_dtype=low)
    sum(term(y, p, i) for i, p in enumerate(projections)).backward()
    if low is not None:   # x, w: through the fp32 sum of each projection's gradient of y
        y = y.detach().requires_grad_()
        dy = sum(torch.autograd.grad(term(y, p, i), y)[0].float()
                 for i, p in enumerate(projections))
        x.grad, w.grad = K.rms_norm_backward_reference(dy, x, w, 1e-6)
    for g, t in zip(got, leaves):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_backend_hands_the_projections_gradients_to_the_norm_backward_on_gpu(monkeypatch):
    """Through the backend on a tiny Llama (fp32, the RMSNorm pass alone): every decoder norm
    feeding q, k, v or gate, up has its backward launch rewritten to take 3 or 2 terms, and the
    loss and every gradient equal eager's; with ``rmsnorm_grad_sum=False`` none is."""
    import chronicals
    from tests.tiny_models import assert_same_training_signal, batch, twins

    # a cached graph would skip the post-grad passes the spy counts
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    for grad_sum in (True, False):
        torch._dynamo.reset()
        taken = []
        original = K._take_in_gradient_terms

        def spy(graph, node):
            taken.append(original(graph, node) and node.kwargs["kwargs"]["N_DY"])
            return taken[-1]

        monkeypatch.setattr(K, "_take_in_gradient_terms", spy)
        eager, model = twins("llama")
        eager, model = eager.cuda(), model.cuda()
        chronicals.optimize(model, strict=True, passes=("rmsnorm",), rmsnorm_grad_sum=grad_sum)
        inputs = {k: v.cuda() for k, v in batch().items()}
        assert_same_training_signal(eager, model, inputs, rtol=1e-4, atol=1e-5)
        layers = model.config.num_hidden_layers
        if grad_sum:
            assert sorted(t for t in taken if t) == [2] * layers + [3] * layers
        else:
            assert taken == []


def test_autocast_result_in_bf16_from_fp32_rows_and_bf16_gradient_terms():
    """Under torch.autocast the pass asks for an fp32 norm's result in bf16 (its readers are
    linears that cast it there): the stored result is the fp32 result rounded once, bit for bit
    what autocast's cast gives; the backward reads the readers' bf16 gradients unsummed, adds
    them in fp32 and writes dx in x's fp32."""
    rows, hidden = 19, 136
    x = torch.randn(rows, hidden, device=DEVICE)
    w = torch.randn(hidden, device=DEVICE) * 0.5 + 1.0
    f32 = torch.float32
    y = torch.empty(rows, hidden, device=DEVICE, dtype=torch.bfloat16)
    K.rms_norm_forward(x, w, y, 1e-6, 0.0, f32, f32, f32)
    want = K.rms_norm_reference(x, w, 1e-6, 0.0, f32, f32, f32, f32).to(torch.bfloat16)
    diff = (y.float() - want.float()).abs()
    # fp32 arithmetic may differ from torch's in the last bits of a few values, flipping a
    # bf16 rounding there; never by more than one bf16 step
    assert (diff <= want.float().abs() * 2 ** -8).all()
    assert (diff == 0).float().mean() > 0.99
    dys = [torch.randn(rows, hidden, device=DEVICE).to(torch.bfloat16) for _ in range(3)]
    _, dx_ref, dw_ref = _reference_with_grads(x, w, sum(d.double() for d in dys), 1e-6, 0.0)
    dx = torch.full_like(x, float("nan"))
    dw = K.rms_norm_backward(dys[0], x, w, dx, 1e-6, 0.0, f32, f32, True, dy_terms=tuple(dys[1:]))
    assert dx.dtype == f32
    assert rel_err(dx, dx_ref) < TOLERANCE[f32]
    assert rel_err(dw, dw_ref) < TOLERANCE[f32]
