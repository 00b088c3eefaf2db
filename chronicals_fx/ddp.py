"""Under DDP, rewrite each Dynamo graph whole, before Dynamo's DDPOptimizer splits it.

**Why.** With ``torch.compile`` on a ``DistributedDataParallel`` model, Dynamo hands the
captured graph to ``DDPOptimizer.compile_fn`` (``torch/_dynamo/backends/distributed.py``; see
``convert_frame.py``, which swaps it in for the user's backend while a DDP forward runs). It
cuts the graph at gradient-bucket boundaries (``bucket_cap_mb``, 25 MB by default) with
``split_module`` and calls the user's backend once per piece. A value built in one piece and
used in a later one is a graph *input* there. Hugging Face builds the causal mask once, before
the first layer, so in every piece after the first the mask is a runtime tensor the attention
pass cannot prove causal (it declines "the mask reads the runtime ... tensor"), and those
layers keep the materialized [B,1,T,T] mask with SDPA's slow masked path. Any other pattern a
seam cuts (a norm whose residual add is in the previous piece, the loss) is missed likewise.

**What.** :func:`install` (called when :mod:`chronicals_fx.backend` is imported: that is how
``backend="chronicals"`` is resolved, and what ``import chronicals`` imports) wraps
``DDPOptimizer.compile_fn`` once. When the backend DDPOptimizer was given is ours, the wrapper
runs the chronicals passes on the whole graph first, with the options and report callback the
backend is bound to, then lets DDPOptimizer bucket, split and compile as usual. Every pattern
is then rewritten with the whole graph in view (the mask of every layer is proven; the mask's
construction is gone when nothing reads it any more), and each match is a single node that no
seam can cut. The rewritten graph's nodes carry a marker that ``split_module`` copies into
every piece (it copies node metadata, placeholders included); the backend, called per piece,
sees it and compiles the piece without running the passes again. So the report lists each
rewrite once, as one graph (the Dynamo graph), however many pieces DDP compiles.

Running the passes again on a piece would find nothing more: every match is already a
chronicals op or an SDPA call the passes leave alone, and a piece holds a subset of the
whole graph's nodes with less context (its cut values are inputs). Skipping it also skips
declines repeated per piece.

**Why this design.** Alternatives considered: turning DDPOptimizer off
(``torch._dynamo.config.optimize_ddp = False``) gives one graph but loses the overlap of
gradient all-reduce with the backward, which DDPOptimizer exists for; proving a piece's mask
input from the piece that built it would need the pieces' fake outputs tied back to graph
nodes (DDPOptimizer only propagates fake tensors), and would still leave the mask materialized.
Rewriting before the split is the one place that sees the whole program and changes nothing
DDP relies on: the parameters stay graph inputs read by the same (now fused) nodes, so buckets
are still counted from them; new nodes carry fake ``example_value`` metadata (the passes set
it, as for Inductor), which ``split_module`` reads for symbolic sizes, and DDPOptimizer then
propagates fake tensors through the compiled pieces as before.

Finding our backend: DDPOptimizer is given Dynamo's wrapper chain around what the user passed
to ``torch.compile``: ``WrapBackendDebug`` (``_torchdynamo_orig_backend``), then
``torch._TorchCompileWrapper`` (``compiler_fn`` and the ``mode``/``options`` ``kwargs``), then
possibly ``functools.partial`` (how ``chronicals.optimize``/``explain`` bind their config and
report callback), then :func:`chronicals_fx.backend.chronicals_backend`, recognised by the
attribute ``whole_graph`` it carries. The keyword arguments are collected on the way down and
merged as the calls would merge them (an outer wrapper's keywords win over a partial's). A
chain with anything else in it (positional arguments bound by a partial, an unknown wrapper)
is left alone: the backend then runs per piece as before (correct, only less is matched).
``CHRONICALS_DDP_WHOLE_GRAPH=0`` in the environment (read at import) leaves DDPOptimizer alone.

FSDP2 is another matter: its hooks are ``torch._dynamo.disable``d, so Dynamo itself breaks the
program at every sharded layer into separate frames, each compiled on its own; there is no
whole graph to see (README, "Several GPUs", says what a user can do).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("chronicals")

_INSTALLED = "_chronicals_whole_graph"   # attribute on the installed wrapper
_DEPTH = 16


def install() -> bool:
    """Wrap ``DDPOptimizer.compile_fn`` (idempotent). False where torch has no DDPOptimizer,
    or where the environment sets ``CHRONICALS_DDP_WHOLE_GRAPH=0`` (then the backend runs the
    passes on each piece, as it did before this module existed)."""
    if os.environ.get("CHRONICALS_DDP_WHOLE_GRAPH", "1") == "0":
        return False
    try:
        from torch._dynamo.backends.distributed import DDPOptimizer
    except ImportError:   # a torch built without distributed
        return False
    original = DDPOptimizer.compile_fn
    if getattr(original, _INSTALLED, False):
        return True

    @functools.wraps(original)
    def compile_fn(self, gm, example_inputs, *args: Any, **compiler_configs: Any):
        bound = chronicals_bound(getattr(self, "backend_compile_fn", None), compiler_configs)
        if bound is not None:
            whole_graph, kwargs = bound
            whole_graph(gm, example_inputs, **kwargs)
        return original(self, gm, example_inputs, *args, **compiler_configs)

    setattr(compile_fn, _INSTALLED, True)
    DDPOptimizer.compile_fn = compile_fn
    return True


def chronicals_bound(fn: Any, call_kwargs: dict | None = None
                     ) -> tuple[Callable, dict[str, Any]] | None:
    """If ``fn`` (a Dynamo backend, possibly wrapped) ends in the chronicals backend: its
    whole-graph rewrite and the keyword arguments the backend would be called with."""
    layers = [dict(call_kwargs or {})]   # outermost first
    for _ in range(_DEPTH):
        whole_graph = getattr(fn, "whole_graph", None)
        if callable(whole_graph) and getattr(fn, "_chronicals_backend", False):
            kwargs: dict[str, Any] = {}
            for layer in reversed(layers):   # the innermost binding first, outer ones win
                kwargs.update(layer)
            return whole_graph, kwargs
        if isinstance(fn, functools.partial):
            if fn.args:   # positional bindings: not a call shape we know
                return None
            layers.append(dict(fn.keywords))
            fn = fn.func
        elif hasattr(fn, "_torchdynamo_orig_backend"):   # Dynamo's WrapBackendDebug
            fn = fn._torchdynamo_orig_backend
        elif hasattr(fn, "compiler_fn") and isinstance(getattr(fn, "kwargs", None), dict):
            layers.append(dict(fn.kwargs))                 # torch._TorchCompileWrapper
            fn = fn.compiler_fn
        else:
            return None
    return None
