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
