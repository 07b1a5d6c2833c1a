"""Freezing by name patterns, frozen BatchNorm in eval mode, and gradual unfreezing.

A pattern is a shell-style wildcard (fnmatch) on a parameter's name or on the
name of any module above it: `layer4.*`, `features`, `conv1` and `layer4`
each name what they say. A leading `!` takes names back out, the last matching
pattern winning, as in .gitignore: `['*', '!fc.*']` is everything but the head.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

from bprun.engine.callbacks import Callback
from bprun.errors import BprunError

log = logging.getLogger("bprun")


def _scopes(name: str) -> list[str]:
    """`layer1.0.conv1.weight` -> layer1, layer1.0, layer1.0.conv1, layer1.0.conv1.weight."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def matches(name: str, pattern: str) -> bool:
    return any(fnmatchcase(scope, pattern) for scope in _scopes(name))


def select(model: nn.Module, patterns: Iterable[str], key: str) -> list[str]:
    """Names of the parameters `patterns` pick; a pattern that picks nothing is an error."""
    patterns = list(patterns)
    names = [n for n, _ in model.named_parameters()]
    picked = set()
    for pattern in patterns:
        negate = pattern.startswith("!")
        hits = {n for n in names if matches(n, pattern[1:] if negate else pattern)}
        if not hits:
            raise BprunError(no_match(key, pattern, model))
        picked = picked - hits if negate else picked | hits
    return [n for n in names if n in picked]


def no_match(key: str, pattern: str, model: nn.Module) -> str:
    top = [n for n, _ in model.named_children()]
    return (
        f"{key} pattern '{pattern}' matches no parameter of {type(model).__name__}: "
        f"its top-level modules are {', '.join(top)} (patterns like '{top[0]}' or "
        f"'{top[0]}.*' name them)"
    )


class Freezer(Callback):
    """`trainer.freeze` and `trainer.unfreeze_at_epoch` as a Trainer callback.

    Frozen parameters get requires_grad=False (no gradients, no updates, no
    weight decay: the optimizer skips parameters without gradients), and a
    BatchNorm layer all of whose parameters are frozen stays in eval mode, so
    its running statistics stay those of the pretrained weights. After
    `unfreeze_at_epoch` epochs everything is trainable again; the optimizer
    already holds every parameter, so nothing is rebuilt and resume is exact.
    """

    def __init__(self, model: nn.Module, patterns: list[str], unfreeze_at_epoch: int | None):
        self.model, self.unfreeze_at_epoch = model, unfreeze_at_epoch
        names = set(select(model, patterns, "trainer.freeze"))
        self.params = [p for n, p in model.named_parameters() if n in names]
        frozen = {id(p) for p in self.params}
        self.norms = [  # BatchNorm layers whose own parameters are all frozen
            m
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (own := [id(p) for p in m.parameters(recurse=False)])
            and all(i in frozen for i in own)
        ]
        self.frozen = False
        self.freeze()

    def freeze(self) -> None:
        for p in self.params:
            p.requires_grad_(False)
        for bn in self.norms:
            bn.train = _stay_in_eval.__get__(bn)  # model.train() reaches it through children()
            bn.eval()
        self.frozen = True

    def unfreeze(self) -> None:
        for p in self.params:
            p.requires_grad_(True)
        for bn in self.norms:
            del bn.train  # back to nn.Module.train
            bn.train(self.model.training)
        self.frozen = False

    def _due(self, epochs_done: int) -> bool:
        at = self.unfreeze_at_epoch
        return self.frozen and at is not None and epochs_done >= at

    def on_fit_start(self, trainer, train_loader) -> None:
        if self._due(trainer.epoch):  # resumed past the unfreezing epoch
            self.unfreeze()

    def on_summary(self, trainer, summary: dict) -> None:
        summary["frozen"] = {
            "parameters": sum(p.numel() for p in self.params),
            "tensors": len(self.params),
            "batch_norm_in_eval": len(self.norms),
            "unfreeze_at_epoch": self.unfreeze_at_epoch,
            "still_frozen": self.frozen,
        }

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if self._due(trainer.epoch + 1):
            self.unfreeze()
            log.info(
                f"unfroze {sum(p.numel() for p in self.params):,} parameters after epoch "
                f"{trainer.epoch + 1}"
            )


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def finetune_callbacks(model: nn.Module, settings) -> list[Callback]:
    """The summary of weights and parameter groups, and a Freezer when `trainer.freeze` is set.

    Call it after the optimizer is built: parameters frozen here stay in the
    optimizer, which is what lets them train again after `unfreeze_at_epoch`.
    """
    callbacks: list[Callback] = [FinetuneSummary()]
    if settings.freeze:
        callbacks.append(Freezer(model, list(settings.freeze), settings.unfreeze_at_epoch))
    return callbacks


class FinetuneSummary(Callback):
    """metrics.json entries: the weights' key reports (`weights`) and, when the optimizer has
    several groups or multipliers, each group's name, lr_mult, lr and weight decay."""

    def on_summary(self, trainer, summary: dict) -> None:
        reports = getattr(trainer.module, "weights_reports", None)
        if reports:
            summary["weights"] = [r.as_dict() for r in reports]
        groups = trainer.optimizer.param_groups
        if len(groups) > 1 or any(g.get("lr_mult", 1.0) != 1.0 for g in groups):
            summary["param_groups"] = [
                {
                    "name": g.get("name", f"group{i}"),
                    "lr_mult": g.get("lr_mult", 1.0),
                    "lr": g.get("initial_lr", g["lr"]),
                    "weight_decay": g.get("weight_decay"),
                    "parameters": sum(p.numel() for p in g["params"]),
                }
                for i, g in enumerate(groups)
            ]
