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
