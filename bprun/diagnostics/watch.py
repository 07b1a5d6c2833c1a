"""Vanishing and exploding gradients: per-layer norms against thresholds, kept on the device.

Each update adds one comparison and a few element-wise kernels; nothing is read
to the host until `read`, which the caller does once per log interval. An
episode is a run of consecutive updates over a threshold: it fires once, when it
reaches `patience` updates, and a layer is re-armed as soon as it recovers.
"""

from __future__ import annotations

import math

import torch

SETTING = {"vanishing": "vanish_below", "exploding": "explode_above"}


class GradWatch:
    def __init__(
        self,
        names: list[str],
        vanish_below: float | None,
        explode_above: float | None,
        patience: int,
        device: torch.device,
    ):
        self.names, self.patience = names, patience
        self.kinds = [
            (kind, threshold)
            for kind, threshold in (("vanishing", vanish_below), ("exploding", explode_above))
            if threshold is not None
        ]
        shape = (len(self.kinds), len(names))
        # One comparison for both kinds: vanishing is norm < v, exploding is -norm < -e.
        sign = [1.0 if kind == "vanishing" else -1.0 for kind, _ in self.kinds]
        self.sign = torch.tensor(sign, device=device).unsqueeze(1)
        self.limit = torch.tensor(
            [s * t for s, (_, t) in zip(sign, self.kinds, strict=True)], device=device
        ).unsqueeze(1)
        self.count = torch.zeros(shape, dtype=torch.int32, device=device)
        self.fired_at = torch.full(shape, -1.0, device=device)  # update offset in the window
        self.fired_norm = torch.zeros(shape, device=device)
        self.window_start = 0

    def step(self, norms: torch.Tensor, update: int) -> None:
        """Count consecutive crossings for the norms of update `update`: seven small kernels,
        all in place, no host sync. A NaN norm counts as exploding."""
        crossed = torch.nan_to_num(norms, nan=math.inf) * self.sign < self.limit
        self.count.add_(1).mul_(crossed)
        newly = self.count == self.patience
        self.fired_at.masked_fill_(newly, float(update - self.window_start))
        torch.where(newly, norms, self.fired_norm, out=self.fired_norm)

    def state(self) -> torch.Tensor:
        """Everything `read` needs, as one flat float vector (to be read with the caller's)."""
        return torch.cat(
            [self.count.float().flatten(), self.fired_at.flatten(), self.fired_norm.flatten()]
        )

    def read(self, values: list[float], update: int) -> tuple[list[dict], dict[str, int]]:
        """(events that fired since the last read, layers now in an episode per kind), from the
        host copy of `state()`; starts a new window at `update`."""
        n = len(self.kinds) * len(self.names)
        count, fired_at, fired_norm = values[:n], values[n : 2 * n], values[2 * n : 3 * n]
        events, active = [], {}
        for k, (kind, threshold) in enumerate(self.kinds):
            row = slice(k * len(self.names), (k + 1) * len(self.names))
            active[kind] = sum(c >= self.patience for c in count[row])
            for name, at, norm in zip(self.names, fired_at[row], fired_norm[row], strict=True):
                if at >= 0:
                    events.append(
                        {
                            "kind": kind,
                            "layer": name,
                            "update": self.window_start + int(at),
                            "norm": norm if math.isfinite(norm) else str(norm),
                            "threshold": threshold,
                            "patience": self.patience,
                        }
                    )
        self.fired_at.fill_(-1.0)
        self.window_start = update
        return events, active


def describe(events: list[dict]) -> list[str]:
    """One warning line per kind: the threshold, then each update with its layers and norms."""
    lines = []
    for kind, setting in SETTING.items():
        these = [e for e in events if e["kind"] == kind]
        if not these:
            continue
        by_update: dict[int, list[str]] = {}
        for e in these:
            by_update.setdefault(e["update"], []).append(f"{e['layer']} {_fmt(e['norm'])}")
        where = "; ".join(f"update {u}: {', '.join(ls)}" for u, ls in sorted(by_update.items()))
        first = these[0]
        side = "below" if kind == "vanishing" else "above"
        lines.append(
            f"{kind} gradients in {len(these)} layer(s): gradient norm {side} "
            f"trainer.grad_watch.{setting}={first['threshold']:g} for {first['patience']} "
            f"consecutive updates, at {where}"
        )
    return lines


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
