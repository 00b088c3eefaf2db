"""LoRA+ optimizer parameter groups (Hayou, Ghosh & Yu, 2024, arXiv:2402.12354).

A LoRA update is ``dW = B @ A`` with ``A: [r, in]`` and ``B: [out, r]``. LoRA+ shows that with one
learning rate for both, feature learning in the infinite-width limit is inefficient: ``A`` sees
inputs whose entries add up over ``in`` coordinates, so a stable step for ``A`` is Theta(1/n),
while ``B`` maps the r-dimensional ``A x`` and tolerates Theta(1). Giving ``B`` a learning rate
``ratio`` times larger (16 in the paper) speeds up fine-tuning at the same cost.

How parameters are grouped (each trainable parameter lands in exactly one group, frozen ones in
none, empty groups are dropped):

========================  =================  ===============================================
group                     lr                 members
========================  =================  ===============================================
``lora_A``                ``lr``             A matrices
``lora_B``                ``lr * ratio``     B matrices (and B's bias, see below)
``lora_embedding``        ``embedding_lr``   A and B of LoRA on embedding tables
``dora_magnitude``        ``lr``             DoRA magnitude vectors (never decayed)
``other``                 ``lr``             everything else trainable (``modules_to_save``,
                                             heads, norms, biases, prompt vectors ...)
========================  =================  ===============================================

Parameters with at most one dimension (biases, norm weights, scalars) go to the ``<group>_no_decay``
variant with ``weight_decay=0``; the others get ``weight_decay``. Differences from
``peft.optimizers.create_loraplus_optimizer``:

* PEFT puts every 1-D parameter (norms, biases, DoRA magnitudes) at ``lr * ratio``. The ratio comes
  from the ``B`` analysis only; a norm weight or a magnitude vector scales a full-width activation
  and gets the base ``lr`` here. The bias of ``lora_B`` (PEFT's ``lora_bias=True``) is added to
  B's output directly, so by the same width argument it is B-like and stays at ``lr * ratio``.
* PEFT overrides a ``weight_decay`` passed to the optimizer with its own
  ``loraplus_weight_decay`` (default 0). Here ``weight_decay`` is applied to every >= 2-D group.
* ``embedding_lr`` defaults to ``lr`` instead of PEFT's absolute 1e-6. A LoRA'd embedding looks
  rows of ``A: [r, vocab]`` up with a one-hot input: there is no sum over a wide input, so the
  width argument behind LoRA+ does not apply to either factor and both keep the base rate. An
  absolute 1e-6 ignores the user's ``lr`` and, at usual LoRA rates (1e-4 .. 2e-4), is 100-200x
  smaller, which all but freezes an adapter the user asked for.

Finding LoRA layers. A module that has ``lora_A`` / ``lora_B`` / ``lora_embedding_A`` /
``lora_embedding_B`` / ``lora_magnitude_vector`` attributes (PEFT's layers, AdaLoRA's
``ParameterDict`` variant, or hand-written layers using PEFT's names) is classified by those names.
Any other module is searched structurally: it holds a frozen 2-D base weight ``W: [out, in]`` and
trainable 2-D tensors ``A: [r, in]`` and ``B: [out, r]`` with ``r < min(out, in)``. The candidates
are the module's own parameters and the direct parameters of its children (``ModuleDict`` /
``ModuleList`` are looked through), so both ``nn.Parameter`` factors and ``nn.Linear`` factors
beside an ``nn.Linear`` base are found. Factors are read in ``nn.Linear`` orientation (weight is
``[out, in]``); when the base belongs to an ``nn.Embedding`` (``W: [vocab, dim]``) the pair is
``A: [r, vocab]``, ``B: [dim, r]`` as in PEFT, and goes to ``lora_embedding``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from tabulate import tabulate
from torch import nn

logger = logging.getLogger(__name__)

_NAMED_ROLES = {
    "lora_A": "lora_A",
    "lora_B": "lora_B",
    "lora_embedding_A": "lora_embedding",
    "lora_embedding_B": "lora_embedding",
    "lora_magnitude_vector": "dora_magnitude",
}
_ROLE_ORDER = ("lora_A", "lora_B", "lora_embedding", "dora_magnitude", "other")
_RESERVED_KEYS = {"params", "lr", "weight_decay", "name"}


def _check_number(name: str, value: Any, *, allow_zero: bool) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and (number >= 0 if allow_zero else number > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _named_roles(module: nn.Module) -> dict[int, str]:
    """Roles of parameters held under PEFT's attribute names on ``module``."""
    roles = {}
    for attr, role in _NAMED_ROLES.items():
        holder = getattr(module, attr, None)
        if isinstance(holder, nn.Parameter):
            roles[id(holder)] = role
        elif isinstance(holder, nn.Module):
            for p in holder.parameters():
                roles[id(p)] = role
    return roles


def _candidates(module: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """``(owner, parameter)`` for ``module``'s own parameters and its children's direct ones."""
    found = [(module, p) for p in module.parameters(recurse=False)]
    pending = list(module.children())
    while pending:
        child = pending.pop(0)
        if isinstance(child, (nn.ModuleDict, nn.ModuleList)):
            pending[:0] = list(child.children())
        else:
            found.extend((child, p) for p in child.parameters(recurse=False))
    return found


def _structural_roles(module: nn.Module) -> dict[int, str]:
    """Roles of low-rank pairs beside a frozen base weight in ``module`` (see module docstring)."""
    found = _candidates(module)
    trainable = [p for _, p in found if p.requires_grad and p.ndim == 2]
    roles = {}
    for owner, base in found:
        if base.requires_grad or base.ndim != 2:
            continue
        if isinstance(owner, nn.Embedding):
            a_dim, b_dim = base.shape  # A: [r, vocab], B: [dim, r]
            a_role = b_role = "lora_embedding"
        else:
            b_dim, a_dim = base.shape  # A: [r, in], B: [out, r]
            a_role, b_role = "lora_A", "lora_B"
        max_rank = min(a_dim, b_dim)
        a_ranks = {p.shape[0] for p in trainable if p.shape[1] == a_dim and p.shape[0] < max_rank}
        b_ranks = {p.shape[1] for p in trainable if p.shape[0] == b_dim and p.shape[1] < max_rank}
        ranks = a_ranks & b_ranks
        for p in trainable:
            if p.shape[1] == a_dim and p.shape[0] in ranks:
                roles.setdefault(id(p), a_role)
            elif p.shape[0] == b_dim and p.shape[1] in ranks:
                roles.setdefault(id(p), b_role)
    return roles


def _parameter_roles(model: nn.Module) -> dict[int, str]:
    """Map ``id(parameter)`` to its LoRA role; unmapped trainable parameters are ``"other"``."""
    roles: dict[int, str] = {}
    for module in model.modules():
        named = _named_roles(module)
        found = named if named else _structural_roles(module)
        for key, role in found.items():
            roles.setdefault(key, role)
    return roles


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups for LoRA+ (see the module docstring for the rules).

    Args:
        model: any ``nn.Module``; PEFT models and hand-written LoRA layers are both recognised.
        lr: learning rate of ``A`` factors, DoRA magnitudes and all other trainable parameters.
        ratio: ``lr_B / lr_A``; the paper's default is 16.
        weight_decay: decay of >= 2-D parameters; 1-D ones and DoRA magnitudes get 0.
        embedding_lr: learning rate of LoRA factors on embedding tables; ``None`` means ``lr``.
        **extra: further keys copied into every group (e.g. ``betas``).

    Returns:
        ``[{"params": [...], "lr": ..., "weight_decay": ..., "name": ..., **extra}, ...]`` in the
        order lora_A, lora_B, lora_embedding, dora_magnitude, other (each followed by its
        ``_no_decay`` variant), without empty groups. Torch optimizers keep the ``name`` key.

    Raises:
        ValueError: ``lr``, ``ratio`` or ``embedding_lr`` not > 0, ``weight_decay`` < 0, an
            ``extra`` key that clashes with a group key, or a model without trainable parameters.
    """
    embedding_lr = lr if embedding_lr is None else embedding_lr
    for name, value in (("lr", lr), ("ratio", ratio), ("embedding_lr", embedding_lr)):
        _check_number(name, value, allow_zero=False)
    _check_number("weight_decay", weight_decay, allow_zero=True)
    clash = _RESERVED_KEYS & extra.keys()
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} clash with keys set by loraplus_param_groups")

    role_lr = {
        "lora_A": lr,
        "lora_B": lr * ratio,
        "lora_embedding": embedding_lr,
        "dora_magnitude": lr,
        "other": lr,
    }
    roles = _parameter_roles(model)
    members: dict[str, list[nn.Parameter]] = {}
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = roles.get(id(param), "other")
        decays = role != "dora_magnitude" and param.ndim >= 2
        name = role if decays or role == "dora_magnitude" else f"{role}_no_decay"
        members.setdefault(name, []).append(param)
    if not members:
        raise ValueError(
            "model has no trainable parameters; attach LoRA adapters (or set requires_grad) "
            "before building the optimizer"
        )

    groups = []
    for role in _ROLE_ORDER:
        for name in (role, f"{role}_no_decay"):
            if name in members:
                decay = weight_decay if name == role and role != "dora_magnitude" else 0.0
                groups.append(
                    {
                        "params": members[name],
                        "lr": role_lr[role],
                        "weight_decay": decay,
                        "name": name,
                        **extra,
                    }
                )
    return groups


def loraplus_summary(groups: Iterable[dict[str, Any]]) -> str:
    """A table of parameter groups: name, tensor count, element count, lr, weight decay.

    Accepts the output of :func:`loraplus_param_groups` or any ``optimizer.param_groups``.
    """
    rows = []
    for index, group in enumerate(groups):
        params = list(group["params"])
        rows.append(
            [
                group.get("name", f"group{index}"),
                len(params),
                f"{sum(p.numel() for p in params):,}",
                f"{group['lr']:.3g}" if "lr" in group else "-",
                f"{group['weight_decay']:.3g}" if "weight_decay" in group else "-",
            ]
        )
    return tabulate(
        rows,
        headers=["group", "tensors", "elements", "lr", "weight_decay"],
        colalign=("left", "right", "right", "right", "right"),
    )


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
    *,
    lr: float,
    ratio: float = 16.0,
    weight_decay: float = 0.0,
    embedding_lr: float | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """Build ``optimizer_cls`` over :func:`loraplus_param_groups` and log the group table.

    ``kwargs`` (``betas``, ``eps``, ``fused``, ``foreach`` ...) go to the optimizer constructor;
    ``lr`` and ``weight_decay`` are also passed as its defaults, so groups added later with
    ``add_param_group`` inherit them rather than the optimizer's own defaults.
    """
    groups = loraplus_param_groups(
        model, lr, ratio=ratio, weight_decay=weight_decay, embedding_lr=embedding_lr
    )
    optimizer = optimizer_cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)
    logger.info(
        "LoRA+ %s (ratio %g):\n%s",
        optimizer_cls.__name__,
        ratio,
        loraplus_summary(optimizer.param_groups),
    )
    return optimizer
