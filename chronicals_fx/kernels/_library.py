"""Opaque ops registered straight on the dispatcher, for ops called many times a step.

``torch.library.custom_op`` wraps every call of its body in Python: an autograd-keyed wrapper,
a redispatch, the dynamo-disable wrapper and a check that no output aliases an input
(ANCHORS.md: 51 µs a call inside a compiled graph against 9 for a ``triton_op``; on a CPU here
10.5 µs against 3.4 for the same body registered as below). The SwiGLU-backward GEMM runs 24
times a step, so it is registered this way: the schema inferred from the annotations as
custom_op does, one implementation for every device (CompositeExplicitAutograd), a fake
implementation for tracing. What this leaves out is custom_op's alias check, so an op made
here must return new tensors only (its tests check that).
"""

from __future__ import annotations

from typing import Callable

import torch

_LIBRARY = torch.library.Library("chronicals", "FRAGMENT")


def opaque_op(name: str, fake: Callable) -> Callable:
    """Decorator: register the function as ``torch.ops.chronicals.<name>`` (no mutated
    arguments; outputs new tensors), with ``fake`` as its fake implementation, and return the
    op (an OpOverload: call it as the function)."""
    def register(fn: Callable):
        _LIBRARY.define(name + torch.library.infer_schema(fn, mutates_args=()))
        _LIBRARY.impl(name, fn, "CompositeExplicitAutograd")
        torch.library.register_fake(f"chronicals::{name}", fake, lib=_LIBRARY)
        op = getattr(torch.ops.chronicals, name).default
        op.__doc__ = fn.__doc__
        return op
    return register
