"""Find projections that share an input, one of them narrow, and make them one GEMM.

    linear(x, W₁, b₁), …, linear(x, Wₖ, bₖ)      one x, k ≥ 2, some Wᵢ with < NARROW rows
    →  y = linear(x, cat(W₁, …, Wₖ), cat(b₁, …, bₖ)),   yᵢ = split(y, [n₁, …, nₖ], −1)[i]

An attention layer with grouped-query attention projects its input three times, twice narrowly:
Qwen2.5-0.5B's q, k, v are 896, 128 and 128 columns of one [N, 896] input. A GEMM 128 columns
wide leaves most of the card idle, forward and in both backward GEMMs (H200, N=8192: k's
forward 7 µs, 250 TFLOP/s, against ~500 for q's); one 1152 columns wide does not. No kernel of our
own: the concatenated weight goes to cuBLAS through Inductor, and the backward is autograd's
(split's gradient concatenates the dyᵢ; then one GEMM for dX and one for dW, whose row blocks
are the Wᵢ's gradients). Per layer, forward + backward under Inductor
(`python -m benchmarks.fused_projections`, H200, bf16, N=8192, CUDA-graph replays):

    Qwen2.5-0.5B q/k/v (896, 128, 128)    161.7 µs → 108.2 µs   concatenated: 1.50×
    Qwen2.5-0.5B gate/up (4864, 4864)     670.8 µs → 871.3 µs   0.77×: left alone
    Llama-3-8B q/k/v (4096, 1024, 1024)  1814.0 µs → 1984.4 µs  0.91×: left alone

In the model (H200, B=8 T=1024, benchmarks/RESULTS.md session 25): 136 → 87 µs a layer of q/k/v
GEMMs and bias sums, against 35 µs of new copies (the weights' concatenation forward, the output
gradients' backward); the step 59.5 → 57.8 ms (+3.0% tokens/s), 58.1 → 57.2 ms with CUDA graphs.

Wide projections already run at the card's matmul rate, and concatenating them costs copies
(the weights forward, the output gradients backward) that the saved launches don't repay: a
group is rewritten only when one of its projections is narrower than NARROW, and projections of
WIDE columns or more stay out of it (a LoRA'd gate/up's base projections beside their rank-r
A products; no width between 896 and 4096 has been measured). The A products of LoRA adapters
the lora pass rewrote are its own (``lora_concat_a``): joining them would round x's gradient
once instead of autocast's way.

Values: forward, each output column is the same dot product of x with the same weight row
(plus the same bias), in the same dtype: eager's up to the order in which the GEMM kernel,
chosen for the wider matrix, accumulates it. Backward, x's gradient
Σᵢ dyᵢ Wᵢ is one GEMM over the concatenated columns, accumulated in fp32 and rounded once,
where eager rounds each product and each sum: the same value up to those roundings (closer to
the exact sum). The weights' and biases' gradients are eager's. The group's projections must
read the very same x node, have weights (and biases, all or none) of one dtype and device, and
be defined where the rewrite can read them. A projection whose output feeds another pass's op
directly (SwiGLU's gate and up, which its kernel reads as two row-contiguous tensors) is not
taken.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch.fx import GraphModule, Node

from .graph import call_before, erase_dead, insert_call, is_kind, tensor_value
from .lora import A_PRODUCT

NAME = "projections"
# Output columns below which a projection counts as narrow, and from which one stays apart
# (see the module docstring).
NARROW = 256
WIDE = 2048


def run(gm: GraphModule, ctx) -> None:
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for node in gm.graph.nodes:
        key = _group_key(node)
        if key is not None:
            groups[key].append(node)
    for members in groups.values():
        widths = [tensor_value(is_kind(n, "linear")["weight"]).shape[0] for n in members]
        if len(members) < 2 or min(widths) >= NARROW:
            continue
        order = {n: i for i, n in enumerate(gm.graph.nodes)}   # as the last rewrite left it
        first = min(members, key=order.__getitem__)
        reason = _autocast_between(gm, first, members, order) or _hoist_operands(first, members,
                                                                                 order)
        if reason:
            ctx.declined(first, f"{len(members)} projections of one input: {reason}")
            continue
        _concatenate(gm, first, members, widths)
        ctx.matched(first, f"{len(members)} projections of one input → one GEMM "
                           f"({' + '.join(map(str, widths))} = {sum(widths)} columns)")


def _group_key(node: Node) -> tuple | None:
    """(input, has bias, dtype, device) for a projection this pass may take, else None."""
    linear = is_kind(node, "linear")
    if linear is None or not isinstance(linear["input"], Node):
        return None
    x, w, b = tensor_value(linear["input"]), tensor_value(linear["weight"]), linear["bias"]
    bias = tensor_value(b) if b is not None else None
    if x is None or w is None or w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1]:
        return None
    if b is not None and (bias is None or bias.shape != (w.shape[0],) or bias.dtype != w.dtype):
        return None
    if w.shape[0] >= WIDE or node.meta.get(A_PRODUCT):
        return None
    if any(_is_chronicals_op(user) for user in node.users):
        return None
    return (linear["input"], b is not None, w.dtype, w.device)


def _is_chronicals_op(node: Node) -> bool:
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target.namespace == "chronicals")


def _operands(node: Node) -> list:
    linear = is_kind(node, "linear")
    return [linear["weight"], *([linear["bias"]] if linear["bias"] is not None else [])]


def _autocast_between(gm: GraphModule, first: Node, members: list[Node],
                      order: dict[Node, int]) -> str:
    """Why the members can't be one GEMM if an autocast region begins or ends among them (one
    projection would run in another precision than the others), else ""."""
    from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

    last = max(order[n] for n in members)
    for node in gm.graph.nodes:
        if order[first] < order[node] < last and node.op == "call_function" and \
                node.target in (_enter_autocast, _exit_autocast):
            return f"an autocast region begins or ends between them ({node.name})"
    return ""


def _hoist_operands(first: Node, members: list[Node], order: dict[Node, int]) -> str:
    """Move what the members' weights and biases are computed from, where it comes after
    ``first``, to just before it (a weight made right before its own projection: gathered from
    its shards, cast), so the joined GEMM can take ``first``'s place; or the reason it can't."""
    late = [v for n in members for v in _operands(n)
            if isinstance(v, Node) and order[v] > order[first]]
    chain: set[Node] = set()
    while late:
        node = late.pop()
        if node in chain:
            continue
        if node in members:
            return f"a weight is computed from {node.name}, one of their outputs"
        if node.is_impure():
            return f"{node.name}, which a weight needs, has side effects after {first.name}"
        chain.add(node)
        late += [a for a in node.all_input_nodes if order[a] >= order[first]]
    for node in sorted(chain, key=order.__getitem__):
        first.prepend(node)
    return ""


def _concatenate(gm: GraphModule, first: Node, members: list[Node], widths: list[int]) -> None:
    """Replace ``members`` by one linear over their concatenated weights, at ``first``."""
    graph = gm.graph
    x = is_kind(first, "linear")["input"]
    weight = call_before(graph, first, torch.cat,
                         ([is_kind(n, "linear")["weight"] for n in members], 0))
    biases = [is_kind(n, "linear")["bias"] for n in members]
    bias = call_before(graph, first, torch.cat, (biases, 0)) if biases[0] is not None else None
    y = call_before(graph, first, torch._C._nn.linear, (x, weight, bias))
    outputs = insert_call(graph, first, torch.split, (y, widths, -1), meta_from=first,
                          n_outputs=len(members))
    for node, out in zip(members, outputs):
        node.replace_all_uses_with(out)
    erase_dead(graph, members)
