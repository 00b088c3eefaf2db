"""The pass pipeline: each op is one module here with ``NAME`` and ``run(gm, ctx)``.

Adding an op means adding ``passes/X.py`` (how to find it), ``kernels/X.py`` (how to compute
it), and one line in :data:`PIPELINE`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import copy

from torch.fx import Graph, GraphModule, Node

from ..config import Config
from ..report import Decline, Match, Report
from . import attention, linear_ce, rmsnorm, rope, swiglu
from .graph import where

log = logging.getLogger("chronicals")

# Order matters: normalization first (its output feeds the projections the MLP and attention
# passes look for), the loss last (it consumes the final norm's output).
PIPELINE = (rmsnorm, swiglu, rope, attention, linear_ce)


@dataclass
class PassContext:
    """What a pass may touch besides the graph: the config and the report being written."""

    config: Config
    report: Report
    op: str = ""

    def matched(self, node: Node, detail: str) -> None:
        self.report.matches.append(Match(self.op, where(node), detail, 0))

    def declined(self, node: Node, reason: str) -> None:
        self.report.declines.append(Decline(self.op, where(node), reason, 0))


def run_pipeline(gm: GraphModule, config: Config) -> Report:
    """Run every enabled pass over ``gm`` in place; return what each found."""
    report = Report(graphs=1)
    for module in PIPELINE:
        if module.NAME not in config.passes:
            continue
        ctx = PassContext(config, Report(), module.NAME)
        snapshot = _snapshot(gm)
        try:
            module.run(gm, ctx)
            gm.graph.lint()
        except Exception as exc:  # a pass bug must never cost the user a wrong result
            if config.strict:
                raise
            log.warning("chronicals: pass %s failed (%s: %s); its rewrites were undone",
                        module.NAME, type(exc).__name__, exc)
            _restore(gm, snapshot)
            ctx.report = Report(declines=[Decline(module.NAME, "<graph>",
                                                  f"pass raised {type(exc).__name__}: {exc}", 0)])
        report.matches += ctx.report.matches
        report.declines += ctx.report.declines
    gm.recompile()
    return report


def _snapshot(gm: GraphModule) -> Graph:
    """A node-for-node copy of the graph (metadata shared), to undo a failed pass."""
    graph = Graph(owning_module=gm)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    result, output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(result).meta = output.meta
    return graph


def _restore(gm: GraphModule, graph: Graph) -> None:
    gm.graph = graph
