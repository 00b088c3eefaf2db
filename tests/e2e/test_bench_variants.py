"""The end-to-end benchmark's variant names: a pass set and backend options per variant."""

import pytest

from chronicals_fx.bench import compile_kwargs, variant_options


def test_variant_names_carry_passes_and_options():
    assert variant_options("chronicals") == {}
    assert variant_options("chronicals:rmsnorm,swiglu") == {"passes": ("rmsnorm", "swiglu")}
    assert variant_options("chronicals:rmsnorm@swiglu_save_hidden=0,attention_backend=cudnn") == {
        "passes": ("rmsnorm",), "swiglu_save_hidden": False, "attention_backend": "cudnn"}
    assert variant_options("chronicals@swiglu_save_hidden=true") == {"swiglu_save_hidden": True}
    with pytest.raises(SystemExit, match="not key=value"):
        variant_options("chronicals@swiglu_save_hidden")
    assert variant_options("compile@mode=reduce-overhead") == {"mode": "reduce-overhead"}
    assert variant_options("chronicals@mode=reduce-overhead,swiglu_save_hidden=0") == {
        "mode": "reduce-overhead", "swiglu_save_hidden": False}


def test_compile_variant_splits_mode_from_inductor_options():
    assert compile_kwargs(variant_options("compile")) == {}
    assert compile_kwargs(variant_options("compile@mode=reduce-overhead")) == {
        "mode": "reduce-overhead"}
    assert compile_kwargs(variant_options("compile@cpp_wrapper=true")) == {
        "options": {"cpp_wrapper": True}}
    with pytest.raises(SystemExit, match="mode or options"):
        compile_kwargs(variant_options("compile@mode=reduce-overhead,cpp_wrapper=1"))


def test_interleaved_run_trains_every_variant_on_the_same_batches(tmp_path):
    """``--interleave``: one process, the timed steps alternated over rounds. Each variant makes
    all its steps on the batches a run of its own reads (eager's losses equal its own run's up
    to float rounding: on a CPU, oneDNN may pick other kernels once another model has run), the
    passes matched, and peak memory is not claimed per variant."""
    import json
    import math

    from chronicals_fx import bench

    common = ["--model", "tiny-llama", "--batch", "2", "--seq", "32", "--steps", "5",
              "--warmup", "1"]
    assert bench.main(common + ["--variants", "eager", "chronicals:rmsnorm", "--interleave", "2",
                                "--json", str(tmp_path / "mixed.json")]) == 0
    assert bench.main(common + ["--variants", "eager", "--json", str(tmp_path / "alone.json")]) == 0
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert "interleaved" in mixed["header"]
    runs = {r["variant"]: r for r in mixed["results"]}
    assert set(runs) == {"eager", "chronicals:rmsnorm"}
    for r in runs.values():
        assert r["problems"] == [] and len(r["losses"]) == 5 and len(r["step_ms"]) == 5
        assert math.isnan(r["peak_gib"])
    assert runs["chronicals:rmsnorm"]["counts"]["rmsnorm"] > 0
    own = alone["results"][0]["losses"]
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(runs["eager"]["losses"], own))


def test_repeated_runs_merge_into_means_and_ranges():
    """``--repeat``: a variant's runs become one row — mean tokens/s with the range of its runs,
    the ratio of means to torch.compile's, every run's losses against eager's; a failed run is
    a problem of the variant, not averaged away."""
    import math

    from chronicals_fx.bench import merged_runs, summary_table

    def run(variant, tps, losses, grad=1.0, warmup=1):
        return {"variant": variant, "tokens_per_s": tps, "losses": losses,
                "step_ms": [99.0] + [1000 / tps] * 2, "warmup_steps": warmup,
                "median_step_ms": 1000 / tps,
                "peak_gib": 2.0, "min_grad_norm": grad, "problems": [], "counts": None}

    results = [run("eager", 50.0, [3.0, 2.0]), run("compile", 100.0, [3.0, 2.0]),
               run("chronicals", 104.0, [3.0, 2.01]), run("compile", 102.0, [3.0, 2.0]),
               run("chronicals", 106.0, [3.0, 2.05], grad=0.5),
               {"variant": "chronicals", "error": "CUDA out of memory"}]
    merged = {r["variant"]: r for r in merged_runs(results)}
    assert merged["eager"]["tokens_per_s"] == 50.0 and "tokens_per_s_range" not in merged["eager"]
    assert merged["compile"]["tokens_per_s"] == 101.0
    assert merged["compile"]["tokens_per_s_range"] == (100.0, 102.0)
    ours = merged["chronicals"]
    assert ours["tokens_per_s"] == 105.0 and ours["min_grad_norm"] == 0.5
    assert ours["runs_losses"] == [[3.0, 2.01], [3.0, 2.05]]
    assert ours["problems"] == ["1 of 3 runs failed: CUDA out of memory"]
    table = summary_table(results)
    row = next(line for line in table.splitlines() if line.startswith("chronicals"))
    assert "104–106, 2 runs" in row and "1.040x" in row   # 105 / 101
    assert " 0.05 " in row                                 # the second run's gap to eager
    assert "1 of 3 runs failed" in row
    # every step a warm-up step (--warmup >= --steps): no timed step, a nan, not a crash
    untimed = merged_runs([run("compile", 100.0, [3.0], warmup=3), run("compile", 90.0, [3.0], warmup=3)])
    assert math.isnan(untimed[0]["median_step_ms"])
    failing = merged_runs([{"variant": "liger", "error": "boom"}] * 2)
    assert failing[0]["error"] == "all 2 runs failed: boom"
