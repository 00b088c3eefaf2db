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

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .graph import (Canon, call_before, erase_dead, is_kind, number, scaled_operand, strip_casts,
                    tensor_value, value)

NAME = "lora"
_LOW = (torch.bfloat16, torch.float16)
# How the sum is formed where PEFT casts it back ($CHRONICALS_LORA_SUM, a measurement hook):
# "low" (s folded into W_B, the add in the model's dtype), "addmm" (the same in one cuBLAS
# addmm), "fp32" (the fp32 sum, as for any other user).
SUM = os.environ.get("CHRONICALS_LORA_SUM", "low")


def run(gm: GraphModule, ctx) -> None:
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        add = is_kind(node, "add")
        if add is None:
            continue
        for base, delta in ((add["input"], add["other"]), (add["other"], add["input"])):
            site = _adapter(add.node, base, delta)
            if site is not None:
                how = _rewrite(gm, site)
                ctx.matched(node, f"rank {site.rank} adapter: products in "
                                  f"{str(site.low).removeprefix('torch.')} "
                                  f"(fp32 weights, fp32 accumulation){how}")
                break


@dataclass
class _Site:
    add: Node               # base + delta (fp32: bf16 + fp32 promotes)
    base: Node              # the frozen layer's output, dtype low
    low: torch.dtype
    rank: int
    a: Canon                # linear A
    b: Canon                # linear B
    scale: Any = None       # s of delta = B(A(x)) · s (or / s), None if unscaled
    divide: bool = False


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


def _adapter(add: Node, base, delta) -> _Site | None:
    """The site if ``add`` = ``base + delta`` is an adapted layer's sum, else None."""
    low = _dtype(base)
    if low not in _LOW or not isinstance(delta, Node):
        return None
    scale, divide = None, False
    scaled = scaled_operand(delta)
    if scaled is not None:
        divide = is_kind(delta, "div") is not None
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
    return _Site(add, base, low, rank, lin_a, lin_b, scale, divide)


def _rewrite(gm: GraphModule, site: _Site) -> str:
    """Rewrite the site; returns how the sum was formed, for the report."""
    graph, low, a, b = gm.graph, site.low, site.a, site.b

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
    upcasts = [c.node for c in strip_casts(a["input"])[1]]
    casts_to_low = [u for u in site.add.users
                    if (c := is_kind(u, "cast")) is not None and c["dtype"] == low]
    if SUM != "fp32" and site.add.users and len(casts_to_low) == len(site.add.users):
        how = _sum_in_low(graph, site, prod_a, in_low)
        for cast in casts_to_low:
            cast.replace_all_uses_with(how[0])
        erase_dead(graph, [*casts_to_low, site.add, *site.add.all_input_nodes, b.node, a.node,
                           *upcasts])
        return how[1]
    # the fp32 sum has other users (a hand-written module's fp32 output): keep it in fp32
    prod_b = call_before(graph, b.node, linear,
                         (prod_a, in_low(b["weight"], b.node), in_low(b["bias"], b.node)))
    up = call_before(graph, b.node, "to", (prod_b, torch.float32))
    b.node.replace_all_uses_with(up)
    erase_dead(graph, [b.node, a.node, *upcasts])
    return ""


def _sum_in_low(graph, site: _Site, prod_a: Node, in_low) -> tuple[Node, str]:
    """The sum, wanted only in the low dtype (PEFT casts it back): base + a·(s·W_B)ᵀ in low.

    s is folded into W_B ([out, r], not [N, out]: the backward then scales no [N, out]
    gradient), which is exact when s is a power of two. Without a bias on B the sum is one
    cuBLAS addmm (β = 1: base is read in the GEMM's epilogue instead of a [N, out] product
    being written and added): base + Σ rounded once, where autocast rounds Σ·s first.
    """
    add, b = site.add, site.b
    weight, bias = b["weight"], b["bias"]
    if site.scale is not None:
        op = torch.div if site.divide else torch.mul
        weight = call_before(graph, add, op, (weight, site.scale))
        if bias is not None:
            bias = call_before(graph, add, op, (bias, site.scale))
    weight = in_low(weight, add)
    if bias is not None or SUM != "addmm":
        prod_b = call_before(graph, add, torch.nn.functional.linear,
                             (prod_a, weight, in_low(bias, add)))
        return call_before(graph, add, torch.add, (site.base, prod_b)), ""
    out_features = tensor_value(weight).shape[0]
    base_2d = call_before(graph, add, "reshape", (site.base, -1, out_features))
    a_2d = call_before(graph, add, "reshape", (prod_a, -1, site.rank))
    weight_t = call_before(graph, add, "t", (weight,))
    out = call_before(graph, add, torch.addmm, (base_2d, a_2d, weight_t))
    return call_before(graph, add, "view_as", (out, site.base)), ", sum in the GEMM (addmm)"
