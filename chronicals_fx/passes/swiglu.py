"""Find gated MLP activations (SwiGLU, GeGLU) by what they compute; replace each with
``chronicals::swiglu``.

The computation matched, in either operand order:

    y = act(g) · u

where g and u are projections of the same tensor x:

    projection  linear(x, W, b)                          bias or not
              | grouped_mm(x, W, offs)                   experts of a mixture (x's rows sorted
                                                         by expert, W [E, H, ·]): transformers'
                                                         MoE layers, torch's or its fallback op
              | P + low-rank delta                       LoRA: P + B(A(x))·s (PEFT's spelling)
              | P.masked_fill(row_mask, 0)               whole rows zeroed (transformers 5.17's
                                                         MoE layers: rows no expert computed)
              | cast(P)
              | piece of one fused projection P = x Wᵀ   chunk / split / slice on the last dim

and act is an elementwise function of g alone, recognised by *evaluating* the subgraph from g
to act(g) (elementwise ops and numeric constants only) on probe values in float64 and
comparing with the activations the kernel has (``kernels.swiglu.ACTIVATIONS``):

    silu        F.silu, nn.SiLU, g·sigmoid(g), g/(1+exp(-g)), ...
    gelu        F.gelu, nn.GELU, g·½(1+erf(g/√2)), ...
    gelu_tanh   F.gelu(approximate="tanh") (HF's gelu_pytorch_tanh), and the hand-written tanh
                formula ½g(1+tanh(√(2/π)(g+0.044715g³))) in any arrangement (HF's gelu_new,
                gelu_fast)

The projections stay as matmuls; only act(g)·u becomes one op call. Not candidates, never
mentioned: a non-gated MLP act(fc(x)), a product of two projections without an activation,
products whose operands are not projections of one tensor. Declined with a reason: other
gate activations (relu, sigmoid — GLU — quick_gelu, ...), dtypes or devices the kernel
doesn't take, operands of different shapes (broadcasting), an activation value used
elsewhere.

Memory: where g and u are each a whole fresh projection result that nothing but the op reads
(not pieces of a fused projection, not used elsewhere, not graph outputs), the op is called
with ``inplace_backward``: its backward writes dg, du over g, u (see ``kernels.swiglu``); the
backend gives Inductor the post-grad pass that keeps that write in place in the compiled backward.
With ``Config.swiglu_save_hidden=False``, a down projection ``linear(y, W, b)`` that is y's only
reader goes into the op as well (``chronicals::swiglu_linear``): y is then not saved for the
down projection's backward; the op's backward writes it again (see ``kernels.swiglu``), on
Hopper in the epilogue of the dh GEMM (``Config.swiglu_fused_gemm``, ``kernels.swiglu_gemm``).

Rounding: the kernel computes act(g) in fp32, rounds it to the inputs' dtype, multiplies and
rounds again — exactly eager's rounding points for F.silu/F.gelu in bf16/fp16 (which compute
in fp32 internally). A hand-written activation in bf16 rounds after each of its ops in
eager; the kernel computes it in fp32 (more accurate, differences at bf16 rounding level),
and the match says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..kernels._triton import KERNEL_DTYPES
from ..kernels.swiglu import ACTIVATIONS
from .graph import (autocast_cast_dtype, call_before, canon, is_kind, live_canons, narrower,
                    normalize_dim, number, replace_with_call, scaled_operand, strip_casts,
                    tensor_value, used_outside)

NAME = "swiglu"
_LOW = (torch.bfloat16, torch.float16)
_MAX_CHAIN = 32   # nodes in one activation subgraph; bigger is not an activation


@dataclass
class _Projection:
    input: Node                  # the tensor projected (x)
    fused: Node | None = None    # the fused projection the piece was cut from
    split: str = ""              # how it was cut: "chunk", "split", "slice"
    experts: bool = False        # a grouped matmul: each expert's rows by its own weight


@dataclass
class _Site:
    mul: Node                    # act(g) · u
    gate: Node                   # g: the op's first input
    up: Node                     # u: the op's second input
    chain: list[Node]            # g → act(g), topological order (act(g) last)
    gate_proj: _Projection
    up_proj: _Projection
    activation: str = ""
    composite: bool = False      # spelled as several ops (rounds per op in eager)
    casts: list[Node] = field(default_factory=list)
    inplace_backward: bool = False
    down_projection: bool = False    # the down projection taken into the op (swiglu_linear)
    autocast_down: bool = False      # ... with autocast's casts of its W (and b) made explicit


def run(gm: GraphModule, ctx) -> None:
    for mul in live_canons(gm.graph, "mul"):
        node = mul.node
        site = _find(node, mul["input"], mul["other"])
        if site is None:
            continue
        site.activation = _identify(site.chain, site.gate) or ""
        if site.activation == "identity":
            continue    # cast(g) · u: a product of projections, no activation
        reason = _activation_declines(site) or _kernel_declines(site)
        if reason:
            ctx.declined(node, reason)
            continue
        out = _rewrite(gm, site)
        if (not ctx.config.swiglu_save_hidden
                and _take_in_down_projection(gm, out, site, ctx.config.swiglu_fused_gemm)
                is not None):
            ctx.matched(out, _describe(site))     # where the gated product was (the MLP)
            continue
        site.inplace_backward = _overwritable(out, site.gate) and _overwritable(out, site.up)
        if site.inplace_backward:
            out.args = (*out.args[:3], True)
        ctx.matched(out, _describe(site))


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------
def projection(node) -> _Projection | None:
    """How ``node`` projects a tensor x (see the module docstring), or None."""
    node, _ = strip_casts(node)
    if not isinstance(node, Node):
        return None
    c = canon(node)
    if c is not None and c.kind == "linear" and isinstance(c["input"], Node):
        return _Projection(c["input"])
    if _is_grouped_mm(node) and node.args and isinstance(node.args[0], Node):
        return _Projection(node.args[0], experts=True)
    if c is not None and c.kind == "masked_fill" and _zeroes_rows(c):
        return projection(c["input"])
    if c is not None and c.kind == "add":
        for base, delta in ((c["input"], c["other"]), (c["other"], c["input"])):
            proj = projection(base)
            if proj is not None and _low_rank_delta(delta):
                return proj
        return None
    if c is not None and c.kind == "getitem":
        return _piece(c["input"], c["index"])
    return None


def _is_grouped_mm(node: Node) -> bool:
    """A grouped matmul: each expert's rows of x times that expert's weight (one projection of
    x per expert, as F.linear is one for all rows)."""
    if node.op != "call_function":
        return False
    ops = _grouped_mms()
    return node.target in ops or getattr(node.target, "overloadpacket", None) in ops


@functools.cache
def _grouped_mms() -> tuple:
    found = [f for f in (getattr(torch, "_grouped_mm", None), getattr(F, "grouped_mm", None),
                         getattr(torch.ops.aten, "_grouped_mm", None)) if f is not None]
    try:   # transformers' own op where torch's can't serve (fp32 under compile, older CPUs)
        found.append(torch.ops.transformers.grouped_mm_fallback)
    except (AttributeError, RuntimeError):
        pass
    return tuple(found)


def _zeroes_rows(fill) -> bool:
    """P.masked_fill(mask, 0) with a mask of whole rows (size 1 in the last dim): each row is
    still x's row times W, or 0. transformers 5.17's grouped-matmul experts zero this way the
    rows the kernel leaves unwritten (tokens routed to no expert of this rank) after each
    grouped matmul; the fill stays in the graph, so the product reads the same values."""
    mask, filled = tensor_value(fill["mask"]), tensor_value(fill["input"])
    return (number(fill["value"]) == 0 and mask is not None and filled is not None
            and mask.dim() >= 1 and mask.shape[-1] == 1 and filled.shape[-1] > 1)


def _low_rank_delta(node) -> bool:
    """B(A(x)) · s: a linear, possibly scaled by a number and cast (LoRA's added branch)."""
    node, _ = strip_casts(node)
    scaled = scaled_operand(node)
    if scaled is not None:
        if number(scaled[1]) is None:
            return False
        node, _ = strip_casts(scaled[0])
    return is_kind(node, "linear") is not None


_SPLITTERS = {torch.chunk: "chunk", torch.split: "split", "chunk": "chunk", "split": "split"}


def _piece(source, index) -> _Projection | None:
    """A projection if ``source[index]`` is a last-dim piece of a (fused) projection."""
    if not isinstance(source, Node):
        return None
    how = None
    if source.op == "call_function" and source.target in (torch.chunk, torch.split):
        how = _SPLITTERS[source.target]
    elif source.op == "call_method" and source.target in ("chunk", "split"):
        how = _SPLITTERS[source.target]
    if how is not None:
        if not isinstance(index, int) or not source.args:
            return None
        fused = source.args[0]
        dim = source.args[2] if len(source.args) > 2 else source.kwargs.get("dim", 0)
        return _fused_piece(fused, dim, how)
    if _last_dim_slice(index, source):
        return _fused_piece(source, -1, "slice")
    return None


def _fused_piece(fused, dim, how) -> _Projection | None:
    value = tensor_value(fused)
    proj = projection(fused)
    if value is None or proj is None or normalize_dim(dim, value.dim()) != (value.dim() - 1,):
        return None
    return _Projection(proj.input, fused, how, proj.experts)


def _last_dim_slice(index, source: Node) -> bool:
    """True if ``index`` is a basic slice of the last dim only (a view, no copy)."""
    value = tensor_value(source)
    if value is None:
        return False
    index = index if isinstance(index, tuple) else (index,)
    if not index or not all(isinstance(e, slice) or e is Ellipsis for e in index):
        return False
    ellipses = sum(e is Ellipsis for e in index)
    if ellipses > 1 or index[-1] is Ellipsis:
        return False
    if not ellipses and len(index) != value.dim():
        return False
    last = index[-1]
    everything = slice(None, None, None)
    if any(e is not Ellipsis and e != everything for e in index[:-1]):
        return False
    return (last != everything and last.step in (None, 1)
            and all(v is None or isinstance(v, int) for v in (last.start, last.stop)))


# ---------------------------------------------------------------------------------------------
# The activation: an elementwise subgraph of g alone, identified by evaluating it
# ---------------------------------------------------------------------------------------------
_UNARY = {"neg": torch.neg, "exp": torch.exp, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
          "silu": F.silu, "relu": F.relu, "reciprocal": torch.reciprocal, "sqrt": torch.sqrt,
          "rsqrt": torch.rsqrt}
_BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
           "pow": torch.pow}
_ERF = (torch.erf, torch.special.erf)


def _is_erf(node: Node) -> bool:
    return ((node.op == "call_function" and node.target in _ERF and len(node.args) == 1
             and not node.kwargs)
            or (node.op == "call_method" and node.target == "erf" and len(node.args) == 1))


def _operands(node: Node) -> list | None:
    """The value operands of an elementwise node we can evaluate, or None."""
    if _is_erf(node):
        return [node.args[0]]
    c = canon(node)
    if c is None:
        return None
    if c.kind == "cast":
        return [c["input"]] if c["dtype"] in (*KERNEL_DTYPES, torch.float64) else None
    if c.kind in _UNARY:
        return [c["input"]]
    if c.kind == "gelu":
        return [c["input"]] if c["approximate"] in ("none", "tanh") else None
    if c.kind in _BINARY:
        operands = [c["input"], c["exponent" if c.kind == "pow" else "other"]]
        if not all(isinstance(o, Node) or _is_constant(o) for o in operands):
            return None
        return operands
    return None


def _is_constant(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _chain(out) -> tuple[Node, list[Node]] | None:
    """(g, nodes from g to ``out``) if ``out`` is an elementwise function of one projection g."""
    if not isinstance(out, Node):
        return None
    order: list[Node] = []
    leaves: set[Node] = set()
    seen: set[Node] = set()

    def visit(node: Node) -> bool:           # post-order: operands before users
        if node in seen:
            return True
        seen.add(node)
        if projection(node) is not None:
            leaves.add(node)
            return True
        operands = _operands(node)
        if operands is None or len(seen) > _MAX_CHAIN:
            return False
        if not all(visit(o) for o in operands if isinstance(o, Node)):
            return False
        order.append(node)
        return True

    if not visit(out) or len(leaves) != 1 or not order:
        return None
    gate = leaves.pop()
    # A widening cast of the projection belongs to the activation (the kernel computes in
    # fp32 anyway): g stays the projection's own value, e.g. silu(g.float()).to(bf16).
    while (cast := is_kind(gate, "cast")) is not None and isinstance(cast["input"], Node):
        src = tensor_value(cast["input"])
        if src is None or narrower(cast["dtype"], src.dtype) or not _only_feeds(gate, order):
            break
        order.insert(0, gate)
        gate = cast["input"]
    return gate, order


def _only_feeds(node: Node, chain: list[Node]) -> bool:
    return all(user in chain for user in node.users)


def _evaluate(chain: list[Node], gate: Node, x: torch.Tensor) -> torch.Tensor:
    env = {gate: x}
    val = lambda a: env[a] if isinstance(a, Node) else a  # noqa: E731
    for node in chain:
        if _is_erf(node):
            env[node] = torch.erf(val(node.args[0]))
            continue
        c = canon(node)
        if c.kind == "cast":
            env[node] = val(c["input"])          # rounding aside, a cast is the identity
        elif c.kind == "gelu":
            env[node] = F.gelu(val(c["input"]), approximate=c["approximate"])
        elif c.kind in _UNARY:
            env[node] = _UNARY[c.kind](val(c["input"]))
        else:
            a, b = val(c["input"]), val(c["exponent" if c.kind == "pow" else "other"])
            if not isinstance(a, torch.Tensor):
                a = torch.full_like(x, a)
            env[node] = _BINARY[c.kind](a, b)
    return env[chain[-1]]


@functools.lru_cache(maxsize=1)
def _probe() -> torch.Tensor:
    """Probe values: a dense grid over the range where activations differ, and beyond."""
    return torch.cat([torch.linspace(-8.0, 8.0, 161, dtype=torch.float64),
                      torch.tensor([-30.0, -12.5, 12.5, 30.0], dtype=torch.float64)])


_KNOWN = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    # Known but not served: named in the decline.
    "relu": F.relu,
    "sigmoid (GLU)": torch.sigmoid,
    "tanh": torch.tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "identity": lambda x: x,
}


def _identify(chain: list[Node], gate: Node) -> str | None:
    """The name of the activation ``chain`` computes, or None if none we know."""
    x = _probe()
    try:
        y = _evaluate(chain, gate, x)
    except Exception:  # an operand we can't reproduce (e.g. a tensor constant): not ours
        return None
    if y.shape != x.shape or not torch.isfinite(y).all():
        return None
    for name, fn in _KNOWN.items():
        ref = fn(x)
        if torch.allclose(y, ref, rtol=1e-6, atol=1e-7):
            return name
    return None


# ---------------------------------------------------------------------------------------------
# Finding
# ---------------------------------------------------------------------------------------------
def _find(mul: Node, a, b) -> _Site | None:
    if not isinstance(a, Node) or not isinstance(b, Node):
        return None
    for act_out, up in ((a, b), (b, a)):
        up_proj = projection(up)
        if up_proj is None:
            continue
        found = _chain(act_out)
        if found is None:
            continue
        gate, chain = found
        if gate is up or _same_call(gate, up):
            continue    # g · f(g): an activation itself (e.g. g·sigmoid(g)), not a gate
        gate_proj = projection(gate)
        if gate_proj is None or gate_proj.input is not up_proj.input:
            continue
        return _Site(mul, gate, up, chain, gate_proj, up_proj)
    return None


def _same_call(a: Node, b: Node) -> bool:
    """Two calls of one pure function on the same arguments (``fc(x) * sigmoid(fc(x))``)."""
    return (a.op == b.op and a.op in ("call_function", "call_method") and a.target == b.target
            and a.args == b.args and a.kwargs == b.kwargs)


def _activation_declines(site: _Site) -> str | None:
    name = site.activation
    if not name:
        return "gate activation is not SiLU or GELU (an elementwise function the kernel lacks)"
    if name not in ACTIVATIONS:
        return f"gate activation {name}: the kernel has {', '.join(ACTIVATIONS)}"
    ops = [n for n in site.chain if is_kind(n, "cast") is None]
    site.composite = len(ops) > 1
    site.casts = [n for n in site.chain if is_kind(n, "cast") is not None]
    return None


def _kernel_declines(site: _Site) -> str | None:
    """Why the kernel can't take this site, or None."""
    g, u, y = tensor_value(site.gate), tensor_value(site.up), tensor_value(site.mul)
    a = tensor_value(site.chain[-1])
    if g is None or u is None or y is None or a is None:
        return "no shape/dtype information"
    if g.dtype not in KERNEL_DTYPES:
        return f"gate dtype {g.dtype} (kernel: fp32, bf16, fp16)"
    if not g.dtype == u.dtype == a.dtype == y.dtype:
        return (f"dtypes gate {_short(g.dtype)}, act(gate) {_short(a.dtype)}, up {_short(u.dtype)}, "
                f"product {_short(y.dtype)}: the kernel takes and returns one dtype")
    for cast in site.casts:
        if narrower(canon(cast)["dtype"], g.dtype):
            return f"activation rounds through {_short(canon(cast)['dtype'])} inside"
    if g.device.type not in ("cuda", "cpu"):
        return f"device {g.device.type}"
    if u.device != g.device:
        return "gate and up on different devices"
    if tuple(g.shape) != tuple(u.shape) or tuple(y.shape) != tuple(g.shape):
        return (f"gate shape {tuple(g.shape)} and up shape {tuple(u.shape)} differ "
                "(broadcasting; the kernel is elementwise over equal shapes)")
    if (node := used_outside(site.chain, [*site.chain, site.mul])) is not None:
        return f"intermediate {node.name} (part of act(gate)) is used outside the gated product"
    return None


# ---------------------------------------------------------------------------------------------
# Rewriting and reporting
# ---------------------------------------------------------------------------------------------
def _rewrite(gm: GraphModule, site: _Site) -> Node:
    args = (site.gate, site.up, ACTIVATIONS[site.activation])
    return replace_with_call(gm.graph, site.mul, torch.ops.chronicals.swiglu.default, args,
                             erase=site.chain)


def _take_in_down_projection(gm: GraphModule, op: Node, site: _Site, fused_gemm: bool
                             ) -> Node | None:
    """``linear(swiglu(g, u), W, b)`` → ``swiglu_linear(g, u, W, b)`` where the linear is the
    op's only reader and takes it as is (one dtype, W [O, I]); else None, ``op`` unchanged (a
    LoRA'd down projection, for one, reads the op twice)."""
    if len(op.users) != 1:
        return None
    linear = is_kind(next(iter(op.users)), "linear")
    if linear is None or linear["input"] is not op or not isinstance(linear["weight"], Node):
        return None
    h, w, out = tensor_value(op), tensor_value(linear["weight"]), tensor_value(linear.node)
    b = linear["bias"]
    if h is None or w is None or out is None or w.dim() != 2 or w.shape[1] != h.shape[-1]:
        return None
    if b is not None and not (isinstance(b, Node) and tensor_value(b) is not None):
        return None
    if h.dtype != out.dtype or w.device != h.device:
        return None
    weight = linear["weight"]
    operands = [weight] + ([b] if b is not None else [])
    if any(tensor_value(n).dtype != h.dtype for n in operands):
        # Under torch.autocast an fp32 W (and b) meets the bf16/fp16 product, and autocast
        # casts them down for the GEMM: made explicit here, as the attention and loss passes do.
        if autocast_cast_dtype(linear.node, operands) != h.dtype:
            return None
        weight = call_before(gm.graph, linear.node, "to", (weight, h.dtype))
        b = None if b is None else call_before(gm.graph, linear.node, "to", (b, h.dtype))
        site.autocast_down = True
    site.down_projection = True
    args = (site.gate, site.up, weight, b, ACTIVATIONS[site.activation], fused_gemm)
    return replace_with_call(gm.graph, linear.node, torch.ops.chronicals.swiglu_linear.default,
                             args, erase=[op])


def _overwritable(op: Node, node: Node) -> bool:
    """True if the op's backward may write over ``node``'s tensor: a fresh projection result
    (linear, or LoRA's sum), reached through nothing but casts (which may return their input
    itself), that no node but ``op`` reads along the way — so no other value shares its storage
    and nothing reads it after the op, the graph's output included.

    Pieces of a fused projection are left out: the write into a view of the fused tensor is
    functionalized into scatters that read the whole tensor again afterwards, which the
    compiled backward can't keep in place (it would give the kernel fresh buffers, plus the
    scatters' copy of the fused tensor: worse than the out-of-place backward).
    """
    chain = [node]
    while (cast := is_kind(chain[-1], "cast")) is not None and isinstance(cast["input"], Node):
        chain.append(cast["input"])
    if is_kind(chain[-1], "linear", "add") is None:
        return False
    allowed = {op, *chain}
    return all(set(n.users) <= allowed for n in chain)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _describe(site: _Site) -> str:
    g = tensor_value(site.gate)
    parts = [f"{_short(g.dtype)} I={g.shape[-1]}", site.activation]
    if site.gate_proj.fused is not None and site.gate_proj.fused is site.up_proj.fused:
        parts.append(f"fused gate/up projection ({site.gate_proj.split})")
    if site.gate_proj.experts:
        parts.append("experts of a mixture (grouped matmul)")
    if site.composite:
        note = "activation spelled out, matched by value"
        if g.dtype in _LOW:
            note += f"; computed in fp32 (eager rounds each op to {_short(g.dtype)})"
        parts.append(note)
    if site.inplace_backward:
        parts.append("backward writes dg, du over g, u")
    if site.down_projection:
        parts.append("down projection taken in: saves g, u only")
    if site.autocast_down:
        parts.append("autocast's casts of the down projection's weight made explicit")
    return ", ".join(parts)
