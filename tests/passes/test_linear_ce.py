"""Linear + cross-entropy pass: counts and loss/every-grad parity on HF models and hand-written
losses, the logits policy, gradient accumulation's num_items_in_batch, declines with reasons."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import chronicals
from tests.tiny_models import (_COMMON, FAMILIES, assert_same_training_signal, batch,
                               keep_rewritten_graphs, twins)

OP = "linear_cross_entropy"
ONLY = {"passes": (OP,)}


def _lce(report):
    return report.counts[OP], [d.reason for d in report.declines if d.op == OP]


# ---------------------------------------------------------------------------------------------
# Hugging Face families
# ---------------------------------------------------------------------------------------------
# aot_eager (AOTAutograd traces the op's registered autograd, as Inductor would) on Llama; the
# others run the rewritten graph op by op ("eager"), which checks the same rewrite at a fraction
# of the CPU time. Gemma ties lm_head to the embedding: the weight's gradient sums both uses.
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_family_counts_parity_and_no_logits(family):
    eager, optimized = twins(family)
    inputs = batch()
    compiler = "aot_eager" if family == "llama" else "eager"
    chronicals.optimize(optimized, strict=True, compiler=compiler, **ONLY)
    assert_same_training_signal(eager, optimized, inputs)
    report = chronicals.report_of(optimized)
    assert _lce(report) == (1, [])
    assert report.matches[-1].where == "lm_head"
    assert "logits output dropped" in report.matches[-1].detail
    assert "gradients in the forward (hidden, weight)" in report.matches[-1].detail
    # Training with labels: the [N, V] logits are never computed; outputs.logits is None.
    assert optimized(**inputs).logits is None


def _tiny(config_name, **extra):
    config = getattr(transformers, config_name)(**{**_COMMON, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("config_name,extra,detail", [
    ("Gemma2Config", dict(head_dim=12, final_logit_softcapping=5.0), "softcap=5"),   # c·tanh(x/c)
    ("CohereConfig", dict(logit_scale=0.5), "scale=0.5"),                             # x * k
])
def test_hf_logit_transforms(config_name, extra, detail):
    eager, optimized = _tiny(config_name, **extra)
    inputs = batch()
    chronicals.optimize(optimized, strict=True, compiler="eager", **ONLY)
    assert_same_training_signal(eager, optimized, inputs)
    [match] = chronicals.report_of(optimized).matches
    assert detail in match.detail


def test_hf_num_items_in_batch_is_a_sum_divided_by_the_count():
    """Trainer under gradient accumulation passes num_items_in_batch: loss = sum / count."""
    eager, optimized = twins("qwen2")
    inputs = {**batch(), "num_items_in_batch": torch.tensor(23)}
    chronicals.optimize(optimized, strict=True, compiler="eager", **ONLY)
    assert_same_training_signal(eager, optimized, inputs)
    [match] = chronicals.report_of(optimized).matches
    assert "reduction=sum" in match.detail


def test_hf_keep_logits_returns_the_logits():
    eager, optimized = twins("llama")
    inputs = batch()
    chronicals.optimize(optimized, strict=True, compiler="eager", keep_logits=True, **ONLY)
    assert_same_training_signal(eager, optimized, inputs)
    assert "logits kept" in chronicals.report_of(optimized).matches[0].detail
    out_e, out_o = eager(**inputs), optimized(**inputs)
    torch.testing.assert_close(out_o.logits, out_e.logits)
    # The kept logits stay differentiable (a distillation loss on them still trains).
    (out_o.loss + out_o.logits.square().mean()).backward()


def test_hf_without_gradient_keeps_logits_and_declines():
    """Evaluation (no grad) with labels: metrics need the logits, so the loss is left alone."""
    model = twins("llama")[0]
    inputs = batch()
    optimized = chronicals.optimize(copy.deepcopy(model), strict=True, compiler="eager", **ONLY)
    with torch.no_grad():
        out = optimized(**inputs)
    count, declines = _lce(chronicals.report_of(optimized))
    assert count == 0 and "no gradient" in declines[0]
    torch.testing.assert_close(out.logits, model(**inputs).logits)


def test_hf_without_labels_is_not_a_candidate():
    model = twins("llama")[0]
    report = chronicals.explain(model, input_ids=batch()["input_ids"])
    assert _lce(report) == (0, [])


# ---------------------------------------------------------------------------------------------
# Hand-written losses: each matches once and equals eager (loss, hidden and weight grads)
# ---------------------------------------------------------------------------------------------
class Head(nn.Module):
    def __init__(self, fn, hidden=24, vocab=50, bias=False):
        super().__init__()
        self.fn = fn
        self.lm_head = nn.Linear(hidden, vocab, bias=bias)
        self.ce = nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1)

    def forward(self, h, y):
        return self.fn(self, h, y)


def _shifted(s, h, y):
    logits = s.lm_head(h).float()                                    # [B, T, V]
    return F.cross_entropy(logits[:, :-1, :].reshape(-1, logits.shape[-1]),
                           y[:, 1:].reshape(-1))


HAND_WRITTEN = {
    "slice_shift": _shifted,
    "pad_shift_hf": lambda s, h, y: F.cross_entropy(
        s.lm_head(h).float().view(-1, 50),
        F.pad(y, (0, 1), value=-100)[..., 1:].contiguous().view(-1), ignore_index=-100),
    "module_smoothing_ignore": lambda s, h, y: s.ce(s.lm_head(h).flatten(0, 1),
                                                    torch.where(y < 0, -1, y).flatten()),
    "sum_over_count": lambda s, h, y: F.cross_entropy(
        s.lm_head(h).view(-1, 50), y.view(-1), reduction="sum") / 7,
    "matmul_weight_T": lambda s, h, y: F.cross_entropy((h @ s.lm_head.weight.T).float().view(-1, 50),
                                                        y.view(-1)),
    "matmul_weight_t": lambda s, h, y: F.cross_entropy(
        torch.matmul(h, s.lm_head.weight.t()).reshape(-1, 50), y.reshape(-1)),
    "nll_log_softmax": lambda s, h, y: F.nll_loss(
        F.log_softmax(s.lm_head(h).view(-1, 50).float(), dim=-1), y.view(-1)),
    "softcap_then_scale": lambda s, h, y: F.cross_entropy(
        (2.0 * torch.tanh(s.lm_head(h) / 8.0) * 4.0).view(-1, 50), y.view(-1)),
    "scale_divide": lambda s, h, y: F.cross_entropy((s.lm_head(h) / 3.0).float().view(-1, 50),
                                                    y.view(-1), label_smoothing=0.2),
}


def _check(module, h, y, count=1, compiler="aot_eager", rtol=1e-5, atol=1e-6, **options):
    report = chronicals.explain(module, h, y, chronicals_options={**ONLY, **options})
    assert _lce(report)[0] == count, str(report)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler=compiler, **ONLY,
                                    **options)
    h_e, h_o = h.clone().requires_grad_(), h.clone().requires_grad_()
    loss_e, loss_o = module(h_e, y), optimized(h_o, y)
    torch.testing.assert_close(loss_o, loss_e, rtol=rtol, atol=atol, equal_nan=True)
    loss_e.backward()
    loss_o.backward()
    torch.testing.assert_close(h_o.grad, h_e.grad, rtol=rtol, atol=atol)
    for (name, p_e), p_o in zip(module.named_parameters(), optimized.parameters()):
        torch.testing.assert_close(p_o.grad, p_e.grad, rtol=rtol, atol=atol, msg=name)
    return report


def _inputs(batch_size=2, seq=9, hidden=24, vocab=50, ignore=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch_size, seq, hidden, generator=g)
    y = torch.randint(0, vocab, (batch_size, seq), generator=g)
    if ignore:
        y[0, :3] = -100
    return h, y


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_losses(name):
    _check(Head(HAND_WRITTEN[name]), *_inputs())


def test_bias_and_inductor():
    report = _check(Head(_shifted, bias=True), *_inputs(), compiler="inductor")
    assert "bias" in report.matches[0].detail


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored_matches_eager(reduction):
    """"mean" over zero tokens is nan in eager, and here; the gradients are zero."""
    def fn(s, h, y):
        return F.cross_entropy(s.lm_head(h).view(-1, 50), y.view(-1), reduction=reduction)

    h, y = _inputs()
    y[:] = -100
    _check(Head(fn), h, y)


def test_slice_shift_drops_logits_but_keeps_other_outputs():
    """A module that returns (loss, logits): logits become None in training by default."""
    def fn(s, h, y):
        logits = s.lm_head(h)
        return _shifted_from(logits, y), logits

    module = Head(fn)
    h, y = _inputs()
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager", **ONLY)
    loss, logits = optimized(h.requires_grad_(), y)
    assert logits is None
    torch.testing.assert_close(loss, module(h, y)[0])


def _shifted_from(logits, y):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1))


def test_bf16_parity_at_bf16_tolerance():
    module = Head(HAND_WRITTEN["pad_shift_hf"]).to(torch.bfloat16)
    h, y = _inputs()
    _check(module, h.to(torch.bfloat16), y, rtol=2e-2, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Declines (the original runs; the report says why) and non-candidates
# ---------------------------------------------------------------------------------------------
DECLINES = {
    "class weights": lambda s, h, y: F.cross_entropy(s.lm_head(h).view(-1, 50), y.view(-1),
                                                     weight=torch.ones(50)),
    "reduction='none'": lambda s, h, y: F.cross_entropy(s.lm_head(h).view(-1, 50), y.view(-1),
                                                        reduction="none").mean(),
    "is a tensor, not a constant": lambda s, h, y: F.cross_entropy(
        (s.lm_head(h) * s.lm_head.weight.norm()).view(-1, 50), y.view(-1)),
    "soft-cap form not understood": lambda s, h, y: F.cross_entropy(
        torch.tanh(torch.tanh(s.lm_head(h))).view(-1, 50), y.view(-1)),
    "between the linear and the loss": lambda s, h, y: F.cross_entropy(
        torch.sigmoid(s.lm_head(h)).view(-1, 50), y.view(-1)),
    "probability targets": lambda s, h, y: F.cross_entropy(
        s.lm_head(h).view(-1, 50), F.one_hot(y.clamp(min=0).view(-1), 50).float()),
}


@pytest.mark.parametrize("reason", sorted(DECLINES))
def test_declines(reason):
    module = Head(DECLINES[reason])
    h, y = _inputs()
    report = chronicals.explain(module, h, y, chronicals_options=ONLY)
    count, declines = _lce(report)
    assert count == 0 and any(reason in d for d in declines), str(report)
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="eager", **ONLY)
    torch.testing.assert_close(optimized(h, y), module(h, y))


def test_logits_used_elsewhere_is_declined_not_recomputed():
    """The "computed anyway" case: the logits also feed another value of the graph."""
    module = Head(lambda s, h, y: (lambda x: F.cross_entropy(x.view(-1, 50), y.view(-1))
                                   + x.argmax(-1).float().mean())(s.lm_head(h)))
    count, declines = _lce(chronicals.explain(module, *_inputs(), chronicals_options=ONLY))
    assert count == 0 and "also feed" in declines[0]


def test_float64_declines():
    module = Head(HAND_WRITTEN["sum_over_count"]).double()
    h, y = _inputs()
    count, declines = _lce(chronicals.explain(module, h.double(), y, chronicals_options=ONLY))
    assert count == 0 and "float64" in declines[0]


LOOK_ALIKES = {
    # a cross-entropy of something that is no linear layer's output
    "ce_of_input": lambda s, h, y: F.cross_entropy(h.reshape(-1, 24), y.view(-1).clamp(0, 23)),
    # a linear whose output the loss never sees directly: a sum is taken first
    "no_ce": lambda s, h, y: -F.log_softmax(s.lm_head(h), -1).mean(),
}


@pytest.mark.parametrize("name", sorted(LOOK_ALIKES))
def test_look_alikes_are_not_candidates(name):
    module = Head(LOOK_ALIKES[name])
    h, y = _inputs()
    assert _lce(chronicals.explain(module, h, y, chronicals_options=ONLY)) == (0, [])


def test_pass_can_be_turned_off():
    model = twins("llama")[0]
    report = chronicals.explain(model, **batch(), chronicals_options={"passes": ("rmsnorm",)})
    assert _lce(report) == (0, [])


def test_logits_of_all_vocab_slice_is_not_matched():
    """Slicing the vocabulary (logits[..., :40]) changes the softmax: declined, never rewritten."""
    def fn(s, h, y):
        return F.cross_entropy(s.lm_head(h)[..., :40].reshape(-1, 40), y.view(-1).clamp(-100, 39))

    module = Head(fn)
    h, y = _inputs()
    report = chronicals.explain(module, h, y, chronicals_options=ONLY)
    count, declines = _lce(report)
    assert count == 0 and "vocabulary" in declines[0]


# ---------------------------------------------------------------------------------------------
# Which op: gradients in the forward when a gradient is needed, else the forward only
# ---------------------------------------------------------------------------------------------
def _ops_in(gm_list):
    targets = [n.target for gm in gm_list for n in gm.graph.nodes if n.op == "call_function"]
    return ([t for t in targets if t is torch.ops.chronicals.linear_cross_entropy.default],
            [t for t in targets
             if t is torch.ops.chronicals.linear_cross_entropy_grad_in_forward.default])


def test_training_gets_gradients_in_the_forward_evaluation_the_forward_only(monkeypatch):
    graphs = keep_rewritten_graphs(monkeypatch)
    module = Head(_shifted)
    h, y = _inputs()
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager",
                                    **ONLY)
    optimized(h.clone().requires_grad_(), y)
    [match] = chronicals.report_of(optimized).matches
    assert "gradients in the forward (hidden, weight)" in match.detail
    assert [len(ops) for ops in _ops_in(graphs)] == [0, 1]
    with torch.no_grad():
        loss = optimized(h, y)
    assert "forward only" in chronicals.report_of(optimized).matches[-1].detail
    assert [len(ops) for ops in _ops_in(graphs[1:])] == [1, 0]
    torch.testing.assert_close(loss, module(h, y))


def test_frozen_head_computes_the_hidden_gradient_only():
    """LoRA-style: lm_head frozen, the hidden states train."""
    module = Head(_shifted, bias=True)
    module.lm_head.requires_grad_(False)
    h, y = _inputs()
    report = chronicals.explain(module, h.requires_grad_(), y, chronicals_options=ONLY)
    assert "gradients in the forward (hidden)" in report.matches[0].detail
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler="aot_eager",
                                    **ONLY)
    h_e, h_o = h.detach().clone().requires_grad_(), h.detach().clone().requires_grad_()
    module(h_e, y).backward()
    optimized(h_o, y).backward()
    torch.testing.assert_close(h_o.grad, h_e.grad, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in optimized.parameters())


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_loss_scaled_after_the_op(compiler):
    """The loss is not the graph's last value (loss · 0.5 inside, / 4 outside): the op's saved
    grads are scaled by the upstream gradient."""
    module = Head(lambda s, h, y: _shifted(s, h, y) * 0.5)
    h, y = _inputs()
    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler=compiler, **ONLY)
    h_e, h_o = h.clone().requires_grad_(), h.clone().requires_grad_()
    (module(h_e, y) / 4).backward()
    (optimized(h_o, y) / 4).backward()
    torch.testing.assert_close(h_o.grad, h_e.grad, rtol=1e-5, atol=1e-6)
    for p_e, p_o in zip(module.parameters(), optimized.parameters()):
        torch.testing.assert_close(p_o.grad, p_e.grad, rtol=1e-5, atol=1e-6)


def test_checkpointed_head():
    """lm_head and the loss inside torch.utils.checkpoint: the op in the checkpointed region is
    run again in the backward (its gradients recomputed), and the result equals eager's."""
    import torch.utils.checkpoint as cp

    module = Head(lambda s, h, y: cp.checkpoint(_shifted, s, h, y, use_reentrant=False))
    h, y = _inputs()
    _check(module, h, y)
