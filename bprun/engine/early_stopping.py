"""Early stopping with Lightning's semantics.

Checks run in the order: non-finite metric, stopping threshold, divergence
threshold, improvement. Patience counts validation checks.
"""

from __future__ import annotations

import math


class EarlyStopper:
    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        patience: int | None = None,
        min_delta: float = 0.0,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
    ):
        self.monitor, self.mode, self.patience = monitor, mode, patience
        self.min_delta = abs(min_delta)
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.stopped_reason: str | None = None

    @property
    def enabled(self) -> bool:
        return (
            self.patience is not None
            or self.stopping_threshold is not None
            or self.divergence_threshold is not None
        )

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def step(self, value: float) -> bool:
        """Feed one validation result; True means stop, with the reason in `stopped_reason`."""
        name = self.monitor
        if self.check_finite and not math.isfinite(value):
            reason = f"{name} = {value} is not finite; previous best {self.best:.4g}"
        elif self.stopping_threshold is not None and self._better(value, self.stopping_threshold):
            reason = (
                f"stopping threshold reached: {name} = {value:.4g} beats {self.stopping_threshold}"
            )
        elif self.divergence_threshold is not None and self._better(
            self.divergence_threshold, value
        ):
            reason = f"divergence threshold reached: {name} = {value:.4g} is worse than {self.divergence_threshold}"
        else:
            delta = -self.min_delta if self.mode == "min" else self.min_delta
            if self._better(value - delta, self.best):
                self.best, self.wait = value, 0
                return False
            self.wait += 1
            if self.patience is None or self.wait < self.patience:
                return False
            reason = f"{name} did not improve in the last {self.wait} checks; best {self.best:.4g}"
        self.stopped_reason = reason
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "wait": self.wait, "stopped_reason": self.stopped_reason}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait = state["best"], state["wait"]
        self.stopped_reason = state["stopped_reason"]
