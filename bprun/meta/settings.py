"""Typed settings of `task=meta`, registered as the Hydra schema of the `meta` config node, so
a misspelt key fails at compose time and every value is checked here, once.

A plain dataclass with no torch import: the command line validates the config before torch
loads.
"""

from __future__ import annotations

from dataclasses import dataclass

from bprun.errors import BprunError


@dataclass
class MetaSettings:
    """MAML (Finn et al. 2017). The outer optimizer and its learning rate are the `optim`
    group's (optim.lr), the outer schedule the `sched` group's (stepped once per iteration)."""

    iterations: int = 70000  # meta-updates (outer optimizer steps); the paper's sine runs: 70k
    tasks_per_batch: int = 25  # tasks per meta-update (the meta-batch)
    shots: int = 10  # K: support points per task, what the inner steps fit
    query: int = 10  # query points per task that the meta-update scores the adapted weights on
    inner_steps: int = 1  # gradient steps per task in meta-training
    inner_lr: float = 0.01  # alpha: the step size of the inner steps, in training and evaluation
    first_order: bool = False  # FOMAML: no gradient through the inner steps' gradients
    baseline: bool = True  # also train one network jointly on the same points, fine-tuned alike
    eval_tasks: int = 500  # held-out tasks the adaptation is measured on
    eval_steps: int = 10  # k: the MSE is reported after 0, 1 and k inner steps (and all between)
    eval_query: int = 100  # query points per held-out task
    eval_seed: int = 0  # draws the held-out tasks; the same for every run, like dataset.val_seed

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BprunError naming the first setting whose value cannot work, and its fix."""
        for key in ("iterations", "tasks_per_batch", "shots", "query", "inner_steps"):
            _at_least(key, getattr(self, key), 1)
        for key in ("eval_tasks", "eval_steps", "eval_query"):
            _at_least(key, getattr(self, key), 1)
        if not self.inner_lr > 0:
            raise BprunError(
                f"meta.inner_lr must be positive (the paper's sine runs: 0.01), got {self.inner_lr}"
            )

    @property
    def algorithm(self) -> str:
        return "fomaml" if self.first_order else "maml"


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise BprunError(f"meta.{key} must be at least {low}, got {value}")
