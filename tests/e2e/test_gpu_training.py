"""Short bf16 training runs on the GPU: the optimized model trains like eager."""

from __future__ import annotations

import pytest
import torch

import chronicals
from chronicals_fx.workload import build_model, byte_batches, train


@pytest.mark.gpu
def test_tiny_llama_bf16_trains_like_eager_on_gpu():
    runs = {}
    for variant in ("eager", "chronicals"):
        model = build_model("tiny-llama", dtype=torch.bfloat16, device="cuda")
        if variant == "chronicals":
            chronicals.optimize(model, strict=True)
        runs[variant] = train(model, byte_batches(8, 256, device="cuda"), 30, lr=1e-3)
    eager, ours = runs["eager"], runs["chronicals"]
    assert not ours.proof_of_training(), ours.proof_of_training()
    assert ours.losses[-1] < ours.losses[0] - 0.5          # it learned
    # bf16 tolerance: per-step losses agree to 2% (rounding differences compound over steps)
    for a, b in zip(eager.losses, ours.losses):
        assert abs(a - b) <= 0.02 * abs(a), (eager.losses, ours.losses)
    assert chronicals.report_of(model).counts["rmsnorm"] == 9


@pytest.mark.gpu
def test_cuda_graphs_mode_trains_like_eager_and_keeps_last_steps_losses():
    """``mode="reduce-overhead"``: the training loop keeps every step's ``loss.detach()`` and
    reads them at the end (CUDA graph outputs would have been overwritten: the backend clones
    small outputs), and the run matches eager."""
    runs = {}
    for variant in ("eager", "chronicals"):
        model = build_model("tiny-llama", dtype=torch.bfloat16, device="cuda")
        if variant == "chronicals":
            chronicals.optimize(model, strict=True, mode="reduce-overhead")
        runs[variant] = train(model, byte_batches(8, 256, device="cuda"), 20, lr=1e-3)
    eager, ours = runs["eager"], runs["chronicals"]
    assert not ours.proof_of_training(), ours.proof_of_training()
    for a, b in zip(eager.losses, ours.losses):
        assert abs(a - b) <= 0.02 * abs(a), (eager.losses, ours.losses)
    skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    assert skips == 0, dict(torch._dynamo.utils.counters["inductor"])


@pytest.mark.gpu
def test_without_donated_buffers_trains_like_eager_on_gpu():
    """With AOTAutograd's donated buffers off, the SwiGLU backward may not overwrite the saved
    gate and up: the pass gives its in-place kernel fresh buffers instead (the branch torch 2.11
    traced with a plain dict and failed to compile). Same run as with donated buffers, and
    like eager."""
    runs = {}
    for variant in ("eager", "donated", "not donated"):
        model = build_model("tiny-llama", dtype=torch.bfloat16, device="cuda")
        torch._dynamo.reset()
        with torch._functorch.config.patch(donated_buffer=variant != "not donated"):
            if variant != "eager":
                chronicals.optimize(model, strict=True)
            runs[variant] = train(model, byte_batches(8, 256, device="cuda"), 12, lr=1e-3)
        if variant != "eager":
            assert chronicals.report_of(model).counts["swiglu"] == 4
    ours = runs["not donated"]
    assert not ours.proof_of_training(), ours.proof_of_training()
    assert ours.losses == runs["donated"].losses      # the same kernels on the same values
    for a, b in zip(runs["eager"].losses, ours.losses):
        assert abs(a - b) <= 0.02 * abs(a), (runs["eager"].losses, ours.losses)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma", "phi3", "mistral"])
def test_families_bf16_train_like_eager_on_gpu(family, record_property):
    """The convergence suite on the GPU: bf16, Inductor, every pass on, 30 steps of real text.
    The per-step losses go to the JUnit XML (``--junitxml``) for RESULTS.md."""
    from tests.tiny_models import tiny_causal_lm

    runs = {}
    for variant in ("eager", "chronicals"):
        model = tiny_causal_lm(family, vocab_size=256, use_cache=False).to("cuda", torch.bfloat16)
        if variant == "chronicals":
            chronicals.optimize(model, strict=True)
        runs[variant] = train(model, byte_batches(8, 256, device="cuda"), 30, lr=1e-3)
    eager, ours = runs["eager"], runs["chronicals"]
    gaps = [abs(a - b) / abs(a) for a, b in zip(eager.losses, ours.losses)]
    record_property("losses_eager", [round(x, 4) for x in eager.losses])
    record_property("losses_chronicals", [round(x, 4) for x in ours.losses])
    record_property("max_rel_gap", max(gaps))
    record_property("counts", chronicals.report_of(model).counts)
    assert not ours.proof_of_training(), ours.proof_of_training()
    assert ours.losses[-1] < ours.losses[0] - 0.5
    assert max(gaps) <= 0.02, (eager.losses, ours.losses)


@pytest.mark.gpu
def test_lora_pass_trains_like_eager_on_gpu():
    """PEFT LoRA (fp32 adapters on the bf16 model) with the default passes, ``lora`` among them:
    30 steps within bf16 tolerance of eager's fp32-adapter products, and every adapter found."""
    from chronicals_fx.bench import with_lora

    runs = {}
    for variant in ("eager", "chronicals"):
        model = with_lora(build_model("tiny-llama", dtype=torch.bfloat16, device="cuda"), 8)
        if variant == "chronicals":
            chronicals.optimize(model, strict=True)
        runs[variant] = train(model, byte_batches(8, 256, device="cuda"), 30, lr=1e-3)
    eager, ours = runs["eager"], runs["chronicals"]
    assert not ours.proof_of_training(), ours.proof_of_training()
    assert ours.losses[-1] < ours.losses[0] - 0.5
    for a, b in zip(eager.losses, ours.losses):
        assert abs(a - b) <= 0.02 * abs(a), (eager.losses, ours.losses)
    layers = model.get_base_model().config.num_hidden_layers
    assert chronicals.report_of(model).counts["lora"] == 7 * layers


@pytest.mark.gpu
def test_mixture_of_experts_bf16_trains_like_eager_on_gpu(record_property):
    """Mixtral's shape in bf16 on the GPU, where transformers' experts run torch's grouped_mm:
    the gated product of the routed experts is found at every layer, and 30 steps stay within
    bf16 tolerance of eager's (routing by top-k can flip on near ties, so the tolerance is the
    suite's 2%)."""
    from tests.e2e.test_model_zoo import GQA, tiny

    runs = {}
    for variant in ("eager", "chronicals"):
        model = tiny("MixtralConfig", **GQA, vocab_size=256, num_local_experts=4,
                     num_experts_per_tok=2).to("cuda", torch.bfloat16)
        if variant == "chronicals":
            chronicals.optimize(model, strict=True)
        runs[variant] = train(model, byte_batches(8, 256, device="cuda"), 30, lr=1e-3)
    eager, ours = runs["eager"], runs["chronicals"]
    gaps = [abs(a - b) / abs(a) for a, b in zip(eager.losses, ours.losses)]
    counts = chronicals.report_of(model).counts
    record_property("max_rel_gap", max(gaps))
    record_property("counts", counts)
    assert not ours.proof_of_training(), ours.proof_of_training()
    assert ours.losses[-1] < ours.losses[0] - 0.5
    assert max(gaps) <= 0.02, (eager.losses, ours.losses)
    assert counts["swiglu"] == model.config.num_hidden_layers, counts
