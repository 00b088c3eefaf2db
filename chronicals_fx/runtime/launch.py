"""``chronicals run script.py`` — run an unmodified training script with its models optimized.

Two hooks, installed before the script runs and nowhere else:

1. ``torch.compile`` defaults to the chronicals backend: a call that names no backend, or
   Inductor (Hugging Face's ``TrainingArguments(torch_compile=True)`` passes
   ``backend="inductor"``), gets ``backend="chronicals"``; any other backend is respected.
   ``chronicals run``'s options (``--passes``, ``--compiler``) go to these calls and to those
   that name chronicals themselves.
2. Training start optimizes the model: the outermost ``module.train()`` call on a module with
   trainable parameters (HF ``Trainer``, TRL, accelerate and most plain loops call it before
   the first step) runs :func:`chronicals.optimize` on that module, once. Modules already
   compiled (``torch.compile``/``nn.Module.compile``) are left to hook 1.

A script that never calls ``.train()`` nor ``torch.compile`` runs unchanged: call
``chronicals.optimize(model)`` there.

Under both hooks, ``TrainingArguments(torch_compile_backend="chronicals")`` is accepted too (see
:mod:`chronicals_fx.runtime.hf`). When the script ends, one line on stderr says what was
optimized: ``CHRONICALS_RUN {"graphs": n, "counts": {...}, "optimized_at_train": [...]}``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import runpy
import sys
import weakref
from typing import Any

import torch
from torch import nn

log = logging.getLogger("chronicals")

_OPTIMIZED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_TRAINED: list[str] = []  # class names of the modules hook 2 optimized, in order


@contextlib.contextmanager
def installed(**options: Any):
    """Install both hooks for the duration of the block; ``options`` go to the backend."""
    from chronicals_fx.api import optimize
    from chronicals_fx.backend import chronicals_backend
    from chronicals_fx.config import Config
    from chronicals_fx.runtime.hf import register_with_accelerate

    Config.from_options(options)  # fail before the script runs, not inside it
    register_with_accelerate()  # TrainingArguments(torch_compile_backend="chronicals")
    original_compile, original_train = torch.compile, nn.Module.train
    depth = 0

    @functools.wraps(original_compile)
    def compile_with_chronicals(*args, backend="inductor", options=None, **kwargs):
        if backend in ("inductor", "chronicals"):
            # by default or by name: `chronicals run`'s options apply; the function itself, so
            # that no installed entry point is needed for the name
            backend = chronicals_backend
            options = {**options_for_backend, **(options or {})}
        return original_compile(*args, backend=backend, options=options, **kwargs)

    def train(self: nn.Module, mode: bool = True):
        nonlocal depth
        depth += 1
        try:
            result = original_train(self, mode)
        finally:
            depth -= 1
        if mode and depth == 0 and _wants_optimizing(self):
            log.info("chronicals run: optimizing %s at training start", type(self).__name__)
            _OPTIMIZED.add(self)
            _TRAINED.append(type(self).__name__)
            optimize(self, **options)
        return result

    options_for_backend = dict(options)
    torch.compile, nn.Module.train = compile_with_chronicals, train
    try:
        yield
    finally:
        torch.compile, nn.Module.train = original_compile, original_train


def _wants_optimizing(module: nn.Module) -> bool:
    if module in _OPTIMIZED or isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        return False
    if getattr(module, "_compiled_call_impl", None) is not None:
        return False
    return any(p.requires_grad for p in module.parameters())


def run_script(path: str, argv: list[str], **options: Any) -> None:
    """Run ``path`` as ``__main__`` with ``argv``, both hooks installed.

    As ``python path`` would: ``sys.argv[0]`` is the path and the script's folder comes first on
    ``sys.path`` (a script may import its neighbours).
    """
    from chronicals_fx import backend

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [path, *argv]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    earlier = list(backend.RECENT_REPORTS)  # held, so that no new report can reuse their ids
    before = {id(r) for r in earlier}
    trained = len(_TRAINED)
    try:
        with installed(**options):
            runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        reports = [r for r in backend.RECENT_REPORTS if id(r) not in before]
        counts: dict[str, int] = {}
        for report in reports:
            for op, n in report.counts.items():
                counts[op] = counts.get(op, 0) + n
        print("CHRONICALS_RUN " + json.dumps({"graphs": len(reports), "counts": counts,
                                               "optimized_at_train": _TRAINED[trained:]}),
              file=sys.stderr, flush=True)
