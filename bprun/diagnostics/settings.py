"""Typed settings of the diagnostic tasks, registered as the Hydra schemas of the
`gradcheck` and `lr_find` config nodes, so a misspelt key fails at compose time.

Plain dataclasses with no torch import: the command line validates the config
before it loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from bprun.errors import BprunError


@dataclass
class GradcheckSettings:
    """`task=gradcheck`: autograd against central finite differences in float64."""

    batch_size: int = 4  # samples of the first training batch the loss is computed on
    threshold: float = 1.0e-4  # a parameter fails when its max relative error exceeds this
    eps: float = 1.0e-6  # finite-difference step
    floor: float = 1.0e-4  # gradient magnitudes below this count as this in relative errors
    max_coords: int = 32  # coordinates sampled per parameter tensor in large models
    full_below: int = 5000  # models with fewer parameters are checked at every coordinate
    seed: int = 0  # picks the sampled coordinates and the dropout masks

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.batch_size < 1 or self.eps <= 0 or self.threshold <= 0 or self.max_coords < 1:
            raise BprunError(
                "gradcheck.batch_size, eps, threshold and max_coords must be positive, got "
                f"{self.batch_size}, {self.eps}, {self.threshold}, {self.max_coords}"
            )


@dataclass
class LrFindSettings:
    """`task=lr_find`: Lightning's learning-rate range test."""

    min_lr: float = 1.0e-8
    max_lr: float = 1.0
    num_steps: int = 100  # updates in the sweep (Lightning's num_training)
    early_stop_threshold: float | None = 4.0  # stop once the smoothed loss exceeds this x best
    beta: float = 0.98  # smoothing of the loss
    skip_begin: int = 10  # points left out at the start when picking the steepest descent
    skip_end: int = 1  # and at the end

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not 0 < self.min_lr < self.max_lr or self.num_steps < 2:
            raise BprunError(
                "lr_find needs 0 < min_lr < max_lr and num_steps >= 2, got "
                f"min_lr={self.min_lr}, max_lr={self.max_lr}, num_steps={self.num_steps}"
            )
