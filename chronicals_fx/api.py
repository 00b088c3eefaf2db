"""The public verbs: ``optimize`` (compile a model in place) and ``explain`` (report only)."""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any

import torch
from torch import nn

from .backend import chronicals_backend, inductor_settings
from .config import Config
from .report import Report

log = logging.getLogger("chronicals")

# model -> the report of every graph compiled for it so far (dropped with the model).
_REPORTS: "weakref.WeakKeyDictionary[nn.Module, Report]" = weakref.WeakKeyDictionary()


def optimize(model: nn.Module, *, dynamic: bool | None = None, fullgraph: bool = False,
             mode: str | None = None, **options: Any) -> nn.Module:
    """Compile ``model`` in place with the chronicals backend and return it.

    The same object comes back, of the same class, with the same ``state_dict`` keys (no
    ``_orig_mod.`` prefix): ``nn.Module.compile`` swaps only the call path. ``.train()`` and
    ``.eval()`` keep working (Dynamo guards on the mode and recompiles once per mode).
    Compilation happens at the first call; each graph's report is logged then and available
    from :func:`report_of`. ``options`` are :class:`Config` fields plus Inductor options.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize() takes an nn.Module, got {type(model).__name__}")
    config = Config.from_options(options)
    # CUDA graphs: a mode that turns them on ("reduce-overhead", "max-autotune") unless an
    # option turns them off, or the option alone
    if inductor_settings(mode, config).get("triton.cudagraphs") and _fsdp2_sharded(model):
        raise ValueError(
            f"CUDA graphs (mode={mode!r} or triton.cudagraphs) do not suit an FSDP2 "
            "(fully_shard) model: FSDP2 gathers the parameters into fresh memory every step, so "
            "the graphs are recorded again each step (measured 10x slower on 2 H200s). Leave "
            "them off ('max-autotune-no-cudagraphs' keeps autotuning); under DDP or on one GPU "
            "they are supported.")
    report = _REPORTS.setdefault(model, Report())

    def collect(graph_report: Report) -> None:
        report.extend(graph_report)
        log.info("chronicals.optimize(%s):\n%s", type(model).__name__, graph_report)

    backend = functools.partial(chronicals_backend, options=config, on_report=collect)
    # nn.Module.compile, not model.compile: a subclass may define its own `compile`.
    nn.Module.compile(model, backend=backend, dynamic=dynamic, fullgraph=fullgraph, mode=mode)
    return model


def _fsdp2_sharded(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:     # torch built without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def report_of(model: nn.Module) -> Report:
    """What the backend has matched and declined in ``model`` so far (after its first call).

    One entry per compiled graph: a model split at a graph break contributes each part, and a
    recompilation (eval mode, a new input shape) adds its graph again. Under DDP a graph counts
    once however many pieces DDP's graph splitter compiles it in: the passes rewrite it whole
    before it is cut (:mod:`chronicals_fx.ddp`).
    """
    if model not in _REPORTS:
        raise KeyError(f"{type(model).__name__} was not passed to chronicals.optimize()")
    return _REPORTS[model]


def explain(model: nn.Module, *args: Any, **kwargs: Any) -> Report:
    """Capture ``model(*args, **kwargs)``'s graph(s) and report what the passes would do.

    Nothing is trained: the forward runs once (the rewritten graph, op by op, no Inductor);
    no backward and no optimizer step run, so no parameter changes. Grad mode is left as the
    caller has it, since graphs captured without grad can differ from training graphs.
    Options of :func:`optimize` go in the keyword ``chronicals_options``. The report also
    lists Dynamo's graph breaks in this capture (``graph_breaks``): ops in the code between
    graphs run eager with any backend, neither matched nor declined.
    """
    from torch._dynamo.utils import counters

    options = kwargs.pop("chronicals_options", {}) or {}
    config = Config.from_options({**options, "compiler": "eager"})
    report = Report()
    backend = functools.partial(chronicals_backend, options=config, on_report=report.extend)
    compiled = torch.compile(model, backend=backend, dynamic=False)
    before = dict(counters["graph_break"])
    compiled(*args, **kwargs)
    report.graph_breaks = {reason: times - before.get(reason, 0)
                           for reason, times in counters["graph_break"].items()
                           if times > before.get(reason, 0)}
    return report
