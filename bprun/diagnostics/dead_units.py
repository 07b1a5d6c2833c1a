"""Dead units: the share of units per ReLU-family layer that are never active on a batch.

A unit is one output element of the activation apart from the batch dimension
(a feature of a Linear layer, a channel at one position of a conv map, a feature
of one token). It is active on a sample when its output is > 0: for ReLU,
LeakyReLU, PReLU, ELU, SELU and CELU that is exactly a positive input, and so it
is for GELU, SiLU and Mish, whose output is positive exactly when their input
is. A unit never active on the measured batch is dead there: ReLU passes it no
gradient at all, GELU and SiLU only the small gradient of their negative tail.

Forward hooks are registered just before a log-interval update and removed
right after it, so no other forward pass pays for them; evaluation passes
(model.eval) are ignored. Activations applied as functions (F.relu) are not
modules and cannot be seen.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bprun.engine.callbacks import Callback

log = logging.getLogger("bprun")

FAMILY = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
)


class DeadUnits(Callback):
    """TensorBoard tags `dead_units/<layer>`: the fraction of dead units on the log update's
    batch (all micro-batches of it when accumulating)."""

    def __init__(self, settings):
        self.every = settings.log_every_n_updates
        self.handles: list = []
        self.active: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, train_loader) -> None:
        self.layers = [(n, m) for n, m in trainer.module.named_modules() if isinstance(m, FAMILY)]
        if not self.layers:
            log.warning(
                f"trainer.dead_units=true but {type(trainer.module).__name__} has no ReLU-family "
                "activation modules: nothing to measure"
            )
        self._arm_if_next(trainer)

    def on_update_end(self, trainer) -> None:
        if self.handles and trainer.update % self.every == 0:
            self._disarm()
            if self.active:
                names = list(self.active)
                fractions = torch.stack(
                    [1.0 - self.active[n].float().mean() for n in names]
                ).tolist()
                if trainer.tracker is not None:
                    trainer.tracker.log(
                        {f"dead_units/{n}": f for n, f in zip(names, fractions, strict=True)},
                        trainer.update,
                    )
                self.last = dict(zip(names, fractions, strict=True))
            self.active = {}
        self._arm_if_next(trainer)

    def on_fit_end(self, trainer) -> None:
        self._disarm()

    def _arm_if_next(self, trainer) -> None:
        if self.layers and not self.handles and (trainer.update + 1) % self.every == 0:
            self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers]

    def _disarm(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, name: str):
        def record(module, args, output):
            if not module.training or not isinstance(output, torch.Tensor) or output.dim() < 2:
                return
            fired = (output.detach() > 0).any(0)
            seen = self.active.get(name)
            if seen is None or seen.shape != fired.shape:
                self.active[name] = fired
            else:
                seen |= fired

        return record
