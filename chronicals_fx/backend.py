"""The ``chronicals`` torch.compile backend: Dynamo graph in, passes, Inductor out."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from torch.fx import GraphModule

from . import ddp
from .config import Config
from .passes import run_pipeline
from .report import Report

log = logging.getLogger("chronicals")

# Reports of graphs compiled through the backend by name, newest last (bounded: a training
# script may recompile). ``optimize``/``explain`` collect their own through ``on_report``.
RECENT_REPORTS: list[Report] = []
_RECENT_LIMIT = 64

# Node metadata key set on every node of a graph the passes rewrote whole before DDP's graph
# splitting (chronicals_fx/ddp.py); split_module copies node metadata into the pieces.
REWRITTEN = "chronicals_rewritten"


def chronicals_backend(gm: GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                       options: Any = None, on_report: Callable[[Report], None] | None = None
                       ) -> Callable:
    """Rewrite ``gm``'s RMSNorm/SwiGLU/RoPE/attention/loss subgraphs, then compile it.

    Registered as ``torch.compile(..., backend="chronicals")`` through the
    ``torch_dynamo_backends`` entry point. ``mode`` and ``options`` are torch.compile's:
    our keys (see :class:`Config`) are taken out of ``options``, the rest go to Inductor.
    A piece of a graph already rewritten whole (DDP, see :mod:`chronicals_fx.ddp`) is
    compiled without running the passes again.
    """
    config = Config.from_options(options)
    _load_kernels()
    if rewritten(gm):
        log.debug("chronicals: compiling a piece of a graph rewritten before DDP's split")
    else:
        _rewrite(gm, config, on_report)
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    from .kernels import rmsnorm, swiglu

    # Every graph gets our post-grad passes (SwiGLU's keeps the in-place backward in place,
    # RMSNorm's hands its backward the unsummed gradients; both leave graphs without their op
    # alone): a piece of a graph rewritten before DDP's split has no pass run of its own to
    # ask for them.
    patches = inductor_settings(mode, config)
    if config.rmsnorm_grad_sum:
        patches = rmsnorm.SumGradientsIntoBackward.installed_in(patches)
    patches = swiglu.ReuseSavedInputs.installed_in(patches)
    compiled = compile_fx(gm, example_inputs, config_patches=patches)
    return owning_small_outputs(compiled) if patches.get("triton.cudagraphs") else compiled


def inductor_settings(mode: str | None, config: Config) -> dict[str, Any]:
    """Inductor's options for ``torch.compile``'s ``mode`` (e.g. "reduce-overhead" turns on
    ``triton.cudagraphs``), overridden by the user's own Inductor options."""
    from torch._inductor import list_mode_options

    return {**(list_mode_options(mode) if mode else {}), **config.inductor}


# Outputs up to this many elements are copied out of the CUDA graph pool (losses, counts).
SMALL_OUTPUT_NUMEL = 4096


def owning_small_outputs(compiled: Callable) -> Callable:
    """Under CUDA graphs (``mode="reduce-overhead"``) a graph's outputs live in the graph's
    memory pool and the next replay overwrites them: a training loop that keeps last step's
    ``loss.detach()`` for logging would read torch's "overwritten by a subsequent run" error.
    Small outputs (a loss, a token count) are cloned out of the pool — one tiny kernel each,
    differentiable; large ones (kept logits) stay in it, and torch's own check guards them."""
    import torch

    def run(*args):
        outputs = compiled(*args)
        return type(outputs)(
            o.clone() if isinstance(o, torch.Tensor) and o.numel() <= SMALL_OUTPUT_NUMEL else o
            for o in outputs)

    run._boxed_call = getattr(compiled, "_boxed_call", False)  # type: ignore[attr-defined]
    return run


def whole_graph(gm: GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                options: Any = None, on_report: Callable[[Report], None] | None = None) -> None:
    """Run the passes over ``gm`` in place and mark its nodes, compiling nothing: what DDP's
    graph splitter calls first (:mod:`chronicals_fx.ddp`), with the backend's own arguments.
    The backend, called per piece, then only compiles. A failure here (outside the passes,
    which undo their own) leaves ``gm`` unmarked, to be rewritten per piece as before."""
    del example_inputs, mode
    config = Config.from_options(options)
    _load_kernels()
    if rewritten(gm):
        return
    try:
        _rewrite(gm, config, on_report, mark=True)
    except Exception:
        if config.strict:
            raise
        log.warning("chronicals: rewriting the whole graph before DDP's split failed; "
                    "the pieces are rewritten one by one", exc_info=True)


def rewritten(gm: GraphModule) -> bool:
    """True for a graph (or a piece of one) the passes already rewrote whole."""
    return any(REWRITTEN in n.meta for n in gm.graph.nodes)


def _rewrite(gm: GraphModule, config: Config, on_report: Callable[[Report], None] | None,
             mark: bool = False) -> Report:
    report = run_pipeline(gm, config)
    if mark:
        for node in gm.graph.nodes:
            node.meta[REWRITTEN] = True
    log.info("%s", report)
    RECENT_REPORTS.append(report)
    del RECENT_REPORTS[:-_RECENT_LIMIT]
    if on_report is not None:
        on_report(report)
    return report


def _load_kernels() -> None:
    """Register the chronicals ops with torch (idempotent; import has the side effect)."""
    from . import kernels  # noqa: F401


def reset() -> None:
    """Forget recent reports (torch calls ``reset`` on backends in ``torch._dynamo.reset``)."""
    RECENT_REPORTS.clear()


chronicals_backend.reset = reset  # type: ignore[attr-defined]
# How chronicals_fx.ddp recognises this backend at the end of Dynamo's wrapper chain.
chronicals_backend.whole_graph = whole_graph  # type: ignore[attr-defined]
chronicals_backend._chronicals_backend = True  # type: ignore[attr-defined]
# Under DDP, let the passes see each Dynamo graph before it is split at bucket boundaries.
ddp.install()
