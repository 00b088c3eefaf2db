"""Canonical views of Dynamo FX nodes, and the match helpers every pass shares.

A Dynamo graph spells the same math many ways: ``x.pow(2)``, ``x ** 2``, ``torch.square(x)``;
``x.float()``, ``x.to(torch.float32)``, ``x.type_as(y)``; positional or keyword arguments;
methods (``call_method "mean"``) or functions (``torch.mean``). Passes never look at those
spellings. They call :func:`canon`, which answers one question — *what does this node
compute?* — as a :class:`Canon` with a canonical kind and named inputs, or ``None`` when the
node is nothing a pass cares about. The graph itself is not rewritten by canonicalization, so
nodes that no pass replaces reach Inductor exactly as Dynamo produced them.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node
from torch.fx.node import map_arg

# ---------------------------------------------------------------------------------------------
# Canonical kinds: name -> (positional parameter names, keyword defaults).
# The names follow torch's own signatures so args and kwargs fold into one dict.
# ---------------------------------------------------------------------------------------------
_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "add": (("input", "other"), {"alpha": 1}),
    "sub": (("input", "other"), {"alpha": 1}),
    "mul": (("input", "other"), {}),
    "div": (("input", "other"), {"rounding_mode": None}),
    "pow": (("input", "exponent"), {}),
    "square": (("input",), {}),
    "neg": (("input",), {}),
    "rsqrt": (("input",), {}),
    "sqrt": (("input",), {}),
    "reciprocal": (("input",), {}),
    "exp": (("input",), {}),
    "tanh": (("input",), {}),
    "sigmoid": (("input",), {}),
    "cos": (("input",), {}),
    "sin": (("input",), {}),
    "silu": (("input", "inplace"), {"inplace": False}),
    "gelu": (("input",), {"approximate": "none"}),
    "relu": (("input", "inplace"), {"inplace": False}),
    "mean": (("input", "dim", "keepdim"), {"dim": None, "keepdim": False, "dtype": None}),
    "sum": (("input", "dim", "keepdim"), {"dim": None, "keepdim": False, "dtype": None}),
    "softmax": (("input", "dim"), {"dtype": None, "_stacklevel": 3}),
    "linear": (("input", "weight", "bias"), {"bias": None}),
    "rms_norm": (("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None}),
    "cat": (("tensors", "dim"), {"dim": 0}),
    "getitem": (("input", "index"), {}),
    "masked_fill": (("input", "mask", "value"), {}),
}

# call_function targets -> kind. Tensor methods arrive as call_method by name and use the
# same kind names (``x.mul(y)`` -> "mul").
_FUNCTION_KINDS: dict[Any, str] = {
    operator.add: "add", torch.add: "add",
    operator.sub: "sub", torch.sub: "sub",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.pow: "pow", torch.pow: "pow",
    operator.neg: "neg", torch.neg: "neg",
    operator.getitem: "getitem",
    torch.square: "square",
    torch.rsqrt: "rsqrt", torch.sqrt: "sqrt", torch.reciprocal: "reciprocal",
    torch.exp: "exp", torch.tanh: "tanh", torch.sigmoid: "sigmoid",
    torch.cos: "cos", torch.sin: "sin",
    F.silu: "silu", torch._C._nn.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu",
    torch._C._nn.gelu: "gelu",
    torch.mean: "mean", torch.sum: "sum",
    torch.softmax: "softmax", F.softmax: "softmax",
    torch._C._nn.linear: "linear", F.linear: "linear",
    torch.rms_norm: "rms_norm", F.rms_norm: "rms_norm",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.masked_fill: "masked_fill",
}
_METHOD_KINDS = {
    name: name
    for name in ("add", "sub", "mul", "div", "pow", "square", "neg", "rsqrt", "sqrt",
                 "reciprocal", "exp", "tanh", "sigmoid", "cos", "sin", "relu", "mean", "sum",
                 "softmax", "masked_fill")
}
_METHOD_KINDS.update({"__getitem__": "getitem", "true_divide": "div", "__mul__": "mul",
                      "__add__": "add", "__truediv__": "div"})

# Casts: ``x.float()`` and friends name their dtype.
_DTYPE_METHODS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                  "double": torch.float64}


@dataclass(frozen=True)
class Canon:
    """What one node computes: a canonical ``kind`` and its inputs by parameter name.

    ``kind == "cast"`` carries ``inputs["input"]`` and ``inputs["dtype"]`` (a torch.dtype),
    whatever the spelling (``.float()``, ``.to(dtype)``, ``.to(device, dtype)``, ``.type_as``,
    ``.type(dtype)``).
    """

    kind: str
    node: Node
    inputs: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.inputs[name]


def _bind(kind: str, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    positional, defaults = _SIGNATURES[kind]
    if len(args) > len(positional):
        return None
    bound = dict(defaults)
    bound.update(zip(positional, args))
    for key, value in kwargs.items():
        if key not in positional and key not in defaults:
            return None  # an argument we don't model (e.g. out=): not canonical
        bound[key] = value
    if any(name not in bound for name in positional):
        return None
    return bound


def _cast(node: Node) -> Canon | None:
    """Recognise every dtype-cast spelling; a pure device move is not a cast."""
    if node.op != "call_method":
        return None
    name, args, kwargs = node.target, node.args, node.kwargs
    if name in _DTYPE_METHODS and len(args) == 1 and not kwargs:
        return Canon("cast", node, {"input": args[0], "dtype": _DTYPE_METHODS[name]})
    if name == "type_as" and len(args) == 2 and isinstance(args[1], Node):
        other = value(args[1])
        if isinstance(other, torch.Tensor):
            return Canon("cast", node, {"input": args[0], "dtype": other.dtype})
    if name == "type" and len(args) == 2 and isinstance(args[1], torch.dtype):
        return Canon("cast", node, {"input": args[0], "dtype": args[1]})
    if name == "to":
        dtype = kwargs.get("dtype")
        for arg in args[1:]:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, Node) and isinstance(value(arg), torch.Tensor):
                dtype = value(arg).dtype
        if dtype is None or set(kwargs) - {"dtype", "device", "non_blocking", "copy"}:
            return None
        if kwargs.get("copy"):
            return None
        out = value(node)
        src = value(args[0])
        if isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor):
            if out.device != src.device:
                return None  # a device move is not a cast
        return Canon("cast", node, {"input": args[0], "dtype": dtype})
    return None


def canon(node: Any) -> Canon | None:
    """The canonical view of ``node``, or ``None`` if it computes nothing passes model."""
    if not isinstance(node, Node):
        return None
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target)
    elif node.op == "call_method":
        cast = _cast(node)
        if cast is not None:
            return cast
        kind = _METHOD_KINDS.get(node.target)
    else:
        return None
    if kind is None:
        return None
    bound = _bind(kind, tuple(node.args), dict(node.kwargs))
    if bound is None:
        return None
    if kind in ("add", "sub") and bound.pop("alpha") != 1:
        return None
    if kind == "div" and bound.pop("rounding_mode") is not None:
        return None
    if kind in ("silu", "relu") and bound.pop("inplace"):
        return None
    if kind == "square":
        return Canon("pow", node, {"input": bound["input"], "exponent": 2})
    return Canon(kind, node, bound)


def is_kind(node: Any, *kinds: str) -> Canon | None:
    """``canon(node)`` if its kind is one of ``kinds``, else None."""
    c = canon(node)
    return c if c is not None and c.kind in kinds else None


def live_canons(graph: Graph, *kinds: str) -> Iterator[Canon]:
    """The canonical view of each node of one of ``kinds``, over the graph as it was when the
    walk began, skipping nodes a rewrite on the way has erased (a pass's outer loop)."""
    for node in list(graph.nodes):
        if not node._erased and (c := is_kind(node, *kinds)) is not None:
            yield c


# ---------------------------------------------------------------------------------------------
# Values, dtypes, shapes
# ---------------------------------------------------------------------------------------------
# While the passes run over the body of a checkpointed region (``passes.run_pipeline``), each
# body placeholder's meta holds, under this key, the node of the enclosing graph it is bound to.
# Analyses that prove where a value comes from (the attention mask) follow it; rewrites never
# use an outer node directly (``PassContext.local`` makes it a body input first).
OUTER_NODE = "chronicals_outer_node"


def value(node: Any) -> Any:
    """The example value of a node (a FakeTensor for tensors), or the constant itself."""
    if isinstance(node, Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def tensor_value(node: Any) -> torch.Tensor | None:
    v = value(node)
    return v if isinstance(v, torch.Tensor) else None


def autocast_dtype(node: Node, device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs low-precision ops in at ``node`` on ``device_type``;
    None where autocast is off there.

    Two sources: an autocast region of the graph around ``node`` (Dynamo records a
    ``with torch.autocast(...)`` inside the traced code as ``_enter_autocast`` …
    ``_exit_autocast`` calls), innermost first; else the state the backend runs under (an
    autocast around the model's call, as HF Trainer's: Dynamo guards on it, so the graph only
    ever runs under it)."""
    from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

    open_regions: list[Node] = []
    for n in node.graph.nodes:
        if n is node:
            break
        if n.op == "call_function" and n.target is _enter_autocast:
            open_regions.append(n)
        elif n.op == "call_function" and n.target is _exit_autocast and n.args[0] in open_regions:
            open_regions.remove(n.args[0])
    for enter in reversed(open_regions):
        device, dtype, enabled = (list(enter.args) + [None, True])[:3]
        if device == device_type:
            return (dtype or torch.get_autocast_dtype(device_type)) if enabled else None
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast_dtype(result: Node, operands: Iterable[Node]) -> torch.dtype | None:
    """The low precision ``torch.autocast`` cast ``operands`` to for the op that gives
    ``result``: the result's dtype (bf16/fp16), where every operand is fp32 or already in it
    (at least one fp32: autocast casts those, and leaves the others) and autocast runs in that
    dtype at ``result`` (:func:`autocast_dtype`). None otherwise (no fp32 operand, one in a
    third dtype, autocast off or in another dtype there): mixed dtypes that are not autocast's
    doing. The passes that meet autocast's mixed dtypes make these casts explicit."""
    out, operands = tensor_value(result), list(operands)
    if out is None or out.dtype not in (torch.bfloat16, torch.float16) or not operands:
        return None
    dtypes = {tensor_value(n).dtype for n in operands}
    if torch.float32 not in dtypes or not dtypes <= {torch.float32, out.dtype}:
        return None
    return out.dtype if autocast_dtype(result, out.device.type) == out.dtype else None


# F.scaled_dot_product_attention as Dynamo may record it.
SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}

# Ops that only move data: a cast commutes with them.
_LAYOUT_METHODS = {"view", "reshape", "expand", "transpose", "permute", "contiguous",
                   "unsqueeze", "flatten", "__getitem__"}
_LAYOUT_FUNCTIONS = {operator.getitem, torch.reshape, torch.transpose, torch.permute,
                     torch.unsqueeze, torch.flatten}


def readers_through_layout(result: Node, is_reader: Callable[[Node, Node], bool]
                           ) -> tuple[list[Node], list[Node]] | None:
    """(walked, readers): every path from ``result`` through data-movement ops (views,
    transposes, expand, indexing) ends at a node ``is_reader(node, reading)`` accepts, where
    ``reading`` is the tensor it gets; the data-movement nodes walked, in graph order, and the
    readers. None where a path ends elsewhere (or nowhere: a result nothing reads)."""
    walked, readers, frontier = [], [], [result]
    while frontier:
        node = frontier.pop()
        if not node.users:
            return None
        for user in node.users:
            layout = (user.op == "call_method" and user.target in _LAYOUT_METHODS) or \
                     (user.op == "call_function" and user.target in _LAYOUT_FUNCTIONS)
            if layout and user.args[0] is node:
                walked.append(user)
                frontier.append(user)
            elif is_reader(user, node):
                readers.append(user)
            else:
                return None
    order = {n: i for i, n in enumerate(result.graph.nodes)}
    return sorted(set(walked), key=order.__getitem__), list(dict.fromkeys(readers))


def refresh_values(nodes: Iterable[Node]) -> None:
    """Recompute the example values of ``nodes`` (in graph order) after an input changed dtype."""
    for node in nodes:
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        node.meta["example_value"] = fake_call(fn, node.args, node.kwargs)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def number(x: Any) -> float | None:
    """A Python constant as float, or None for anything else (a tensor, a symbolic value)."""
    return float(x) if is_number(x) else None


def promoted_float(x: Any) -> bool:
    """True for a float Dynamo turned into a graph input (a 0-d float64 placeholder, read by
    ``.item()``): it does so for a float that differed at a recompile of the same code — e.g. a
    second model compiled in this process whose config has another eps (transformers' models
    share their forward's wrapper)."""
    if not (isinstance(x, Node) and x.op == "call_method" and x.target == "item" and x.args
            and isinstance(x.args[0], Node) and x.args[0].op == "placeholder"):
        return False
    held = tensor_value(x.args[0])
    return held is not None and held.dim() == 0 and held.dtype == torch.float64


def not_constant(name: str, x: Any) -> str:
    """The decline reason for a scalar the kernel needs as a constant that is not one; for a
    :func:`promoted_float`, with what happened and the setting that keeps floats constant."""
    if promoted_float(x):
        return (f"{name} is not a constant: Dynamo made this float a graph input after a "
                "recompile (another model compiled in this process with another value?); "
                "torch._dynamo.config.specialize_float = True keeps floats constant")
    return f"{name} is not a constant"


def static_int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def normalize_dim(dim: Any, ndim: int) -> tuple[int, ...] | None:
    """``dim`` (int, list or tuple) as sorted non-negative axes, or None if not static."""
    dims = dim if isinstance(dim, (list, tuple)) else (dim,)
    out = []
    for d in dims:
        if static_int(d) is None or not -ndim <= d < ndim:
            return None
        out.append(d % ndim)
    return tuple(sorted(out))


# Mantissa bits: a cast to a dtype with fewer bits rounds.
_MANTISSA = {torch.float64: 52, torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}


def narrower(a: torch.dtype, b: torch.dtype) -> bool:
    """True if values in ``a`` carry fewer mantissa bits than ``b`` (a cast to ``a`` rounds)."""
    return _MANTISSA.get(a, 99) < _MANTISSA.get(b, 99)


def strip_casts(node: Any) -> tuple[Any, list[Canon]]:
    """Follow dtype casts upward: the source value and the casts passed on the way."""
    casts = []
    while (c := is_kind(node, "cast")) is not None:
        casts.append(c)
        node = c["input"]
    return node, casts


def scaled_operand(node: Any) -> tuple[Node, Any] | None:
    """(x, s) if ``node`` computes x·s, s·x or x/s with x a node; what s may be is the
    caller's to check (a number, a symbolic one, ...)."""
    c = is_kind(node, "mul", "div")
    if c is None:
        return None
    x, s = c["input"], c["other"]
    if c.kind == "mul" and tensor_value(x) is None:   # s · x (s a number or a symbolic one)
        x, s = s, x
    return (x, s) if isinstance(x, Node) else None


# ---------------------------------------------------------------------------------------------
# Exclusivity and rewriting
# ---------------------------------------------------------------------------------------------
def sole_user(node: Node) -> Node | None:
    """The only user of ``node``, or None if it has zero or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def used_outside(internal: Iterable[Node], allowed: Iterable[Node]) -> Node | None:
    """The first node of ``internal`` with a user outside ``allowed``, else None.

    A subgraph is ours to replace only if its intermediates feed nothing else: otherwise the
    graph still needs them and replacing it would compute them twice (or not at all).
    """
    allowed = set(allowed)
    for node in internal:
        if any(user not in allowed for user in node.users):
            return node
    return None


def fake_call(target: Any, args: tuple, kwargs: dict | None = None) -> Any:
    """Run ``target`` on the example values of ``args`` under the graph's fake mode.

    Nodes a pass inserts need ``meta["example_value"]`` like Dynamo's own, so later passes
    and Inductor see a valid graph. Arguments may nest nodes (a shape tuple with symbolic sizes,
    the tuple an op returned).
    """
    args, kwargs = map_arg((tuple(args), dict(kwargs or {})), value)
    modes = {id(m): m for v in torch.utils._pytree.tree_leaves((args, kwargs))
             if (m := getattr(v, "fake_mode", None)) is not None}
    if len(modes) != 1:
        raise RuntimeError(f"expected example values of one fake mode, found {len(modes)}")
    with next(iter(modes.values())):
        return target(*args, **kwargs)


def call_before(graph: Graph, before: Node, target: Any, args: tuple,
                kwargs: dict | None = None, meta_from: Node | None = None) -> Node:
    """Insert ``target(*args, **kwargs)`` before ``before``, with the metadata of ``meta_from``
    (default ``before``: the module stack, for the report) and its own fake ``example_value``.
    A string target is a tensor method (``"to"``: a cast, as Dynamo spells it)."""
    kwargs = kwargs or {}
    with graph.inserting_before(before):
        new = (graph.call_method(target, args, kwargs) if isinstance(target, str)
               else graph.call_function(target, args, kwargs))
    source = before if meta_from is None else meta_from
    # where it lives (the module stack), not what it computes (value, source function)
    new.meta = {k: v for k, v in source.meta.items()
                if k not in ("example_value", "val", "source_fn_stack")}
    fn = getattr(torch.Tensor, target) if isinstance(target, str) else target
    new.meta["example_value"] = fake_call(fn, args, kwargs)
    return new


def replace_with_call(graph: Graph, old: Node, target: Any, args: tuple,
                      kwargs: dict | None = None, erase: Iterable[Node] = ()) -> Node:
    """Insert ``target(*args)`` before ``old``, redirect ``old``'s users to it, erase the dead.

    ``erase`` lists the matched nodes; each is removed once nothing uses it (reverse
    topological order), so values still needed elsewhere stay in the graph.
    """
    new = call_before(graph, old, target, args, kwargs)
    old.replace_all_uses_with(new)
    erase_dead(graph, [*erase, old])
    return new


def insert_call(graph: Graph, before: Node, target: Any, args: tuple, meta_from: Node,
                n_outputs: int) -> list[Node]:
    """Insert ``target(*args)`` (returning a tuple of ``n_outputs`` tensors) before ``before``;
    returns one ``getitem`` node per output, each with its fake ``example_value``.

    The caller redirects users (``replace_all_uses_with``) and erases what became dead.
    """
    call = call_before(graph, before, target, args, meta_from=meta_from)
    return [call_before(graph, before, operator.getitem, (call, i), meta_from=meta_from)
            for i in range(n_outputs)]


def erase_dead(graph: Graph, nodes: Iterable[Node]) -> None:
    """Erase those of ``nodes`` that nothing uses any more, users before producers."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(set(nodes), key=order.__getitem__, reverse=True):
        if not node.users and node.op in ("call_function", "call_method"):
            graph.erase_node(node)


# ---------------------------------------------------------------------------------------------
# Where a node lives, for the report (never a reason to match)
# ---------------------------------------------------------------------------------------------
_SOURCE_ROOT = re.compile(r"^L\['[^']*'\](\[\d+\])?")
_MODULES_KEY = re.compile(r"\.(?:__dict__\['_modules'\]|_modules)\['([^']*)'\]")
_INDEX = re.compile(r"\[(\d+)\]")


def where(node: Node) -> str:
    """The module path of ``node`` (``model.layers.0.input_layernorm``), or its name."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return f"<{node.name}>"
    source = list(stack.values())[-1][0]
    path = _SOURCE_ROOT.sub("", source)
    path = _MODULES_KEY.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".") or "<root>"
