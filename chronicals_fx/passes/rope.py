"""Find rotary position embeddings by what they compute and replace them with ``chronicals::rope``.

A rotation of x [.., D] by per-token angles, in any of four spellings:

    rotate-half   x·cos + rotate_half(x)·sin,  rotate_half(x) = cat(−x[.., h:], x[.., :h])    (HF)
    halves        cat(x1·c − x2·s, x2·c + x1·s),  x1, x2 = x[.., :h], x[.., h:];  c, s of width h
                  (rotate-half with one angle per pair: cos = cat(c, c))          (GPT-OSS)
    interleaved   x·cos + rot2(x)·sin,  rot2(x) = stack(−x[.., 1::2], x[.., ::2], −1).flatten(−2)
                                                                              (GPT-J, GLM)
    complex       view_as_real(view_as_complex(x.float().reshape(.., D/2, 2)) · f).flatten(−2)
                                                                              (Meta Llama)

with h = D/2, either operand order of every product and of the sum, the slices spelled as
indexing, ``chunk``, ``split`` or ``narrow``, the negation as ``−x`` or ``x·(−1)``; x and
rotate(x) widened by one cast or by a cast each (Ernie 4.5: fp32 products of a bf16 x, whose
gradient then sums two terms each rounded to x's dtype); followed by
casts of the result (``type_as``) and, for partial rotary (GPT-NeoX, Phi, GPT-J), by
``cat((rotated, x_pass), −1)`` where x_rot = q[.., :R] and x_pass = q[.., R:] of the same q.

cos and sin are any tensors that broadcast against x along its last dim, batch and sequence
axes and are constant over heads: a buffer, a graph input, or computed from position_ids in the
graph (HF's rotary module). x is 4-D, [B, H, T, D] (HF) or [B, T, H, D] (GPT-J, Meta); which axis
is which is read from cos/sin's broadcast shape. A complex multiply's factor f gives cos =
real(f), sin = imag(f).

Every rotation found is one *site*. Sites with the same cos/sin, spelling, layout, sizes and
dtypes are paired in graph order — in an attention layer, the query's and the key's — into one
``rope(q, k, cos, sin, …)`` call (one launch); a site with no partner gets ``rope(q, None, …)``.
The report counts **one "rope" match per op call**: a 2-layer Llama gives 2 (q+k per layer).

Semantics, dtypes included: the op multiplies and adds in the dtype eager's products have
(``round_dtype``: e.g. bf16 for HF's bf16 q times bf16 cos), rounds where eager rounds, and stores
in the result's dtype, so bf16 results are bit-identical to eager's; the backward rounds where
autograd does (``grad_round_dtype``: the dtype x is multiplied in). When cos/sin are proved to
hold each angle twice (HF's ``cat((freqs, freqs))``, GPT-J's ``repeat_interleave(·, 2)``), the
op reads only one of each pair (``half``). No gradient flows to cos/sin: a site whose cos or sin
requires grad is declined.

Not RoPE, never matched: a learned position embedding added to x; a cat of the halves without
the negation, or with the negation on the other half; slices of another tensor than the one
multiplied by cos.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..kernels._triton import KERNEL_DTYPES
from .graph import (
    SDPA,
    Canon,
    autocast_cast_dtype,
    call_before,
    canon,
    erase_dead,
    insert_call,
    is_kind,
    narrower,
    normalize_dim,
    number,
    readers_through_layout,
    refresh_values,
    sole_user,
    static_int,
    tensor_value,
    used_outside,
)

NAME = "rope"

_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class _Site:
    x: Node                       # the tensor rotated (before widening casts), 4-D
    cos: Node                     # multiplies x (complex: the factor f; sin is f too)
    sin: Node
    spelling: str                 # "rotate-half" | "halves" | "interleaved" | "complex"
    output: Node                  # last node of the matched chain
    matched: list[Node]           # every node the op replaces
    internal: list[Node]          # intermediates that must feed only the chain
    x_rotated: Node               # the tensor the products read (x, a cast, or x[.., :R])
    round_dtype: torch.dtype      # dtype of the products and the sum
    grad_round_dtype: torch.dtype  # dtype autograd accumulates x's gradient in
    seq_dim: int = 2
    half: bool = False
    partial: bool = False
    autocast_result: torch.dtype | None = None   # the result written in it (_autocast_result)
    # the rotation's own last node (before the casts and partial-rotary cat taken in after it):
    # where the op is reported (a taken-in cast may belong to the module reading the result)
    rotation: Node | None = None

    @property
    def interleaved(self) -> bool:
        return self.spelling in ("interleaved", "complex")

    @property
    def out_dtype(self) -> torch.dtype:
        return self.autocast_result or tensor_value(self.output).dtype


def run(gm: GraphModule, ctx) -> None:
    sites: list[_Site] = []
    taken: set[Node] = set()
    for node in list(gm.graph.nodes):
        found = None
        if (c := is_kind(node, "add")) is not None:
            found = _from_add(c)
        elif (c := is_kind(node, "cat")) is not None:
            found = _from_halves(c)
        elif node.op == "call_function" and node.target is torch.view_as_real:
            found = _from_complex(node)
        if found is None:
            continue
        if isinstance(found, tuple):          # (node to blame, reason)
            ctx.declined(*found)
            continue
        if taken & set(found.matched):
            continue  # overlaps a site already found (never seen in practice)
        taken |= set(found.matched)
        sites.append(found)
    for group in _pairs(gm, sites):
        call = _rewrite(gm, group)
        ctx.matched(call, _describe(group))


# ---------------------------------------------------------------------------------------------
# Finding: small recognizers for the pieces
# ---------------------------------------------------------------------------------------------
def _call(node: Any, methods: tuple[str, ...] = (), functions: tuple = ()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and node.target in functions


def _arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (positional, counting the tensor itself) or keyword ``name``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _shape(node: Any) -> tuple | None:
    v = tensor_value(node)
    return tuple(v.shape) if v is not None else None


def _is_last_dim(dim: Any, ndim: int) -> bool:
    return normalize_dim(dim, ndim) == (ndim - 1,)


def _last_slice(node: Any) -> tuple[Node, int, int, int] | None:
    """(x, start, stop, step) if ``node`` is a slice of x along its last dim, else None.

    Spellings: ``x[..., a:b:s]`` / ``x[:, :, :, a:b]``, ``x.narrow(-1, a, n)``, and the parts of
    ``x.chunk(2, -1)`` / ``torch.split(x, n, -1)``.
    """
    if not isinstance(node, Node):
        return None
    if node.op == "call_function" and node.target is operator.getitem:
        base, index = node.args
        if not isinstance(base, Node):
            return None
        if tensor_value(base) is not None:
            return _index_slice(base, index)
        return _part_slice(base, index)
    if _call(node, ("narrow",), (torch.narrow,)):
        x, dim, start, length = (_arg(node, 0, "input"), _arg(node, 1, "dim"),
                                 _arg(node, 2, "start"), _arg(node, 3, "length"))
        shape = _shape(x)
        if shape is None or static_int(start) is None or static_int(length) is None:
            return None
        if not _is_last_dim(dim, len(shape)) or start < 0:
            return None
        return x, start, start + length, 1
    return None


def _index_slice(base: Node, index: Any):
    shape = _shape(base)
    size = static_int(shape[-1]) if shape else None
    if size is None:
        return None
    index = index if isinstance(index, tuple) else (index,)
    if any(i is None for i in index) or sum(i is Ellipsis for i in index) > 1:
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        fill = len(shape) - (len(index) - 1)
        if fill < 0:
            return None
        index = index[:k] + (slice(None),) * fill + index[k + 1:]
    if len(index) != len(shape):
        return None
    if any(i != slice(None) for i in index[:-1]) or not isinstance(index[-1], slice):
        return None
    last = index[-1]
    if any(v is not None and static_int(v) is None for v in (last.start, last.stop, last.step)):
        return None
    return (base, *last.indices(size))


def _part_slice(parts: Node, index: Any):
    """A part of ``chunk`` / ``split`` along the last dim, as a slice."""
    if static_int(index) is None:
        return None
    if _call(parts, ("chunk",), (torch.chunk,)):
        x, chunks, dim = _arg(parts, 0, "input"), _arg(parts, 1, "chunks"), _arg(parts, 2, "dim", 0)
        shape = _shape(x)
        if shape is None or static_int(chunks) is None or static_int(shape[-1]) is None:
            return None
        size = -(-shape[-1] // chunks)
        sizes = [size] * (shape[-1] // size) + ([shape[-1] % size] if shape[-1] % size else [])
    elif _call(parts, ("split",), (torch.split, torch.functional.split)):
        x, sizes, dim = (_arg(parts, 0, "tensor"), _arg(parts, 1, "split_size_or_sections"),
                         _arg(parts, 2, "dim", 0))
        shape = _shape(x)
        if shape is None or static_int(shape[-1]) is None:
            return None
        if static_int(sizes) is not None:
            sizes = [sizes] * (shape[-1] // sizes) + ([shape[-1] % sizes] if shape[-1] % sizes else [])
        elif not (isinstance(sizes, (list, tuple)) and all(static_int(s) is not None for s in sizes)):
            return None
    else:
        return None
    if not isinstance(x, Node) or not _is_last_dim(dim, len(shape)) or not 0 <= index < len(sizes):
        return None
    start = sum(sizes[:index])
    return x, start, start + sizes[index], 1


def _slice_nodes(node: Node) -> list[Node]:
    """The nodes of a slice: the node, and the chunk/split it indexes, if any."""
    base = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
    return [node, base] if isinstance(base, Node) and tensor_value(base) is None else [node]


def _negated(node: Any) -> Node | None:
    """x if ``node`` is −x (``neg`` or a multiply by −1), else None."""
    if (c := is_kind(node, "neg")) is not None:
        return c["input"] if isinstance(c["input"], Node) else None
    if (c := is_kind(node, "mul")) is not None:
        for a, b in ((c["input"], c["other"]), (c["other"], c["input"])):
            if isinstance(a, Node) and number(b) == -1.0:
                return a
    return None


_RESHAPES = (("reshape", "view", "flatten", "unflatten"),
             (torch.reshape, torch.flatten, torch.unflatten))


def _merges_last_two(node: Any) -> Node | None:
    """y if ``node`` is y [.., P, 2] reshaped (flatten, view, reshape) to [.., 2P], else None."""
    if not _call(node, *_RESHAPES):
        return None
    y = node.args[0] if node.args else None
    inp, out = _shape(y), _shape(node)
    if inp is None or out is None or len(inp) < 2:
        return None
    if tuple(out) != tuple(inp[:-2]) + (inp[-2] * inp[-1],) or static_int(inp[-1]) != 2:
        return None
    return y


def _splits_last(node: Any) -> Node | None:
    """y if ``node`` is y [.., D] reshaped to [.., D/2, 2] (pairs of neighbours), else None."""
    if not _call(node, *_RESHAPES):
        return None
    y = node.args[0] if node.args else None
    inp, out = _shape(y), _shape(node)
    if inp is None or out is None or static_int(inp[-1]) is None or inp[-1] % 2:
        return None
    if tuple(out) != tuple(inp[:-1]) + (inp[-1] // 2, 2):
        return None
    return y


@dataclass
class _Rotated:
    x: Node
    spelling: str
    nodes: list[Node] = field(default_factory=list)


def _rotate_half(node: Any) -> _Rotated | None:
    """cat((−x[.., h:], x[.., :h]), −1) with h = D/2."""
    c = is_kind(node, "cat")
    shape = _shape(node)
    if c is None or shape is None or not isinstance(c["tensors"], (list, tuple)):
        return None
    if len(c["tensors"]) != 2 or not _is_last_dim(c["dim"], len(shape)):
        return None
    found = _negated_and_plain_slices(*c["tensors"], lambda d: ((d // 2, d, 1), (0, d // 2, 1)))
    if found is None:
        return None
    return _Rotated(found[0], "rotate-half", [node, *found[1]])


def _rotate_pairs(node: Any) -> _Rotated | None:
    """stack((−x[.., 1::2], x[.., ::2]), −1) merged back to [.., D]."""
    stacked = _merges_last_two(node)
    if not _call(stacked, (), (torch.stack,)):
        return None
    tensors, dim = _arg(stacked, 0, "tensors"), _arg(stacked, 1, "dim", 0)
    shape = _shape(stacked)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or not _is_last_dim(dim, len(shape)):
        return None
    found = _negated_and_plain_slices(*tensors, lambda d: ((1, d, 2), (0, d, 2)))
    if found is None:
        return None
    return _Rotated(found[0], "interleaved", [node, stacked, *found[1]])


def _negated_and_plain_slices(first: Any, second: Any, expected) -> tuple[Node, list] | None:
    """(x, nodes) if ``first`` is −x[.., a] and ``second`` is x[.., b] on the last dim of one x
    of even size D, with ``expected(D) == ((start, stop, step) of a, (start, stop, step) of b)``."""
    neg_input = _negated(first)
    neg, plain = _last_slice(neg_input), _last_slice(second)
    if neg is None or plain is None or neg[0] is not plain[0]:
        return None
    x = neg[0]
    size = static_int(_shape(x)[-1])
    if size is None or size % 2 or (neg[1:], plain[1:]) != expected(size):
        return None
    return x, [first, *_slice_nodes(neg_input), *_slice_nodes(second)]


def _widening_base(node: Node) -> tuple[Node, list[Node]]:
    """Follow casts upward while none rounds: (the tensor read, the casts passed)."""
    casts = []
    while (c := is_kind(node, "cast")) is not None:
        src = tensor_value(c["input"])
        if src is None or narrower(c["dtype"], src.dtype):
            break
        casts.append(node)
        node = c["input"]
    return node, casts


# ---------------------------------------------------------------------------------------------
# Finding: the three spellings
# ---------------------------------------------------------------------------------------------
def _from_add(add):
    """x·cos + rotate(x)·sin, in any operand order."""
    for m_cos, m_sin in ((add["input"], add["other"]), (add["other"], add["input"])):
        mc, ms = is_kind(m_cos, "mul"), is_kind(m_sin, "mul")
        if mc is None or ms is None:
            continue
        for rot_node, sin in ((ms["input"], ms["other"]), (ms["other"], ms["input"])):
            # a widening cast of the rotated value is the rotation of the widened x (negation
            # and slicing are exact): Ernie 4.5 widens x and rotate(x) apart
            rot_base, rot_casts = _widening_base(rot_node) if isinstance(rot_node, Node) \
                else (rot_node, [])
            rot = _rotate_half(rot_base) or _rotate_pairs(rot_base)
            if rot is None:
                continue
            rot_source, source_casts = _widening_base(rot.x)
            for x_m, cos in ((mc["input"], mc["other"]), (mc["other"], mc["input"])):
                if x_m is rot.x and not rot_casts:
                    separate = False
                elif isinstance(x_m, Node) and _widening_base(x_m)[0] is rot_source:
                    separate = True    # x·cos and rotate(x)·sin read x through casts of their own
                else:
                    continue
                if not isinstance(cos, Node) or not isinstance(sin, Node) \
                        or tensor_value(cos) is None:
                    continue
                rot.nodes += rot_casts + (source_casts if separate else [])
                return _site_from_products(add.node, mc.node, ms.node, rot, x_m, cos, sin,
                                           separate)
    return None


def _site_from_products(add: Node, m_cos: Node, m_sin: Node, rot: _Rotated, x_m: Node,
                        cos: Node, sin: Node, separate: bool):
    """``separate``: the two products read x through widening casts of their own, so x's
    gradient is the sum of two terms each rounded to x's dtype (each cast's backward rounds),
    added in that dtype; otherwise the terms meet at x_m and are summed in its dtype."""
    xv, addv = tensor_value(x_m), tensor_value(add)
    if _shape(m_cos) != _shape(x_m) or _shape(m_sin) != _shape(x_m):
        return add, "cos/sin broadcast beyond the rotated tensor's shape"
    dtypes = {tensor_value(m_cos).dtype, tensor_value(m_sin).dtype, addv.dtype}
    if len(dtypes) != 1:
        return add, f"cos and sin products in different dtypes {sorted(map(str, dtypes))}"
    x, casts = _widening_base(x_m)
    grad_dtype = tensor_value(x).dtype if separate else xv.dtype
    site = _Site(x=x, cos=cos, sin=sin, spelling=rot.spelling, output=add,
                 matched=[*casts, *rot.nodes, m_cos, m_sin, add], internal=[],
                 x_rotated=x_m, round_dtype=addv.dtype, grad_round_dtype=grad_dtype)
    return _finish(site, width=xv.shape[-1])


def _products(node: Any, kind: str) -> tuple[Canon, Canon] | None:
    """The two products of ``node`` if it is ``a·b ± c·d`` (``kind``: "add" or "sub")."""
    c = is_kind(node, kind)
    if c is None:
        return None
    left, right = is_kind(c["input"], "mul"), is_kind(c["other"], "mul")
    return (left, right) if left is not None and right is not None else None


def _factors(product: Canon, half: Node) -> Any:
    """The other factor of ``product`` if one factor is ``half``, else None."""
    if product["input"] is half:
        return product["other"]
    if product["other"] is half:
        return product["input"]
    return None


def _from_halves(cat):
    """cat((x1·c − x2·s, x2·c + x1·s), −1) with x1, x2 the two halves of x's last dim, in
    any operand order of the products and of the sum."""
    tensors, shape = cat["tensors"], _shape(cat.node)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or shape is None:
        return None
    if not _is_last_dim(cat["dim"], len(shape)):
        return None
    first, second = _products(tensors[0], "sub"), _products(tensors[1], "add")
    if first is None or second is None:
        return None
    p_cos, p_sin = first            # x1·c − x2·s: the minuend holds x1
    for x1 in (p_cos["input"], p_cos["other"]):
        low = _last_slice(x1)
        size = static_int(_shape(low[0])[-1]) if low is not None else None
        if size is None or size % 2 or low[1:] != (0, size // 2, 1):
            continue
        x = low[0]
        c = _factors(p_cos, x1)
        for x2 in (p_sin["input"], p_sin["other"]):
            if _last_slice(x2) != (x, size // 2, size, 1):
                continue
            s = _factors(p_sin, x2)
            # the second half: x2·c + x1·s, in either order of the sum
            for q_cos, q_sin in (second, second[::-1]):
                if _factors(q_cos, x2) is c and _factors(q_sin, x1) is s:
                    return _halves_site(cat.node, x, c, s, [x1, x2],
                                        [p_cos.node, p_sin.node, tensors[0],
                                         q_cos.node, q_sin.node, tensors[1]])
    return None


def _halves_site(out: Node, x_m: Node, cos: Any, sin: Any, halves: list[Node],
                 arithmetic: list[Node]):
    """The site of a halves rotation: rotate-half with tables of one angle per pair (``half``),
    so the op's tables are c and s as they are, of width D/2."""
    if not isinstance(cos, Node) or not isinstance(sin, Node) or tensor_value(cos) is None \
            or tensor_value(sin) is None:
        return None
    dtypes = {tensor_value(n).dtype for n in arithmetic}
    if len(dtypes) != 1:
        return out, f"the halves' products in different dtypes {sorted(map(str, dtypes))}"
    xv = tensor_value(x_m)
    x, casts = _widening_base(x_m)
    slices = [n for h in halves for n in _slice_nodes(h)]
    site = _Site(x=x, cos=cos, sin=sin, spelling="halves", output=out,
                 matched=[*casts, *dict.fromkeys(slices), *arithmetic, out], internal=[],
                 x_rotated=x_m, round_dtype=tensor_value(out).dtype,
                 grad_round_dtype=xv.dtype, half=True)
    return _finish(site, width=xv.shape[-1] // 2)


def _from_complex(real: Node):
    """view_as_real(view_as_complex(x.float().reshape(.., D/2, 2)) · f), merged to [.., D]."""
    prod = is_kind(real.args[0] if real.args else None, "mul")
    if prod is None:
        return None
    for xc, f in ((prod["input"], prod["other"]), (prod["other"], prod["input"])):
        if not _call(xc, (), (torch.view_as_complex,)) or not isinstance(f, Node):
            continue
        pairs = xc.args[0]
        x_m = _splits_last(pairs)
        out = sole_user(real)
        if x_m is None or _merges_last_two(out) is not real or tensor_value(f) is None:
            return None
        if tensor_value(f).dtype != torch.complex64 or tensor_value(x_m).dtype != torch.float32:
            return real, f"complex multiply in {tensor_value(f).dtype} (kernel: complex64 = fp32 pairs)"
        if _shape(prod.node) != _shape(xc):
            return real, "the complex factor broadcasts beyond the rotated tensor's shape"
        x, casts = _widening_base(x_m)
        site = _Site(x=x, cos=f, sin=f, spelling="complex", output=out,
                     matched=[*casts, pairs, xc, prod.node, real, out], internal=[],
                     x_rotated=x_m, round_dtype=torch.float32, grad_round_dtype=torch.float32,
                     half=True)
        return _finish(site, width=tensor_value(x_m).shape[-1] // 2)
    return None


# ---------------------------------------------------------------------------------------------
# Growing the match, and what the kernel accepts
# ---------------------------------------------------------------------------------------------
def _finish(site: _Site, width: int):
    """Absorb output casts and a partial-rotary cat, check what the kernel needs."""
    _absorb_output(site)
    reason = _accepts(site, width)
    if reason:
        return site.output, reason
    site.internal = [n for n in site.matched if n is not site.output]
    if (node := used_outside(site.internal, site.matched)) is not None:
        return site.output, f"intermediate {node.name} is used outside the rotation"
    return site


def _absorb_output(site: _Site) -> None:
    """Take in single-use casts after the result (at most one rounding: the kernel's store),
    then ``cat((rotated, x[.., R:]), −1)`` when x is x[.., :R] of a wider tensor."""
    site.rotation = site.output
    out, current, narrowed = site.output, site.round_dtype, False
    while (cast := is_kind(sole_user(out), "cast")) is not None:
        dtype = cast["dtype"]
        if dtype not in KERNEL_DTYPES or narrowed or narrower(current, dtype):
            break  # a widening after rounding would need the gradient rounded on the way back
        narrowed = dtype != current
        current, out = dtype, cast.node
        site.matched.append(out)
    site.output = out

    rot = _last_slice(site.x)
    cat = is_kind(sole_user(out), "cat")
    if rot is None or cat is None or not isinstance(cat["tensors"], (list, tuple)):
        return
    q, start, stop, step = rot
    q_shape, cat_shape = _shape(q), _shape(cat.node)
    if (start, step) != (0, 1) or len(cat["tensors"]) != 2 or cat["tensors"][0] is not out:
        return
    if cat_shape is None or not _is_last_dim(cat["dim"], len(cat_shape)):
        return
    passed, casts = _widening_base(cat["tensors"][1])
    rest = _last_slice(passed)
    if rest is None or rest != (q, stop, q_shape[-1], 1) or tensor_value(cat.node).dtype != current:
        return
    site.matched += [site.x, *casts, passed, cat.node]
    site.x, site.output, site.partial = q, cat.node, True


def _accepts(site: _Site, width: int) -> str | None:
    """Why the kernel can't take this site (None if it can); sets the layout and ``half``."""
    xv = tensor_value(site.x)
    x_m = tensor_value(site.x_rotated)
    if xv.dim() != 4:
        return f"the rotated tensor is {xv.dim()}-D (kernel: 4-D [B,H,T,D] or [B,T,H,D])"
    for name, dtype in (("input", xv.dtype), ("result", site.out_dtype),
                        ("product", site.round_dtype)):
        if dtype not in KERNEL_DTYPES:
            return f"{name} dtype {dtype} (kernel: fp32, bf16, fp16)"
    if xv.device.type not in ("cuda", "cpu"):
        return f"device {xv.device.type}"
    head_dim, rotary_dim = static_int(xv.shape[-1]), static_int(x_m.shape[-1])
    if head_dim is None or rotary_dim is None:
        return "head dim is symbolic"
    if rotary_dim % 2:
        return f"odd rotary dim {rotary_dim}"
    tables = (site.cos,) if site.spelling == "complex" else (site.cos, site.sin)
    for table in tables:
        tv = tensor_value(table)
        if tv.requires_grad:
            return f"{table.name} requires grad (the op passes no gradient to cos/sin)"
        if tv.device != xv.device:
            return f"{table.name} is on {tv.device}, the rotated tensor on {xv.device}"
        if site.spelling != "complex" and tv.dtype not in KERNEL_DTYPES:
            return f"{table.name} dtype {tv.dtype} (kernel: fp32, bf16, fp16)"
    layouts = None
    for table in tables:
        options = _layouts(tuple(x_m.shape), _shape(table), width)
        if isinstance(options, str):
            return options
        layouts = [s for s in (layouts or options) if s in options]
    if not layouts:
        return "cos and sin broadcast along different axes"
    site.seq_dim = layouts[0]
    if site.spelling in ("rotate-half", "interleaved"):
        site.half = all(_duplicated(t, site.spelling) for t in tables)
    return None


def _known_eq(a: Any, b: Any) -> bool:
    if static_int(a) is not None and static_int(b) is not None:
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 — an undecidable comparison is "not known equal"
        return False


def _layouts(x_shape: tuple, table: tuple, width: int) -> list[int] | str:
    """The sequence axes (2: [B,H,T,D], 1: [B,T,H,D]) under which ``table`` is one row of
    ``width`` angles per (batch, token), constant over heads; best first. A reason if none."""
    if len(table) > 4:
        return f"cos/sin of {len(table)} dims"
    t = (1,) * (4 - len(table)) + tuple(table)
    if not _known_eq(t[3], width):
        return f"cos/sin have {t[3]} angles per row, the rotated width is {width}"
    if not (_known_eq(t[0], 1) or _known_eq(t[0], x_shape[0])):
        return "cos/sin batch size differs from the rotated tensor's"
    options = []
    for seq, head in ((2, 1), (1, 2)):
        if _known_eq(t[head], 1) and (_known_eq(t[seq], 1) or _known_eq(t[seq], x_shape[seq])):
            options.append(seq)
    if not options:
        return "cos/sin vary over heads (the kernel loads one row per token)"
    # Prefer the layout where the angles vary along the sequence axis.
    options.sort(key=lambda seq: _known_eq(t[seq], 1))
    return options


# ---------------------------------------------------------------------------------------------
# cos/sin holding each angle twice: the kernel then reads one of each pair
# ---------------------------------------------------------------------------------------------
_UNARY = ("cos", "sin", "neg", "exp")
_SAME_LAST = (("unsqueeze", "squeeze", "view", "reshape", "expand", "contiguous"),
              (torch.unsqueeze, torch.squeeze, torch.reshape))


def _duplicated(node: Node, spelling: str) -> bool:
    """True if every row of ``node`` is [a, a] (rotate-half) or [a0, a0, a1, a1, …]
    (interleaved): found through elementwise steps from ``cat((a, a), −1)`` or
    ``repeat_interleave(a, 2, −1)``."""
    for _ in range(32):
        shape = _shape(node)
        if shape is None:
            return False
        c = canon(node)
        if spelling == "rotate-half" and c is not None and c.kind == "cat":
            tensors = c["tensors"]
            return (isinstance(tensors, (list, tuple)) and len(tensors) == 2
                    and tensors[0] is tensors[1] and _is_last_dim(c["dim"], len(shape)))
        if spelling == "interleaved" and _call(node, ("repeat_interleave",), (torch.repeat_interleave,)):
            repeats, dim = _arg(node, 1, "repeats"), _arg(node, 2, "dim")
            return static_int(repeats) == 2 and dim is not None and _is_last_dim(dim, len(shape))
        up = _elementwise_input(node, c, shape)
        if up is None:
            return False
        node = up
    return False


def _elementwise_input(node: Node, c, shape: tuple) -> Node | None:
    """The tensor ``node`` is computed from, if each output row is a function of one input row
    element by element (last dim kept as is); else None."""
    if c is not None:
        if c.kind == "cast" or c.kind in _UNARY:
            return c["input"] if isinstance(c["input"], Node) else None
        if c.kind in ("mul", "div", "add", "sub"):
            a, b = c["input"], c["other"]
            if isinstance(a, Node) and number(b) is not None:
                return a
            if isinstance(b, Node) and number(a) is not None and c.kind in ("mul", "add"):
                return b
            return None
    inp = node.args[0] if node.args else None
    in_shape = _shape(inp)
    if in_shape is None or not in_shape or in_shape[-1] != shape[-1]:
        return None
    if _call(node, *_SAME_LAST):
        return inp if [s for s in in_shape if s != 1] == [s for s in shape if s != 1] or \
            _call(node, ("expand",)) else None
    if node.op == "call_function" and node.target is operator.getitem and _keeps_last(node.args[1], len(in_shape)):
        return inp
    return None


def _keeps_last(index: Any, ndim: int) -> bool:
    """True if indexing with ``index`` leaves the last dim untouched (and last)."""
    index = index if isinstance(index, tuple) else (index,)
    if Ellipsis in index:
        after = index[index.index(Ellipsis) + 1:]
        if not after:
            return True
        return after[-1] == slice(None) and None not in after[-1:]
    consumed = [i for i in index if i is not None]
    if len(consumed) < ndim:
        return True
    last = max(k for k, i in enumerate(index) if i is not None)
    return index[last] == slice(None) and all(i is not None for i in index[last:])


# ---------------------------------------------------------------------------------------------
# Pairing and rewriting
# ---------------------------------------------------------------------------------------------
# Deterministic functions of their inputs (nothing random, nothing in place): two calls with
# the same arguments compute the same value.
_PURE_METHODS = {"unsqueeze", "squeeze", "view", "reshape", "expand", "repeat_interleave", "to",
                 "float", "half", "bfloat16", "type_as", "contiguous", "flatten", "transpose",
                 "permute", "cos", "sin", "exp", "neg", "mul", "add", "sub", "div", "pow",
                 "__getitem__", "split", "chunk"}
_PURE_FUNCTIONS = {operator.getitem, operator.mul, operator.add, operator.sub, operator.truediv,
                   operator.neg, operator.pow, torch.mul, torch.add, torch.cat, torch.stack,
                   torch.arange, torch.outer, torch.repeat_interleave, torch.unsqueeze,
                   torch.squeeze, torch.reshape, torch.cos, torch.sin, torch.exp, torch.polar,
                   torch.view_as_real, torch.select, torch.split, torch.functional.split}


def _same_value(a: Any, b: Any, depth: int = 24) -> bool:
    """True if ``a`` and ``b`` are the same node or compute the same pure function of the same
    nodes (e.g. the two ``cos.unsqueeze(1)`` of separate apply_rotary calls)."""
    if a is b:
        return True
    if not (isinstance(a, Node) and isinstance(b, Node)):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b))
        return type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b
    if depth == 0 or a.op != b.op or a.target != b.target:
        return False
    pure = (a.op == "call_method" and a.target in _PURE_METHODS) or \
           (a.op == "call_function" and a.target in _PURE_FUNCTIONS)
    if not pure or a.kwargs.keys() != b.kwargs.keys():
        return False
    return _same_value(a.args, b.args, depth - 1) and \
        all(_same_value(a.kwargs[k], b.kwargs[k], depth - 1) for k in a.kwargs)


def _key(site: _Site) -> tuple:
    xv, xm = tensor_value(site.x), tensor_value(site.x_rotated)
    return (site.spelling, site.seq_dim, site.half, str(xv.shape[0]), str(xv.shape[site.seq_dim]),
            xv.shape[-1], xm.shape[-1], xv.dtype, xv.device, site.round_dtype,
            site.grad_round_dtype, site.out_dtype)


def _pairs(gm: GraphModule, sites: list[_Site]) -> list[list[_Site]]:
    """Sites grouped into op calls: each with the next compatible site in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    sites = sorted(sites, key=lambda s: order[s.output])
    groups, used = [], set()
    for i, a in enumerate(sites):
        if i in used:
            continue
        used.add(i)
        group = [a]
        for j in range(i + 1, len(sites)):
            b = sites[j]
            if j in used or _key(a) != _key(b):
                continue
            if not (_same_value(a.cos, b.cos) and _same_value(a.sin, b.sin)):
                continue
            anchor = min(order[a.output], order[b.output])
            if order[b.x] < anchor and all(order[u] > anchor for u in b.output.users):
                used.add(j)
                group.append(b)
            break  # only the next compatible site: q with k, not with a later layer's
        groups.append(group)
    return groups


def _table_3d(insert, site: _Site, table: Node) -> Node:
    """cos/sin as [Bc, Tc, W] views (unit dims added in front, the head axis squeezed)."""
    for _ in range(4 - tensor_value(table).dim()):
        table = insert(torch.unsqueeze, table, 0)
    table = insert(torch.squeeze, table, 3 - site.seq_dim)  # the head axis
    if site.half and site.spelling == "rotate-half":
        table = insert(operator.getitem, table, (Ellipsis, slice(None, _shape(table)[-1] // 2)))
    elif site.half and site.spelling == "interleaved":
        table = insert(operator.getitem, table, (Ellipsis, slice(None, None, 2)))
    return table


def _attention_readers(result: Node) -> tuple[list[Node], list[Node]] | None:
    """(walked, SDPAs) where every path from ``result`` goes through data-movement ops (views,
    GQA's repeat_kv) into SDPA as its query or key; None otherwise. (The eager spelling's
    matmuls are left out: its softmax is cast to the query's dtype, which a low result would
    change.)"""
    def as_query_or_key(user: Node, reading: Node) -> bool:
        return (user.op == "call_function" and user.target in SDPA
                and reading in user.args[:2] and reading not in user.args[2:]
                and reading not in user.kwargs.values())
    return readers_through_layout(result, as_query_or_key)


def _autocast_result(group: list[_Site]) -> tuple[torch.dtype, list[Node]] | None:
    """Under ``torch.autocast``, RoPE by fp32 cos/sin gives fp32 (of a bf16 q or k from its
    projection, or an fp32 one from a q/k norm), which SDPA casts to bf16: the dtype every
    site's result is cast to, where each result reaches only SDPAs (as q or k, through
    data-movement ops) that autocast runs in it (:func:`.graph.autocast_cast_dtype`), with the
    data-movement nodes walked (their values change dtype with the results); None
    otherwise. The op then writes the result in that dtype — the bits of autocast's cast — with
    no fp32 result and no cast kernel, and its backward reads SDPA's bf16 gradients without
    their casts to fp32 (the same values)."""
    dtypes, walked = set(), []
    for site in group:
        out = tensor_value(site.output)
        found = _attention_readers(site.output) if out is not None else None
        if out is None or out.dtype != torch.float32 or found is None:
            return None
        walked += found[0]
        for sdpa in found[1]:
            dtypes.add(autocast_cast_dtype(sdpa, [a for a in sdpa.args[:3]
                                                  if isinstance(a, Node)]))
    low = dtypes.pop() if len(dtypes) == 1 else None
    return (low, walked) if low is not None else None


def _rewrite(gm: GraphModule, group: list[_Site]) -> Node:
    graph = gm.graph
    low, walked = _autocast_result(group) or (None, [])
    for site in group:
        site.autocast_result = low
    order = {n: i for i, n in enumerate(graph.nodes)}
    a = group[0]
    b = group[1] if len(group) > 1 else None
    anchor = min((s.output for s in group), key=order.__getitem__)

    def insert(target, *args) -> Node:   # before the first output, with its module stack
        return call_before(graph, anchor, target, args, meta_from=a.rotation)

    if a.spelling == "complex":
        pairs = insert(torch.view_as_real, a.cos)
        cos = _table_3d(insert, a, insert(torch.select, pairs, -1, 0))
        sin = _table_3d(insert, a, insert(torch.select, pairs, -1, 1))
    else:
        cos, sin = _table_3d(insert, a, a.cos), _table_3d(insert, a, a.sin)
    args = (a.x, b.x if b else None, cos, sin, a.seq_dim, a.interleaved, a.half, a.round_dtype,
            a.grad_round_dtype, a.out_dtype)
    outs = insert_call(graph, anchor, torch.ops.chronicals.rope.default, args, a.rotation,
                       len(group))
    for site, out in zip(group, outs):
        site.output.replace_all_uses_with(out)
    erase_dead(graph, set().union(*(s.matched for s in group)))
    refresh_values(walked)
    return outs[0].args[0]


def _describe(group: list[_Site]) -> str:
    a = group[0]
    xv, xm = tensor_value(a.x), tensor_value(a.x_rotated)
    layout = "[B,H,T,D]" if a.seq_dim == 2 else "[B,T,H,D]"
    heads = " + ".join(str(tensor_value(s.x).shape[3 - a.seq_dim]) for s in group)
    parts = [a.spelling, f"{len(group)} tensor(s), heads {heads}", f"D={xv.shape[-1]}"]
    if a.partial and xm.shape[-1] < xv.shape[-1]:
        parts.append(f"partial R={xm.shape[-1]}")
    parts.append(layout)
    parts.append(f"{_SHORT.get(xv.dtype, xv.dtype)}→{_SHORT.get(a.out_dtype, a.out_dtype)}")
    if a.autocast_result is not None:
        parts.append("result in the dtype autocast casts it to for attention")
    if a.round_dtype != torch.float32:
        parts.append(f"products rounded to {_SHORT.get(a.round_dtype)} as in eager")
    parts.append("cos/sin half rows" if a.half else "cos/sin full rows")
    return ", ".join(parts)
