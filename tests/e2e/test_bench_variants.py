"""The end-to-end benchmark's variant names: a pass set and backend options per variant."""

import pytest

from chronicals_fx.bench import chronicals_options


def test_variant_names_carry_passes_and_options():
    assert chronicals_options("chronicals") == {}
    assert chronicals_options("chronicals:rmsnorm,swiglu") == {"passes": ("rmsnorm", "swiglu")}
    assert chronicals_options("chronicals:rmsnorm@swiglu_save_hidden=0,attention_backend=cudnn") == {
        "passes": ("rmsnorm",), "swiglu_save_hidden": False, "attention_backend": "cudnn"}
    assert chronicals_options("chronicals@swiglu_save_hidden=true") == {"swiglu_save_hidden": True}
    with pytest.raises(SystemExit, match="not key=value"):
        chronicals_options("chronicals@swiglu_save_hidden")
