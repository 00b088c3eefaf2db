"""Model zoo: tiny random Hugging Face families beyond tests/tiny_models.py's FAMILIES, through
the whole pipeline (every default pass, strict=True).

For each family: loss and every parameter gradient equal eager's (fp32); each op's match count
is what the config implies (and the matches sit at the modules the architecture has); what the
kernels must not serve — sliding windows shorter than the sequence, tanh soft-capped scores —
is declined with its reason, never turned into plain causal attention.

Built from configs (no downloads), T = 16 tokens and sliding windows of 4, so windows bind.
Compiled with aot_eager (AOTAutograd traces forward and backward through the ops' registered
autograd, as Inductor would), as the convergence suite does, to stay fast on a CPU.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import transformers

import chronicals
from chronicals_fx.config import OP_NAMES
from tests.tiny_models import assert_same_training_signal, batch

T = 16        # tokens per row of every batch here
WINDOW = 4    # sliding windows bind: WINDOW < T
# tests/tiny_models.py's _COMMON dimensions; GQA (4 query heads over 2 KV heads) and head_dim
# where the family has them. use_cache=False: the training setting (the mask is built in the
# graph, where the attention pass must prove it or decline).
DIMS = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, use_cache=False)
GQA = dict(num_key_value_heads=2, head_dim=12)
SOFTCAP_REASON = "tanh soft-capping of the scores"


def tiny(config_name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random fp32 model of ``config_name`` (skipped where this transformers lacks it), with
    every 1-D parameter (norm weights, biases) moved off its init value, as tiny_causal_lm
    does: a kernel that ignores a norm weight cannot pass."""
    config_class = getattr(transformers, config_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = config_class(**{**DIMS, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def sdpa_masks(model, inputs) -> list[bool]:
    """For each SDPA call of the model's traced forward, in order (one a layer), whether
    transformers hands it a mask. Its versions differ: 5.17 builds the causal mask of a
    full-attention layer (which the attention pass proves causal and replaces: counted), later
    versions pass ``is_causal=True`` with no mask (already the fused kernel: left alone,
    uncounted). Empty under the eager attention implementation."""
    found: list[bool] = []

    def capture(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in SDPA:
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                found.append(mask is not None)
        return gm

    torch.compile(copy.deepcopy(model), backend=capture)(**inputs)
    return found


def torch_compile_graphs(model, inputs) -> int:
    """How many graphs plain torch.compile (aot_eager) compiles for a training step of a copy
    of ``model``."""
    from torch._dynamo.backends.debugging import aot_eager

    torch._dynamo.reset()
    count = [0]

    def counting(gm, example_inputs):
        count[0] += 1
        return aot_eager(gm, example_inputs)

    torch.compile(copy.deepcopy(model), backend=counting)(**inputs).loss.backward()
    torch._dynamo.reset()
    return count[0]


SDPA = (torch.nn.functional.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


def window_of(config, layer: int) -> int | None:
    """The sliding window layer ``layer`` attends within; None for full attention."""
    types = getattr(config, "layer_types", None)
    if types and types[layer] == "sliding_attention":
        return config.sliding_window
    return None


# ---------------------------------------------------------------------------------------------
# What each architecture implies
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    config: str
    overrides: dict
    norms_per_layer: int          # RMSNorm modules in each decoder layer
    final_norm: bool = True       # an RMSNorm after the last layer
    # where each layer's gated products act(gate) * up sit (one swiglu site each), under it
    gated: tuple[str, ...] = ("mlp",)
    # skipped where torch.compile alone can't capture this transformers' model in one graph
    # (the experts' fallback op of some versions can't be traced backward: transformers 5.17)
    one_graph_probe: bool = False
    # where each layer's groups of narrow projections of one input sit (the first projection's
    # module; one projections site each): q/k/v, unless a q/k norm reads q and k directly
    projections: tuple[str, ...] = ("self_attn.q_proj",)
    layers: str = "model.layers"  # module path of the decoder layers
    attn: str = "self_attn"       # attention module's name inside a layer
    # (op, where-suffix, text): every match of op at a module ending in where-suffix has text
    # in its detail (and there is at least one such match)
    details: Callable[[object], list[tuple[str, str, str]]] = field(default=lambda c: [])


FAMILIES = {
    # 4 norms a layer (input, post-attention, pre- and post-feedforward; Gemma's 1 + w), GeGLU
    # (tanh GELU), sliding window on even layers, tanh soft-capping of the attention scores
    # (every layer declines) and of the final logits (fused into the loss).
    "gemma2": Family("Gemma2Config", dict(GQA, sliding_window=WINDOW,
                                          attn_logit_softcapping=50.0,
                                          final_logit_softcapping=30.0),
                     norms_per_layer=4,
                     details=lambda c: [("linear_cross_entropy", "lm_head",
                                         f"softcap={c.final_logit_softcapping:g}"),
                                        ("rmsnorm", "norm", "weight 1+w"),
                                        ("swiglu", "mlp", "gelu_tanh")]),
    # The same without score soft-capping: the full-attention layer is proven causal, the
    # sliding one (window 4 < 16 tokens) declines. Gemma 2 runs eager attention (SDPA under
    # transformers 5.17, which then drops the score soft-capping of the family above too).
    "gemma2_no_score_softcap": Family("Gemma2Config", dict(GQA, sliding_window=WINDOW,
                                                           attn_logit_softcapping=None,
                                                           final_logit_softcapping=30.0),
                                      norms_per_layer=4,
                                      details=lambda c: [("attention", "self_attn",
                                                          c._attn_implementation)]),
    # Gemma 3 text: Gemma 2's 4 norms + per-head q_norm and k_norm (over head_dim) a layer;
    # a sliding and a full layer (the default pattern, 5 sliding : 1 full, would make both of
    # 2 layers sliding); local and global RoPE bases.
    "gemma3": Family("Gemma3TextConfig", dict(GQA, sliding_window=WINDOW,
                                              layer_types=["sliding_attention",
                                                           "full_attention"]),
                     norms_per_layer=6,
                     details=lambda c: [("rmsnorm", "q_norm", f"H={c.head_dim},"),
                                        ("rmsnorm", "k_norm", f"H={c.head_dim},"),
                                        ("rmsnorm", "norm", "weight 1+w")]),
    # OLMo 2: no input norm; post-attention and post-feedforward norms, and q_norm / k_norm over
    # the whole q / k projection (heads · head_dim), not per head.
    "olmo2": Family("Olmo2Config", dict(GQA, eos_token_id=2), norms_per_layer=4, projections=(),
                    details=lambda c: [
                        ("rmsnorm", "q_norm", f"H={c.num_attention_heads * c.head_dim},"),
                        ("rmsnorm", "k_norm", f"H={c.num_key_value_heads * c.head_dim},")]),
    # Granite: Llama's layout with multipliers on the embeddings, the residual branches and the
    # scores, and logits divided by logits_scaling (a constant scale folded into the loss).
    "granite": Family("GraniteConfig", dict(GQA, embedding_multiplier=2.0, residual_multiplier=0.5,
                                            attention_multiplier=0.1, logits_scaling=4.0),
                      norms_per_layer=2,
                      details=lambda c: [("linear_cross_entropy", "lm_head",
                                          f"scale={1 / c.logits_scaling:g}")]),
    # GPT-NeoX: LayerNorm (with bias, mean-centred: not an RMSNorm), a non-gated GELU MLP,
    # fused QKV, no GQA, rotary on a fraction of head_dim: only RoPE, attention and the loss.
    "gpt_neox": Family("GPTNeoXConfig",
                       dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.5}),
                       norms_per_layer=0, final_norm=False, gated=(), projections=(),
                       layers="gpt_neox.layers", attn="attention",
                       details=lambda c: [("rope", "attention", "partial R=%d" % int(
                           c.hidden_size // c.num_attention_heads
                           * c.rope_parameters["partial_rotary_factor"]))]),
    # HunYuan: q/k norms applied to RoPE's result (its final sum is the norm's input, not a
    # residual add to fuse: RoPE is matched first).
    "hunyuan": Family("HunYuanDenseV1Config", dict(GQA), norms_per_layer=4,
                      details=lambda c: [("rope", "self_attn", "rotate-half")]),
    # Ernie 4.5: interleaved RoPE in fp32, x and rotate(x) widened by casts of their own.
    "ernie4_5": Family("Ernie4_5Config", dict(GQA), norms_per_layer=2,
                       details=lambda c: [("rope", "self_attn", "interleaved")]),
    # Mixtures of experts (transformers' experts layer, default "grouped_mm" implementation):
    # each expert's gate/up is one grouped matmul of the tokens routed to it, chunked, and
    # act(gate) * up is the gated product of all experts at once (fp32 here: transformers'
    # fallback op; bf16 on a GPU: torch's grouped_mm). Qwen2-MoE adds a shared expert, an
    # ordinary gated MLP beside the routed ones.
    "mixtral": Family("MixtralConfig", dict(GQA, num_local_experts=4, num_experts_per_tok=2),
                      norms_per_layer=2, gated=("mlp.experts",), one_graph_probe=True,
                      details=lambda c: [("swiglu", "experts", "fused gate/up projection"),
                                         ("swiglu", "experts", "experts of a mixture")]),
    "qwen3_moe": Family("Qwen3MoeConfig", dict(GQA, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=40),
                        norms_per_layer=4, gated=("mlp.experts",), one_graph_probe=True,
                        details=lambda c: [("swiglu", "experts", "experts of a mixture")]),
    "olmoe": Family("OlmoeConfig", dict(GQA, num_experts=4, num_experts_per_tok=2,
                                        eos_token_id=2),
                    norms_per_layer=4, gated=("mlp.experts",), one_graph_probe=True,
                    projections=()),
    "qwen2_moe": Family("Qwen2MoeConfig", dict(GQA, num_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=40,
                                               shared_expert_intermediate_size=64),
                        norms_per_layer=2, gated=("mlp.experts", "mlp.shared_expert"),
                        one_graph_probe=True,
                        details=lambda c: [("swiglu", "experts", "experts of a mixture")]),
    # Qwen2 with its sliding window on layers from max_window_layers on: layer 0 full
    # (proven causal), layer 1 a window of 4 (declined). SDPA (the default) and eager.
    "qwen2_sliding": Family("Qwen2Config", dict(GQA, use_sliding_window=True,
                                                sliding_window=WINDOW, max_window_layers=1),
                            norms_per_layer=2),
    "qwen2_sliding_eager": Family("Qwen2Config", dict(GQA, use_sliding_window=True,
                                                      sliding_window=WINDOW, max_window_layers=1,
                                                      attn_implementation="eager"),
                                  norms_per_layer=2,
                                  details=lambda c: [("attention", "self_attn", "eager")]),
}


@dataclass
class Expected:
    counts: dict[str, int]
    declined_counts: dict[str, int]
    where: dict[str, list[str]]                  # op -> module paths of its matches, sorted
    declined: dict[str, tuple[str, ...]]         # attention module -> acceptable reasons


def expected(family: Family, config, masks: list[bool]) -> Expected:
    """Counts and sites from the config (RMSNorm sites are cross-checked against the model's
    modules by the caller) and, under SDPA, from which layers transformers hands a mask
    (``masks``, :func:`sdpa_masks`): an unmasked causal SDPA is left alone, uncounted."""
    L = config.num_hidden_layers
    layers = [f"{family.layers}.{i}" for i in range(L)]
    attn = [f"{layer}.{family.attn}" for layer in layers]
    sdpa = config._attn_implementation == "sdpa"
    assert len(masks) == (L if sdpa else 0), masks
    declined: dict[str, tuple[str, ...]] = {}
    for i, where in enumerate(attn):
        reasons = []
        if getattr(config, "attn_logit_softcapping", None) and not sdpa:  # SDPA drops it
            reasons.append(SOFTCAP_REASON)
        w = window_of(config, i)
        if w is not None and w < T:
            reasons.append(f"sliding window of {w} tokens")
        if reasons:
            declined[where] = tuple(reasons)
    matched_attn = [a for i, a in enumerate(attn) if a not in declined and (not sdpa or masks[i])]
    rmsnorm = family.norms_per_layer * L + int(family.final_norm)
    counts = dict.fromkeys(OP_NAMES, 0)
    counts.update(rmsnorm=rmsnorm, swiglu=L * len(family.gated), rope=L,
                  attention=len(matched_attn), linear_cross_entropy=1,
                  projections=L * len(family.projections))
    declined_counts = dict.fromkeys(OP_NAMES, 0)
    declined_counts["attention"] = len(declined)
    where = {"swiglu": sorted(f"{layer}.{g}" for layer in layers for g in family.gated),
             "rope": sorted(attn), "attention": sorted(matched_attn),
             "linear_cross_entropy": ["lm_head"], "lora": [],
             "projections": sorted(f"{layer}.{p}" for layer in layers for p in family.projections)}
    return Expected(counts, declined_counts, where, declined)


def rmsnorm_modules(model) -> list[str]:
    return sorted(name for name, m in model.named_modules() if type(m).__name__.endswith("RMSNorm"))


def check_report(report, exp: Expected, model, family: Family) -> None:
    text = str(report)
    assert report.graphs == 1, text
    assert report.counts == exp.counts, text
    assert report.declined_counts == exp.declined_counts, text
    # the architecture's RMSNorm modules are exactly the rmsnorm sites
    norms = rmsnorm_modules(model)
    assert len(norms) == exp.counts["rmsnorm"], norms
    sites = {op: sorted(m.where for m in report.matches if m.op == op) for op in OP_NAMES}
    assert sites["rmsnorm"] == norms, text
    for op, where in exp.where.items():
        assert sites[op] == where, (op, text)
    for d in report.declines:
        assert d.op == "attention" and d.where in exp.declined, text
        assert any(r in d.reason for r in exp.declined[d.where]), (d, text)
    for op, suffix, detail in family.details(model.config):
        found = [m for m in report.matches if m.op == op and m.where.endswith(suffix)]
        assert found, (op, suffix, text)
        for m in found:
            assert detail in m.detail, (m, detail)


# ---------------------------------------------------------------------------------------------
# Every family: parity, exact counts, declines with reasons
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_parity_counts_and_declines(name):
    family = FAMILIES[name]
    eager = tiny(family.config, **family.overrides)
    graphs = torch_compile_graphs(eager, batch(seq=T)) if family.one_graph_probe else 1
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager")
    inputs = batch(seq=T)
    assert_same_training_signal(eager, optimized, inputs)
    if graphs != 1:   # parity holds; the counts below assume one graph
        pytest.skip(f"transformers {transformers.__version__}: torch.compile alone captures "
                    f"{family.config}'s model in {graphs} graphs (parity checked, counts not)")
    check_report(chronicals.report_of(optimized),
                 expected(family, eager.config, sdpa_masks(eager, inputs)), eager, family)
    # the fused loss drops the [N, V] logits in training
    assert optimized(**inputs).logits is None


# ---------------------------------------------------------------------------------------------
# Sliding windows: the windows above bind at this length (so parity above would catch a window
# served as plain causal attention); a window as long as the sequence is plain causal, one
# token shorter is not.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gemma2_no_score_softcap", "gemma3", "qwen2_sliding"])
def test_windows_bind_at_this_length(name):
    family = FAMILIES[name]
    inputs = batch(seq=T)
    windowed = tiny(family.config, **family.overrides)
    unbound = tiny(family.config, **{**family.overrides, "sliding_window": T})
    loss_w, loss_u = windowed(**inputs).loss, unbound(**inputs).loss
    assert (loss_w - loss_u).abs() > 1e-3, (loss_w, loss_u)


@pytest.mark.parametrize("window,causal", [(T, True), (T - 1, False)])
def test_qwen2_window_against_sequence_length(window, causal):
    """Every layer sliding (max_window_layers=0): i − j ≤ w − 1 always holds for w = T (a
    redundant window: plain causal), and fails at (T − 1, 0) for w = T − 1 (declined)."""
    eager = tiny("Qwen2Config", **GQA, use_sliding_window=True, sliding_window=window,
                 max_window_layers=0)
    assert [window_of(eager.config, i) for i in range(2)] == [window, window]
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager")
    assert_same_training_signal(eager, optimized, batch(seq=T))
    report = chronicals.report_of(optimized)
    layers = ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    if causal:
        assert [m.where for m in report.matches if m.op == "attention"] == layers, str(report)
        assert all("mask proven causal" in m.detail for m in report.matches
                   if m.op == "attention"), str(report)
        assert not report.declines, str(report)
    else:
        assert report.counts["attention"] == 0, str(report)
        assert [(d.op, d.where) for d in report.declines] == [("attention", w) for w in layers]
        assert all(f"sliding window of {window} tokens" in d.reason for d in report.declines)


def test_qwen2_sliding_with_kv_cache_config_default():
    """use_cache=True (the config's default, also in training): transformers hands the full
    layer's SDPA is_causal=True with no mask and native GQA — already the fused kernel, left
    alone uncounted (passes/attention.py) — or, in 5.17, a causal mask it builds (proven and
    replaced: counted); and builds the sliding layer's mask in the graph: declined, never
    served as causal."""
    eager = tiny("Qwen2Config", **GQA, use_sliding_window=True, sliding_window=WINDOW,
                 max_window_layers=1, use_cache=True)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager")
    assert_same_training_signal(eager, optimized, batch(seq=T))
    report = chronicals.report_of(optimized)
    full_layer_masked, sliding_layer_masked = sdpa_masks(eager, batch(seq=T))
    assert sliding_layer_masked
    assert report.counts["attention"] == int(full_layer_masked), str(report)
    assert all("mask proven causal" in m.detail for m in report.matches if m.op == "attention")
    [decline] = report.declines
    assert decline.where == "model.layers.1.self_attn", str(report)
    assert f"sliding window of {WINDOW} tokens" in decline.reason, str(report)
    assert report.counts["rmsnorm"] == 5 and report.counts["swiglu"] == 2, str(report)
    assert report.counts["rope"] == 2 and report.counts["linear_cross_entropy"] == 1, str(report)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_keep_every_pass_but_attention_and_equal_eager(side):
    """SFT without packing: an attention_mask with padding and -100 labels under the pads. The
    padding mask is a runtime tensor the attention pass cannot prove, so attention declines
    with the reason and the original runs; every other pass matches, and loss and every
    gradient equal eager's."""
    from tests.tiny_models import tiny_causal_lm

    eager = tiny_causal_lm("qwen2", use_cache=False)
    optimized = chronicals.optimize(copy.deepcopy(eager), strict=True, compiler="aot_eager")
    inputs = batch()
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, -5:] = 0 if side == "right" else 1
    mask[0, :5] = 0 if side == "left" else 1
    padded = {"input_ids": inputs["input_ids"], "attention_mask": mask,
              "labels": inputs["labels"].masked_fill(mask == 0, -100)}
    assert_same_training_signal(eager, optimized, padded)
    report = chronicals.report_of(optimized)
    assert report.counts == {"rmsnorm": 5, "swiglu": 2, "rope": 2, "attention": 0,
                             "linear_cross_entropy": 1, "lora": 0, "projections": 2}
    reasons = [d.reason for d in report.declines]
    assert len(reasons) == 2 and all("attention_mask" in r for r in reasons), reasons


def test_gpt_oss_rotary_halves_and_parity():
    """GPT-OSS: RoPE spelled on the halves with tables of one angle per pair (matched, q and k of
    every layer); its clamped gated activation and its attention sinks are not candidates. Loss
    and every gradient equal eager's."""
    eager = tiny("GptOssConfig", **GQA, num_local_experts=4, num_experts_per_tok=2)
    graphs = torch_compile_graphs(eager, batch(seq=T))
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager")
    assert_same_training_signal(eager, optimized, batch(seq=T))
    if graphs != 1:   # parity holds; the counts below assume one graph
        pytest.skip(f"transformers {transformers.__version__}: torch.compile alone captures "
                    f"GPT-OSS in {graphs} graphs (parity checked, counts not)")
    report = chronicals.report_of(optimized)
    rope = [m for m in report.matches if m.op == "rope"]
    layers = eager.config.num_hidden_layers
    assert len(rope) == layers and all("halves, 2 tensor(s)" in m.detail for m in rope), report
    assert report.counts["swiglu"] == 0 and not report.declines, report


# ---------------------------------------------------------------------------------------------
# Two models in one process: transformers' models share their forward's wrapper, so Dynamo's
# second compile of it makes a float that differs (eps) a graph input; the norms that read it
# decline, saying why and what keeps floats constant.
# ---------------------------------------------------------------------------------------------
SECOND_MODEL = {   # config, the float that differs, its two values, the op reading it, sites
    "llama_eps": ("LlamaConfig", "rms_norm_eps", (1e-6, 1e-5), "rmsnorm",
                  2 * DIMS["num_hidden_layers"] + 1),
    "granite_logit_scale": ("GraniteConfig", "logits_scaling", (4.0, 8.0),
                            "linear_cross_entropy", 1),
}


@pytest.mark.parametrize("specialize_float", [False, True])
@pytest.mark.parametrize("case", list(SECOND_MODEL))
def test_second_model_with_another_float(case, specialize_float):
    config, field, values, op, sites = SECOND_MODEL[case]
    with torch._dynamo.config.patch(specialize_float=specialize_float):
        reports = []
        for value in values:
            model = tiny(config, **{field: value})
            chronicals.optimize(model, strict=True, compiler="aot_eager")
            model(**batch(seq=T)).loss.backward()
            reports.append(chronicals.report_of(model))
    first, second = reports
    assert first.counts[op] == sites and not first.declines
    if specialize_float:
        assert second.counts[op] == sites and not second.declines
    else:
        assert second.counts[op] == 0
        assert len(second.declines) == sites and all(
            d.op == op and "specialize_float = True" in d.reason for d in second.declines)
