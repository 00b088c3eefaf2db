"""The public surface: optimize in place, explain, the backend by name, options, PEFT."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

import chronicals
from tests.tiny_models import assert_same_training_signal, batch, tiny_causal_lm


def test_optimize_is_in_place_and_keeps_state_dict_and_modes(tmp_path):
    model = tiny_causal_lm("llama")
    keys = list(model.state_dict())
    same = chronicals.optimize(model, compiler="aot_eager")
    assert same is model and type(model).__name__ == "LlamaForCausalLM"
    inputs = batch()
    model(**inputs).loss.backward()
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix
    model.eval()
    with torch.no_grad():
        eval_loss = model(**inputs).loss
    model.train()
    assert torch.isfinite(eval_loss)
    # checkpoints round-trip through a fresh, unoptimized model
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    fresh = tiny_causal_lm("llama", seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pt"))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    # one graph for training, one recompiled for eval mode: the report holds both
    report = chronicals.report_of(model)
    assert report.graphs == 2 and report.counts["rmsnorm"] == 2 * 5


def test_backend_by_name_without_import():
    code = (
        "import sys, torch\n"
        "assert 'chronicals_fx' not in sys.modules\n"
        "f = torch.compile(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),"
        " backend='chronicals', options={'compiler': 'eager'})\n"
        "x, w = torch.randn(3, 8), torch.randn(8)\n"
        "y = f(x, w)\n"
        "from chronicals_fx.backend import RECENT_REPORTS\n"
        "assert RECENT_REPORTS[-1].counts['rmsnorm'] == 1, RECENT_REPORTS[-1]\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_options_are_validated():
    with pytest.raises(ValueError, match="unknown pass"):
        chronicals.optimize(torch.nn.Linear(2, 2), passes=("rmsnorm", "layernorm"))
    with pytest.raises(ValueError, match="compiler"):
        chronicals.Config(compiler="tvm")
    with pytest.raises(ValueError, match="attention_backend"):
        chronicals.Config(attention_backend="xformers")
    with pytest.raises(TypeError):
        chronicals.optimize("not a module")
    config = chronicals.Config.from_options({"passes": "rmsnorm", "max_autotune": True})
    assert config.passes == ("rmsnorm",) and config.inductor == {"max_autotune": True}


def test_cuda_graph_outputs_small_ones_are_cloned_out_of_the_pool():
    """Under CUDA graphs the backend hands back its own copies of small outputs (a loss kept
    past the next replay stays valid), leaves large ones and non-tensors as they are, and keeps
    the compiled function's calling convention."""
    from chronicals_fx.backend import SMALL_OUTPUT_NUMEL, owning_small_outputs

    loss, logits = torch.tensor(2.0), torch.zeros(SMALL_OUTPUT_NUMEL + 1)

    def compiled(args):
        return [loss, logits, None]

    compiled._boxed_call = True
    wrapped = owning_small_outputs(compiled)
    out = wrapped([])
    assert wrapped._boxed_call is True
    assert out[0] is not loss and out[0].untyped_storage().data_ptr() != loss.untyped_storage().data_ptr()
    assert torch.equal(out[0], loss)
    assert out[1] is logits and out[2] is None


def test_cuda_graphs_mode_refused_for_fsdp2_models():
    """FSDP2 gathers parameters into new memory each step: CUDA graphs would be recorded
    again every step, so optimize() refuses the mode there with the reason."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        mesh = init_device_mesh("cpu", (1,))   # not the accelerator's, when there is one
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        for cuda_graphs in ({"mode": "reduce-overhead"}, {"mode": "max-autotune"},
                            {"triton.cudagraphs": True}):
            with pytest.raises(ValueError, match="FSDP2"):
                chronicals.optimize(model, **cuda_graphs)
        assert chronicals.optimize(model, mode="reduce-overhead", **{"triton.cudagraphs": False})
        assert chronicals.optimize(model) is model      # the default mode is fine
    finally:
        dist.destroy_process_group()


def test_report_table_lists_every_op():
    report = chronicals.explain(tiny_causal_lm("llama"), **batch())
    assert set(report.counts) == {"rmsnorm", "swiglu", "rope", "attention", "linear_cross_entropy",
                                  "lora", "projections"}
    text = str(report)
    for op in report.counts:
        assert op in text
    assert "model.layers.0.input_layernorm" in text


def _norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w


@torch._dynamo.disable
def _norm_dynamo_skips(x, w):
    return _norm(x, w)


class _NormsAroundASkippedOne(torch.nn.Module):
    def __init__(self, skip: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.skip = skip

    def forward(self, x):
        y = _norm(x, self.w)
        y = (_norm_dynamo_skips if self.skip else _norm)(y.tanh(), self.w)
        return _norm(y.tanh(), self.w).sum()


def test_report_names_dynamos_graph_breaks():
    """A norm Dynamo will not trace (a torch._dynamo.disable'd function, as FSDP2's hooks are) is
    in no graph, so neither matched nor declined: the report lists the graph break and Dynamo's
    reason instead, in its table too. Without the break, all three norms match and none is
    listed."""
    x = torch.randn(2, 4, 16)
    report = chronicals.explain(_NormsAroundASkippedOne(skip=True), x)
    assert report.counts["rmsnorm"] == 2 and report.graphs == 2 and not report.declines
    [(reason, times)] = report.graph_breaks.items()
    assert times == 1 and "skip" in reason
    text = str(report)
    assert "graph breaks" in text and reason.strip().splitlines()[0] in text
    report = chronicals.explain(_NormsAroundASkippedOne(skip=False), x)
    assert report.counts["rmsnorm"] == 3 and report.graphs == 1 and report.graph_breaks == {}


def test_peft_wrapped_model():
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm("qwen2")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                             lora_dropout=0.0)
    eager = peft.get_peft_model(base, config)
    with torch.no_grad():  # B starts at zero: move it so LoRA gradients are non-trivial
        for name, p in eager.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    optimized = copy.deepcopy(eager)
    chronicals.optimize(optimized, strict=True, compiler="aot_eager")
    assert_same_training_signal(eager, optimized, batch())
    assert chronicals.report_of(optimized).counts["rmsnorm"] == 5


def _skip_if_torch_compile_fails_too(eager, prompt, error) -> None:
    """Skip when plain ``torch.compile`` can't compile the same generate either: torch 2.11's
    C++ code generation for the CPU emits an undeclared variable in a gather's bound check
    here (CppCompileError, "'tmp2' was not declared"; it passes with torch 2.13), not ours
    to fix."""
    plain = copy.deepcopy(eager)
    plain.compile()
    torch._dynamo.reset()
    try:
        plain.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    except torch._inductor.exc.InductorError as plain_error:
        pytest.skip(f"plain torch.compile fails here too on torch {torch.__version__}: "
                    f"{str(plain_error).splitlines()[0][:200]} (ours: "
                    f"{str(error).splitlines()[0][:200]})")


def test_generate_after_a_training_step_equals_eager_greedy_decoding():
    """The usual fine-tuning loop samples from the model between steps: ``generate`` (eval
    mode, KV cache, a growing length: new graphs, symbolic shapes) after a training step gives
    eager's greedy tokens."""
    eager = tiny_causal_lm("llama")
    optimized = chronicals.optimize(copy.deepcopy(eager))
    inputs = batch()
    optimized(**inputs).loss.backward()
    eager.eval()
    optimized.eval()
    prompt = inputs["input_ids"][:, :8]
    with torch.no_grad():
        expected = eager.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        try:
            got = optimized.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        except torch._inductor.exc.InductorError as error:
            _skip_if_torch_compile_fails_too(eager, prompt, error)
            raise
    assert got.shape == (2, 14)
    assert torch.equal(got, expected)
    report = chronicals.report_of(optimized)
    assert report.graphs >= 2 and report.counts["rmsnorm"] >= 10
