"""Low-rank adapters kept in fp32 on a bf16/fp16 model: their products in the model's dtype.

PEFT keeps adapter weights in fp32 on a bf16 or fp16 model (``get_peft_model``'s default
``autocast_adapter_dtype=True``: fp32 master weights, so small optimizer updates are not lost)
and casts the input up to them. Without ``torch.autocast`` every adapter product and its
gradients then run as fp32 GEMMs, which H100/H200 run without tensor cores: measured on an
H200 (benchmarks/RESULTS.md, session 7), ~34 of a LoRA r=32 step's 105 ms, more than the frozen
base model's bf16 GEMMs. The computation matched, by value and shape, never by module name:

    y = base + (B(A(xᵤ)) · s)        either operand order of the add; s a number (or absent)

    base   linear(x, W[, b]) of dtype D ∈ {bf16, fp16}   (the frozen layer)
    xᵤ     an fp32 tensor from the same x                 (PEFT: x.to(float32), maybe dropout)
    A, B   linear(·, W_A[, b_A]) then linear(·, W_B[, b_B]), computed in fp32, with fp32
           weights W_A [r, in], W_B [out, r], r < min(in, out) (low rank; A feeds only B)

Rewritten with autocast's product precision (what HF Trainer's ``bf16=True`` gives them):

    a = linear(xᵤ.to(D), W_A.to(D), b_A.to(D))      # cuBLAS in D, fp32 accumulation
    b = linear(a, W_B.to(D), b_B.to(D)).to(fp32)     # then s·b + base as before, in fp32

The weights stay fp32 tensors, as do their gradients (whose values are rounded through D by the
casts' backward, as under autocast), so the optimizer's update keeps fp32 precision. Where xᵤ
is one upcast of a D tensor x (PEFT without dropout), x is used directly (the cast is exact).
The scaled sum s·b + base is rounded once, where autocast rounds b·s to D first: the results
are autocast's exactly when s is a power of two (PEFT's alpha / r usually is), within one
rounding otherwise. Not candidates: products already in D (adapters in D, or under
``torch.autocast``), a low-rank fp32 branch that is no adapter of a linear of the same input
(e.g. added to a residual stream), full-rank fp32 layers on a low-precision input (e.g. an fp32
lm_head, a deliberate choice of precision), fp32 models. With several adapters on one layer,
the first one's sum is fp32 and the others are left alone. ``passes=(*DEFAULT_PASSES, "lora")``
turns the pass on.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .graph import (Canon, call_before, erase_dead, is_kind, number, scaled_operand, strip_casts,
                    tensor_value, value)

NAME = "lora"
_LOW = (torch.bfloat16, torch.float16)


def run(gm: GraphModule, ctx) -> None:
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        add = is_kind(node, "add")
        if add is None:
            continue
        for base, delta in ((add["input"], add["other"]), (add["other"], add["input"])):
            site = _adapter(base, delta)
            if site is not None:
                low, rank, lin_a, lin_b = site
                _rewrite(gm, low, lin_a, lin_b)
                ctx.matched(node, f"rank {rank} adapter: products in "
                                  f"{str(low).removeprefix('torch.')} "
                                  f"(fp32 weights, fp32 accumulation)")
                break


def _dtype(node) -> torch.dtype | None:
    value = tensor_value(node)
    return value.dtype if value is not None else None


def _scalar(x) -> bool:
    """A number, or a symbolic one (Dynamo makes a float attribute that changed between two
    compiled instances a SymFloat input)."""
    if number(x) is not None:
        return True
    v = value(x) if isinstance(x, Node) else None
    return isinstance(v, (torch.SymFloat, torch.SymInt))


def _source(node):
    """``node`` through dtype casts and dropout: the tensor an adapter and its base layer share."""
    while True:
        node, _ = strip_casts(node)
        if (isinstance(node, Node) and node.op == "call_function"
                and node.target is torch.nn.functional.dropout and node.args):
            node = node.args[0]
            continue
        return node


def _adapter(base, delta):
    """(low dtype, rank, linear A, linear B) if ``base + delta`` is a site, else None."""
    low = _dtype(base)
    if low not in _LOW or not isinstance(delta, Node):
        return None
    scaled = scaled_operand(delta)
    if scaled is not None:
        delta, scale = scaled
        if not _scalar(scale):
            return None
    lin_b = is_kind(delta, "linear")
    if lin_b is None or len(delta.users) != 1:
        return None
    lin_a = is_kind(lin_b["input"], "linear")
    if lin_a is None or len(lin_a.node.users) != 1:
        return None
    # fp32 products (under torch.autocast they are low-precision already: nothing to do)
    if _dtype(lin_a.node) != torch.float32 or _dtype(lin_b.node) != torch.float32:
        return None
    w_a, w_b = tensor_value(lin_a["weight"]), tensor_value(lin_b["weight"])
    if w_a is None or w_b is None or w_a.dim() != 2 or w_b.dim() != 2:
        return None
    if w_a.dtype != torch.float32 or w_b.dtype != torch.float32:
        return None
    if _dtype(lin_a["input"]) != torch.float32:
        return None
    rank = w_a.shape[0]
    if w_b.shape[1] != rank or rank >= min(w_a.shape[1], w_b.shape[0]):
        return None
    for bias in (lin_a["bias"], lin_b["bias"]):
        if bias is not None and _dtype(bias) != torch.float32:
            return None
    # an adapter of the base layer: base = linear(x) of the same x (not e.g. a residual stream)
    base_lin = is_kind(strip_casts(base)[0], "linear")
    if base_lin is None or _source(base_lin["input"]) is not _source(lin_a["input"]):
        return None
    return low, rank, lin_a, lin_b


def _rewrite(gm: GraphModule, low: torch.dtype, a: Canon, b: Canon) -> None:
    graph = gm.graph

    def in_low(node, before: Node):
        if node is None:
            return None
        source, casts = strip_casts(node)
        if len(casts) == 1 and _dtype(source) == low:   # one upcast of a low tensor: exact
            return source
        return call_before(graph, before, "to", (node, low))

    linear = torch.nn.functional.linear
    x = in_low(a["input"], a.node)
    prod_a = call_before(graph, a.node, linear,
                         (x, in_low(a["weight"], a.node), in_low(a["bias"], a.node)))
    prod_b = call_before(graph, b.node, linear,
                         (prod_a, in_low(b["weight"], b.node), in_low(b["bias"], b.node)))
    up = call_before(graph, b.node, "to", (prod_b, torch.float32))
    b.node.replace_all_uses_with(up)
    upcasts = [c.node for c in strip_casts(a["input"])[1]]
    erase_dead(graph, [b.node, a.node, *upcasts])
