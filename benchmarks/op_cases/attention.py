"""Attention cases: every candidate kernel per shape, so the default can be chosen with data.

    python -m benchmarks.ops --ops attention [--variants sdpa_cudnn flex ...]

Inputs are laid out as transformers makes them: q [B,Hq,T,D] and k, v [B,Hk,T,D], each a
transposed view of a [B,T,H,D] projection. Causal cases (one sequence per row):

    eager               transformers' eager attention: repeat_kv, q·kᵀ·scale + mask (built from
                        aranges, as masking_utils does), softmax in fp32, cast, ·v
    hf_sdpa_dense_mask  what transformers' sdpa path runs under torch.compile: repeat_kv and
                        SDPA with the materialized [B,1,T,T] boolean mask (compiled)
    sdpa_default        SDPA(is_causal=True, enable_gqa=True): torch's own backend choice
    sdpa_flash / sdpa_cudnn   the aten flash / cuDNN kernels called directly (GQA native)
    flex                FlexAttention, causal block mask built once outside the timed call
    triton              chronicals' document kernel with one document per row
    chronicals          ``eager`` compiled by the chronicals backend (attention pass only):
                        the pass proves the mask causal and emits its default backend

Packed cases (8 equal documents per row; position ids restart per document):

    eager / hf_dense_mask   transformers' eager / sdpa paths with the block-diagonal mask
                            materialized from position ids (masking_utils' subgraph, copied)
    flex_doc_mask       FlexAttention with a document BlockMask built once (as a model would,
                        shared by its layers); building it per call costs 7–10 ms (ANCHORS.md)
    varlen              torch.nn.attention.varlen.varlen_attn, cu_seqlens prebuilt; K/V repeated
                        where varlen has no ``enable_gqa`` (torch 2.11)
    triton              chronicals' document kernel, bounds prebuilt (the per-layer cost)
    chronicals          ``hf_dense_mask`` compiled by the chronicals backend: bounds computed in
                        the call (in a model: once per batch for all layers), then the kernel

FLOPs (FlashAttention's convention, the one behind ANCHORS.md's 475 TFLOP/s): forward
4·B·Hq·D·Σ_rows Σ_docs L²/2 (two matmuls over the causal half; one document of length T for
the causal cases), backward 2.5× forward, total 3.5× forward. Ideal bytes: q, k, v read and o
written forward; q, k, v, o, dO read and dq, dk, dv written backward: 6·B·T·D·(Hq + Hk)
elements. Attention is compute-bound; the FLOP rate is the column to read.

Reference: eager in float64 for the small shapes; at B=4 T=4096 Hq=32 D=128 the float64
scores alone need 17 GB, so the reference there is eager in the input dtype (``reference``
off, errors then include eager's own bf16 rounding).
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from benchmarks.harness import OpCase
from chronicals_fx.backend import chronicals_backend
from chronicals_fx.config import Config
from chronicals_fx.kernels import attention as A

CAUSAL_SHAPES = [(8, 1024, 14, 2, 64), (4, 4096, 32, 8, 128)]
PACKED_SHAPES = [(8, 1024, 14, 2, 64), (2, 4096, 14, 2, 64), (4, 4096, 32, 8, 128)]
DOCS_PER_ROW = 8


def _repeat_kv(x, n):
    b, h, t, d = x.shape
    return x if n == 1 else x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


# --- transformers' spellings --------------------------------------------------------------------
def _causal_mask(q):
    i = torch.arange(q.shape[2], device=q.device)
    return (i[None, None, None, :] <= i[None, None, :, None]).expand(q.shape[0], -1, -1, -1)


def _document_mask(q, position_ids):
    """masking_utils (transformers 5.17): documents from position ids, causal & same document."""
    first = position_ids[:, :1] - 1
    doc = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    T = q.shape[2]
    b = torch.arange(q.shape[0], device=q.device)[:, None, None, None]
    i = torch.arange(T, device=q.device)
    qi, ki = i[None, None, :, None], i[None, None, None, :]
    return (ki <= qi) & (doc[b, qi] == doc[b, ki])


def _eager_with(q, k, v, mask):
    n = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n), _repeat_kv(v, n)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    s = s + torch.where(mask, torch.zeros((), device=q.device, dtype=q.dtype),
                        torch.finfo(q.dtype).min)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v)


def _sdpa_with(q, k, v, mask):
    n = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, _repeat_kv(k, n), _repeat_kv(v, n), attn_mask=mask,
                                          scale=q.shape[-1] ** -0.5)


def eager_causal(q, k, v):
    return _eager_with(q, k, v, _causal_mask(q))


def hf_sdpa_causal(q, k, v):
    return _sdpa_with(q, k, v, _causal_mask(q))


def eager_packed(q, k, v, position_ids):
    return _eager_with(q, k, v, _document_mask(q, position_ids))


def hf_sdpa_packed(q, k, v, position_ids):
    return _sdpa_with(q, k, v, _document_mask(q, position_ids))


# --- candidates ----------------------------------------------------------------------------------
def _backend(name):
    def fn(q, k, v, *_):
        return A.attention(q, k, v, q.shape[-1] ** -0.5, 0.0, True, name)
    return fn


def _chronicals(fn):
    backend = functools.partial(chronicals_backend, options=Config(passes=("attention",)))
    return torch.compile(fn, backend=backend, dynamic=False)


_CACHE: dict = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE.clear()   # one case at a time
        _CACHE[key] = make()
    return _CACHE[key]


def _flex_variants(packed: bool) -> dict:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return {}
    flex = torch.compile(flex_attention, dynamic=False)

    def causal(q, k, v):
        T = q.shape[2]
        mask = _cached(("flex", T, q.device), lambda: create_block_mask(
            lambda b, h, i, j: j <= i, None, None, T, T, device=q.device))
        return flex(q, k, v, block_mask=mask, enable_gqa=True, scale=q.shape[-1] ** -0.5)

    def documents(q, k, v, position_ids):
        B, T = q.shape[0], q.shape[2]

        def make():
            doc = (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1)
            return create_block_mask(lambda b, h, i, j: (j <= i) & (doc[b, i] == doc[b, j]),
                                     B, None, T, T, device=q.device)
        mask = _cached(("flexdoc", position_ids.data_ptr(), T), make)
        return flex(q, k, v, block_mask=mask, enable_gqa=True, scale=q.shape[-1] ** -0.5)

    return {"flex_doc_mask": documents} if packed else {"flex": causal}


def _varlen_variant() -> dict:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return {}
    params = inspect.signature(varlen_attn).parameters
    extra = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params

    def fn(q, k, v, position_ids):
        B, H, T, D = q.shape
        lengths = _cached(("varlen", position_ids.data_ptr(), T), lambda: _cu_seqlens(position_ids))
        cu, max_len = lengths
        n = H // k.shape[1]
        if not gqa:
            k, v = _repeat_kv(k, n), _repeat_kv(v, n)
        flat = [t.transpose(1, 2).reshape(B * T, t.shape[1], D) for t in (q, k, v)]
        out = varlen_attn(*flat, cu, cu, max_len, max_len, scale=D ** -0.5,
                          **({"enable_gqa": True} if gqa else {}), **extra)
        return out.view(B, T, H, D).transpose(1, 2)
    return {"varlen": fn}


def _cu_seqlens(position_ids):
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _triton_documents(q, k, v, position_ids):
    bounds = _cached(("bounds", position_ids.data_ptr(), q.shape[2]), lambda: A.document_bounds(
        (torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1).cumsum(-1),
        q.shape[0]))
    return torch.ops.chronicals.document_attention(q, k, v, bounds, q.shape[-1] ** -0.5)[0]


# --- cases ---------------------------------------------------------------------------------------
def _qkv(B, T, Hq, Hk, D, device, dtype):
    return tuple(torch.randn(B, T, h, D, device=device, dtype=dtype).transpose(1, 2)
                 .requires_grad_() for h in (Hq, Hk, Hk))


def _flops(B, Hq, D, sq_lengths):
    forward = 4 * B * Hq * D * sq_lengths / 2
    return int(3.5 * forward)


def cases(device: str, dtype: torch.dtype) -> list[OpCase]:
    size = dtype.itemsize
    out = []
    # Variants are built per case: one compiled function shared by two shapes would recompile
    # with symbolic shapes on the second, which is not what a fixed-shape training run compiles.
    def compiled(fn):
        return torch.compile(fn, dynamic=False)

    for B, T, Hq, Hk, D in CAUSAL_SHAPES:
        causal = {"eager": eager_causal, "hf_sdpa_dense_mask": compiled(hf_sdpa_causal),
                  "sdpa_default": compiled(_backend("sdpa")),
                  "sdpa_flash": compiled(_backend("flash")),
                  "sdpa_cudnn": compiled(_backend("cudnn")),
                  **_flex_variants(packed=False),
                  "triton": compiled(_backend("triton")),
                  "chronicals": _chronicals(eager_causal)}
        out.append(OpCase(
            "attention", f"causal B={B} T={T} Hq={Hq} Hk={Hk} D={D}",
            6 * B * T * D * (Hq + Hk) * size,
            functools.partial(_qkv, B, T, Hq, Hk, D, device, dtype), causal,
            flops=_flops(B, Hq, D, T * T), reference=T * T * B * Hq <= 2**31))

    for B, T, Hq, Hk, D in PACKED_SHAPES:
        L = T // DOCS_PER_ROW
        packed = {"eager": eager_packed, "hf_dense_mask": compiled(hf_sdpa_packed),
                  **_flex_variants(packed=True), **_varlen_variant(),
                  "triton": _triton_documents, "chronicals": _chronicals(hf_sdpa_packed)}

        def inputs(B=B, T=T, Hq=Hq, Hk=Hk, D=D, L=L):
            position_ids = torch.arange(T, device=device).remainder(L).expand(B, -1).contiguous()
            return (*_qkv(B, T, Hq, Hk, D, device, dtype), position_ids)
        out.append(OpCase(
            "attention", f"packed {DOCS_PER_ROW} docs/row B={B} T={T} Hq={Hq} Hk={Hk} D={D}",
            6 * B * T * D * (Hq + Hk) * size, inputs, packed,
            flops=_flops(B, Hq, D, DOCS_PER_ROW * L * L), reference=T * T * B * Hq <= 2**31))
    return out
