"""Tiny random Hugging Face causal LMs built from configs (no downloads), and parity checks."""

from __future__ import annotations

import copy
import types

import torch
import transformers

# family -> (config class, expected RMSNorm sites per layer, extra sites, config overrides)
_COMMON = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    # 2 per layer (input, post-attention) + the final norm
    "llama": ("LlamaConfig", 2, 1, {}),
    "qwen2": ("Qwen2Config", 2, 1, {}),
    "mistral": ("MistralConfig", 2, 1, {"head_dim": 12}),
    "gemma": ("GemmaConfig", 2, 1, {"head_dim": 12}),
    "phi3": ("Phi3Config", 2, 1, {"pad_token_id": 0}),
    # + per-head q_norm and k_norm in every layer
    "qwen3": ("Qwen3Config", 4, 1, {"head_dim": 12}),
}


def tiny_causal_lm(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer random model of ``family`` in fp32, eager or sdpa attention, dropout off."""
    config_name, _, _, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    # Norm weights start at exactly 1 (or 0 for Gemma's 1 + w): move them, so a kernel that
    # ignores the weight cannot pass.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def expected_rmsnorm_count(family: str) -> int:
    _, per_layer, extra, _ = FAMILIES[family]
    return per_layer * _COMMON["num_hidden_layers"] + extra


def batch(vocab: int = 96, batch_size: int = 2, seq: int = 16, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, seq), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def loss_and_grads(model: torch.nn.Module, inputs: dict):
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_same_training_signal(eager: torch.nn.Module, optimized: torch.nn.Module, inputs: dict,
                                rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Loss and every parameter gradient of ``optimized`` equal ``eager``'s (fp32)."""
    loss_e, grads_e = loss_and_grads(eager, inputs)
    loss_o, grads_o = loss_and_grads(optimized, inputs)
    torch.testing.assert_close(loss_o, loss_e, rtol=rtol, atol=atol)
    assert grads_e.keys() == grads_o.keys()
    for name in grads_e:
        assert grads_e[name].abs().sum() > 0 or name.endswith("bias"), f"zero grad for {name}"
        torch.testing.assert_close(grads_o[name], grads_e[name], rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def twins(family: str, **overrides):
    model = tiny_causal_lm(family, **overrides)
    return model, copy.deepcopy(model)


def optimized_matches_eager(module: torch.nn.Module, *args, rtol: float = 1e-5, atol: float = 1e-6,
                            compiler: str = "aot_eager", **options) -> torch.nn.Module:
    """Optimize a copy of ``module``; assert its output and the gradients of the first input and
    of every parameter equal eager's. Returns the optimized copy (for its report)."""
    import chronicals

    optimized = chronicals.optimize(copy.deepcopy(module), strict=True, compiler=compiler, **options)
    x_e = args[0].detach().clone().requires_grad_()
    x_o = args[0].detach().clone().requires_grad_()
    y_e, y_o = module(x_e, *args[1:]), optimized(x_o, *args[1:])
    assert y_o.dtype == y_e.dtype and y_o.shape == y_e.shape
    torch.testing.assert_close(y_o, y_e, rtol=rtol, atol=atol)
    dy = torch.randn_like(y_e)
    y_e.backward(dy)
    y_o.backward(dy)
    torch.testing.assert_close(x_o.grad, x_e.grad, rtol=rtol, atol=atol)
    for (name, p_e), p_o in zip(module.named_parameters(), optimized.parameters()):
        torch.testing.assert_close(p_o.grad, p_e.grad, rtol=rtol, atol=atol, msg=name)
    return optimized


def keep_rewritten_graphs(monkeypatch) -> list:
    """A list that collects every graph the backend rewrites from now on (after its passes)."""
    import chronicals_fx.backend

    graphs = []
    run_pipeline = chronicals_fx.backend.run_pipeline

    def keep(gm, config):
        report = run_pipeline(gm, config)
        graphs.append(gm)
        return report

    monkeypatch.setattr(chronicals_fx.backend, "run_pipeline", keep)
    return graphs


class SquareLoss(torch.nn.Module):
    """The smallest model a :class:`chronicals_fx.workload.Trainer` steps (it reads
    ``model(**batch).loss``): a [4 → 4] linear, the loss the mean square of its output."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(4, 4)

    def forward(self, input_ids, labels):
        return types.SimpleNamespace(loss=self.inner(input_ids).pow(2).mean())
