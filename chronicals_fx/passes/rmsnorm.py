"""Find RMSNorm by what it computes and replace it with ``chronicals::rms_norm``.

The canonical computation (any spelling :mod:`.graph` folds into it):

    S = x_b²                       pow(x, 2) | x * x | square(x)
    V = mean(S, dim=-1, keepdim)
    A = V + eps                    eps a constant
    N = x_a · rsqrt(A)             rsqrt | 1/sqrt | reciprocal(sqrt) | pow(·, -0.5) | x_a / sqrt(A)

with x_a and x_b the same tensor up to widening casts, followed optionally by casts, one
multiply by a weight vector of shape [H] (possibly ``w + offset``, in either operand order),
and more casts. ``torch.rms_norm`` / ``F.rms_norm`` / ``nn.RMSNorm`` are matched directly.

Every dtype the value passes through is recorded, so the kernel rounds where eager rounds.
Not RMSNorm, never matched: a sum of squares (L2 normalization), a centered input (LayerNorm),
a statistic of one tensor applied to another.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from ..kernels._triton import KERNEL_DTYPES
from ..kernels.rmsnorm import MAX_HIDDEN
from .graph import (Canon, autocast_cast_dtype, canon, erase_dead, insert_call, is_kind,
                    live_canons, narrower, normalize_dim, not_constant, number,
                    readers_through_layout, refresh_values, replace_with_call, sole_user,
                    static_int, tensor_value, used_outside)

NAME = "rmsnorm"
_LOW = (torch.bfloat16, torch.float16)


@dataclass
class _Site:
    x: Node                      # input, before any widening cast
    eps: float
    output: Node                 # last node of the matched chain
    internal: list[Node]         # intermediates that must feed only the chain
    matched: list[Node] = field(default_factory=list)   # all nodes the op replaces
    weight: Node | None = None
    offset: float = 0.0
    norm_dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype = torch.float32
    mul_dtype: torch.dtype = torch.float32
    note: str = ""


def run(gm: GraphModule, ctx) -> None:
    for c in live_canons(gm.graph, "add", "rms_norm"):
        node = c.node
        site = _functional(c) if c.kind == "rms_norm" else _decomposed(c)
        if site is None:
            continue
        if isinstance(site, str):
            ctx.declined(node, site)
            continue
        reason = _kernel_declines(site)
        if reason:
            ctx.declined(node, reason)
            continue
        _rewrite(gm, site)
        ctx.matched(site.output, _describe(site))


# ---------------------------------------------------------------------------------------------
# Finding
# ---------------------------------------------------------------------------------------------
def _widening_base(node):
    """Follow casts upward while none of them rounds: the tensor the norm really reads."""
    while (c := is_kind(node, "cast")) is not None:
        src = tensor_value(c["input"])
        if src is None or narrower(c["dtype"], src.dtype):
            break
        node = c["input"]
    return node


def _squared(node) -> Node | None:
    """x if ``node`` computes x² (pow 2, x*x, square), else None."""
    c = canon(node)
    if c is None:
        return None
    if c.kind == "pow" and number(c["exponent"]) == 2.0:
        return c["input"]
    if c.kind == "mul" and c["input"] is c["other"]:
        return c["input"]
    return None


def _is_centered(node) -> bool:
    """x − mean(x): the input LayerNorm normalizes. RMSNorm of it is LayerNorm: not ours."""
    c = is_kind(node, "sub")
    if c is None:
        return False
    m = is_kind(c["other"], "mean")
    return m is not None and _widening_base(m["input"]) is _widening_base(c["input"])


def _decomposed(add: Canon):
    """Match from A = mean(x²) + eps; returns a _Site, a decline reason, or None."""
    stat, eps = add["input"], add["other"]
    if not is_kind(stat, "mean"):
        stat, eps = eps, stat
    mean = is_kind(stat, "mean")
    if mean is None:
        return None
    square = mean["input"]
    x_b = _squared(square)
    if x_b is None:
        return None
    base = _widening_base(x_b)
    if _is_centered(base):
        return None
    value = tensor_value(base)
    if value is None:
        return None

    # A → N: find the normalized value and the reciprocal-sqrt chain between.
    chain, normalized, x_a = _normalize_step(add.node)
    if normalized is None:
        return None
    weight_first = None
    if _widening_base(x_a) is not base:
        weight_first = _weight_times(x_a, base)
        if weight_first is None:
            return None  # statistics of one tensor applied to another: not a norm

    if normalize_dim(mean["dim"], value.dim()) != (value.dim() - 1,):
        return f"normalizes over dim {mean['dim']} of a {value.dim()}-D tensor; the kernel needs the last dim"
    if mean["keepdim"] is not True:
        return "mean without keepdim"
    if mean["dtype"] is not None:
        return "mean with an explicit dtype"
    if number(eps) is None:
        return not_constant("eps", eps)
    internal = [square, stat, add.node, *chain]
    site = _Site(x=base, eps=number(eps), output=normalized, internal=internal,
                 matched=[x_b, x_a, square, stat, add.node, *chain, normalized])
    site.norm_dtype = tensor_value(normalized).dtype
    if tensor_value(x_b).dtype in _LOW:
        site.note = f"statistics in fp32 (eager: {_short(tensor_value(x_b).dtype)})"
    if weight_first is None:
        _extend(site)
        return site
    # (w ⊙ x) · r: the weight multiply comes first; the kernel reassociates to (x · r) ⊙ w,
    # so only the final rounding point is kept.
    mul, (site.weight, site.offset, site.weight_dtype, extra) = weight_first
    site.matched += [*extra, mul]
    site.internal.append(mul)
    site.mul_dtype = site.norm_dtype
    site.norm_dtype = torch.float32
    site.output, site.mul_dtype = _absorb_casts(site, normalized, site.mul_dtype)
    site.note = "weight applied before the normalization (reassociated)"
    return site


def _weight_times(node, base):
    """(mul node, weight info) if ``node`` is w ⊙ x with x the norm's input, else None."""
    mul = is_kind(node, "mul")
    if mul is None:
        return None
    for a, b in ((mul["input"], mul["other"]), (mul["other"], mul["input"])):
        if isinstance(a, Node) and _widening_base(a) is base:
            weight = _weight(b, tensor_value(base).shape[-1])
            if weight is not None:
                return mul.node, weight
    return None


def _normalize_step(a: Node) -> tuple[list[Node], Node | None, Node | None]:
    """From A = mean + eps to N = x · A^(-1/2): (nodes between, N, x_a)."""
    user = sole_user(a)
    c = canon(user)
    if c is None:
        return [], None, None
    if c.kind == "rsqrt" or (c.kind == "pow" and number(c["exponent"]) == -0.5):
        return _times(user, [user])
    if c.kind == "sqrt":
        nxt = sole_user(user)
        d = canon(nxt)
        if d is None:
            return [], None, None
        if d.kind == "reciprocal" or (d.kind == "div" and number(d["input"]) == 1.0
                                     and d["other"] is user):
            return _times(nxt, [user, nxt])
        if d.kind == "div" and d["other"] is user and isinstance(d["input"], Node):
            return [user], nxt, d["input"]
    return [], None, None


def _times(r: Node, chain: list[Node]) -> tuple[list[Node], Node | None, Node | None]:
    """N = x · r in either order, r being 1/sqrt(A)."""
    user = sole_user(r)
    c = is_kind(user, "mul")
    if c is None:
        return [], None, None
    other = c["other"] if c["input"] is r else c["input"]
    if other is r or not isinstance(other, Node):
        return [], None, None
    return chain, user, other


def _functional(c: Canon):
    """torch.rms_norm(x, [H], weight, eps): fp32 statistics and weight multiply, cast back."""
    value = tensor_value(c["input"])
    if value is None:
        return None
    shape = c["normalized_shape"]
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or shape[0] != value.shape[-1]:
        return f"normalized_shape {shape}: the kernel normalizes the last dim only"
    eps = c["eps"]
    if eps is None:
        eps = torch.finfo(torch.float32).eps  # aten's default: epsilon of the fp32 opmath type
    if number(eps) is None:
        return not_constant("eps", eps)
    site = _Site(x=c["input"], eps=number(eps), output=c.node, internal=[], matched=[c.node])
    if c["weight"] is not None:
        site.weight = c["weight"]
        site.weight_dtype = tensor_value(c["weight"]).dtype
    return site


def _extend(site: _Site) -> None:
    """Grow the match from N through casts, one weight multiply, and casts."""
    out, rounding = site.output, site.norm_dtype
    out, rounding = _absorb_casts(site, out, rounding)
    site.norm_dtype = rounding
    hidden = tensor_value(site.x).shape[-1]
    mul = is_kind(sole_user(out), "mul")
    if mul is not None:
        other = mul["other"] if mul["input"] is out else mul["input"]
        weight = _weight(other, hidden) if other is not out else None
        if weight is not None:
            site.weight, site.offset, site.weight_dtype, extra = weight
            site.mul_dtype = tensor_value(mul.node).dtype
            site.matched += [*extra, mul.node]
            out, _ = _absorb_casts(site, mul.node, site.mul_dtype)
    site.output = out


def _absorb_casts(site: _Site, out: Node, rounding: torch.dtype) -> tuple[Node, torch.dtype]:
    """Take in single-use casts after ``out``; stop before a second low-precision dtype."""
    while (cast := is_kind(sole_user(out), "cast")) is not None:
        dtype = cast["dtype"]
        if dtype not in KERNEL_DTYPES:
            break
        if dtype in _LOW and rounding in _LOW and dtype != rounding:
            break  # bf16 then fp16 (or back): two roundings the kernel does not model
        if narrower(dtype, rounding):
            rounding = dtype
        out = cast.node
        site.matched.append(out)
    return out, rounding


def _weight(node, hidden: int):
    """(weight, offset, dtype of w + offset, nodes) if ``node`` is w, cast(w) or w + c."""
    extra = []
    top, casts = _strip(node, extra)
    offset, add_dtype = 0.0, None
    add = is_kind(top, "add")
    if add is not None:
        a, b = add["input"], add["other"]
        if number(a) is not None:
            a, b = b, a
        if number(b) is None or not isinstance(a, Node):
            return None
        offset, add_dtype = number(b), tensor_value(add.node).dtype
        extra.append(add.node)
        top, more = _strip(a, extra)
        casts += more
    w = tensor_value(top)
    if w is None or tuple(w.shape) != (hidden,) or w.dtype not in KERNEL_DTYPES:
        return None
    if any(narrower(c["dtype"], w.dtype) for c in casts):
        return None  # the weight is rounded before use: leave that multiply alone
    return top, offset, add_dtype or w.dtype, extra


def _strip(node, extra: list[Node]):
    casts = []
    while (c := is_kind(node, "cast")) is not None:
        casts.append(c)
        extra.append(c.node)
        node = c["input"]
    return node, casts


# ---------------------------------------------------------------------------------------------
# Accepting and rewriting
# ---------------------------------------------------------------------------------------------
def _kernel_declines(site: _Site) -> str | None:
    """Why the kernel can't take this site, or None."""
    x = tensor_value(site.x)
    if x.dtype not in KERNEL_DTYPES:
        return f"input dtype {x.dtype} (kernel: fp32, bf16, fp16)"
    if x.device.type not in ("cuda", "cpu"):
        return f"device {x.device.type}"
    hidden = static_int(x.shape[-1])
    if hidden is None:
        return "hidden size is symbolic"
    if hidden > MAX_HIDDEN:
        return f"hidden size {hidden} > {MAX_HIDDEN}"
    if site.weight is not None:
        w = tensor_value(site.weight)
        if w.device != x.device:
            return "weight on another device"
    if (node := used_outside(site.internal, site.matched)) is not None:
        return f"intermediate {node.name} is used outside the norm"
    return None


def _linear_readers(result: Node) -> tuple[list[Node], list[Node]] | None:
    """(walked, linears) where every path from ``result`` goes through data-movement ops (the
    final norm's slice before the lm_head) into a linear as its input; None otherwise."""
    def as_input(user: Node, reading: Node) -> bool:
        linear = is_kind(user, "linear")
        return linear is not None and linear["input"] is reading and \
            reading is not linear["weight"] and reading is not linear["bias"]
    return readers_through_layout(result, as_input)


def _autocast_result(site: _Site) -> tuple[torch.dtype, list[Node]] | None:
    """Under ``torch.autocast``, the low precision every reader of the norm's fp32 result casts
    it to, where every reader is a linear taking it as input (through data-movement ops) that
    autocast runs in that dtype (:func:`.graph.autocast_cast_dtype`), with the data-movement
    nodes walked (their values change dtype with the result); None otherwise. The kernel
    then writes the result in that dtype: the same bits as autocast's casts, without the fp32
    result, the cast kernel and, in backward, the casts of the readers' gradients back to fp32
    (a decoder norm's q, k, v or gate, up: four launches and ~0.2 GB of memory traffic a norm at
    Qwen2.5-0.5B's B=8 T=1024). Autograd then sums those gradients in that dtype; under
    Inductor our backward kernel takes them unsummed and adds them in fp32, as eager's autocast
    does (SumGradientsIntoBackward)."""
    out = tensor_value(site.output)
    found = _linear_readers(site.output) if out is not None else None
    if out is None or out.dtype != torch.float32 or found is None:
        return None
    walked, readers = found
    dtypes = set()
    for reader in readers:
        linear = is_kind(reader, "linear")
        operands = [n for n in (linear["input"], linear["weight"], linear["bias"])
                    if isinstance(n, Node)]
        dtypes.add(autocast_cast_dtype(reader, operands))
    low = dtypes.pop() if len(dtypes) == 1 else None
    return (low, walked) if low is not None else None


def _rewrite(gm: GraphModule, site: _Site) -> None:
    out_dtype = tensor_value(site.output).dtype
    walked = []
    if (autocast := _autocast_result(site)) is not None:
        out_dtype, walked = autocast
        site.note = ", ".join(filter(None, [site.note, f"result in {_short(out_dtype)} "
                                            "(autocast casts it there for every reader)"]))
    params = (site.weight, site.eps, site.offset, site.norm_dtype, site.weight_dtype,
              site.mul_dtype, out_dtype)
    residual = _residual_add(gm.graph, site)
    if residual is None:
        site.output = replace_with_call(gm.graph, site.output,
                                        torch.ops.chronicals.rms_norm.default,
                                        (site.x, *params), erase=site.matched)
        refresh_values(walked)
        return
    # h = a + b feeds the norm: one op writes both h (for its other users) and the norm.
    a, b = residual
    h, y = insert_call(gm.graph, site.x, torch.ops.chronicals.add_rms_norm.default,
                       (a, b, *params), meta_from=site.output, n_outputs=2)
    old_h = site.x
    old_h.replace_all_uses_with(h)
    site.output.replace_all_uses_with(y)
    erase_dead(gm.graph, [*site.matched, site.output, old_h])
    refresh_values(walked)
    site.output, site.note = y, ", ".join(filter(None, [site.note, "residual add fused"]))


def _residual_add(graph, site: _Site) -> tuple[Node, Node] | None:
    """(a, b) if the norm's input is a + b of two tensors of its own shape and dtype."""
    add = is_kind(site.x, "add")
    if add is None:
        return None
    a, b = add["input"], add["other"]
    x = tensor_value(site.x)
    for t in (a, b):
        v = tensor_value(t)
        if v is None or v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            return None
    if site.weight is not None:
        order = {n: i for i, n in enumerate(graph.nodes)}
        if order[site.weight] > order[site.x]:
            return None  # the weight is computed after the add: no single insertion point
    return a, b


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _describe(site: _Site) -> str:
    x = tensor_value(site.x)
    parts = [f"{_short(x.dtype)} H={x.shape[-1]}"]
    if site.weight is None:
        parts.append("no weight")
    elif site.offset:
        parts.append(f"weight {site.offset:g}+w")
    if site.norm_dtype != torch.float32:
        parts.append(f"normalized→{_short(site.norm_dtype)}")
    if site.weight is not None:
        parts.append(f"weight multiply in {_short(site.mul_dtype)}")
    if site.note:
        parts.append(site.note)
    return ", ".join(parts)
