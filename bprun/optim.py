"""Optimizer and scheduler helpers named by `conf/optim` and `conf/sched` nodes.

The schedulers are torch's own classes, composed; their state_dicts hold
plain numbers and strings only, so they load from a checkpoint read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import lr_scheduler

from bprun.errors import BprunError

NORM_LAYERS = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def param_groups_weight_decay(model: nn.Module, weight_decay: float | None = None) -> list[dict]:
    """Two parameter groups: decayed weights, and biases/normalisation parameters without decay.

    As timm's `param_groups_weight_decay`: every parameter with at most one
    dimension (biases, norm scales and shifts) and every parameter of a
    normalisation layer goes into a group with weight_decay 0. The other group
    gets `weight_decay` (None: the optimizer's own setting). Shared parameters
    are listed once; frozen ones are left out; empty groups are dropped.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_LAYERS)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if is_norm or p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append(
            {"params": decay}
            if weight_decay is None
            else {"params": decay, "weight_decay": weight_decay}
        )
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_updates: int,
    warmup_updates: int | None = None,
    warmup_fraction: float = 0.05,
    start_factor: float = 0.01,
    eta_min: float = 0.0,
) -> lr_scheduler.LRScheduler:
    """Linear warmup from start_factor x lr to lr, then cosine down to eta_min by the run's end.

    Lengths count scheduler steps (updates with interval=step). `warmup_updates`
    None means `warmup_fraction` of `total_updates`, the run's length.
    """
    if warmup_updates is None:
        if not 0.0 <= warmup_fraction < 1.0:
            raise BprunError(f"sched.warmup_fraction must be in [0, 1), got {warmup_fraction}")
        warmup_updates = round(warmup_fraction * total_updates)
    if warmup_updates < 0:
        raise BprunError(f"sched.warmup_updates must be >= 0, got {warmup_updates}")
    if not 0.0 < start_factor <= 1.0:
        raise BprunError(f"sched.start_factor must be in (0, 1], got {start_factor}")
    warmup_updates = min(warmup_updates, total_updates - 1)
    cosine = lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, total_updates - warmup_updates), eta_min=eta_min
    )
    if warmup_updates <= 0:
        return cosine
    warmup = lr_scheduler.LinearLR(
        optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_updates
    )
    return lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_updates])


def one_cycle(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    max_lr: float | None = None,
    cycle_momentum: bool | None = None,
    **kwargs,
) -> lr_scheduler.OneCycleLR:
    """torch's OneCycleLR with two defaults taken from the optimizer.

    `max_lr` None is each group's configured lr. `cycle_momentum` None cycles
    momentum only where the optimizer uses it (SGD with momentum > 0, or
    betas); OneCycleLR would otherwise refuse Adagrad and switch momentum on
    for plain SGD.
    """
    groups = optimizer.param_groups
    if max_lr is None:
        max_lr = [g["lr"] for g in groups]
    if cycle_momentum is None:
        cycle_momentum = all("betas" in g or g.get("momentum", 0) > 0 for g in groups)
    return lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, cycle_momentum=cycle_momentum, **kwargs
    )
