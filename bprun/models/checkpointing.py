"""Activation checkpointing: keep each block's input, recompute its insides in the backward.

`enable_activation_checkpointing(model)` runs every block of a model through
`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)` while gradients
are on: the model's own `enable_activation_checkpointing()` where it has one
(bprun's MLP blocks, CNN stages, transformer layers), otherwise each top-level
`nn.Sequential` stage (torchvision's ResNet `layer1..4`, `features` of VGG and
MobileNet) and each entry of a top-level `nn.ModuleList`. A block keeps its
class name and parameter names (the class is swapped for a subclass whose
`forward` checkpoints), so checkpoints load with it on or off.

BatchNorm in a recomputed block would update its running statistics twice per
step; the recomputation runs with momentum 0, so they are updated once, as
without checkpointing. Dropout draws the same masks (the RNG state is
restored for the recomputation).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bprun.errors import BprunError


def run_checkpointed(fn, owner: nn.Module, *args, **kwargs):
    """`fn(*args, **kwargs)` under non-reentrant checkpointing when gradients are on;
    `owner` holds the BatchNorm layers the recomputation must not update."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    if _recorder is not None:  # saved_tensor_bytes counts what the recomputation keeps
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                _recorder(a)
    return checkpoint(
        fn,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(_contexts, owner),
        **kwargs,
    )


def _contexts(owner: nn.Module):
    return contextlib.nullcontext(), _frozen_batch_norm(owner)


@contextlib.contextmanager
def _frozen_batch_norm(owner: nn.Module):
    """Within: training-mode BatchNorm layers of `owner` leave their running statistics as
    they are (momentum 0: running * 1 + batch * 0) and their batch counter too."""
    layers = [
        m
        for m in owner.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(layers, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


_CLASSES: dict[type, type] = {}
_recorder = None  # set while saved_tensor_bytes measures


def checkpoint_module(module: nn.Module) -> None:
    """Make `module` recompute its forward in the backward pass (in place; names unchanged)."""
    cls = type(module)
    if getattr(cls, "_bprun_checkpointed", False):
        return
    if cls not in _CLASSES:

        def forward(self, *args, **kwargs):
            return run_checkpointed(functools.partial(cls.forward, self), self, *args, **kwargs)

        _CLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {"forward": forward, "_bprun_checkpointed": True, "__module__": cls.__module__},
        )
    module.__class__ = _CLASSES[cls]


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint the blocks of `model`; returns how many blocks (segments) there are."""
    own = getattr(model, "enable_activation_checkpointing", None)
    if own is not None:
        return own()
    count = 0
    for child in model.children():
        if isinstance(child, nn.Sequential):
            checkpoint_module(child)
            count += 1
        elif isinstance(child, nn.ModuleList):
            for block in child:
                checkpoint_module(block)
                count += 1
    if count == 0:
        raise BprunError(
            f"model.activation_checkpointing=true: {type(model).__name__} has no blocks to "
            "checkpoint (no top-level nn.Sequential stages or nn.ModuleList blocks); it works "
            "with model=mlp, cnn, resnet and transformer, or give your model an "
            "enable_activation_checkpointing() method"
        )
    return count


def saved_tensor_bytes(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of activations held for the backward pass of one forward: every tensor autograd
    saves (through `torch.autograd.graph.saved_tensors_hooks`) plus the inputs that
    checkpointed blocks keep for their recomputation, each storage counted once, parameters
    and buffers left out (they are held anyway)."""
    held = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def keep(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            storages[storage.data_ptr()] = storage.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        keep(t)
        return t

    global _recorder
    _recorder = keep
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn(model(x), y)
    finally:
        _recorder = None
    return sum(storages.values())


class CheckpointedStages(nn.Sequential):
    """An `nn.Sequential` of layers whose stages (runs of layers starting at `starts`) can be
    checkpointed one by one; parameter names are those of a plain Sequential."""

    def __init__(self, *layers: nn.Module, starts: list[int]):
        super().__init__(*layers)
        self.starts = list(starts)
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checkpointed:
            return super().forward(x)
        ends = [*self.starts[1:], len(self)]
        for a, b in zip(self.starts, ends, strict=True):
            x = run_checkpointed(functools.partial(self._run, a, b), self, x)
        return x

    def _run(self, a: int, b: int, x: torch.Tensor) -> torch.Tensor:
        for i in range(a, b):
            x = self[i](x)
        return x
