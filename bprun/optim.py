"""Optimizer and scheduler helpers named by `conf/optim` and `conf/sched` nodes.

The schedulers are torch's own classes, composed; their state_dicts hold
plain numbers and strings only, so they load from a checkpoint read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim import lr_scheduler

from bprun.engine.optim_impl import (  # noqa: F401  (re-exported: bprun.optim is their old home)
    DEFAULT_IMPL,
    IMPLS,
    choose_impl,
    impl_kwargs,
    impl_of,
)
from bprun.errors import BprunError

NORM_LAYERS = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def param_groups(
    model: nn.Module,
    lr: float | None = None,
    weight_decay: float | None = None,
    split_decay: bool = False,
    lr_mult: dict[str, float] | None = None,
) -> list[dict]:
    """The trainable parameters in named groups for the optimizer.

    `lr_mult` maps name patterns (see `bprun.engine.freeze`) to multipliers of
    `lr`: discriminative learning rates. A parameter takes the first pattern
    that matches it; the rest form the `default` group. With `split_decay`,
    each group is split again as timm's `param_groups_weight_decay` splits a
    model: every parameter with at most one dimension (biases, norm scales and
    shifts) and every parameter of a normalisation layer or an embedding gets weight_decay 0.
    Shared parameters are listed once; parameters the model itself froze are left out; `trainer.freeze` freezes after the
    optimizer is built, so its parameters are in (an optimizer skips parameters
    without gradients) and unfreezing needs no new groups. Each group carries
    `name` and `lr_mult`.
    """
    from bprun.engine.freeze import matches, no_match

    lr_mult = dict(lr_mult or {})
    if lr_mult and lr is None:
        raise BprunError("optim.lr_mult multiplies optim.lr, which this optimizer node lacks")
    for pattern, mult in lr_mult.items():
        if not isinstance(mult, (int, float)) or mult < 0:
            raise BprunError(f"optim.lr_mult['{pattern}'] must be a number >= 0, got {mult}")
    names = {id(p): n for n, p in model.named_parameters()}
    unmatched = set(lr_mult)
    groups: dict[tuple[str, bool], list] = {}
    seen = set()
    for module in model.modules():
        # Norm layers and embeddings (token and position tables) take no weight decay.
        is_norm = isinstance(module, (*NORM_LAYERS, nn.Embedding))
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            pattern = next((pt for pt in lr_mult if matches(names[id(p)], pt)), "default")
            unmatched.discard(pattern)
            no_decay = split_decay and (is_norm or p.ndim <= 1)
            groups.setdefault((pattern, no_decay), []).append(p)
    if unmatched:
        raise BprunError(no_match("optim.lr_mult", sorted(unmatched)[0], model))
    out = []
    for pattern in ("default", *lr_mult):
        for no_decay in (False, True):
            params = groups.get((pattern, no_decay))
            if not params:
                continue
            mult = 1.0 if pattern == "default" else float(lr_mult[pattern])
            group = {
                "params": params,
                "name": pattern + ("/no_decay" if no_decay else ""),
                "lr_mult": mult,
            }
            if pattern != "default":
                group["lr"] = lr * mult
            if no_decay:
                group["weight_decay"] = 0.0
            elif weight_decay is not None and split_decay:
                group["weight_decay"] = weight_decay
            out.append(group)
    return out


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
        cycle_momentum = all("betas" in g or g.get("momentum", 0) > 0 for g in groups) and (
            "betas" in optimizer.defaults or "momentum" in optimizer.defaults  # OneCycleLR reads
        )  # them there: an optimizer of mixed groups (optim=muon) keeps its momentum
    return lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=total_steps, cycle_momentum=cycle_momentum, **kwargs
    )


class SparseAdam(torch.optim.Optimizer):
    """Adam that takes sparse gradients as well as dense ones (`optim=sparse_adam`).

    A sparse gradient (an `nn.Embedding(sparse=True)`'s: the rows a batch looked up) updates
    those rows alone, their moments included, as `torch.optim.SparseAdam` does ("lazy Adam");
    a dense one is a plain Adam step. torch's SparseAdam refuses dense gradients, and a model
    of embeddings and layers (NCF) has both. Building this optimizer makes the model's
    embeddings give sparse gradients (`sparse_gradients`, read by the run set-up).
    """

    sparse_gradients = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if lr < 0 or eps < 0 or not all(0 <= b < 1 for b in betas):
            raise BprunError(
                f"optim=sparse_adam needs lr >= 0, eps >= 0 and betas in [0, 1), got lr={lr}, "
                f"betas={list(betas)}, eps={eps}"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])
                size = group["lr"] * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                    m_rows = m[rows].mul_(beta1).add_(values, alpha=1 - beta1)
                    v_rows = v[rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)
                    m[rows], v[rows] = m_rows, v_rows
                    p[rows] -= size * m_rows / (v_rows.sqrt() + group["eps"])
                else:
                    m.mul_(beta1).add_(grad, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    p.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-size)
        return loss


def use_sparse_gradients(model: nn.Module, optimizer) -> int:
    """Switch the model's embeddings to sparse gradients when the optimizer takes them (see
    `SparseAdam`); the number of embeddings switched."""
    if not getattr(optimizer, "sparse_gradients", False):
        return 0
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    for m in embeddings:
        m.sparse = True
    return len(embeddings)
