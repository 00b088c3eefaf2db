"""SwiGLU/GeGLU pass: exact counts and eager parity on HF models and hand-written spellings;
non-gated MLPs and products without an activation left alone; declines say why."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

import chronicals
from tests.inductor_code import saved_inputs_and_op_line, top_level_args
from tests.tiny_models import (assert_same_training_signal, batch, keep_rewritten_graphs,
                               optimized_matches_eager, tiny_causal_lm, twins)


# Only the passes up to this one: other ops' passes are tested in their own files.
PASSES = ("rmsnorm", "swiglu")
IN_PLACE = "backward writes dg, du over g, u"
TAKEN_IN = "down projection taken in: saves g, u only"


def _swiglu_report(report):
    return ([m for m in report.matches if m.op == "swiglu"],
            [d for d in report.declines if d.op == "swiglu"])


# ---------------------------------------------------------------------------------------------
# Hugging Face families: one gated MLP per layer.
# ---------------------------------------------------------------------------------------------
# One layer except Llama's two (both layers found, named by index): tracing HF models is what
# costs CI time, and every family's MLP is the same in each layer.
ONE = {"num_hidden_layers": 1}
HF_CASES = {
    "llama": ("llama", {}, "silu"),
    "qwen2": ("qwen2", ONE, "silu"),
    "mistral": ("mistral", ONE, "silu"),
    "gemma": ("gemma", ONE, "gelu_tanh"),                     # gelu_pytorch_tanh: F.gelu(tanh)
    "phi3": ("phi3", ONE, "silu, fused gate/up projection (chunk)"),
    # hidden_act gelu_new: HF's hand-written tanh formula, matched by value
    "llama_gelu_new": ("llama", {**ONE, "hidden_act": "gelu_new"}, "gelu_tanh"),
}


def _check_model(eager, optimized, inputs, count, detail="", **options):
    """Compile (AOTAutograd through the op's autograd), compare loss and every gradient with
    eager, then check what the pass reported for the compiled graph(s)."""
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=PASSES, **options)
    assert_same_training_signal(eager, optimized, inputs)
    report = chronicals.report_of(optimized)
    matches, declines = _swiglu_report(report)
    assert len(matches) == count and not declines, str(report)
    assert all(detail in m.detail for m in matches), str(report)
    return matches


@pytest.mark.parametrize("save_hidden", [False, True])
@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hf_family_counts_and_parity(case, save_hidden):
    family, overrides, detail = HF_CASES[case]
    eager, optimized = twins(family, **overrides)
    layers = eager.config.num_hidden_layers
    matches = _check_model(eager, optimized, batch(), layers, detail,
                           swiglu_save_hidden=save_hidden)
    assert [m.where for m in matches] == [f"model.layers.{i}.mlp" for i in range(layers)]
    if not save_hidden:     # the default: every MLP's down projection goes into the op
        assert all(TAKEN_IN in m.detail for m in matches), matches
        return
    # g and u are the MLP's own projections: the backward writes over them, except where they
    # are pieces of Phi-3's fused gate_up projection.
    assert all((IN_PLACE in m.detail) == ("fused" not in detail) for m in matches), matches


def test_peft_lora_projections():
    """LoRA wraps gate/up as linear(x) + B(A(x))·s: still projections of one tensor."""
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["gate_proj", "up_proj", "down_proj"])
    eager = peft.get_peft_model(model, config)
    _check_model(eager, copy.deepcopy(eager), batch(), 1, "silu")


# ---------------------------------------------------------------------------------------------
# Hand-written gated MLPs
# ---------------------------------------------------------------------------------------------
class GatedMLP(nn.Module):
    """down(fn(gate, up)); gate and up from two linears or cut from one fused linear."""

    def __init__(self, fn, hidden=24, inter=40, bias=False, split=None, up_features=None):
        super().__init__()
        self.fn, self.split, self.inter = fn, split, inter
        if split is None:
            self.gate = nn.Linear(hidden, inter, bias=bias)
            self.up = nn.Linear(hidden, up_features or inter, bias=bias)
        else:
            self.gate_up = nn.Linear(hidden, 2 * inter, bias=bias)
        self.down = nn.Linear(inter, hidden, bias=bias)
        self.silu, self.gelu = nn.SiLU(), nn.GELU()

    def forward(self, x):
        if self.split is None:
            g, u = self.gate(x), self.up(x)
        else:
            g, u = self.split(self.gate_up(x), self.inter)
        return self.down(self.fn(self, g, u))


SPELLINGS = {
    # name: (fn(self, gate, up), activation)
    "f_silu": (lambda s, g, u: F.silu(g) * u, "silu"),
    "nn_silu": (lambda s, g, u: s.silu(g) * u, "silu"),
    "up_first": (lambda s, g, u: u * F.silu(g), "silu"),
    "x_sigmoid_x": (lambda s, g, u: g * torch.sigmoid(g) * u, "silu"),
    "sigmoid_x_method": (lambda s, g, u: u * (g.sigmoid() * g), "silu"),
    "div_one_plus_exp": (lambda s, g, u: g / (1 + torch.exp(-g)) * u, "silu"),
    "f_gelu": (lambda s, g, u: F.gelu(g) * u, "gelu"),
    "nn_gelu": (lambda s, g, u: u * s.gelu(g), "gelu"),
    "gelu_erf_formula": (lambda s, g, u: g * 0.5 * (1.0 + torch.erf(g / math.sqrt(2.0))) * u, "gelu"),
    "gelu_tanh": (lambda s, g, u: F.gelu(g, approximate="tanh") * u, "gelu_tanh"),
    "hf_gelu_pytorch_tanh": (lambda s, g, u: ACT2FN["gelu_pytorch_tanh"](g) * u, "gelu_tanh"),
    "hf_gelu_new": (lambda s, g, u: ACT2FN["gelu_new"](g) * u, "gelu_tanh"),
    "hf_gelu_fast": (lambda s, g, u: u * ACT2FN["gelu_fast"](g), "gelu_tanh"),
    "upcast_silu": (lambda s, g, u: F.silu(g.float()).to(g.dtype) * u, "silu"),
}


def _check_matches_and_parity(module, x, count=1, rtol=1e-5, atol=1e-6, compiler="aot_eager",
                              **options):
    optimized = optimized_matches_eager(module, x, rtol=rtol, atol=atol, compiler=compiler,
                                        passes=PASSES, **options)
    report = chronicals.report_of(optimized)
    matches, declines = _swiglu_report(report)
    assert len(matches) == count and not declines, str(report)
    return matches


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_hand_written_spellings(name):
    fn, activation = SPELLINGS[name]
    torch.manual_seed(0)
    [match] = _check_matches_and_parity(GatedMLP(fn), torch.randn(3, 5, 24) * 2)
    assert match.detail.split(", ")[1] == activation


def test_bias_projections():
    torch.manual_seed(0)
    _check_matches_and_parity(GatedMLP(SPELLINGS["f_silu"][0], bias=True), torch.randn(4, 24))


FUSED = {
    "chunk_method": lambda t, i: t.chunk(2, dim=-1),
    "torch_chunk": lambda t, i: torch.chunk(t, 2, -1),
    "split_size": lambda t, i: t.split(i, dim=-1),
    "torch_split_sections": lambda t, i: torch.split(t, [i, i], dim=2),
    "slice_ellipsis": lambda t, i: (t[..., :i], t[..., i:]),
    "slice_full_index": lambda t, i: (t[:, :, i:], t[:, :, :i]),   # gate is the second half
}


@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_gate_up_projection(name):
    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS["f_silu"][0], split=FUSED[name])
    [match] = _check_matches_and_parity(module, torch.randn(2, 5, 24))
    assert "fused gate/up projection" in match.detail


def test_fused_projection_through_inductor():
    """Inductor's code generation over the op (its CPU path here), gelu_tanh on chunk views."""
    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS["gelu_tanh"][0], split=FUSED["chunk_method"])
    _check_matches_and_parity(module, torch.randn(2, 5, 24), compiler="inductor")


class GroupedExperts(nn.Module):
    """Experts of a mixture as transformers' grouped_mm implementation computes them: x's rows
    sorted by expert, one grouped matmul for every expert's gate/up ([E, 2I, H] weights),
    chunked, act(gate) * up, one grouped matmul down. ``offs``: the rows' expert boundaries.
    ``row_mask`` [rows, 1]: transformers 5.17 zeroes those rows after each grouped matmul, and
    in x before the first (the kernel's backward leaves those rows of dx unwritten)."""

    def __init__(self, grouped_mm, offs, experts=3, hidden=16, inter=24, row_mask=None):
        super().__init__()
        self.grouped_mm = grouped_mm
        self.row_mask = row_mask
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, inter) / inter ** 0.5)
        self.register_buffer("offs", offs)

    def project(self, x, weight):
        out = self.grouped_mm(x, weight.transpose(-2, -1), offs=self.offs)
        return out if self.row_mask is None else out.masked_fill(self.row_mask, 0.0)

    def forward(self, x):
        if self.row_mask is not None:
            x = x.masked_fill(self.row_mask, 0.0)
        g, u = self.project(x, self.gate_up).chunk(2, dim=-1)
        return self.project(F.silu(g) * u, self.down)


@pytest.mark.parametrize("grouped_mm", [torch._grouped_mm, F.grouped_mm],
                         ids=["torch._grouped_mm", "F.grouped_mm"])
def test_experts_of_a_grouped_matmul(grouped_mm):
    """A grouped matmul is a projection of x (each expert's rows by that expert's weight): the
    gated product of all experts matches, bit for bit in bf16 on CPU (torch's grouped_mm wants
    bf16 operands under compile; transformers' fp32 fallback op is covered by the model zoo's
    Mixtral)."""
    torch.manual_seed(0)
    offs = torch.tensor([4, 4, 10], dtype=torch.int32)          # the second expert gets no rows
    module = GroupedExperts(grouped_mm, offs).to(torch.bfloat16)
    [match] = _check_matches_and_parity(module, torch.randn(10, 16).to(torch.bfloat16),
                                        rtol=0, atol=0)
    assert "fused gate/up projection (chunk), experts of a mixture (grouped matmul)" in match.detail


def test_experts_with_rows_zeroed_after_the_grouped_matmul():
    """transformers 5.17 zeroes the rows of tokens routed to no expert (past the last offset,
    left unwritten by the kernel) with ``masked_fill(row_mask, 0)`` after each grouped matmul:
    still a projection row by row, so the gated product matches, bit for bit in bf16."""
    torch.manual_seed(0)
    offs = torch.tensor([3, 3, 8], dtype=torch.int32)           # rows 8 and 9: no expert
    row_mask = (torch.arange(10) >= 8).unsqueeze(-1)
    module = GroupedExperts(torch._grouped_mm, offs, row_mask=row_mask).to(torch.bfloat16)
    [match] = _check_matches_and_parity(module, torch.randn(10, 16).to(torch.bfloat16),
                                        rtol=0, atol=0)
    assert "fused gate/up projection (chunk), experts of a mixture (grouped matmul)" in match.detail


def test_two_sites_in_one_graph():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = GatedMLP(SPELLINGS["f_silu"][0])
            self.b = GatedMLP(SPELLINGS["f_gelu"][0], split=FUSED["chunk_method"])

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    _check_matches_and_parity(Two(), torch.randn(6, 24), count=2)


@pytest.mark.parametrize("name,dtype,tol", [("f_silu", torch.bfloat16, 0),
                                            ("gelu_tanh", torch.bfloat16, 0),
                                            ("upcast_silu", torch.bfloat16, 0),
                                            ("f_gelu", torch.float16, 1e-3)])
def test_low_precision_rounds_where_eager_rounds(name, dtype, tol):
    """bf16/fp16: act(g) rounded to the dtype, then the product rounded, and the backward's
    dy·u rounded before act'(g): eager's rounding points, so on CPU (where both compute in
    fp32 internally) the results are bit-identical; fp16 GELU's backward differs by an ulp
    in the order of its fp32 terms."""
    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS[name][0], split=FUSED["chunk_method"]).to(dtype)
    _check_matches_and_parity(module, torch.randn(16, 24).to(dtype), rtol=tol, atol=tol)


def test_hand_written_activation_in_bf16_is_noted():
    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS["hf_gelu_new"][0]).to(torch.bfloat16)
    [match] = _check_matches_and_parity(module, torch.randn(4, 24).to(torch.bfloat16),
                                        rtol=5e-2, atol=5e-2)
    assert "eager rounds each op to bf16" in match.detail


# ---------------------------------------------------------------------------------------------
# The in-place backward: only where g and u are the op's alone
# ---------------------------------------------------------------------------------------------
class UpReturned(GatedMLP):
    def forward(self, x):
        u = self.up(x)
        return self.down(F.silu(self.gate(x)) * u), u


@pytest.mark.parametrize("name", ["gate_reused", "up_returned"])
def test_backward_out_of_place_where_g_or_u_is_shared(name):
    """A gate read elsewhere, or an up the graph returns, keeps the out-of-place backward
    (the write would reach the other reader or the caller); results equal eager's."""
    torch.manual_seed(0)
    x = torch.randn(3, 24)
    if name == "gate_reused":
        [match] = _check_matches_and_parity(GatedMLP(lambda s, g, u: F.silu(g) * u + g), x)
    else:
        module = UpReturned(SPELLINGS["f_silu"][0])
        optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager",
                                        passes=PASSES)
        x_e, x_o = x.clone().requires_grad_(), x.clone().requires_grad_()
        (y_e, u_e), (y_o, u_o) = module(x_e), optimized(x_o)
        (y_e.sum() + u_e.sum()).backward()
        (y_o.sum() + u_o.sum()).backward()
        torch.testing.assert_close(u_o, u_e)         # the caller's u: not overwritten
        torch.testing.assert_close(x_o.grad, x_e.grad)
        [match] = _swiglu_report(chronicals.report_of(optimized))[0]
    assert IN_PLACE not in match.detail


def test_backward_in_place_under_inductor():
    """Through chronicals.optimize and Inductor (CPU: the reference op stands in for the kernel):
    Inductor gets ReuseSavedInputs, its backward hands the saved g and u to the in-place op
    itself (no clone), and output and gradients equal eager's."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS["f_silu"][0])
    optimized, codes = run_and_get_code(optimized_matches_eager, module, torch.randn(2, 5, 24),
                                        compiler="inductor", passes=PASSES,
                                        swiglu_save_hidden=True)
    [match] = _swiglu_report(chronicals.report_of(optimized))[0]
    assert IN_PLACE in match.detail
    inputs, line = saved_inputs_and_op_line(codes[-1])
    args = top_level_args(line)
    assert args[1] in inputs and args[2] in inputs, line
    assert "clone" not in codes[-1]


@pytest.mark.parametrize("save_hidden", [False, True])
def test_backward_under_activation_checkpointing(save_hidden):
    """Checkpointed: g and u are recomputed in the backward, where the write into them is
    Inductor's ordinary business; results equal eager's, down projection taken in or not."""
    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = GatedMLP(SPELLINGS["gelu_tanh"][0])

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(self.mlp, x, use_reentrant=False)

    torch.manual_seed(0)
    [match] = _check_matches_and_parity(Checkpointed(), torch.randn(2, 5, 24), compiler="inductor",
                                        swiglu_save_hidden=save_hidden)
    assert (IN_PLACE if save_hidden else TAKEN_IN) in match.detail


# ---------------------------------------------------------------------------------------------
# Not gated activations: never candidates, nothing reported, results identical.
# ---------------------------------------------------------------------------------------------
class Plain(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Linear(24, 40), nn.Linear(24, 40)
        self.other = nn.Linear(16, 40)
        self.down = nn.Linear(40, 24)

    def forward(self, x, y):
        return self.down(self.fn(self, x, y))


NOT_GATED = {
    "act_of_fc_silu": lambda s, x, y: F.silu(s.a(x)),
    "act_of_fc_x_sigmoid_x": lambda s, x, y: s.a(x) * torch.sigmoid(s.a(x)),
    "act_of_fc_gelu_new": lambda s, x, y: ACT2FN["gelu_new"](s.a(x)),
    "bilinear_no_activation": lambda s, x, y: s.a(x) * s.b(x),
    "projections_of_different_inputs": lambda s, x, y: F.silu(s.a(x)) * s.other(y),
    "gate_times_non_projection": lambda s, x, y: F.silu(s.a(x)) * (x.sum(-1, keepdim=True) + 1),
    "activation_of_product": lambda s, x, y: F.silu(s.a(x) * s.b(x)),
    # masked_fill is a projection only with whole rows set to 0
    "gate_rows_filled_with_one":
        lambda s, x, y: F.silu(s.a(x).masked_fill(x[:, :1] > 0, 1.0)) * s.b(x),
    "gate_masked_elementwise":
        lambda s, x, y: F.silu(s.a(x).masked_fill(s.b(x) > 0, 0.0)) * s.b(x),
}


@pytest.mark.parametrize("name", sorted(NOT_GATED))
def test_not_gated_is_not_a_candidate(name):
    torch.manual_seed(0)
    module = Plain(NOT_GATED[name])
    x, y = torch.randn(3, 24), torch.randn(3, 16)
    report = chronicals.explain(module, x, y, chronicals_options={"passes": PASSES})
    assert _swiglu_report(report) == ([], []), str(report)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager", passes=PASSES)
    torch.testing.assert_close(optimized(x, y), module(x, y), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Declines: the gated product stays as it was, the report says why.
# ---------------------------------------------------------------------------------------------
DECLINES = {
    # name: (fn, reason fragment)
    "relu_gated": (lambda s, g, u: F.relu(g) * u, "relu"),
    "sigmoid_glu": (lambda s, g, u: torch.sigmoid(g) * u, "sigmoid"),
    "quick_gelu": (lambda s, g, u: ACT2FN["quick_gelu"](g) * u, "quick_gelu"),
    "squared_relu": (lambda s, g, u: F.relu(g).pow(2) * u, "not SiLU or GELU"),
}


def _declined(module, x, fragment):
    report = chronicals.explain(module, x, chronicals_options={"passes": PASSES})
    matches, declines = _swiglu_report(report)
    assert not matches, str(report)
    assert len(declines) == 1 and fragment in declines[0].reason, str(report)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager", passes=PASSES)
    torch.testing.assert_close(optimized(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(DECLINES))
def test_declines(name):
    fn, fragment = DECLINES[name]
    torch.manual_seed(0)
    module = GatedMLP(fn)
    _declined(module, torch.randn(3, 24), fragment)


def test_activation_value_reused_declines():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = nn.Linear(16, 32), nn.Linear(16, 32)

        def forward(self, x):
            a = F.silu(self.gate(x))
            return a * self.up(x), a

    x = torch.randn(3, 16)
    report = chronicals.explain(Reused(), x, chronicals_options={"passes": PASSES})
    matches, [decline] = _swiglu_report(report)
    assert not matches and "used outside" in decline.reason


def test_float64_declines():
    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS["f_silu"][0]).double()
    _declined(module, torch.randn(3, 24, dtype=torch.float64), "float64")


def test_broadcast_shapes_decline():
    torch.manual_seed(0)
    module = GatedMLP(SPELLINGS["f_silu"][0], up_features=1)
    _declined(module, torch.randn(3, 24), "differ")


def test_mixed_dtypes_decline():
    torch.manual_seed(0)
    module = GatedMLP(lambda s, g, u: (F.silu(g) * u.float()).to(g.dtype)).to(torch.bfloat16)
    _declined(module, torch.randn(3, 24).to(torch.bfloat16), "one dtype")


def test_passes_option_turns_swiglu_off():
    module = GatedMLP(SPELLINGS["f_silu"][0])
    report = chronicals.explain(module, torch.randn(3, 24),
                                chronicals_options={"passes": ("rmsnorm",)})
    assert report.counts["swiglu"] == 0 and not _swiglu_report(report)[1]


# ---------------------------------------------------------------------------------------------
# swiglu_save_hidden=False: the down projection taken into the op
# ---------------------------------------------------------------------------------------------


def _saved_bytes(model, inputs):
    """Bytes of the distinct storages the forward saves for backward, parameters left out
    (through autograd's saved-tensor hooks; compiled graphs save through them too)."""
    model(**inputs).loss.backward()     # compiled first: tracing saves fake tensors too
    storages = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**inputs).loss
    loss.backward()
    return sum(storages.values())


@pytest.mark.parametrize("case", ["qwen2", "phi3"])
def test_down_projection_taken_in(case):
    """Counts, eager parity (loss and every gradient), and one [N, I] tensor less saved per
    layer: g and u, not act(g)·u (Phi-3: the fused gate_up result, not it and act(g)·u)."""
    family, overrides, detail = HF_CASES[case]
    eager, optimized = twins(family, **overrides)
    reference = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=PASSES,
                        swiglu_save_hidden=False)
    assert_same_training_signal(eager, optimized, batch())
    matches, declines = _swiglu_report(chronicals.report_of(optimized))
    layers = eager.config.num_hidden_layers
    assert len(matches) == layers and not declines
    assert all(TAKEN_IN in m.detail and detail in m.detail for m in matches), matches
    chronicals.optimize(reference, strict=True, compiler="aot_eager", passes=PASSES,
                        swiglu_save_hidden=True)
    inputs = batch()
    hidden = inputs["input_ids"].numel() * eager.config.intermediate_size * 4    # fp32 [N, I]
    saved, saved_taken_in = _saved_bytes(reference, inputs), _saved_bytes(optimized, inputs)
    assert saved - saved_taken_in == layers * hidden, (saved, saved_taken_in, hidden)


def test_down_projection_with_lora_is_left_out():
    """A LoRA'd down projection reads act(g)·u twice (base layer and lora_A): the op stays
    plain SwiGLU; parity holds."""
    model = tiny_causal_lm("llama", num_hidden_layers=1)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                             target_modules=["gate_proj", "up_proj", "down_proj"])
    eager = peft.get_peft_model(model, config)
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=PASSES,
                        swiglu_save_hidden=False)
    assert_same_training_signal(eager, optimized, batch())
    matches, _ = _swiglu_report(chronicals.report_of(optimized))
    assert len(matches) == 1 and TAKEN_IN not in matches[0].detail, matches


@pytest.mark.parametrize("bias,frozen_down", [(True, False), (False, True)])
def test_down_projection_bias_and_frozen_weight(bias, frozen_down):
    """A biased down projection (db from the op), and a frozen one (no dW: act(g)·u is not
    written again)."""
    module = GatedMLP(SPELLINGS["f_silu"][0], bias=bias)
    module.down.weight.requires_grad_(not frozen_down)
    optimized = optimized_matches_eager(module, torch.randn(3, 5, 24), passes=PASSES,
                                        swiglu_save_hidden=False)
    matches, declines = _swiglu_report(chronicals.report_of(optimized))
    assert len(matches) == 1 and TAKEN_IN in matches[0].detail and not declines, matches


@pytest.mark.parametrize("fused_gemm", [True, False])
def test_down_projection_carries_the_fused_gemm_option(monkeypatch, fused_gemm):
    """Config.swiglu_fused_gemm reaches the op (its backward picks the Hopper kernel by it);
    on CPU both settings give eager's results."""
    graphs = keep_rewritten_graphs(monkeypatch)
    module = GatedMLP(SPELLINGS["f_silu"][0])
    optimized_matches_eager(module, torch.randn(2, 3, 24), passes=PASSES,
                            swiglu_save_hidden=False, swiglu_fused_gemm=fused_gemm)
    calls = [n for gm in graphs for n in gm.graph.nodes
             if n.target is torch.ops.chronicals.swiglu_linear.default]
    assert len(calls) == 1 and calls[0].args[5] is fused_gemm, [c.args for c in calls]


def test_down_projection_through_inductor():
    """Compiled by Inductor (CPU): the op's body and backward trace, results equal eager's."""
    module = GatedMLP(SPELLINGS["f_gelu"][0])
    optimized = optimized_matches_eager(module, torch.randn(2, 4, 24), compiler="inductor",
                                        passes=PASSES, swiglu_save_hidden=False)
    matches, _ = _swiglu_report(chronicals.report_of(optimized))
    assert len(matches) == 1 and TAKEN_IN in matches[0].detail, matches
