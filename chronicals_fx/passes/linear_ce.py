"""Find lm_head + cross-entropy and replace it with ``chronicals::linear_cross_entropy``.

The computation, walked backwards from the loss (any spelling of each step):

    x = linear(h, W[, b])           F.linear | h @ W.T | h @ W.t() | matmul(h, W.transpose(0, 1))
    … casts                         .float() | .to(torch.float32) | …   (widening only)
    … logit transforms              x * k | x / k (k a constant: Cohere, Granite)
                                    k2 · tanh(x · k1) (soft-capping: Gemma 2, k1 = 1/k2)
    … row reshapes and shifts       view/reshape/flatten/contiguous keeping V last;
                                    x[:, :-1] and other slices/indices of the leading dims
    loss = F.cross_entropy(x2d, y)  or nn.CrossEntropyLoss, or nll_loss(log_softmax(x2d, -1), y)
           with ignore_index, reduction "mean" or "sum", label_smoothing

The labels are taken as the graph computes them (HF's pad-and-shift, slicing, ``.to(device)``):
only the logits side is replaced. The row reshapes and slices are replayed on h (with H in
place of V), so the op sees h [N, H] rows in the same order as the logits rows. What follows
the loss stays: HF's ``loss / num_items_in_batch`` under gradient accumulation is the "sum"
loss divided afterwards.

Under ``torch.autocast`` the linear's operands are fp32 and its logits bf16/fp16: autocast casts
h, W (and b) down and multiplies there; the rewrite makes those casts explicit and the op
takes the low-precision operands (:func:`_autocast_dtype`).

Logits that are a graph output (HF returns them beside the loss): see docs/linear_ce.md.
Training (the loss needs a gradient) with ``keep_logits=False`` (the default): the output is
replaced by ``None`` — ``outputs.logits is None``, as with Liger and Cut Cross-Entropy — so the
[N, V] tensor is never computed. With ``keep_logits=True`` the original linear still computes
them for the output, and the loss comes from the fused op. Without a gradient (evaluation) and
logits returned: declined, since the loss is cheapest computed from logits that exist anyway.

Which op (decided here, at rewrite time): when the loss needs a gradient —
``torch.is_grad_enabled()`` while the backend runs, the loss's example value requires grad, and
so do hidden / weight / bias (their example values) — the op computes the gradients in its
forward (``chronicals::linear_cross_entropy_grad_in_forward``, 6NHV, told which of the three to
compute); otherwise the forward only (``chronicals::linear_cross_entropy``, 2NHV). Dynamo guards
the grad mode and every input's ``requires_grad``, so a change of either recompiles and decides
again. The report says which: "gradients in the forward" or "forward only".

Declined, with the reason: class weights, reduction "none", probability targets, the legacy
size_average/reduce arguments, a scale that is not a constant, a soft-cap form other than
k2·tanh(k1·x), other transforms between the linear and the loss, logits used elsewhere in the
graph, narrowing casts, dtypes/devices the kernel does not take.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from ..kernels._triton import KERNEL_DTYPES
from .graph import (autocast_cast_dtype, call_before, canon, is_kind, narrower, not_constant,
                    number, promoted_float, static_int, tensor_value)

NAME = "linear_cross_entropy"

# The loss functions and the defaults of their arguments.
_CE_TARGETS = {F.cross_entropy}
_NLL_TARGETS = {F.nll_loss}
_LOG_SOFTMAX_TARGETS = {F.log_softmax, torch.log_softmax}
_CE_SIG = inspect.signature(F.cross_entropy)
_NLL_SIG = inspect.signature(F.nll_loss)

_SHAPE_METHODS = {"view", "reshape", "contiguous", "flatten"}
_SHAPE_FUNCTIONS = {torch.reshape: "reshape", torch.flatten: "flatten"}
_TRANSPOSE_ATTRS = ("T", "mT")


@dataclass
class _Site:
    loss: Node                      # the cross_entropy / nll_loss node
    labels: Any
    ignore_index: int
    reduction: str
    label_smoothing: float
    logits: Node                    # what the loss reads, [N, V]
    linear: Node | None = None      # x = h Wᵀ + b
    hidden: Node | None = None
    weight: Node | None = None      # [V, H] (or a [H, V] matrix to transpose: weight_t)
    weight_t: bool = False
    bias: Node | None = None
    chain: list[Node] = field(default_factory=list)      # linear's users … loss input, in order
    extra: list[Node] = field(default_factory=list)      # log_softmax between logits and nll
    transposes: list[Node] = field(default_factory=list)  # W.T and friends feeding a matmul
    shape_ops: list[Node] = field(default_factory=list)  # to replay on h
    scale: float = 1.0
    softcap: float = 0.0
    out_dtype: torch.dtype = torch.float32
    needs: tuple[bool, bool, bool] = (False, False, False)   # grads of hidden, weight, bias
    notes: list[str] = field(default_factory=list)
    autocast: torch.dtype | None = None   # autocast's dtype for the linear's fp32 operands


class _Decline(Exception):
    pass


def run(gm: GraphModule, ctx) -> None:
    for node in list(gm.graph.nodes):
        if node._erased or node.op != "call_function":
            continue
        if node.target not in _CE_TARGETS and node.target not in _NLL_TARGETS:
            continue
        try:
            site = _find(node)
            if site is None:
                continue
            _accept(site)
            returned = _returned_logits(gm, site)
            drop = _logits_policy(site, returned, ctx.config.keep_logits)
            site.needs = _grad_needs(site)
        except _Decline as reason:
            ctx.declined(node, str(reason))
            continue
        loss = _rewrite(gm, site, returned if drop else [])
        if returned:
            site.notes.append("logits output dropped (None)" if drop else "logits kept for the output")
        ctx.matched(loss, _describe(site))


# ---------------------------------------------------------------------------------------------
# Finding
# ---------------------------------------------------------------------------------------------
def _bind(sig: inspect.Signature, node: Node) -> dict[str, Any] | None:
    try:
        bound = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _find(node: Node) -> _Site | None:
    """A _Site if ``node`` is a cross-entropy of linear logits; None if not a candidate."""
    extra = []
    if node.target in _CE_TARGETS:
        args = _bind(_CE_SIG, node)
        if args is None:
            return None
        logits = args["input"]
        smoothing = args["label_smoothing"]
    else:
        args = _bind(_NLL_SIG, node)
        if args is None:
            return None
        logits = _log_softmax_input(args["input"])
        if logits is None:
            return None  # nll_loss of something else
        extra.append(args["input"])
        smoothing = 0.0
    if not isinstance(logits, Node):
        return None
    # Is there a linear up the chain at all? If not, this loss is not ours to talk about.
    chain, top = _walk_up(logits)
    linear = _as_linear(top)
    if linear is None:
        if _linear_above(top):
            raise _Decline(_why_not_understood(top))
        return None

    reduction = args["reduction"]
    if args.get("size_average") is not None or args.get("reduce") is not None:
        raise _Decline("legacy size_average/reduce arguments")
    if args["weight"] is not None:
        raise _Decline("class weights (weight=) are not supported by the kernel")
    if reduction == "none":
        raise _Decline("reduction='none' (the kernel reduces to a scalar)")
    if reduction not in ("mean", "sum"):
        raise _Decline(f"reduction {reduction!r}")
    if number(smoothing) is None or not 0.0 <= number(smoothing) <= 1.0:
        raise _Decline(f"label_smoothing {smoothing!r} is not a constant in [0, 1]")
    ignore_index = static_int(args["ignore_index"])
    if ignore_index is None:
        raise _Decline("ignore_index is not a constant int")

    site = _Site(loss=node, labels=args["target"], ignore_index=ignore_index,
                 reduction=reduction, label_smoothing=number(smoothing), logits=logits,
                 chain=list(reversed(chain)), extra=extra)
    site.linear = top
    site.hidden, site.weight, site.bias, site.weight_t, site.transposes = linear
    _read_chain(site)
    return site


def _log_softmax_input(node: Any) -> Node | None:
    if not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target in _LOG_SOFTMAX_TARGETS:
        args, kwargs = list(node.args), dict(node.kwargs)
    elif node.op == "call_method" and node.target == "log_softmax":
        args, kwargs = list(node.args), dict(node.kwargs)
    else:
        return None
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    v = tensor_value(x)
    if v is None or static_int(dim) is None or dim % v.dim() != v.dim() - 1:
        return None
    if (len(args) > 2 and args[2] is not None) or kwargs.get("dtype") is not None:
        return None
    return x


def _is_chain_step(node: Node) -> bool:
    """Steps the op models: casts, shape ops, slices, constant scales, tanh."""
    if is_kind(node, "cast") is not None:
        return True
    if _shape_kind(node) is not None:
        return True
    c = canon(node)
    if c is None:
        return False
    if c.kind == "getitem":
        return isinstance(tensor_value(node), torch.Tensor)
    if c.kind in ("mul", "div"):
        return _scale_of(c) is not None
    return c.kind == "tanh"


def _walk_up(node: Node) -> tuple[list[Node], Node]:
    """Follow modelled steps upward from the loss input: (steps, first node that isn't one)."""
    chain = []
    while isinstance(node, Node) and _is_chain_step(node):
        chain.append(node)
        node = _chain_input(node)
    return chain, node


def _chain_input(node: Node) -> Node:
    c = canon(node)
    if c is not None and c.kind in ("mul", "div"):
        return _scale_of(c)[0]
    return node.args[0] if node.args else node.kwargs.get("input")


def _scale_of(c) -> tuple[Node, float] | None:
    """(x, k) for x * k, k * x, x / k with k a Python constant; None otherwise."""
    a, b = c["input"], c["other"]
    if c.kind == "mul":
        if isinstance(a, Node) and number(b) is not None:
            return a, number(b)
        if isinstance(b, Node) and number(a) is not None:
            return b, number(a)
        return None
    if isinstance(a, Node) and number(b) is not None and number(b) != 0.0:
        return a, 1.0 / number(b)
    return None


def _shape_kind(node: Node) -> str | None:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return node.target
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return _SHAPE_FUNCTIONS[node.target]
    return None


def _transposed_weight(node: Any) -> Node | None:
    """W if ``node`` is W.T / W.t() / W.transpose(0, 1) of a 2-D W, else None."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] in _TRANSPOSE_ATTRS:
        src = node.args[0]
    elif (node.op == "call_method" and node.target == "t") or (
            node.op == "call_function" and node.target is torch.t):
        src = node.args[0]
    elif (node.op == "call_method" and node.target in ("transpose", "swapaxes")) or (
            node.op == "call_function" and node.target is torch.transpose):
        if len(node.args) != 3 or {a % 2 for a in node.args[1:] if static_int(a) is not None} != {0, 1}:
            return None
        src = node.args[0]
    elif node.op == "call_method" and node.target == "permute" and tuple(node.args[1:]) in ((1, 0), ((1, 0),)):
        src = node.args[0]
    else:
        return None
    v = tensor_value(src)
    return src if v is not None and v.dim() == 2 else None


def _as_linear(node: Any):
    """(h, W, b, weight_t, extra nodes) if ``node`` computes h Wᵀ (+ b), else None."""
    c = is_kind(node, "linear")
    if c is not None:
        return c["input"], c["weight"], c["bias"], False, []
    if isinstance(node, Node) and node.op == "call_function" and node.target in (
            operator.matmul, torch.matmul) and len(node.args) == 2 and not node.kwargs:
        h, m = node.args
        hv, mv = tensor_value(h), tensor_value(m)
        if hv is None or mv is None or mv.dim() != 2 or hv.dim() < 2:
            return None
        w = _transposed_weight(m)
        if w is not None:
            return h, w, None, False, [m]
        return h, m, None, True, []
    return None


def _linear_above(node: Any, depth: int = 6) -> bool:
    """Is a linear/matmul a few steps above ``node`` (through first tensor inputs)?"""
    for _ in range(depth):
        if not isinstance(node, Node):
            return False
        if _as_linear(node) is not None:
            return True
        node = next((a for a in node.args if isinstance(a, Node)), None)
    return False


def _why_not_understood(node: Node) -> str:
    c = canon(node)
    if c is not None and c.kind in ("mul", "div"):
        if any(isinstance(v, Node) for v in (c["input"], c["other"])) and _scale_of(c) is None:
            other = c["other"] if isinstance(c["other"], Node) else c["input"]
            if isinstance(c["input"], Node) and isinstance(c["other"], Node):
                if promoted_float(other):
                    return not_constant("logit scale", other)
                return (f"logit scale {other.name} is a tensor, not a constant "
                        "(the kernel takes constant scales)")
            return f"logit transform {node.name} ({c.kind}) not understood"
    if c is not None and c.kind == "tanh":
        return "soft-cap form not understood"
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"logit transform {node.name} ({what}) between the linear and the loss is not modelled"


def _read_chain(site: _Site) -> None:
    """Fold the chain's casts and transforms into (scale, softcap); collect shape ops."""
    x_val = tensor_value(site.linear)
    dtype = x_val.dtype
    vocab = x_val.shape[-1]
    pre, post, tanh = 1.0, 1.0, False
    for node in site.chain:
        cast = is_kind(node, "cast")
        if cast is not None:
            if narrower(cast["dtype"], dtype):
                raise _Decline(f"logits rounded to {cast['dtype']} before the loss")
            dtype = cast["dtype"]
            continue
        c = canon(node)
        if c is not None and c.kind in ("mul", "div"):
            k = _scale_of(c)[1]
            if tanh:
                post *= k
            else:
                pre *= k
            continue
        if c is not None and c.kind == "tanh":
            if tanh:
                raise _Decline("soft-cap form not understood (two tanh)")
            tanh = True
            continue
        # A shape op or a slice: must keep V last, rows as rows.
        v_in, v_out = tensor_value(_chain_input(node)), tensor_value(node)
        if v_in is None or v_out is None or v_in.shape[-1] != vocab or v_out.shape[-1] != vocab:
            raise _Decline(f"{node.name} reshapes the vocabulary dim")
        if c is not None and c.kind == "getitem" and not _rows_only_index(c["index"], v_in.dim()):
            raise _Decline(f"{node.name} indexes the vocabulary dim or uses tensor indices")
        site.shape_ops.append(node)
    if tanh:
        if post == 0.0:
            raise _Decline("soft-cap with a zero scale")
        site.softcap, site.scale = abs(post), pre * post
    else:
        site.scale = pre * post
    if site.scale == 0.0:
        raise _Decline("logit scale 0")
    site.out_dtype = tensor_value(site.logits).dtype


def _rows_only_index(index: Any, ndim: int) -> bool:
    """True if ``index`` slices or picks only leading dims (never the last, no tensors)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Node) or i is None for i in items):
        return False
    if any(not isinstance(i, (slice, int, type(Ellipsis))) for i in items):
        return False
    if sum(i is Ellipsis for i in items) > 1:
        return False
    if Ellipsis in items:
        k = items.index(Ellipsis)
        after = items[k + 1:]
        # ``...`` then the trailing items: the last of them hits the last dim.
        return not after or _full(after[-1])
    if len(items) < ndim:
        return True
    return len(items) == ndim and _full(items[-1])


def _full(item: Any) -> bool:
    return isinstance(item, slice) and item == slice(None, None, None)


# ---------------------------------------------------------------------------------------------
# Accepting
# ---------------------------------------------------------------------------------------------
def _accept(site: _Site) -> None:
    h, w = tensor_value(site.hidden), tensor_value(site.weight)
    x, logits = tensor_value(site.linear), tensor_value(site.logits)
    labels = tensor_value(site.labels)
    if h is None or w is None or labels is None:
        raise _Decline("inputs without example values")
    if w.dim() != 2:
        raise _Decline(f"weight of rank {w.dim()}")
    if logits.dim() != 2:
        raise _Decline(f"loss input of rank {logits.dim()} (the kernel takes [N, V] logits, "
                       "classes last)")
    if labels.is_floating_point():
        raise _Decline("probability targets (float labels): the kernel takes class indices")
    if labels.dtype != torch.int64 or labels.dim() != 1:
        raise _Decline("targets are not int64 class indices of shape [N] "
                       f"({labels.dtype}, rank {labels.dim()})")
    dtypes = {h.dtype, w.dtype, x.dtype} | ({tensor_value(site.bias).dtype} if site.bias is not None else set())
    site.autocast = _autocast_dtype(site)
    if len(dtypes) != 1 and site.autocast is None:
        raise _Decline(f"mixed dtypes {sorted(map(str, dtypes))}")
    if x.dtype not in KERNEL_DTYPES:
        raise _Decline(f"dtype {x.dtype} (kernel: fp32, bf16, fp16)")
    devices = {h.device, w.device, labels.device}
    if len(devices) != 1 or h.device.type not in ("cuda", "cpu"):
        raise _Decline(f"device(s) {sorted(map(str, devices))}")
    if static_int(w.shape[0]) is None or static_int(w.shape[1]) is None:
        raise _Decline("weight shape is symbolic")
    allowed = set(site.chain) | {site.loss, site.linear, *site.extra}
    for node in [site.linear, *site.chain, *site.extra]:
        for user in node.users:
            if user not in allowed and user.op != "output":
                raise _Decline(f"logits {node.name} also feed {user.name}: they are computed anyway")


def _autocast_dtype(site: _Site) -> torch.dtype | None:
    """The low precision of an autocast linear: fp32 hidden, weight (and bias), bf16/fp16
    logits. ``torch.autocast`` casts the operands to its dtype and multiplies there; the rewrite
    makes those casts explicit, so the fused op gets what the linear's GEMM got (and autograd
    takes the gradients back to fp32 through the casts, as it does under autocast)."""
    operands = [site.hidden, site.weight] + ([site.bias] if site.bias is not None else [])
    return autocast_cast_dtype(site.linear, operands)


def _returned_logits(gm: GraphModule, site: _Site) -> list[Node]:
    """The logits forms (linear output or chain nodes) that the graph returns."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return [n for n in [site.linear, *site.chain] if output in n.users]


def _logits_policy(site: _Site, returned: list[Node], keep_logits: bool) -> bool:
    """True if the returned logits are to be dropped (replaced by None)."""
    if not returned:
        return False
    loss = tensor_value(site.loss)
    if loss is None or not loss.requires_grad:
        raise _Decline("no gradient is needed and the logits are returned: the loss is cheapest "
                       "computed from them")
    return not keep_logits and not _outputs_must_be_tensors()


def _grad_needs(site: _Site) -> tuple[bool, bool, bool]:
    """Which of hidden, weight, bias the fused op must give a gradient for (none: forward only).

    From the example values Dynamo traced with (their ``requires_grad`` reflects the grad mode
    at that point of the program, e.g. inside ``torch.no_grad()`` blocks) and the grad mode
    the backend is called under (AOTAutograd decides inference vs training from the same)."""
    loss = tensor_value(site.loss)
    if not torch.is_grad_enabled() or loss is None or not loss.requires_grad:
        return False, False, False
    h, w = tensor_value(site.hidden), tensor_value(site.weight)
    b = tensor_value(site.bias) if site.bias is not None else None
    return bool(h.requires_grad), bool(w.requires_grad), bool(b is not None and b.requires_grad)


def _outputs_must_be_tensors() -> bool:
    """True inside DDP's graph splitting: AOTAutograd then reads a fake value off every graph
    output, and a None output breaks it. The logits are kept there (the loss is still fused)."""
    context = torch._guards.TracingContext.try_get()
    return bool(context is not None and getattr(context, "fakify_first_call", False))


# ---------------------------------------------------------------------------------------------
# Rewriting
# ---------------------------------------------------------------------------------------------
def _replay(insert, node: Node, h: Node, hidden_size: int, vocab: int) -> Node:
    """Apply shape op ``node`` (on logits) to ``h`` (hidden size in place of V); ``insert``
    adds a call to the graph."""
    c = canon(node)
    if c is not None and c.kind == "getitem":
        return insert(operator.getitem, (h, c["index"]), node)
    kind = _shape_kind(node)
    if kind == "contiguous":
        return insert(torch.Tensor.contiguous, (h,), node)
    if kind == "flatten":
        args = list(node.args[1:])
        kw = dict(node.kwargs)
        start = args[0] if args else kw.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kw.get("end_dim", -1)
        return insert(torch.flatten, (h, start, end), node)
    # view / reshape: the shape with V (the last entry) replaced by H
    shape = list(node.args[1:]) if node.op == "call_method" else list(node.args[1:])
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = list(shape[0])
    if not shape and "shape" in node.kwargs:
        shape = list(node.kwargs["shape"])
    last = shape[-1]
    if static_int(last) == vocab:
        shape[-1] = hidden_size
    elif static_int(last) != -1:
        raise RuntimeError(f"cannot replay {node.format_node()}")
    return insert(torch.reshape, (h, tuple(shape)), node)


def _rewrite(gm: GraphModule, site: _Site, dropped: list[Node]) -> Node:
    graph = gm.graph
    if dropped:
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        gone = set(dropped)
        output.args = map_arg(output.args, lambda n: None if n in gone else n)
    w_val = tensor_value(site.weight)
    vocab, hidden_size = (w_val.shape[1], w_val.shape[0]) if site.weight_t else tuple(w_val.shape)
    def insert(target, args, meta_from: Node) -> Node:
        return call_before(graph, site.loss, target, args, meta_from=meta_from)

    weight, h, bias = site.weight, site.hidden, site.bias
    autocast = site.autocast
    if autocast is not None:
        weight, h = (insert("to", (n, autocast), site.loss) for n in (weight, h))
        bias = None if bias is None else insert("to", (bias, autocast), site.loss)
        site.notes.append(f"autocast's casts of the operands to {_short(autocast)} made explicit")
    if site.weight_t:
        weight = insert(torch.t, (weight,), site.loss)
    for node in site.shape_ops:
        h = _replay(insert, node, h, hidden_size, vocab)
    if tensor_value(h).dim() != 2:
        h = insert(torch.reshape, (h, (-1, hidden_size)), site.loss)
    args = (h, weight, bias, site.labels, site.ignore_index, site.reduction,
            site.label_smoothing, site.scale, site.softcap, 0.0, site.out_dtype)
    if any(site.needs):
        target = torch.ops.chronicals.linear_cross_entropy_grad_in_forward.default
        args = args + tuple(site.needs)
        site.notes.append("gradients in the forward (" + ", ".join(
            name for name, need in zip(("hidden", "weight", "bias"), site.needs) if need) + ")")
    else:
        target = torch.ops.chronicals.linear_cross_entropy.default
        site.notes.append("forward only (no gradient needed)")
    # The op's "where" is the linear's module (lm_head): HF's loss function is no module.
    op = insert(target, args, site.linear)
    loss = insert(operator.getitem, (op, 0), site.linear)
    site.loss.replace_all_uses_with(loss)
    # Erase what became dead, users before inputs; transposes of W last (they may feed other
    # nodes, e.g. a tied embedding, and then stay).
    for node in [site.loss, *site.extra, *reversed(site.chain), site.linear, *site.transposes]:
        if not node._erased and not node.users:
            graph.erase_node(node)
    return loss


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _describe(site: _Site) -> str:
    w = tensor_value(site.weight)
    vocab, hidden = (w.shape[1], w.shape[0]) if site.weight_t else (w.shape[0], w.shape[1])
    parts = [f"{_short(w.dtype)} H={hidden} V={vocab}", f"reduction={site.reduction}",
             f"ignore_index={site.ignore_index}"]
    if site.bias is not None:
        parts.append("bias")
    if site.label_smoothing:
        parts.append(f"label_smoothing={site.label_smoothing:g}")
    if site.softcap:
        parts.append(f"softcap={site.softcap:g}")
    if site.scale != 1.0:
        parts.append(f"scale={site.scale:g}")
    if site.shape_ops:
        parts.append(f"{len(site.shape_ops)} row reshape/slice op(s) replayed on hidden")
    parts += site.notes
    return ", ".join(parts)
