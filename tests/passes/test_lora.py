"""LoRA precision pass: fp32 adapters on a bf16 model get their products in bf16, as
``torch.autocast`` computes them — exactly its results where the scale is a power of two, within
one rounding otherwise (fp32 weights and gradients); products already in bf16 (adapters in bf16,
autocast), fp32 models, full-rank fp32 layers and low-rank fp32 branches that adapt no linear
are left alone."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import chronicals
from tests.tiny_models import batch, keep_rewritten_graphs, loss_and_grads, tiny_causal_lm

PASSES = ("lora",)      # the pass alone
DETAIL = "products in bfloat16 (fp32 weights, fp32 accumulation)"
SUM_IN_LOW, SUM_IN_FP32 = "sum in bfloat16", "fp32 sum"     # the detail's last words


def _peft(dtype=torch.bfloat16, **lora):
    model = tiny_causal_lm("llama", num_hidden_layers=1).to(dtype)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=lora.pop("lora_dropout", 0.0),
                             init_lora_weights=False, target_modules="all-linear")
    return peft.get_peft_model(model, config, **lora)


def _lora_report(model):
    report = chronicals.report_of(model)
    return ([m for m in report.matches if m.op == "lora"],
            [d for d in report.declines if d.op == "lora"])


def _compiled(eager):
    """The reference a pass that changes nothing but what it claims must equal: the model as
    torch.compile(aot_eager) runs it. (AOTAutograd's backward of transformers' repeat_kv sums
    the repeated heads in another order than eager's: one bf16 rounding apart in k and v's
    gradients with transformers 5.17, none with later versions, which use SDPA's own GQA.)"""
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="aot_eager")
    return compiled


def _assert_autocast_parity(eager, optimized, inputs):
    """The optimized model's loss and every gradient equal the compiled model's under
    torch.autocast(bf16), whose precision the pass claims; gradients stay fp32 like their
    weights."""
    with torch.autocast("cpu", torch.bfloat16):
        loss_a, grads_a = loss_and_grads(_compiled(eager), inputs)
    loss_o, grads_o = loss_and_grads(optimized, inputs)
    torch.testing.assert_close(loss_o, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_o.keys()
    for name in grads_a:
        assert grads_o[name].dtype == grads_a[name].dtype, name
        assert grads_o[name].abs().sum() > 0, name
        torch.testing.assert_close(grads_o[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    return loss_o


def test_peft_bf16_model_fp32_adapters():
    """PEFT's default on a bf16 model: fp32 adapter weights; all 7 linears of the layer, each
    adapter on its own (lora_concat_a off, the default: autocast's results exactly)."""
    eager = _peft()
    assert {p.dtype for n, p in eager.named_parameters() if "lora_" in n} == {torch.float32}
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=PASSES)
    loss = _assert_autocast_parity(eager, optimized, batch())
    # against the fp32 adapter products: the loss within bf16 rounding of the model's own
    loss_e, _ = loss_and_grads(eager, batch())
    torch.testing.assert_close(loss, loss_e, rtol=2 ** -8, atol=0)
    matches, declines = _lora_report(optimized)
    assert not declines
    assert sorted(m.where.rsplit(".", 1)[-1] for m in matches) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert all(m.where.startswith("base_model.model.model.layers.0.") for m in matches), matches
    assert all(DETAIL in m.detail and "rank 4" in m.detail and m.detail.endswith(SUM_IN_LOW)
               for m in matches), matches


def test_shared_input_adapters_one_gemm(monkeypatch):
    """lora_concat_a: the A products of q/k/v (one input) and of gate/up (another) run as two
    GEMMs over concatenated A weights instead of five. Forward values are autocast's (each
    output column is its own dot product); in backward the adapters' dx contributions are summed
    inside one GEMM (fp32, rounded once) instead of rounded each and summed in bf16, so gradients
    upstream of a shared input differ from autocast's by that rounding: as close to float64 as
    autocast's (within 1.5x its error, each weight), and equal where no such sum enters."""
    graphs = keep_rewritten_graphs(monkeypatch)
    eager = _peft()
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=PASSES,
                        lora_concat_a=True)
    with torch.autocast("cpu", torch.bfloat16):
        loss_a, grads_a = loss_and_grads(eager, batch())
    loss_o, grads_o = loss_and_grads(optimized, batch())
    loss_64, grads_64 = loss_and_grads(copy.deepcopy(eager).double(), batch())
    assert torch.equal(loss_o, loss_a)
    assert grads_o.keys() == grads_a.keys() == grads_64.keys()

    def error(grads, name):
        return ((grads[name].double() - grads_64[name]).norm() / grads_64[name].norm()).item()

    for name in grads_a:
        assert grads_o[name].dtype == torch.float32, name
        assert error(grads_o, name) <= 1.5 * error(grads_a, name), name
        if ".mlp." in name:     # the last layer's MLP: no shared-input sum lies downstream of it
            assert torch.equal(grads_o[name], grads_a[name]), name
    (gm,) = graphs
    linears = [n for n in gm.graph.nodes if n.op == "call_function"
               and n.target in (torch.nn.functional.linear, torch._C._nn.linear)]
    # 7 base linears + 7 A + 7 B + lm_head; concatenated: q/k/v's 3 A's → 1, gate/up's 2 → 1
    assert len(linears) == 22 - 3


def test_peft_dropout_is_kept_in_fp32():
    """lora_dropout > 0: the dropout stays on the fp32 input, its result is cast for the GEMM."""
    optimized = _peft(lora_dropout=0.1)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=PASSES)
    loss, grads = loss_and_grads(optimized, batch())
    assert torch.isfinite(loss) and all(g.abs().sum() > 0 for g in grads.values())
    assert len(_lora_report(optimized)[0]) == 7


@pytest.mark.parametrize("case", ["fp32 model", "adapters in bf16"])
def test_nothing_to_do(case):
    """An fp32 model's adapters are fp32 products already; PEFT without autocast_adapter_dtype
    keeps bf16 adapters on a bf16 model (bf16 GEMMs already): no match, no decline."""
    if case == "fp32 model":
        eager = _peft(torch.float32)
    else:
        eager = _peft(autocast_adapter_dtype=False)
        assert {p.dtype for n, p in eager.named_parameters() if "lora_" in n} == {torch.bfloat16}
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager", passes=PASSES)
    loss_e, grads_e = loss_and_grads(_compiled(eager), batch())
    loss_o, grads_o = loss_and_grads(optimized, batch())
    torch.testing.assert_close(loss_o, loss_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_o[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)
    assert _lora_report(optimized) == ([], [])


class Adapted(nn.Module):
    """A bf16 layer plus a hand-written fp32 branch up(down(x)) · s (low rank or not), or
    / (1/s); the fp32 sum is returned, or cast back to bf16 as PEFT does."""

    def __init__(self, rank=3, hidden=16, out=12, scale=0.5, divide=False, cast_back=False):
        super().__init__()
        self.base = nn.Linear(hidden, out).to(torch.bfloat16)
        self.down = nn.Linear(hidden, rank, bias=False)        # fp32
        self.up = nn.Linear(rank, out, bias=True)              # fp32, with a bias
        self.scale, self.divide, self.cast_back = scale, divide, cast_back

    def forward(self, x):
        branch = self.up(self.down(x.float()))
        branch = branch / (1 / self.scale) if self.divide else branch * self.scale
        y = self.base(x) + branch                              # fp32 (bf16 + fp32)
        return y.to(torch.bfloat16) if self.cast_back else y


class ResidualBranch(nn.Module):
    """Look-alike: a low-rank fp32 branch added to the bf16 residual stream itself, adapting
    no linear layer (a deliberate fp32 computation, not an adapter)."""

    def __init__(self, rank=3, hidden=16):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=False)

    def forward(self, x):
        return x + self.up(self.down(x.float()))


class FP32Head(nn.Module):
    """Look-alike: a full-rank fp32 layer on an upcast bf16 output (a deliberate precision)."""

    def __init__(self, hidden=16, out=12):
        super().__init__()
        self.base = nn.Linear(hidden, hidden).to(torch.bfloat16)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(self.base(x).float())


def _optimized_with_inputs(build):
    """(module, its optimized copy with the lora pass alone, bf16 input x [2, 5, 16], an fp32
    output gradient g), seeded."""
    torch.manual_seed(0)
    module = build()
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager",
                                    passes=PASSES)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        g = torch.randn(module(x).shape)
    return module, optimized, x, g


def _run(module, x, g, autocast=False):
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = module(x)
    y.float().backward(g)
    return y, {n: p.grad for n, p in module.named_parameters()}


CASES = [dict(), dict(divide=True), dict(cast_back=True), dict(cast_back=True, divide=True)]
CASE_IDS = ["fp32 sum", "fp32 sum, divided", "cast back", "cast back, divided"]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hand_written_adapter_with_biases(case):
    """Matched with A's and B's biases; every gradient equals autocast's (½ is exact in bf16,
    so the scaled branch rounds where autocast's does). An fp32 sum is autocast's output before
    its one rounding; a sum cast back (s folded into B, the sum in bf16) is autocast's."""
    eager, optimized, x, g = _optimized_with_inputs(lambda: Adapted(scale=0.5, **case))
    y_a, grads_a = _run(eager, x, g, autocast=True)
    y_o, grads_o = _run(optimized, x, g)
    assert y_a.dtype == torch.bfloat16
    assert y_o.dtype == (torch.bfloat16 if case.get("cast_back") else torch.float32)
    torch.testing.assert_close(y_o.to(torch.bfloat16), y_a, rtol=0, atol=0)
    for name in grads_a:
        assert grads_o[name].dtype == grads_a[name].dtype, name
        torch.testing.assert_close(grads_o[name], grads_a[name], rtol=1e-5, atol=1e-6, msg=name)
    (match,), _ = _lora_report(optimized)
    assert match.detail.endswith(SUM_IN_LOW if case.get("cast_back") else SUM_IN_FP32), match


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_scale_not_a_power_of_two_is_within_one_rounding_of_autocast(case):
    """s = 0.3: autocast rounds b·s to bf16 before the sum; the pass rounds the fp32 sum once, or
    (cast back) rounds s·W_B instead of W_B and b·s. The outputs differ by at most one bf16
    rounding; the gradients are as far from the fp32 products' (eager without autocast) as
    autocast's are: the same precision."""
    eager, optimized, x, g = _optimized_with_inputs(lambda: Adapted(scale=0.3, **case))
    y_a, grads_a = _run(copy.deepcopy(eager), x, g, autocast=True)
    y_32, grads_32 = _run(eager, x, g)
    y_o, grads_o = _run(optimized, x, g)
    ulp = 2.0 ** -7    # bf16 spacing relative to the value: one rounding is at most half of it
    torch.testing.assert_close(y_o.to(torch.bfloat16), y_a, rtol=ulp, atol=1e-3)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    for name in grads_32:
        ours, autocast = rel(grads_o[name], grads_32[name]), rel(grads_a[name], grads_32[name])
        assert ours <= 1.5 * autocast + 1e-6, (name, ours, autocast)
    (match,), _ = _lora_report(optimized)
    assert match.detail.endswith(SUM_IN_LOW if case.get("cast_back") else SUM_IN_FP32), match


def test_under_autocast_nothing_to_do():
    """Under torch.autocast the products are bf16 already: no match, eager's output dtype."""
    eager, optimized, x, _ = _optimized_with_inputs(Adapted)
    with torch.autocast("cpu", torch.bfloat16):
        y_e, y_o = eager(x), optimized(x)
    assert y_o.dtype == y_e.dtype == torch.bfloat16
    torch.testing.assert_close(y_o, y_e, rtol=0, atol=0)
    assert _lora_report(optimized) == ([], [])


@pytest.mark.parametrize("build", [lambda: Adapted(rank=12), FP32Head, ResidualBranch],
                         ids=["full rank", "fp32 head", "residual branch"])
def test_look_alikes_left_alone(build):
    """rank 12 = min(16, 12) is no low-rank branch; an fp32 head on an upcast output and a
    low-rank branch on the residual stream adapt no linear: no match, eager's results exactly."""
    module, optimized, x, g = _optimized_with_inputs(build)
    y_e, grads_e = _run(module, x, g)
    y_o, grads_o = _run(optimized, x, g)
    torch.testing.assert_close(y_o, y_e, rtol=1e-5, atol=1e-6)
    for name in grads_e:
        torch.testing.assert_close(grads_o[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)
    assert _lora_report(optimized) == ([], [])


def test_default_and_off():
    """A default pass: the default passes rewrite all 7 adapters; passes without "lora" leave
    them as they are (reported as 0)."""
    assert "lora" in chronicals.DEFAULT_PASSES
    model = _peft()
    passes = tuple(p for p in chronicals.DEFAULT_PASSES if p != "lora")
    on = chronicals.explain(model, **batch())
    off = chronicals.explain(model, **batch(), chronicals_options={"passes": passes})
    assert on.counts["lora"] == 7 and not [d for d in on.declines if d.op == "lora"]
    assert off.graphs == 1 and off.counts["rmsnorm"] > 0      # compiled, with the other passes
    assert off.counts["lora"] == 0 and not [m for m in off.matches if m.op == "lora"]
    assert not [d for d in off.declines if d.op == "lora"]


class BranchAlsoReturned(Adapted):
    """The scaled branch has a second user (returned too): the sum stays fp32, so the branch is
    computed once (a bf16 sum would need the scaled product anyway, and the fp32 GEMMs with it)."""

    def forward(self, x):
        branch = self.up(self.down(x.float())) * self.scale
        return (self.base(x) + branch).to(torch.bfloat16), branch


def test_scaled_branch_with_another_user_keeps_the_fp32_sum():
    torch.manual_seed(0)
    eager = BranchAlsoReturned()
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager",
                                    passes=PASSES)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        y_a, branch_a = eager(x)
    y_o, branch_o = optimized(x)
    torch.testing.assert_close(y_o, y_a, rtol=0, atol=0)
    torch.testing.assert_close(branch_o.to(torch.bfloat16), branch_a, rtol=0, atol=0)
    (match,), _ = _lora_report(optimized)
    assert match.detail.endswith(SUM_IN_FP32), match


class ScaleOnTheLeft(nn.Module):
    """PEFT's sum with the scale written on either side: s · B(A(x)) or B(A(x)) · s."""

    def __init__(self, scale, left):
        super().__init__()
        self.base = nn.Linear(16, 12).to(torch.bfloat16)
        self.down = nn.Linear(16, 3, bias=False)
        self.up = nn.Linear(3, 12, bias=False)
        self.scale, self.left = scale, left

    def forward(self, x):
        branch = self.up(self.down(x.float()))
        branch = self.scale * branch if self.left else branch * self.scale
        return (self.base(x) + branch).to(torch.bfloat16)


@pytest.mark.parametrize("left", [False, True], ids=["b * s", "s * b"])
def test_symbolic_scale_on_either_side(left):
    """A float attribute that differs between instances becomes a symbolic input of the graph
    (from the second compiled instance on): matched on either side of the product."""
    torch._dynamo.reset()
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    for scale in (0.5, 0.25, 0.125):
        torch.manual_seed(0)
        module = ScaleOnTheLeft(scale, left)
        optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager",
                                        passes=PASSES)
        with torch.autocast("cpu", torch.bfloat16):
            expected = module(x)
        torch.testing.assert_close(optimized(x), expected, rtol=0, atol=0)
        assert chronicals.report_of(optimized).counts["lora"] == 1, scale
