"""Fully sharded data parallel without hooks (the idea of torchtitan's SimpleFSDP), so that
Dynamo can trace a whole FSDP step into one graph and the chronicals passes see every layer.

Under FSDP2 (``fully_shard``) every hook is ``torch._dynamo.disable``d (torch 2.13 removed the
switch that let Dynamo trace them), so a compiled model breaks at every sharded layer: the
layers compile as frames of their own, the causal mask reaches them as a runtime tensor the
attention pass can't prove, and the Python around them paces the step (session 23: rank 0's
host within 10% of the step for torch.compile and chronicals alike). Here each parameter is
instead a ``Shard(0)`` DTensor, and a parametrization gathers it at every use: a
redistribute to ``Replicate`` — Dynamo traces it to a functional all-gather in the graph —
whose backward reduce-scatters the gradient, averaged (``Partial("avg")``: each rank's mean
loss, so the gradients equal one process's on the global batch). No hooks: one graph a step.

A benchmark recipe, not FSDP2: no prefetching or stream handling of its own (overlap is left
to Inductor's passes for collectives in a graph — one all-gather and one reduce-scatter bucket
instead of one per parameter, reordered to overlap compute: the variant options
``bucket_all_gathers_fx=only_fsdp,bucket_reduce_scatters_fx=all,reorder_for_compute_comm_overlap=true``
— session 23 found them working on the CPU), and the gathered
weights live from the forward to the backward (as FSDP2 with ``reshard_after_forward=False``).
State-dict keys change (``parametrizations.<name>.original``).
"""

from __future__ import annotations

import torch
from torch import nn

class _Gather(nn.Module):
    """The parametrization: the full parameter from its shard; backward reduce-scatters."""

    def forward(self, shard):
        from torch.distributed.tensor import Partial, Replicate

        return shard.redistribute(placements=[Replicate()]).to_local(
            grad_placements=[Partial("avg")])


def shard_parameters(model: nn.Module, mesh) -> nn.Module:
    """``model`` in place, each parameter a ``Shard(0)`` DTensor over the 1-D ``mesh``, gathered
    at every use. Tied parameters stay one (one shard, gathered where each user reads it)."""
    import torch.nn.utils.parametrize as parametrize
    from torch.distributed.tensor import Shard, distribute_tensor

    sharded: dict[int, nn.Parameter] = {}
    for module in list(model.modules()):
        for name, param in list(module.named_parameters(recurse=False, remove_duplicate=False)):
            if id(param) not in sharded:
                sharded[id(param)] = nn.Parameter(
                    distribute_tensor(param.detach(), mesh, [Shard(0)]),
                    requires_grad=param.requires_grad)
            delattr(module, name)
            module.register_parameter(name, sharded[id(param)])
            parametrize.register_parametrization(module, name, _Gather(), unsafe=True)
    return model
