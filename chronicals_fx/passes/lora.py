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
    y = base + linear(a, (s·W_B).to(D), (s·b_B).to(D))            (in D)

when every user of y casts it back to D (PEFT does: ``result.to(torch_result_dtype)``) and the
scaled branch feeds nothing else. s is folded into the [out, r] weight (not at all when s = 1),
so no [N, out] product or gradient is ever scaled. Where y or the scaled branch has other users
(a hand-written module returning the fp32 sum), the sum stays fp32 instead:
``y = base + s · linear(a, W_B.to(D), b_B.to(D)).to(fp32)``, rounded once.

The weights stay fp32 tensors, as do their gradients (whose values are rounded through D by the
casts' backward, as under autocast), so the optimizer's update keeps fp32 precision. Where xᵤ
is one upcast of a D tensor x (PEFT without dropout), x is used directly (the cast is exact).
When s is a power of two (PEFT's alpha / r usually is) the results are autocast's exactly
(in fp16, unless s·W_B has entries below fp16's normal range, 6.1e-5, which the fold rounds
differently); otherwise within one rounding (autocast rounds W_B, the product, b·s and the sum;
this rounds s·W_B, the product and the sum — or the fp32 sum once). The report's detail says
which sum a site got.

With ``Config.lora_concat_a`` (off by default), adapters whose A products read one x (q/k/v
of a layer; gate/up) share one GEMM over their concatenated A weights: forward values are
unchanged (each column is its own dot product), and in backward their dx terms are summed
inside one GEMM in fp32 and rounded once, where autocast rounds each and sums in D — one
rounding less, so the gradients upstream differ from autocast's by that much (no less accurate:
the tests compare both to float64).

Measured on an H200, LoRA r=32 on every linear of the Qwen2.5-0.5B shape, B=8 T=1024
(benchmarks/RESULTS.md, session 9): 1.29x torch.compile, 1.59x with CUDA graphs (24 layers,
call 1). The concatenated A products: 1.05x at 6 layers (call 2), 0.97x at 24 (call 3, inside
the spread of a host-bound step), hence not the default.
Not candidates: products already in D (adapters in D, or under
``torch.autocast``), a low-rank fp32 branch that is no adapter of a linear of the same input
(e.g. added to a residual stream), full-rank fp32 layers on a low-precision input (e.g. an fp32
lm_head, a deliberate choice of precision), fp32 models. With several adapters on one layer,
the first one's sum is fp32 and the others are left alone. A default pass (``passes=`` without
"lora" turns it off).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .graph import (Canon, call_before, erase_dead, is_kind, live_canons, number, scaled_operand,
                    strip_casts, tensor_value, value)

NAME = "lora"
_LOW = (torch.bfloat16, torch.float16)
# Marks, in a node's meta, the A products this pass wrote: they are joined here or not at all
# (``lora_concat_a``), never by the projections pass, which would change the rounding of x's
# gradient that keeps these results autocast's.
A_PRODUCT = "chronicals_lora_a_product"


def run(gm: GraphModule, ctx) -> None:
    a_products = []
    for add in live_canons(gm.graph, "add"):
        node = add.node
        for base, delta in ((add["input"], add["other"]), (add["other"], add["input"])):
            site = _adapter(node, base, delta)
            if site is not None:
                low = str(site.low).removeprefix("torch.")
                prod_a, in_low = _rewrite(gm, site)
                a_products.append(prod_a)
                ctx.matched(node, f"rank {site.rank} adapter: products in {low} (fp32 "
                                  f"weights, fp32 accumulation), "
                                  + (f"sum in {low}" if in_low else "fp32 sum"))
                break
    if ctx.config.lora_concat_a:
        for group in _shared_input_groups(gm.graph, a_products):
            _concatenate(gm.graph, group)


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
    scaled: Node | None = None   # the node computing B(A(x)) · s


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
    scale, divide, scaled_node = None, False, None
    scaled = scaled_operand(delta)
    if scaled is not None:
        divide = is_kind(delta, "div") is not None
        scaled_node = delta
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
    return _Site(add, base, low, rank, lin_a, lin_b, scale, divide, scaled_node)


def _rewrite(gm: GraphModule, site: _Site) -> tuple[Node, bool]:
    """Rewrite the site; returns the new A product and whether the sum is formed in the low
    dtype (True) or in fp32 (False)."""
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
    prod_a.meta[A_PRODUCT] = True
    upcasts = [c.node for c in strip_casts(a["input"])[1]]
    casts_to_low = [u for u in site.add.users
                    if (c := is_kind(u, "cast")) is not None and c["dtype"] == low]
    only_cast_back = bool(site.add.users) and len(casts_to_low) == len(site.add.users)
    scaled_for_the_sum_only = site.scaled is None or len(site.scaled.users) == 1
    if only_cast_back and scaled_for_the_sum_only:
        out = _sum_in_low(graph, site, prod_a, in_low)
        for cast in casts_to_low:
            cast.replace_all_uses_with(out)
        erase_dead(graph, [*casts_to_low, site.add, *site.add.all_input_nodes, b.node, a.node,
                           *upcasts])
        return prod_a, True
    # the fp32 sum (or the scaled product) has other users, e.g. a hand-written module's fp32
    # output: keep the sum in fp32
    prod_b = call_before(graph, b.node, linear,
                         (prod_a, in_low(b["weight"], b.node), in_low(b["bias"], b.node)))
    up = call_before(graph, b.node, "to", (prod_b, torch.float32))
    b.node.replace_all_uses_with(up)
    erase_dead(graph, [b.node, a.node, *upcasts])
    return prod_a, False


def _shared_input_groups(graph, products: list[Node]) -> list[list[Node]]:
    """The A products ``linear(x, W_A.to(D))`` (no bias) that read one x, in groups of two or
    more in graph order (q/k/v of a layer; gate/up)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_input: dict[Node, list[Node]] = {}
    for prod in products:
        x, weight, bias = prod.args
        if bias is None and isinstance(weight, Node) and strip_casts(weight)[1]:
            by_input.setdefault(x, []).append(prod)
    return [sorted(g, key=order.__getitem__) for g in by_input.values() if len(g) > 1]


def _concatenate(graph, products: list[Node]) -> None:
    """One GEMM for A products that share their input:

        [a₁ | a₂ | …] = linear(x, cat(W_A₁, W_A₂, …).to(D)),    aᵢ its column slices

    The same values (each column of a GEMM is its own dot product; fp32 accumulation in both).
    Fewer, larger GEMMs (r-column ones are far from the tensor cores' rate) and fewer launches:
    forward one instead of k, backward one dx and one dW instead of k each.
    """
    first = products[0]
    x = first.args[0]
    weights = [strip_casts(p.args[1])[0] for p in products]
    low = tensor_value(first).dtype
    cat = call_before(graph, first, torch.cat, (weights, 0))
    joined = call_before(graph, first, torch.nn.functional.linear,
                         (x, call_before(graph, first, "to", (cat, low)), None))
    joined.meta[A_PRODUCT] = True
    pieces, start = [], 0
    for prod in products:
        rank = tensor_value(prod).shape[-1]
        pieces.append(call_before(graph, first, operator.getitem,
                                  (joined, (Ellipsis, slice(start, start + rank)))))
        start += rank
    for prod, piece in zip(products, pieces):
        prod.replace_all_uses_with(piece)
    erase_dead(graph, [*products, *(p.args[1] for p in products)])


def _sum_in_low(graph, site: _Site, prod_a: Node, in_low) -> Node:
    """base + a·(s·W_B)ᵀ in the low dtype, for a sum wanted only there (PEFT casts it back).

    s is folded into W_B ([out, r]) instead of scaling the [N, out] product, so the backward
    scales no [N, out] gradient either. For s a power of two the fold is exact (in fp16 unless
    s·W_B falls below its normal range) and the result is autocast's bit for bit (it rounds the
    product, then the sum, as this does).
    """
    add, b = site.add, site.b
    weight, bias = b["weight"], b["bias"]
    if site.scale is not None and number(site.scale) != 1:   # PEFT's alpha = r: s = 1
        op = torch.div if site.divide else torch.mul
        weight = call_before(graph, add, op, (weight, site.scale))
        if bias is not None:
            bias = call_before(graph, add, op, (bias, site.scale))
    prod_b = call_before(graph, add, torch.nn.functional.linear,
                         (prod_a, in_low(weight, add), in_low(bias, add)))
    return call_before(graph, add, torch.add, (site.base, prod_b))
