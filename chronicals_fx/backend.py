"""The ``chronicals`` torch.compile backend: Dynamo graph in, passes, Inductor out."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

from torch.fx import GraphModule

from .config import Config
from .passes import run_pipeline
from .report import Report

log = logging.getLogger("chronicals")

# Reports of graphs compiled through the backend by name, newest last (bounded: a training
# script may recompile). ``optimize``/``explain`` collect their own through ``on_report``.
RECENT_REPORTS: list[Report] = []
_RECENT_LIMIT = 64


def chronicals_backend(gm: GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                       options: Any = None, on_report: Callable[[Report], None] | None = None
                       ) -> Callable:
    """Rewrite ``gm``'s RMSNorm/SwiGLU/RoPE/attention/loss subgraphs, then compile it.

    Registered as ``torch.compile(..., backend="chronicals")`` through the
    ``torch_dynamo_backends`` entry point. ``mode`` and ``options`` are torch.compile's:
    our keys (see :class:`Config`) are taken out of ``options``, the rest go to Inductor.
    """
    config = Config.from_options(options)
    _load_kernels()
    report = run_pipeline(gm, config)
    log.info("%s", report)
    RECENT_REPORTS.append(report)
    del RECENT_REPORTS[:-_RECENT_LIMIT]
    if on_report is not None:
        on_report(report)
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode else {}), **config.inductor}
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def _load_kernels() -> None:
    """Register the chronicals ops with torch (idempotent; import has the side effect)."""
    from . import kernels  # noqa: F401


def reset() -> None:
    """Forget recent reports (torch calls ``reset`` on backends in ``torch._dynamo.reset``)."""
    RECENT_REPORTS.clear()


chronicals_backend.reset = reset  # type: ignore[attr-defined]
