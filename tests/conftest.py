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
