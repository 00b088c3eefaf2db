"""Test setup shared by every test module.

Without CUDA, Triton kernels are tested on CPU tensors through Triton's interpreter; it must
be switched on before any kernel module is imported, hence here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_incompatibility() -> str | None:
    """Why Triton's interpreter can't run the kernel tests here (None: it can). Triton 3.6's
    interpreter converts one-element arrays to Python scalars, which numpy 2.3 turned into an
    error: most kernel tests would fail for that alone (session 22, torch 2.11 + triton 3.6)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton
    from packaging.version import Version

    if (Version(triton.__version__) < Version("3.7")
            and Version(numpy.__version__) >= Version("2.3")):
        return (f"triton {triton.__version__}'s interpreter fails with numpy "
                f"{numpy.__version__} (a one-element array converted to a scalar): install "
                f"numpy<2.3, or torch 2.13 with its triton (scripts/setup.sh does on a machine "
                f"without torch)")
    return None


def pytest_configure(config):
    reason = _interpreter_incompatibility()
    if reason:
        raise pytest.UsageError(reason)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws the same random inputs on every run, whatever ran before it: a failure
    reproduces, and a tolerance is checked against fixed data, not a new draw each time."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entry or recompile count leaks between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
