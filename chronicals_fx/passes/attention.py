"""Find attention by what it computes, prove what its mask is, and call a fused kernel.

Two spellings of attention are candidates, q [B,Hq,Tq,D], k and v [B,Hk,Tk,D]:

    eager   P = softmax(q·kᵀ·scale [+ M], dim=-1 [, dtype=fp32]) [→ cast] [→ dropout];  P·v
            (scale as ``* c`` or ``/ c`` on the scores; K/V possibly through repeat_kv)
    SDPA    F.scaled_dot_product_attention(q, k, v, attn_mask=M, dropout_p, is_causal, scale)

repeat_kv (``x[:, :, None].expand(B, Hk, n, T, D).reshape(B, Hk·n, T, D)``) is looked through,
so K/V reach the kernel with Hk heads (GQA, no copy).

**The mask.** A mask is replaced only when its value is proven, by symbolic evaluation of the
subgraph that builds it (arange, index arithmetic, broadcasting and advanced indexing,
comparisons, ``&``, ``where(m, 0, -big)``, and position-id document detection), to be one of

    none       every pair allowed                                 → SDPA, no mask
    causal     j ≤ i (also: redundant sliding windows w ≥ T)      → SDPA ``is_causal=True``
    document   j ≤ i within the same document of a packed row     → ``chronicals::document_attention``

Documents are what transformers derives from ``position_ids`` (masking_utils
``find_packed_sequence_indices``): ``doc = cumsum(diff(P, prepend=P[:, :1] − 1) != 1, -1)``;
its mask is ``doc[i] == doc[j]`` and either ``j ≤ i`` (transformers ≤ 5.17) or
``P[j] ≤ P[i]`` (later versions). Inside one document consecutive positions differ by exactly
1, so ``P[j] ≤ P[i] ⟺ j ≤ i`` there, and both spellings are the same mask. When the position
ids themselves are an ``arange`` (no ``position_ids`` given), the document ids are a constant
and the mask is plain causal. Position ids that arrive as an input go to the document kernel
(which is exact for one document per row too, but slower than cuDNN/flash there).

Anything else declines with the reason: masks that read a runtime boolean tensor (padding),
sliding windows shorter than the sequence, offsets, unions, tanh soft-capping of the scores,
a scale that is not a constant, intermediates used elsewhere (e.g. returned attention weights).
A softmax over another axis, or a product that is not ``P·v``, is not attention: no report.

Under ``torch.autocast`` q and k may be fp32 (RoPE with fp32 cos/sin) and v bf16/fp16: autocast
casts all three to its dtype at SDPA and at the matmuls, and the rewrite makes those casts
explicit (:func:`_autocast_dtype`).

SDPA calls that are already ``is_causal``/unmasked with K/V of Hk heads are left alone (not
counted: nothing would change) unless a backend other than SDPA's default is configured.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..kernels import attention as kernels
from ..kernels._triton import KERNEL_DTYPES
from .graph import (
    OUTER_NODE,
    SDPA,
    autocast_cast_dtype,
    call_before,
    canon,
    fake_call,
    is_kind,
    normalize_dim,
    not_constant,
    number,
    replace_with_call,
    static_int,
    strip_casts,
    tensor_value,
    used_outside,
)

NAME = "attention"

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}
_MATMUL = {torch.matmul, operator.matmul}
_DROPOUT = {F.dropout, torch.dropout, torch.nn.functional.dropout}
_BIG_NEGATIVE = -6.0e4   # fill values at or below this underflow exp() to exactly 0 (fp16 min is -65504)


@dataclass
class _Site:
    anchor: Node                 # the SDPA call or the softmax (for the report)
    output: Node                 # the node whose value the op replaces
    q: Node
    k: Node                      # K/V with Hk heads (repeat_kv looked through)
    v: Node
    scale: float
    dropout_p: float
    spelling: str                # "sdpa" | "eager"
    mask: Node | None = None
    mask_role: str = "sdpa"      # how the mask acts: see _MaskAnalyzer.classify
    is_causal: bool = False      # SDPA's own flag
    repeated: bool = False       # K/V arrived through repeat_kv
    autocast: torch.dtype | None = None   # the dtype autocast casts q, k, v to (_autocast_dtype)
    autocast_casts: tuple[str, ...] = ()   # which of q, k, v the rewrite cast (_cast_inputs)
    matched: list[Node] = field(default_factory=list)
    internal: list[Node] = field(default_factory=list)


def run(gm: GraphModule, ctx) -> None:
    analyzer = _MaskAnalyzer()
    bounds_of: dict[Node, Node] = {}
    for node in list(gm.graph.nodes):
        if node._erased:
            continue
        if node.op == "call_function" and node.target in SDPA:
            site = _sdpa_site(node)
        elif is_kind(node, "softmax") is not None:
            site = _eager_site(node)
        else:
            continue
        if site is None:
            continue
        if isinstance(site, str):
            ctx.declined(node, site)
            continue
        kind, doc = "none", None
        if site.is_causal:
            kind = "causal"
        elif site.mask is not None:
            proof = analyzer.classify(site.mask, tensor_value(site.q).shape, site.mask_role)
            if isinstance(proof, str):
                ctx.declined(node, proof)
                continue
            kind, doc = proof
        site.autocast = _autocast_dtype(site)
        reason = _kernel_declines(site, kind)
        if reason:
            ctx.declined(node, reason)
            continue
        dtype = _compute_dtype(site)
        backend = "document" if kind == "document" else kernels.select_backend(
            *(tensor_value(n).to(dtype) for n in (site.q, site.k, site.v)), kind == "causal",
            site.dropout_p, ctx.config.attention_backend)
        if (site.spelling == "sdpa" and site.mask is None and not site.repeated
                and backend == "sdpa"):
            continue  # already SDPA's fused kernels: rewriting would change nothing
        bounds = None
        if kind == "document":
            bounds = bounds_of.get(doc)
            if bounds is None:
                # Document ids built outside a checkpointed region: the bounds are computed
                # there, once for all layers, and passed in as an input of the region.
                call = ctx.region_call
                if doc.graph is not gm.graph and (call is None or doc.graph is not call.graph):
                    ctx.declined(node, "document ids built outside this graph")
                    continue
                batch = tensor_value(site.q).shape[0]
                bounds = ctx.local(gm, _insert_bounds(doc.graph.owning_module, doc, batch))
                bounds_of[doc] = bounds
        _rewrite(gm, site, kind, backend, bounds)
        ctx.matched(site.output, _describe(site, kind, backend))
    _erase_dead(gm, [n for n, v in analyzer.memo.items() if isinstance(v, Val)])


# ---------------------------------------------------------------------------------------------
# Finding: SDPA calls
# ---------------------------------------------------------------------------------------------
def _bind_sdpa(node: Node) -> dict[str, Any] | None:
    if len(node.args) > len(_SDPA_PARAMS) or set(node.kwargs) - set(_SDPA_PARAMS):
        return None
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, node.args))
    bound.update(node.kwargs)
    if any(p not in bound for p in _SDPA_PARAMS[:3]):
        return None
    return bound


def _sdpa_site(node: Node):
    a = _bind_sdpa(node)
    if a is None:
        return "SDPA call with arguments this pass does not model"
    q, k, v = a["query"], a["key"], a["value"]
    for name, x in (("dropout_p", a["dropout_p"]), ("is_causal", a["is_causal"]),
                    ("enable_gqa", a["enable_gqa"])):
        if isinstance(x, Node):
            return f"{name} is a runtime value"
    if a["scale"] is not None and number(a["scale"]) is None:
        return not_constant("scale", a["scale"])
    shapes = _qkv_shapes(q, k, v)
    if isinstance(shapes, str):
        return shapes
    if a["is_causal"] and a["attn_mask"] is not None:
        return "is_causal together with a mask"
    k_src, k_rep = _through_repeat_kv(k)
    v_src, v_rep = _through_repeat_kv(v)
    if k_rep != v_rep:
        k_src, v_src, k_rep, v_rep = k, v, False, False
    D = tensor_value(q).shape[-1]
    scale = number(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(D)
    site = _Site(anchor=node, output=node, q=q, k=k_src, v=v_src, scale=scale,
                 dropout_p=float(a["dropout_p"]), spelling="sdpa", mask=a["attn_mask"],
                 is_causal=bool(a["is_causal"]), repeated=k_rep, matched=[node])
    if k_rep:
        site.matched += _repeat_nodes(k) + _repeat_nodes(v)
    return site


def _qkv_shapes(q, k, v) -> str | None:
    tq, tk, tv = tensor_value(q), tensor_value(k), tensor_value(v)
    if tq is None or tk is None or tv is None:
        return "q/k/v without tensor metadata"
    if not (tq.dim() == tk.dim() == tv.dim() == 4):
        return f"q/k/v of {tq.dim()}/{tk.dim()}/{tv.dim()} dims (the op takes [B,H,T,D])"
    return None


def _through_repeat_kv(node) -> tuple[Node, bool]:
    """(x, True) if ``node`` is repeat_kv(x): x[:, :, None].expand(B,Hk,n,T,D).reshape(B,Hk·n,T,D)."""
    reshape = node
    if not (isinstance(reshape, Node) and reshape.op == "call_method"
            and reshape.target in ("reshape", "view")):
        return node, False
    expand = reshape.args[0]
    if not (isinstance(expand, Node) and expand.op == "call_method" and expand.target == "expand"):
        return node, False
    index = expand.args[0]
    if not (isinstance(index, Node) and index.op == "call_function"
            and index.target is operator.getitem):
        return node, False
    src = index.args[0]
    full = slice(None, None, None)
    if index.args[1] not in ((full, full, None, full, full), (full, full, None)):
        return node, False
    ts, te, tr = tensor_value(src), tensor_value(expand), tensor_value(reshape)
    if ts is None or te is None or tr is None or ts.dim() != 4 or te.dim() != 5:
        return node, False
    B, HK, T, D = ts.shape
    if tuple(te.shape[:2]) != (B, HK) or tuple(te.shape[3:]) != (T, D):
        return node, False
    if tuple(tr.shape) != (B, HK * te.shape[2], T, D):
        return node, False
    return src, True


def _repeat_nodes(node: Node) -> list[Node]:
    expand = node.args[0]
    return [node, expand, expand.args[0]]


# ---------------------------------------------------------------------------------------------
# Finding: eager attention, anchored at the softmax
# ---------------------------------------------------------------------------------------------
def _eager_site(sm_node: Node):
    sm = canon(sm_node)
    x = tensor_value(sm["input"])
    if x is None or x.dim() != 4 or normalize_dim(sm["dim"], 4) != (3,):
        return None  # a softmax over another axis is not attention
    if sm["dtype"] not in (None, torch.float32):
        return None
    # Backward from the softmax: [casts] (scores | scores + M | masked_fill(scores, M, −big)
    # | where(M, scores, −big))
    pre, pre_casts = strip_casts(sm["input"])
    internal = [c.node for c in pre_casts]
    mask, role = None, "additive"
    scored = _scores(pre)
    if scored is None:
        found = _masked_scores(pre)
        if found is None:
            return _SOFTCAP if _softcap(pre) or _softcap_inside(pre) else None
        scored, mask, role = found
        internal.append(pre)
    if isinstance(scored, str):
        return scored
    q, kt, scale, score_nodes = scored
    internal += score_nodes
    # Forward from the softmax: [casts] [dropout] P·v
    out, dropout_p, post = sm_node, 0.0, []
    while (c := is_kind(_chain_user(out), "cast")) is not None:
        out = c.node
        post.append(out)
    user = _chain_user(out)
    if user is not None and user.op == "call_function" and user.target in _DROPOUT:
        p, training = _dropout_args(user)
        if p is None:
            return "dropout probability is a runtime value"
        dropout_p = p if training else 0.0
        out = user
        post.append(out)
        while (c := is_kind(_chain_user(out), "cast")) is not None:
            out = c.node
            post.append(out)
    pv = _chain_user(out)
    if not (pv is not None and pv.op == "call_function" and pv.target in _MATMUL
            and len(pv.args) == 2 and pv.args[0] is out and isinstance(pv.args[1], Node)):
        return None
    v = pv.args[1]
    k = _transposed(kt)
    if k is None:
        return None
    shapes = _qkv_shapes(q, k, v)
    if isinstance(shapes, str):
        return shapes
    k_src, k_rep = _through_repeat_kv(k)
    v_src, v_rep = _through_repeat_kv(v)
    if k_rep != v_rep:
        k_src, v_src, k_rep, v_rep = k, v, False, False
    internal += [sm_node, *post]
    matched = [*internal, kt, pv]
    if k_rep:
        matched += _repeat_nodes(k) + _repeat_nodes(v)
    site = _Site(anchor=sm_node, output=pv, q=q, k=k_src, v=v_src, scale=scale,
                 dropout_p=dropout_p, spelling="eager", mask=mask, mask_role=role,
                 repeated=k_rep, matched=matched, internal=internal)
    if (node := used_outside(internal, matched)) is not None:
        return f"intermediate {node.name} is used outside the attention"
    return site


def _chain_user(node: Node) -> Node | None:
    """The user that continues softmax → casts → dropout → P·v (others are checked later)."""
    if len(node.users) == 1:
        return next(iter(node.users))
    chain = [u for u in node.users
             if is_kind(u, "cast") is not None
             or u.op == "call_function" and (u.target in _DROPOUT or u.target in _MATMUL
                                             and u.args and u.args[0] is node)]
    return chain[0] if len(chain) == 1 else None


def _scores(node):
    """(q, kᵀ, scale, nodes) if ``node`` is q·kᵀ scaled by constants; a reason; or None."""
    scale, nodes = 1.0, []
    while True:
        c = canon(node)
        if c is None:
            break
        if c.kind == "mul":
            a, b = c["input"], c["other"]
            if number(b) is None:
                a, b = b, a
            if number(b) is None:
                if _is_scores(a) or _is_scores(b):
                    return "scores scaled by a runtime value"
                return None
            scale *= number(b)
        elif c.kind == "div" and number(c["other"]) is not None:
            scale /= number(c["other"])
            a = c["input"]
        elif c.kind == "cast":
            src = tensor_value(c["input"])
            if src is None or tensor_value(node).dtype != src.dtype:
                return None
            a = c["input"]
        else:
            break
        nodes.append(node)
        node = a
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in _MATMUL
            and len(node.args) == 2 and all(isinstance(x, Node) for x in node.args)):
        return None
    q, kt = node.args
    t = tensor_value(node)
    if t is None or t.dim() != 4:
        return None
    nodes.append(node)
    qs = is_kind(q, "mul", "div")
    if qs is not None and len(q.users) == 1:     # (q · c) · kᵀ
        c = number(qs["other"]) if qs.kind == "div" else (
            number(qs["other"]) if number(qs["other"]) is not None else number(qs["input"]))
        inner = qs["input"] if qs.kind == "div" or number(qs["other"]) is not None else qs["other"]
        if c is not None and c != 0 and isinstance(inner, Node):
            scale = scale / c if qs.kind == "div" else scale * c
            nodes.append(q)
            q = inner
    return q, kt, scale, nodes


def _is_scores(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in _MATMUL


def _softcap(node) -> bool:
    """True if ``node`` is Gemma 2's tanh(scores / c) · c."""
    mul = is_kind(node, "mul")
    if mul is None:
        return False
    for t in (mul["input"], mul["other"]):
        th = is_kind(t, "tanh")
        if th is not None and isinstance(_scores(th["input"]), tuple):
            return True
    return False


def _masked_scores(node):
    """(scores, mask, role) if ``node`` applies a mask to scaled scores, else None."""
    add = is_kind(node, "add")
    if add is not None:
        for s_side, m_side in ((add["input"], add["other"]), (add["other"], add["input"])):
            scored = _scores(s_side)
            if scored is not None and isinstance(m_side, Node):
                return scored, m_side, "additive"
        return None
    if not isinstance(node, Node):
        return None
    if (node.op == "call_method" and node.target == "masked_fill"
            or node.op == "call_function" and node.target is torch.masked_fill) \
            and len(node.args) == 3 and not node.kwargs:
        s_side, m_side, fill = node.args
        scored = _scores(s_side)
        if scored is not None and isinstance(m_side, Node) and _is_big_negative(fill):
            return scored, m_side, "disallowed"
    if node.op == "call_function" and node.target is torch.where and len(node.args) == 3:
        m_side, a, b = node.args
        for s_side, fill, role in ((a, b, "allowed"), (b, a, "disallowed")):
            scored = _scores(s_side)
            if scored is not None and isinstance(m_side, Node) and _is_big_negative(fill):
                return scored, m_side, role
    return None


def _is_big_negative(x) -> bool:
    v = number(x)
    return v is not None and v <= _BIG_NEGATIVE


def _softcap_inside(node) -> bool:
    add = is_kind(node, "add")
    return add is not None and any(_softcap(x) for x in (add["input"], add["other"]))


_SOFTCAP = "tanh soft-capping of the scores (not supported by the fused kernels)"


def _transposed(node) -> Node | None:
    """x if ``node`` is x with its last two dims swapped (4-D), else None."""
    if not isinstance(node, Node):
        return None
    t = tensor_value(node)
    if t is None or t.dim() != 4:
        return None
    if node.op == "call_method" and node.target == "transpose" or \
            node.op == "call_function" and node.target is torch.transpose:
        dims = list(node.args[1:3])
        if len(dims) == 2 and all(static_int(d) is not None for d in dims) and \
                sorted(d % 4 for d in dims) == [2, 3]:
            return node.args[0]
    if node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        if [d % 4 if static_int(d) is not None else None for d in dims] == [0, 1, 3, 2]:
            return node.args[0]
    return None


def _dropout_args(node: Node):
    names = ("input", "p", "training", "inplace")
    bound = {"p": 0.5, "training": True, "inplace": False}
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    p, training = bound["p"], bound["training"]
    if number(p) is None or not isinstance(training, bool):
        return None, None
    return float(p), training


# ---------------------------------------------------------------------------------------------
# Proving the mask: symbolic values of the mask-building subgraph
# ---------------------------------------------------------------------------------------------
class _Unknown(Exception):
    """The subgraph computes something this analysis does not model (the message says what)."""


@dataclass(frozen=True)
class Lin:
    """The integer x_dim + off at index (x_0, …, x_{n-1}) of a tensor; the constant off if dim is None."""
    dim: int | None
    off: int = 0


@dataclass(frozen=True)
class Sum:
    """x_plus − x_minus + off: the difference of two index tensors (e.g. i − j)."""
    plus: int
    minus: int
    off: int = 0


@dataclass(frozen=True)
class At:
    """leaf[row, col] + off: a runtime [R, T] integer tensor read at two indices.

    ``kind`` "ids": a tensor we know nothing about (position ids); "doc": the document ids
    ``cumsum(diff(P, prepend=P[:, :1] − 1) != 1)`` of the ids leaf ``source`` (``leaf`` is the
    cumsum node itself)."""
    leaf: Node
    kind: str
    row: Lin
    col: Lin
    off: int = 0
    source: Node | None = None


@dataclass(frozen=True)
class Cmp:
    op: str       # "le": a ≤ b;  "eq": a == b
    a: Any
    b: Any


@dataclass(frozen=True)
class Cond:
    """Conjunction of comparisons; the empty conjunction is True everywhere."""
    atoms: frozenset


@dataclass(frozen=True)
class NotCond:
    cond: Cond


@dataclass(frozen=True)
class Additive:
    """where(cond, 0, -big): an additive float mask."""
    cond: Cond


@dataclass(frozen=True)
class Indicator:
    """1 where cond holds, 0 elsewhere (a float or integer tensor, e.g. tril(ones))."""
    cond: Cond


@dataclass(frozen=True)
class Num:
    """A floating constant tensor."""
    value: float


@dataclass(frozen=True)
class Boolean:
    value: bool


@dataclass(frozen=True)
class DiffOne:
    """diff(P, prepend=P[:, :1] − 1, dim=-1) of the ids leaf P (an At over the whole tensor)."""
    ids: At


@dataclass(frozen=True)
class Boundary:
    """DiffOne(P) != 1: True where a new document starts."""
    ids: At


@dataclass
class Val:
    expr: Any
    shape: tuple[int, ...]


_CMP_FUNCS = {operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt",
              operator.eq: "eq", operator.ne: "ne", torch.le: "le", torch.lt: "lt",
              torch.ge: "ge", torch.gt: "gt", torch.eq: "eq", torch.ne: "ne"}
_CMP_METHODS = {"le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne",
                "__le__": "le", "__lt__": "lt", "__ge__": "ge", "__gt__": "gt",
                "__eq__": "eq", "__ne__": "ne"}
_AND = {operator.and_, torch.logical_and, torch.bitwise_and}
_AND_METHODS = {"__and__", "logical_and", "bitwise_and", "__rand__"}
_NOT = {operator.invert, torch.logical_not, torch.bitwise_not}
_NOT_METHODS = {"logical_not", "bitwise_not", "__invert__"}
_IDENTITY_METHODS = {"contiguous", "clone"}
_INT_DTYPES = (torch.int32, torch.int64)


class _MaskAnalyzer:
    def __init__(self) -> None:
        self.memo: dict[Node, Val | _Unknown] = {}

    # -- the verdict -------------------------------------------------------------------------
    def classify(self, mask: Node, q_shape, role: str) -> tuple[str, Node | None] | str:
        """("none" | "causal" | "document", document-id node) or the reason it is neither.

        ``role`` says how the mask acts on the scores: "sdpa" (boolean = allowed, float =
        added), "additive" (added), "allowed" / "disallowed" (where / masked_fill to −big).
        """
        try:
            val = self.value(mask)
            expr = _allowed(val.expr, role)
        except _Unknown as exc:
            return f"mask of unknown structure: {exc}"
        if len(val.shape) > 4:
            return f"mask of {len(val.shape)} dims"
        shift = 4 - len(val.shape)
        shape = (1,) * shift + tuple(val.shape)
        atoms = [_shift_dims(a, shift) for a in expr.atoms]
        B, _, Tq, _ = q_shape
        if shape[0] not in (1, B):
            return f"mask batch {shape[0]} vs {B}"
        return _classify_atoms(atoms, Tq, shape[3])

    # -- evaluation --------------------------------------------------------------------------
    def value(self, node) -> Val:
        if not isinstance(node, Node):
            if isinstance(node, bool):
                return Val(Boolean(node), ())
            if isinstance(node, int):
                return Val(Lin(None, node), ())
            if isinstance(node, float):
                return Val(Num(node), ())
            raise _Unknown(f"constant {node!r}")
        got = self.memo.get(node)
        if got is None:
            try:
                got = self._eval(node)
            except _Unknown as exc:
                # Memoize the reason, never the raised exception: its traceback's frames reach
                # (through f_back) every caller up the compile stack, and the cycle memo → exc →
                # frame → self → memo keeps them alive until a later cyclic GC. DDP's graph
                # splitter holds a guard in one such frame whose __del__ clears
                # ``fakify_first_call``; freed late, mid-way through compiling another bucket, it
                # made AOTAutograd run Inductor's code on fake tensors (H200 ×2, session 3).
                got = _Unknown(*exc.args)
            self.memo[node] = got
        if isinstance(got, _Unknown):
            raise _Unknown(*got.args)
        return got

    def _eval(self, node: Node) -> Val:
        t = tensor_value(node)
        if t is None:
            raise _Unknown(f"{node.name} has no tensor value")
        shape = tuple(t.shape)
        if any(static_int(s) is None for s in shape):
            # the proof evaluates index ranges of known length; with a symbolic sequence length
            # it would hold for one length only
            raise _Unknown("symbolic shapes (the mask is proven at fixed sizes: pad batches to "
                           "one length, or compile with dynamic=False)")
        if node.op == "placeholder" and isinstance(node.meta.get(OUTER_NODE), Node):
            return self.value(node.meta[OUTER_NODE])   # a region's input: built outside
        if node.op == "placeholder" or node.op == "get_attr":
            return self._leaf(node, t)
        fn = node.target
        args, kwargs = node.args, node.kwargs
        method = node.op == "call_method"
        name = fn if method else getattr(fn, "__name__", str(fn))

        if not method and fn is torch.arange:
            return self._arange(node, t, shape)
        if (not method and fn in _CMP_FUNCS) or (method and fn in _CMP_METHODS):
            op = _CMP_FUNCS[fn] if not method else _CMP_METHODS[fn]
            return self._compare(op, args[0], args[1], shape)
        if (not method and fn in _AND) or (method and fn in _AND_METHODS):
            a, b = self.value(args[0]).expr, self.value(args[1]).expr
            a, b = _as_cond(a), _as_cond(b)
            return Val(_norm(Cond(a.atoms | b.atoms), shape), shape)
        if (not method and fn in _NOT) or (method and fn in _NOT_METHODS):
            inner = _as_cond(self.value(args[0]).expr)
            return Val(NotCond(inner), shape)
        if not method and fn in (operator.or_, torch.logical_or, torch.bitwise_or) or \
                method and fn in ("__or__", "logical_or", "bitwise_or"):
            raise _Unknown("a union of mask patterns")
        if (not method and fn in (operator.add, torch.add, operator.sub, torch.sub)) or \
                (method and fn in ("add", "sub", "__add__", "__sub__")):
            return self._shift(node, args, kwargs, shape,
                               sign=-1 if name in ("sub", "__sub__") or fn in (operator.sub, torch.sub) else 1)
        if not method and fn is operator.getitem:
            return self._getitem(node, args[0], args[1], shape)
        if method and fn == "unsqueeze" or not method and fn is torch.unsqueeze:
            return self._unsqueeze(args[0], args[1], shape)
        if method and fn in ("expand", "expand_as", "broadcast_to") or \
                not method and fn is torch.broadcast_to:
            src = self.value(args[0])
            return Val(_renumber(src.expr, len(src.shape), len(shape), shape), shape)
        if method and (fn in _IDENTITY_METHODS or fn in ("to", "type", "bool", "long", "int")):
            return self._cast(node, args[0], t, shape)
        if method and fn in ("new_ones", "new_zeros", "new_full") or \
                not method and fn in (torch.ones, torch.zeros, torch.full, torch.tensor,
                                      torch.scalar_tensor, torch.ones_like, torch.zeros_like,
                                      torch.full_like):
            return self._constant(node, t, shape)
        if not method and fn is torch.where:
            return self._where(args, shape)
        if method and fn == "masked_fill" or not method and fn is torch.masked_fill:
            return self._masked_fill(args, shape)
        if method and fn in ("tril", "triu") or not method and fn in (torch.tril, torch.triu):
            return self._tri(node, shape)
        if not method and fn is torch.diff:
            return self._diff(node, args, kwargs, shape)
        if method and fn == "cumsum" or not method and fn is torch.cumsum:
            return self._cumsum(node, args, kwargs, shape)
        if t.dtype == torch.bool:
            raise _Unknown(f"{node.name} ({name}) reads a boolean tensor this analysis can't "
                           "see through (a padding mask?)")
        return self._leaf(node, t)

    def _leaf(self, node: Node, t: torch.Tensor) -> Val:
        shape = tuple(t.shape)
        if t.dtype in _INT_DTYPES and t.dim() == 2:
            row = Lin(0) if shape[0] != 1 else Lin(None, 0)
            return Val(At(node, "ids", row, Lin(1) if shape[1] != 1 else Lin(None, 0)), shape)
        if t.dtype == torch.bool:
            raise _Unknown(f"the mask reads the runtime boolean tensor {node.name} "
                           "(a padding mask?)")
        raise _Unknown(f"the mask reads the runtime tensor {node.name} ({t.dtype}, {list(shape)})")

    def _arange(self, node: Node, t, shape) -> Val:
        args = list(node.args)
        if "start" in node.kwargs or "end" in node.kwargs or "step" in node.kwargs:
            raise _Unknown("arange with keyword bounds")
        if not all(static_int(a) is not None for a in args) or not 1 <= len(args) <= 3:
            raise _Unknown("arange with non-integer bounds")
        start = args[0] if len(args) >= 2 else 0
        step = args[2] if len(args) == 3 else 1
        if step != 1 or t.dtype not in _INT_DTYPES:
            raise _Unknown("arange with a step or a float dtype")
        return Val(_norm(Lin(0, start), shape), shape)

    def _shift(self, node, args, kwargs, shape, sign) -> Val:
        if kwargs.get("alpha", 1) != 1 or len(args) != 2:
            raise _Unknown("add/sub with alpha")
        a, b = args
        if static_int(b) is not None and isinstance(a, Node):
            return Val(_offset(self._bcast(a, shape), sign * b), shape)
        if static_int(a) is not None and isinstance(b, Node) and sign == 1:
            return Val(_offset(self._bcast(b, shape), a), shape)
        if isinstance(a, Node) and isinstance(b, Node) and sign == -1:
            ea, eb = self._bcast(a, shape), self._bcast(b, shape)
            if isinstance(ea, Lin) and isinstance(eb, Lin):
                if eb.dim is None:
                    return Val(_offset(ea, -eb.off), shape)
                if ea.dim is not None:                      # x_a − x_b + (a.off − b.off)
                    return Val(Sum(ea.dim, eb.dim, ea.off - eb.off), shape)
        raise _Unknown(f"{node.name}: arithmetic between index tensors")

    def _bcast(self, node, shape):
        v = self.value(node)
        if len(v.shape) > len(shape):
            raise _Unknown("broadcast to fewer dims")
        return _renumber(v.expr, len(v.shape), len(shape), shape)

    def _compare(self, op, a, b, shape) -> Val:
        ea = self._bcast(a, shape) if isinstance(a, Node) else self.value(a).expr
        eb = self._bcast(b, shape) if isinstance(b, Node) else self.value(b).expr
        for x, y in ((ea, eb), (eb, ea)):
            if isinstance(x, Indicator) and op in ("eq", "ne"):
                v = y.off if isinstance(y, Lin) and y.dim is None else (
                    y.value if isinstance(y, Num) else None)
                if v in (0, 1):
                    holds = (v == 1) == (op == "eq")
                    return Val(x.cond if holds else NotCond(x.cond), shape)
        if op == "ne":
            for x, y in ((ea, eb), (eb, ea)):
                if isinstance(x, DiffOne) and y == Lin(None, 1):
                    return Val(Boundary(x.ids), shape)
            if isinstance(ea, Lin) and isinstance(eb, Lin) and ea.dim is None and eb.dim is None:
                return Val(Cond(frozenset()) if ea.off != eb.off else _false(), shape)
            raise _Unknown("a != comparison")
        if not isinstance(ea, (Lin, At, Sum)) or not isinstance(eb, (Lin, At, Sum)):
            raise _Unknown("a comparison of non-index values")
        if op == "lt":
            op, ea = "le", _offset(ea, 1)
        elif op == "ge":
            op, ea, eb = "le", eb, ea
        elif op == "gt":
            op, ea, eb = "le", _offset(eb, 1), ea
        if op == "le":
            ea, eb = _unsum(ea, eb)
        elif isinstance(ea, Sum) or isinstance(eb, Sum):
            raise _Unknown("equality of index differences")
        return Val(_norm(Cond(frozenset([Cmp(op, ea, eb)])), shape), shape)

    def _getitem(self, node, src_node, index, shape) -> Val:
        src = self.value(src_node)
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, Node) for i in idx):
            return self._gather(src, idx, shape)
        if not isinstance(src.expr, (Lin, At, Cond)):
            raise _Unknown("indexing a derived value")
        # basic indexing: map each source dim to an output dim (+ offset) or a constant
        n_src = len(src.shape)
        n_explicit = sum(1 for i in idx if i is not None and i is not Ellipsis)
        expanded = []
        for i in idx:
            if i is Ellipsis:
                expanded += [slice(None)] * (n_src - n_explicit)
            else:
                expanded.append(i)
        expanded += [slice(None)] * (n_src - sum(1 for i in expanded if i is not None))
        sub, s_dim, o_dim = {}, 0, 0
        for i in expanded:
            if i is None:
                o_dim += 1
                continue
            size = src.shape[s_dim]
            if isinstance(i, slice):
                if i.step not in (None, 1):
                    raise _Unknown("strided slicing")
                start = i.start or 0
                if static_int(start) is None:
                    raise _Unknown("slice with a runtime start")
                start = start + size if start < 0 else start
                sub[s_dim] = Lin(o_dim, min(max(start, 0), size))
                o_dim += 1
            elif static_int(i) is not None:
                sub[s_dim] = Lin(None, i + size if i < 0 else i)
            else:
                raise _Unknown(f"index {i!r}")
            s_dim += 1
        return Val(_norm(_subst(src.expr, sub), shape), shape)

    def _gather(self, src: Val, idx, shape) -> Val:
        """Advanced indexing ``src[(i_0, i_1, …)]`` with one index tensor per source dim."""
        if len(idx) != len(src.shape) or not all(isinstance(i, Node) for i in idx):
            raise _Unknown("advanced indexing of this form")
        sub = {}
        for d, i in enumerate(idx):
            e = self._bcast(i, shape)
            if not isinstance(e, Lin):
                raise _Unknown("indexing by a runtime tensor")
            sub[d] = e
        if not isinstance(src.expr, (Lin, At)):
            raise _Unknown("gathering from a derived value")
        return Val(_norm(_subst(src.expr, sub), shape), shape)

    def _unsqueeze(self, src_node, dim, shape) -> Val:
        src = self.value(src_node)
        n = len(src.shape)
        if static_int(dim) is None:
            raise _Unknown("unsqueeze of a runtime dim")
        dim = dim + n + 1 if dim < 0 else dim
        sub = {d: Lin(d if d < dim else d + 1) for d in range(n)}
        return Val(_norm(_subst(src.expr, sub), shape), shape)

    def _cast(self, node, src_node, t, shape) -> Val:
        src_t = tensor_value(src_node)
        if src_t is None or tuple(src_t.shape) != shape:
            raise _Unknown(f"{node.name} changes the shape")
        same = src_t.dtype == t.dtype or (src_t.dtype in _INT_DTYPES and t.dtype in _INT_DTYPES)
        val = self.value(src_node)
        if not same and src_t.dtype.is_floating_point and t.dtype.is_floating_point and \
                isinstance(val.expr, Additive):
            return val   # −big stays ≤ −6e4 (or −inf) in any float dtype; 0 stays 0
        if not same and t.dtype == torch.bool and isinstance(val.expr, Indicator):
            return Val(val.expr.cond, shape)
        if not same:
            raise _Unknown(f"{node.name} casts {src_t.dtype} to {t.dtype}")
        return val

    def _constant(self, node, t, shape) -> Val:
        fn = node.target
        args = node.args
        if fn in ("new_ones", torch.ones, torch.ones_like):
            v = 1
        elif fn in ("new_zeros", torch.zeros, torch.zeros_like):
            v = 0
        elif fn in ("new_full",):
            v = args[2] if len(args) > 2 else node.kwargs.get("fill_value")
        elif fn in (torch.full, torch.full_like):
            v = args[1] if len(args) > 1 else node.kwargs.get("fill_value")
        else:  # torch.tensor(x) / scalar_tensor(x)
            v = args[0] if args else None
        if isinstance(v, bool) or t.dtype == torch.bool:
            if v is None:
                raise _Unknown("constant without a value")
            return Val(Cond(frozenset()) if bool(v) else _false(), shape)
        if isinstance(v, (int, float)):
            if t.dtype.is_floating_point:
                return Val(Num(float(v)), shape)
            return Val(Lin(None, int(v)), shape)
        raise _Unknown(f"{node.name}: a constant of unknown value")

    def _where(self, args, shape) -> Val:
        if len(args) != 3:
            raise _Unknown("where with one argument")
        cond = self.value(args[0]).expr
        a, b = (_number_of(self, x) for x in args[1:])
        if isinstance(cond, Cond) and a == 0.0 and b is not None and b <= _BIG_NEGATIVE:
            return Val(_renumber_val(self, args[0], shape, Additive(cond)), shape)
        if isinstance(cond, NotCond) and b == 0.0 and a is not None and a <= _BIG_NEGATIVE:
            return Val(_renumber_val(self, args[0], shape, Additive(cond.cond)), shape)
        raise _Unknown("where() other than (allowed, 0, −big)")

    def _masked_fill(self, args, shape) -> Val:
        if len(args) != 3:
            raise _Unknown("masked_fill form")
        base = _number_of(self, args[0])
        cond = self.value(args[1]).expr
        fill = _number_of(self, args[2])
        if base == 0.0 and isinstance(cond, NotCond) and fill is not None and fill <= _BIG_NEGATIVE:
            return Val(_renumber_val(self, args[1], shape, Additive(cond.cond)), shape)
        raise _Unknown("masked_fill other than zeros.masked_fill(~allowed, −big)")

    def _tri(self, node, shape) -> Val:
        """tril(x, d) keeps x where j − i ≤ d (zero elsewhere); triu(x, d) where j − i ≥ d."""
        fn = node.target
        lower = fn in ("tril", torch.tril)
        d = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        if static_int(d) is None or len(shape) < 2:
            raise _Unknown("tril/triu of this form")
        n = len(shape)
        i, j = Lin(n - 2), Lin(n - 1)
        keep = Cmp("le", j, Lin(n - 2, d)) if lower else Cmp("le", Lin(n - 2, d), j)
        outside = Cmp("le", Lin(n - 2, d + 1), j) if lower else Cmp("le", j, Lin(n - 2, d - 1))
        del i
        x = self._bcast(node.args[0], shape)
        if isinstance(x, Cond) and not x.atoms:             # bool ones
            return Val(_norm(Cond(frozenset([keep])), shape), shape)
        if isinstance(x, Num) and x.value <= _BIG_NEGATIVE:  # −big kept, 0 elsewhere
            return Val(_norm(Additive(Cond(frozenset([outside]))), shape), shape)
        if isinstance(x, Num) and x.value == 1.0 or x == Lin(None, 1):
            return Val(_norm(Indicator(Cond(frozenset([keep]))), shape), shape)
        raise _Unknown("tril/triu of a value other than ones or −inf")

    def _diff(self, node, args, kwargs, shape) -> Val:
        names = ("input", "n", "dim", "prepend", "append")
        a = {"n": 1, "dim": -1, "prepend": None, "append": None}
        a.update(zip(names, args))
        a.update(kwargs)
        src = self.value(a["input"])
        if a["n"] != 1 or a["append"] is not None or len(src.shape) != 2 or \
                a["dim"] not in (-1, 1) or a["prepend"] is None:
            raise _Unknown("diff of another form")
        first = self.value(a["prepend"])
        expr = src.expr
        want_first = _offset(_norm(_subst(expr, {0: Lin(0), 1: Lin(None, 0)}), first.shape), -1)
        if first.expr != want_first:
            raise _Unknown("diff whose prepend is not P[:, :1] − 1")
        if isinstance(expr, Lin) and expr.dim == 1:
            return Val(Lin(None, 1), shape)          # an arange: every step is 1
        if isinstance(expr, At) and expr.kind == "ids" and expr.col == Lin(1) and \
                expr.row in (Lin(0), Lin(None, 0)):
            return Val(DiffOne(expr), shape)
        raise _Unknown("diff of a derived value")

    def _cumsum(self, node, args, kwargs, shape) -> Val:
        names = ("input", "dim")
        a = {"dtype": None}
        a.update(zip(names, args))
        a.update(kwargs)
        src = self.value(a["input"])
        if a.get("dim") not in (-1, len(src.shape) - 1) or len(src.shape) != 2:
            raise _Unknown("cumsum of another form")
        if isinstance(src.expr, Boundary):
            row = Lin(0) if shape[0] != 1 else Lin(None, 0)
            return Val(At(node, "doc", row, Lin(1), 0, src.expr.ids.leaf), shape)
        if src.expr == _false():
            return Val(Lin(None, 0), shape)
        raise _Unknown("cumsum of something other than document boundaries")


# ---------------------------------------------------------------------------------------------
# Expression helpers
# ---------------------------------------------------------------------------------------------
def _allowed(e, role: str) -> Cond:
    """The condition under which a (query, key) pair is attended, given the mask's role."""
    if role in ("sdpa", "additive") and isinstance(e, Additive):
        return e.cond
    if role in ("sdpa", "allowed") and isinstance(e, Cond):
        return e
    if role == "disallowed":
        if isinstance(e, NotCond):
            return e.cond
        if isinstance(e, Cond) and len(e.atoms) == 1:
            (c,) = e.atoms
            if c.op == "le":               # ¬(a ≤ b) ⟺ b + 1 ≤ a for integers
                return Cond(frozenset([Cmp("le", _offset(c.b, 1), c.a)]))
        raise _Unknown("the masked-out set is not the complement of a conjunction")
    raise _Unknown(f"a {type(e).__name__} value used as a mask")


def _false() -> Cond:
    return Cond(frozenset([Cmp("le", Lin(None, 1), Lin(None, 0))]))


def _as_cond(e) -> Cond:
    if isinstance(e, Cond):
        return e
    if isinstance(e, Boolean):
        return Cond(frozenset()) if e.value else _false()
    raise _Unknown("& of non-boolean values")


def _number_of(analyzer: _MaskAnalyzer, x) -> float | None:
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    try:
        e = analyzer.value(x).expr
    except _Unknown:
        return None
    if isinstance(e, Num):
        return e.value
    if isinstance(e, Lin) and e.dim is None:
        return float(e.off)
    return None


def _renumber_val(analyzer, node, shape, expr):
    return _renumber(expr, len(analyzer.value(node).shape), len(shape), shape)


def _unsum(a, b):
    """a ≤ b with an index difference on one side and a constant on the other, as a
    comparison of two indices: x_p − x_m + o ≤ c ⟺ x_p + o − c ≤ x_m (and mirrored)."""
    if isinstance(a, Sum) and isinstance(b, Lin) and b.dim is None:
        return Lin(a.plus, a.off - b.off), Lin(a.minus)
    if isinstance(b, Sum) and isinstance(a, Lin) and a.dim is None:
        return Lin(b.minus, a.off - b.off), Lin(b.plus)
    if isinstance(a, Sum) or isinstance(b, Sum):
        raise _Unknown("comparison of index differences")
    return a, b


def _offset(e, k: int):
    if isinstance(e, Lin):
        return Lin(e.dim, e.off + k)
    if isinstance(e, Sum):
        return Sum(e.plus, e.minus, e.off + k)
    if isinstance(e, At):
        return At(e.leaf, e.kind, e.row, e.col, e.off + k, e.source)
    raise _Unknown("arithmetic on a non-index value")


def _subst(e, sub: dict[int, Lin]):
    """Rewrite dims: x_d (of the source) := sub[d] (a Lin of the result's dims)."""
    if isinstance(e, Lin):
        if e.dim is None:
            return e
        if e.dim not in sub:
            raise _Unknown("dimension mapping")
        s = sub[e.dim]
        return Lin(s.dim, s.off + e.off)
    if isinstance(e, At):
        return At(e.leaf, e.kind, _subst(e.row, sub), _subst(e.col, sub), e.off, e.source)
    if isinstance(e, Sum):
        p, m = _subst(Lin(e.plus), sub), _subst(Lin(e.minus), sub)
        if p.dim is None or m.dim is None:
            raise _Unknown("index difference along a removed dim")
        return Sum(p.dim, m.dim, e.off + p.off - m.off)
    if isinstance(e, Cmp):
        return Cmp(e.op, _subst(e.a, sub), _subst(e.b, sub))
    if isinstance(e, Cond):
        return Cond(frozenset(_subst(a, sub) for a in e.atoms))
    if isinstance(e, NotCond):
        return NotCond(_subst(e.cond, sub))
    if isinstance(e, Additive):
        return Additive(_subst(e.cond, sub))
    if isinstance(e, Indicator):
        return Indicator(_subst(e.cond, sub))
    if isinstance(e, (Num, Boolean)):
        return e
    raise _Unknown("reshaping a derived value")


def _renumber(e, n_src: int, n_out: int, shape):
    """Right-align a value of n_src dims inside n_out dims (broadcasting), renormalized."""
    if n_src == n_out:
        return _norm(e, shape)
    shift = n_out - n_src
    return _norm(_subst(e, {d: Lin(d + shift) for d in range(n_src)}), shape)


def _shift_dims(e, shift: int):
    return e if shift == 0 else _subst(e, {d: Lin(d + shift) for d in range(4 - shift)})


def _norm(e, shape):
    """Normalize: an index along a dim of size 1 is the constant 0; fold comparisons whose
    truth the dims' extents decide."""
    if isinstance(e, Lin):
        if e.dim is not None and shape[e.dim] == 1:
            return Lin(None, e.off)
        return e
    if isinstance(e, At):
        return At(e.leaf, e.kind, _norm(e.row, shape), _norm(e.col, shape), e.off, e.source)
    if isinstance(e, Sum):
        p, m = _norm(Lin(e.plus), shape), _norm(Lin(e.minus), shape)
        if m.dim is None:
            return _offset(p, e.off) if p.dim is not None else Lin(None, e.off)
        if p.dim is None:
            raise _Unknown("negated index")
        return e
    if isinstance(e, Cmp):
        c = Cmp(e.op, _norm(e.a, shape), _norm(e.b, shape))
        truth = _decide(c, shape)
        if truth is True:
            return None
        if truth is False:
            return "false"
        return c
    if isinstance(e, Cond):
        atoms = set()
        for a in e.atoms:
            n = _norm(a, shape)
            if n == "false":
                return _false()
            if n is not None:
                atoms.add(n)
        return Cond(frozenset(atoms))
    if isinstance(e, NotCond):
        return NotCond(_norm(e.cond, shape))
    if isinstance(e, Additive):
        return Additive(_norm(e.cond, shape))
    if isinstance(e, Indicator):
        return Indicator(_norm(e.cond, shape))
    return e


def _range(e: Lin, shape) -> tuple[int, int]:
    if e.dim is None:
        return e.off, e.off
    return e.off, e.off + shape[e.dim] - 1


def _decide(c: Cmp, shape) -> bool | None:
    """True/False when the comparison holds at every / no index of ``shape``; else None."""
    a, b = c.a, c.b
    if c.op == "le" and a == b:
        return True
    if isinstance(a, At) and isinstance(b, At):
        same = (a.leaf, a.kind, a.row, a.col) == (b.leaf, b.kind, b.row, b.col)
        if same:
            return (a.off <= b.off) if c.op == "le" else (a.off == b.off)
        return None
    if not (isinstance(a, Lin) and isinstance(b, Lin)):
        return None
    if c.op == "eq":
        if a.dim == b.dim:
            return a.off == b.off
        if a.dim is None and b.dim is None:
            return a.off == b.off
        return None
    # a ≤ b  ⟺  x_a − x_b ≤ b.off − a.off
    rhs = b.off - a.off
    if a.dim == b.dim:
        return 0 <= rhs
    lo_a, hi_a = _range(Lin(a.dim), shape)
    lo_b, hi_b = _range(Lin(b.dim), shape)
    if hi_a - lo_b <= rhs:
        return True
    if lo_a - hi_b > rhs:
        return False
    return None


def _classify_atoms(atoms, Tq: int, Tk: int):
    """Name the mask a conjunction of atoms describes, over dims (batch, head, i=query, j=key)."""
    Q, K = Lin(2), Lin(3)
    causal = same_doc = False
    pos_causal: set = set()
    docs: set = set()
    windows: list[int] = []
    other = []
    for c in atoms:
        a, b = c.a, c.b
        if c.op == "le" and isinstance(a, Lin) and isinstance(b, Lin) and a.dim == 3 and b.dim == 2:
            if a.off == b.off:
                causal = True          # j ≤ i
                continue
            other.append(f"causal mask shifted by {b.off - a.off}")
            continue
        if c.op == "le" and isinstance(a, Lin) and isinstance(b, Lin) and a.dim == 2 and b.dim == 3:
            other.append(f"sliding window of {b.off - a.off + 1} tokens")   # i − j ≤ w − 1
            continue
        if isinstance(a, At) and isinstance(b, At) and a.leaf is b.leaf and a.kind == b.kind and \
                a.row == b.row and _rows_ok(a, Tq, Tk):
            if a.kind == "ids" and c.op == "le" and a.col == K and b.col == Q and a.off == b.off:
                pos_causal.add(a.leaf)             # P[j] ≤ P[i]
                continue
            if a.kind == "ids" and c.op == "le" and a.col == Q and b.col == K:
                windows.append(b.off - a.off)      # P[i] − P[j] ≤ w − 1: a sliding window
                continue
            if a.kind == "doc" and c.op == "eq" and {a.col, b.col} == {Q, K} and a.off == b.off:
                same_doc = True
                docs.add((a.leaf, a.source))
                continue
        other.append(_describe_atom(c))
    if other:
        return "mask of unknown structure: " + "; ".join(sorted(set(other)))
    if len(docs) > 1:
        return "mask compares two different document-id tensors"
    if not same_doc:
        if pos_causal or windows:
            return "causal by position ids without document ids (positions need not increase)"
        return ("causal", None) if causal else ("none", None)
    (doc, source), = docs
    if pos_causal - {source}:
        return "causal by position ids other than those the documents come from"
    if not (causal or pos_causal):
        return "same-document mask without causality (bidirectional documents)"
    # Within one document positions step by 1, so P[i] − P[j] = i − j ≤ T − 1: a window
    # P[i] − P[j] ≤ w − 1 is redundant when w ≥ T.
    short = [w + 1 for w in windows if w < max(Tq, Tk) - 1]
    if short:
        return f"sliding window of {min(short)} positions (shorter than the sequence)"
    return "document", doc


def _rows_ok(e: At, Tq: int, Tk: int) -> bool:
    """The leaf is read at row b of batch b (or has one row), over exactly Tq == Tk columns."""
    shape = tensor_value(e.leaf).shape
    if e.row == Lin(0):
        pass
    elif e.row == Lin(None, 0):
        if shape[0] != 1:
            return False
    else:
        return False
    return Tq == Tk == shape[1]


def _describe_atom(c: Cmp) -> str:
    def s(e):
        if isinstance(e, Lin):
            base = {None: "", 0: "b", 1: "h", 2: "i", 3: "j"}.get(e.dim, f"x{e.dim}")
            return f"{base}{e.off:+d}" if base and e.off else (base or str(e.off))
        if isinstance(e, At):
            return f"{e.kind}:{e.leaf.name}[{s(e.row)},{s(e.col)}]" + (f"{e.off:+d}" if e.off else "")
        return "?"
    return f"{s(c.a)} {'≤' if c.op == 'le' else '=='} {s(c.b)}"


# ---------------------------------------------------------------------------------------------
# Accepting and rewriting
# ---------------------------------------------------------------------------------------------
def _kernel_declines(site: _Site, kind: str) -> str | None:
    q, k, v = tensor_value(site.q), tensor_value(site.k), tensor_value(site.v)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in KERNEL_DTYPES:
            return f"{name} dtype {t.dtype} (kernels: fp32, bf16, fp16)"
        if t.device.type not in ("cuda", "cpu"):
            return f"device {t.device.type}"
        if any(static_int(s) is None for s in t.shape):
            return "symbolic shapes"
    out = tensor_value(site.output)
    if not (q.dtype == k.dtype == v.dtype) and site.autocast is None:
        return f"mixed dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if (out is None or out.dtype != _compute_dtype(site)
            or tuple(out.shape) != (*q.shape[:3], v.shape[-1])):
        return "output dtype or shape differs from the attention of q, k, v"
    B, H, Tq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or H % k.shape[1]:
        return f"{H} query heads vs {k.shape[1]} key/value heads"
    if k.shape[2] != v.shape[2] or k.shape[3] != D:
        return "k/v shapes do not match q"
    if kind == "document":
        if site.dropout_p:
            return f"attention dropout p={site.dropout_p:g} inside packed documents " \
                   "(the document kernel has no dropout)"
        if v.shape[-1] != D:
            return "value head dim differs from the query head dim"
        if Tq != k.shape[2]:
            return "packed documents with Tq != Tk"
        if q.device.type == "cuda" and D > kernels.MAX_HEAD_DIM:
            return f"head dim {D} > {kernels.MAX_HEAD_DIM}"
    return None


def _autocast_dtype(site: _Site) -> torch.dtype | None:
    """The low precision autocast computes this attention in, where q, k and v differ in dtype.

    Under ``torch.autocast``, RoPE leaves q and k in fp32 (cos and sin are fp32) while v comes
    out of its projection in bf16/fp16 — or all three arrive in fp32 (transformers 5.17's
    Qwen2 under autocast); SDPA and the matmuls of the eager spelling then cast them to
    autocast's dtype, which is the output's, and the rewrite makes those casts explicit. Only
    where autocast is on there (``graph.autocast_dtype``): without it, eager attention can still
    mix dtypes by casting P to v's dtype itself, and its fp32 scores must stay fp32. None for
    any other mix."""
    return autocast_cast_dtype(site.output, (site.q, site.k, site.v))


def _compute_dtype(site: _Site) -> torch.dtype:
    return site.autocast or tensor_value(site.q).dtype


def _cast_inputs(gm: GraphModule, site: _Site) -> None:
    """q, k, v cast to the dtype autocast computes in, before the attention (see
    :func:`_autocast_dtype`); nothing where they already agree."""
    dtype = site.autocast
    if dtype is None:
        return
    for name in ("q", "k", "v"):
        node = getattr(site, name)
        if tensor_value(node).dtype != dtype:
            setattr(site, name, call_before(gm.graph, site.output, "to", (node, dtype)))
            site.autocast_casts += (name,)


def _insert_bounds(gm: GraphModule, doc: Node, batch: int) -> Node:
    """Document bounds of the batch, computed once right after the document ids."""
    for user in doc.users:
        if user.target is kernels.document_bounds and user.args == (doc, batch):
            return user   # already there (another region's attention inserted it)
    with gm.graph.inserting_after(doc):
        node = gm.graph.call_function(kernels.document_bounds, (doc, batch))
    node.meta["example_value"] = fake_call(kernels.document_bounds, (doc, batch))
    return node


def _rewrite(gm: GraphModule, site: _Site, kind: str, backend: str, bounds: Node | None) -> None:
    _cast_inputs(gm, site)
    args = (site.q, site.k, site.v, site.scale, site.dropout_p, kind != "none", backend)
    kwargs = {"bounds": bounds} if bounds is not None else {}
    site.output = replace_with_call(gm.graph, site.output, kernels.attention, args, kwargs,
                                    erase=site.matched)


def _erase_dead(gm: GraphModule, nodes) -> None:
    """Remove mask-building nodes no attention reads any more (they are pure)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted((n for n in nodes if not n._erased and n in order), key=order.__getitem__,
                       reverse=True):
        if not node.users and node.op in ("call_function", "call_method"):
            gm.graph.erase_node(node)


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _describe(site: _Site, kind: str, backend: str) -> str:
    q, k = tensor_value(site.q), tensor_value(site.k)
    B, H, T, D = q.shape
    what = {"none": "no mask", "causal": "causal", "document": "causal within documents"}[kind]
    if site.mask is not None:
        what = f"mask proven {what}, not materialized"
    parts = [f"{site.spelling} {_short(q.dtype)} B={B} Hq={H} Hk={k.shape[1]} T={T} D={D}", what]
    parts.append("document kernel" if backend == "document" else f"backend {backend}")
    if site.repeated:
        parts.append("GQA without repeat_kv")
    if site.autocast_casts:
        cast = "/".join(site.autocast_casts)
        parts.append(f"autocast's casts of {cast} to {_short(q.dtype)} made explicit")
    if site.dropout_p:
        parts.append(f"dropout {site.dropout_p:g}")
    if site.spelling == "eager" and q.dtype != torch.float32:
        parts.append("probabilities kept in fp32 (eager rounds them to " + _short(q.dtype) + ")")
    return ", ".join(parts)
