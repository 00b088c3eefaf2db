"""The pass pipeline: each op is one module here with ``NAME`` and ``run(gm, ctx)``.

Adding an op means adding ``passes/X.py`` (how to find it), ``kernels/X.py`` (how to compute
it), one line in :data:`PIPELINE` and its name in ``config.OP_NAMES``. (``lora`` and
``projections`` have no kernel: one moves fp32 adapter products to the model's dtype, the other
joins narrow projections of one input into one GEMM; cuBLAS computes both.)
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from ..config import Config
from ..report import Decline, Match, Report
from . import attention, linear_ce, lora, projections, rmsnorm, rope, swiglu
from .graph import OUTER_NODE, where

log = logging.getLogger("chronicals")

# Order matters: RoPE first (its rotation ends in a sum, which a norm reading the result —
# HunYuan's q/k norms — would otherwise take for a residual add and fuse), normalization next
# (its output feeds the projections the MLP and attention passes look for), the loss after them
# (it consumes the final norm's output), the adapters' precision last (the SwiGLU pass
# recognizes LoRA'd projections as PEFT spells them), and the shared-input projections after
# all of them: they concatenate only what the op passes left as plain linears.
PIPELINE = (rope, rmsnorm, swiglu, attention, linear_ce, lora, projections)


@dataclass
class PassContext:
    """What a pass may touch besides the graph: the config and the report being written."""

    config: Config
    report: Report
    op: str = ""
    # Set while the passes run over the body of a checkpointed region called once: that call,
    # in the enclosing graph. Its operands are bound to the body's placeholders (OUTER_NODE).
    region_call: Node | None = None

    def matched(self, node: Node, detail: str) -> None:
        self.report.matches.append(Match(self.op, where(node), detail, 0))

    def declined(self, node: Node, reason: str) -> None:
        self.report.declines.append(Decline(self.op, where(node), reason, 0))

    def local(self, gm: GraphModule, node: Node) -> Node | None:
        """A node of ``gm``'s graph carrying ``node``'s value, or None if there is none.

        ``node`` itself when it is in ``gm``; in a region's body, the placeholder bound to a
        node of the enclosing graph, or else a new placeholder fed by a new operand of the
        region's call (a value the passes found outside, e.g. document ids behind a mask).
        """
        if node.graph is gm.graph:
            return node
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for p in placeholders:
            if p.meta.get(OUTER_NODE) is node:
                return p
        call = self.region_call
        if call is None or node.graph is not call.graph:
            return None
        anchor = (gm.graph.inserting_after(placeholders[-1]) if placeholders
                  else gm.graph.inserting_before(next(iter(gm.graph.nodes))))
        with anchor:
            p = gm.graph.placeholder(f"outer_{node.name}")
        p.meta = {k: v for k, v in node.meta.items() if k in ("example_value", "val")}
        p.meta[OUTER_NODE] = node
        call.args = (*call.args, node)
        return p


# Higher-order ops whose body is an ordinary FX subgraph called as ``op(body, *operands)`` and
# run as written: activation checkpointing (``torch.utils.checkpoint`` and HF
# ``gradient_checkpointing_enable``, reentrant or not, which Dynamo traces as
# ``tag_activation_checkpoint``) and plain ``wrap``. Under checkpointing every decoder layer's
# ops live in such a body, not in the graph Dynamo hands the backend.
_REGION_OPS = (torch.ops.higher_order.tag_activation_checkpoint, torch.ops.higher_order.wrap)


def run_pipeline(gm: GraphModule, config: Config, region_call: Node | None = None) -> Report:
    """Run every enabled pass over ``gm`` in place, and first over the bodies of its
    checkpointed regions; return what each found."""
    report = Report(graphs=1)
    for body, calls in _regions(gm):
        # The passes see a body's inputs through to the enclosing graph (a mask built outside
        # is still proven causal), but a pattern cut by the region's edge is not matched (like
        # one cut by a graph break). AOTAutograd traces the rewritten body, and the
        # partitioner recomputes our ops in the backward like any other op of the region.
        call = calls[0] if len(calls) == 1 else None   # a shared body: no bindings
        placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
        bound = call is not None and len(placeholders) == len(call.args) - 1
        if bound:
            for p, outer in zip(placeholders, call.args[1:]):
                if isinstance(outer, Node):
                    p.meta[OUTER_NODE] = outer
        try:
            sub = run_pipeline(body, config, call if bound else None)
        finally:
            for p in body.graph.nodes:
                if p.op == "placeholder":
                    p.meta.pop(OUTER_NODE, None)
        if bound:
            _drop_unused_inputs(body, call)
        report.matches += sub.matches
        report.declines += sub.declines
    for module in PIPELINE:
        if module.NAME not in config.passes:
            continue
        ctx = PassContext(config, Report(), module.NAME, region_call)
        snapshot = _snapshot(gm)
        call_args = region_call.args if region_call is not None else None
        try:
            module.run(gm, ctx)
            gm.graph.lint()
        except Exception as exc:  # a pass bug must never cost the user a wrong result
            if config.strict:
                raise
            log.warning("chronicals: pass %s failed (%s: %s); its rewrites were undone",
                        module.NAME, type(exc).__name__, exc)
            _restore(gm, snapshot)
            if region_call is not None:
                region_call.args = call_args
            ctx.report = Report(declines=[Decline(module.NAME, "<graph>",
                                                  f"pass raised {type(exc).__name__}: {exc}", 0)])
        report.matches += ctx.report.matches
        report.declines += ctx.report.declines
    gm.recompile()
    return report


def _regions(gm: GraphModule) -> list[tuple[GraphModule, list[Node]]]:
    """Each distinct body module of a :data:`_REGION_OPS` call in ``gm``, with its calls."""
    regions: dict[int, tuple[GraphModule, list[Node]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _REGION_OPS or not node.args:
            continue
        body = node.args[0]
        if isinstance(body, Node) and body.op == "get_attr":
            module = getattr(gm, body.target, None)
            if isinstance(module, GraphModule):
                regions.setdefault(id(module), (module, []))[1].append(node)
    return list(regions.values())


def _drop_unused_inputs(body: GraphModule, call: Node) -> None:
    """Remove body inputs nothing reads any more (a mask replaced by ``is_causal``) and the
    call's matching operands, so the enclosing graph need not build them."""
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    operands = list(call.args[1:])
    if len(placeholders) != len(operands):
        return
    unused = [not p.users for p in placeholders]
    if not any(unused):
        return
    for p, drop in zip(placeholders, unused):
        if drop:
            body.graph.erase_node(p)
    call.args = (call.args[0], *(a for a, drop in zip(operands, unused) if not drop))
    body.recompile()


def _snapshot(gm: GraphModule) -> Graph:
    """A node-for-node copy of the graph (metadata shared), to undo a failed pass."""
    graph = Graph(owning_module=gm)
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    result, output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(result).meta = output.meta
    return graph


def _restore(gm: GraphModule, graph: Graph) -> None:
    gm.graph = graph
