"""Activation checkpointing: Dynamo traces each checkpointed layer as a
``tag_activation_checkpoint`` region whose body is a subgraph; the passes run inside it, see
its inputs through to the enclosing graph (the mask built there), and AOTAutograd recomputes
the fused ops in the backward."""

from __future__ import annotations

import copy

import torch

import chronicals
import chronicals_fx.backend
from chronicals_fx.kernels import attention as attention_kernels
from chronicals_fx.workload import enable_activation_checkpointing
from tests.tiny_models import assert_same_training_signal, tiny_causal_lm


def test_checkpointed_layers_packed_batch(monkeypatch):
    """Every site of every layer found; the packed-document mask, built outside the regions,
    proven and replaced by the document kernel, whose bounds are computed once outside and
    passed into each region; loss and every gradient equal the eager, uncheckpointed model's."""
    eager = tiny_causal_lm("llama", attn_implementation="sdpa", use_cache=False)
    model = copy.deepcopy(eager)
    enable_activation_checkpointing(model)
    graphs = []
    run_pipeline = chronicals_fx.backend.run_pipeline

    def keep(gm, config):
        graphs.append(gm)
        return run_pipeline(gm, config)

    monkeypatch.setattr(chronicals_fx.backend, "run_pipeline", keep)
    chronicals.optimize(model, strict=True, compiler="aot_eager")
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4],
                                 [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 2, 3]])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 16), generator=g)
    labels = ids.masked_fill(position_ids == 0, -100)
    inputs = {"input_ids": ids, "labels": labels, "position_ids": position_ids}
    assert_same_training_signal(eager, model, inputs, rtol=1e-4, atol=1e-5)

    report = chronicals.report_of(model)
    assert report.graphs == 1 and report.counts == {
        "rmsnorm": 5, "swiglu": 2, "rope": 2, "attention": 2, "linear_cross_entropy": 1, "lora": 0,
        "projections": 2
    }, str(report)
    assert not report.declines, str(report)
    assert all("document kernel" in m.detail for m in report.matches if m.op == "attention")
    assert [m.where for m in report.matches if m.op == "swiglu"] == [
        "model.layers.0.mlp", "model.layers.1.mlp"]

    # the bounds: one node in the enclosing graph, an input of each region; the regions no
    # longer take the mask (left dead in the enclosing graph)
    (gm,) = graphs
    bounds = [n for n in gm.graph.nodes if n.target is attention_kernels.document_bounds]
    regions = [n for n in gm.graph.nodes
               if n.target is torch.ops.higher_order.tag_activation_checkpoint]
    assert len(bounds) == 1 and len(regions) == 2
    assert all(bounds[0] in n.args for n in regions)
    for region in regions:
        body = getattr(gm, region.args[0].target)
        assert not any(n.target is attention_kernels.document_bounds for n in body.graph.nodes)
        assert all(p.users for p in body.graph.nodes if p.op == "placeholder")
