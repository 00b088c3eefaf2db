"""Low-rank adapters kept in fp32 on a bf16/fp16 model: their products in the model's dtype.

PEFT keeps adapter weights in fp32 on a bf16 or fp16 model (``get_peft_model``'s default
``autocast_adapter_dtype=True``: fp32 master weights, so small optimizer updates are not lost)
and casts the input up to them. Without ``torch.autocast`` every adapter product and its
gradients then run as fp32 GEMMs, which H100/H200 run without tensor cores: measured on an
H200 (benchmarks/RESULTS.md, session 7), ~34 of a LoRA r=32 step's 105 ms, more than the frozen
base model's bf16 GEMMs. The computation matched, by value and shape, never by module name:

    y = base + (B(A(xᵤ)) · s)        either operand order of the add; s a number (or absent)

    base   a D-typed tensor, D ∈ {bf16, fp16}       (the frozen layer's output)
    xᵤ     an fp32 tensor                            (PEFT: x.to(float32), maybe dropout of it)
    A, B   linear(·, W_A[, b_A]) then linear(·, W_B[, b_B]) with fp32 weights W_A [r, in],
           W_B [out, r] and r < min(in, out)          (low rank; A's output feeds only B)

Rewritten with autocast's precision (what HF Trainer's ``bf16=True`` gives the same model):

    a = linear(xᵤ.to(D), W_A.to(D), b_A.to(D))      # cuBLAS in D, fp32 accumulation
    b = linear(a, W_B.to(D), b_B.to(D)).to(fp32)     # then s·b + base as before

The weights stay fp32 (so do their gradients and the optimizer's update); only the products
are rounded to D, like the base layer's own. Where xᵤ is an upcast of a D tensor x (PEFT without
dropout), x is used directly (the cast is exact). Not candidates: adapters already in D (no fp32
GEMM to remove), full-rank fp32 layers on a low-precision input (e.g. an fp32 lm_head, a
deliberate choice of precision), fp32 models. ``Config(passes=...)`` without ``"lora"`` keeps
the fp32 products.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from .graph import erase_dead, fake_call, is_kind, number, strip_casts, tensor_value

NAME = "lora"
_LOW = (torch.bfloat16, torch.float16)


def run(gm: GraphModule, ctx) -> None:
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        add = is_kind(node, "add")
        if add is None or add.inputs.get("alpha", 1) != 1:
            continue
        for base, delta in ((add["input"], add["other"]), (add["other"], add["input"])):
            site = _adapter(base, delta)
            if site is not None:
                low = _rewrite(gm, *site)
                ctx.matched(node, f"rank {site[2].meta['example_value'].shape[0]} adapter: "
                                  f"products in {str(low).removeprefix('torch.')} "
                                  f"(fp32 weights, fp32 accumulation)")
                break


def _dtype(node) -> torch.dtype | None:
    value = tensor_value(node)
    return value.dtype if value is not None else None


def _adapter(base, delta):
    """(low dtype, linear A node, W_A, linear B node) if ``base + delta`` is a site, else None."""
    low = _dtype(base)
    if low not in _LOW or not isinstance(delta, Node):
        return None
    scaled = is_kind(delta, "mul", "div")
    if scaled is not None:
        a, b = scaled["input"], scaled["other"]
        if scaled.kind == "mul" and not isinstance(a, Node):
            a, b = b, a
        if number(b) is None:
            return None
        delta = a
    lin_b = is_kind(delta, "linear")
    if lin_b is None or len(delta.users) != 1:
        return None
    lin_a = is_kind(lin_b["input"], "linear")
    if lin_a is None or len(lin_a.node.users) != 1:
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
    return low, lin_a.node, lin_a["weight"], lin_b.node


def _rewrite(gm: GraphModule, low: torch.dtype, node_a: Node, weight_a: Node, node_b: Node
             ) -> torch.dtype:
    graph = gm.graph
    a, b = is_kind(node_a, "linear"), is_kind(node_b, "linear")

    def call(before: Node, target, args) -> Node:
        """``target(*args)`` before ``before``; a cast is ``call_method "to"`` as Dynamo spells it."""
        with graph.inserting_before(before):
            new = (graph.call_method("to", args) if target is torch.Tensor.to
                   else graph.call_function(target, args))
        new.meta = {k: v for k, v in before.meta.items() if k not in ("example_value", "val")}
        new.meta["example_value"] = fake_call(target, args)
        return new

    def in_low(value, before: Node):
        if value is None:
            return None
        source, casts = strip_casts(value)
        if casts and _dtype(source) == low:        # an upcast of a low tensor: exact, skip it
            return source
        return call(before, torch.Tensor.to, (value, low))

    x = in_low(a["input"], node_a)
    prod_a = call(node_a, torch.nn.functional.linear,
                  (x, in_low(weight_a, node_a), in_low(a["bias"], node_a)))
    prod_b = call(node_b, torch.nn.functional.linear,
                  (prod_a, in_low(b["weight"], node_b), in_low(b["bias"], node_b)))
    up = call(node_b, torch.Tensor.to, (prod_b, torch.float32))
    node_b.replace_all_uses_with(up)
    upcasts = [c.node for c in strip_casts(a["input"])[1]]
    erase_dead(graph, [node_b, node_a, *upcasts])
    return low
