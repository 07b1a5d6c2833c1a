"""The sinusoid regression tasks of Finn et al. (2017), section 5.1.

Each task is a sine wave y = A sin(x - phase) with its own amplitude A ~ U[0.1, 5] and
phase ~ U[0, pi]; its points have x ~ U[-5, 5]. A learner sees K of them (the support) and
is scored on others of the same wave (the query).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bprun.errors import BprunError


@dataclass
class TaskBatch:
    """Points of `n` tasks: x and y are (n, points, 1); the first `shots` are the support."""

    x: torch.Tensor
    y: torch.Tensor
    shots: int

    @property
    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:, : self.shots], self.y[:, : self.shots]

    @property
    def query(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:, self.shots :], self.y[:, self.shots :]

    def to(self, device: torch.device) -> TaskBatch:
        return TaskBatch(self.x.to(device), self.y.to(device), self.shots)


class SineTasks:
    """A distribution of sine-wave regression tasks (`dataset=sine_tasks`, for `task=meta`).

    Sampling draws from the generator it is given, so a run's task stream is fixed by one
    generator whose state a checkpoint holds.
    """

    problem = "regression"  # what model builders and loss=auto read from a dataset
    input_shape = (1,)
    num_classes = 1  # one output: y

    def __init__(
        self,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, math.pi),
        x_range: tuple[float, float] = (-5.0, 5.0),
    ):
        for key, value in (("amplitude", amplitude), ("phase", phase), ("x_range", x_range)):
            if len(value) != 2 or not value[0] < value[1]:
                raise BprunError(
                    f"dataset.{key} must be [low, high] with low < high, got {list(value)}"
                )
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def sample(self, n_tasks: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        """`n_tasks` new waves with `shots` support and `query` query points each (on the CPU)."""
        amplitude = _uniform((n_tasks, 1, 1), self.amplitude, generator)
        phase = _uniform((n_tasks, 1, 1), self.phase, generator)
        x = _uniform((n_tasks, shots + query, 1), self.x_range, generator)
        return TaskBatch(x, amplitude * torch.sin(x - phase), shots)

    def __repr__(self) -> str:
        return (
            f"SineTasks(amplitude={list(self.amplitude)}, phase={list(self.phase)}, "
            f"x_range={list(self.x_range)})"
        )


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], generator) -> torch.Tensor:
    low, high = bounds
    return low + (high - low) * torch.rand(shape, generator=generator)
