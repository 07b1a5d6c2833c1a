"""Where a run's results go: TensorBoard event files and metrics.json in the run folder."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class Tracker:
    """Scalars to TensorBoard. `purge_step` drops events a crashed run logged after its checkpoint."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def tensorboard_callbacks(settings, run_dir) -> list:
    """Trainer callbacks for the TensorBoard extras switched on in `settings`."""
    return []


def log_hparams(tracker: Tracker, cfg, summary: dict) -> None:
    """Hyperparameters with the final metrics, for TensorBoard's HPARAMS tab."""


def _plain(value):
    """JSON has no NaN or infinity: write them as strings a reader can still parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_plain(data), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def result_table(summary: dict) -> str:
    """The short table printed at the end of a run."""
    monitor = summary["monitor"]
    best, test = summary.get("best", {}), summary.get("test", {})
    rows = []
    if best:
        rows.append((f"best {monitor}", f"{best[monitor]:.4f}  (epoch {best['epoch']})"))
        for k, v in best.items():
            if k.startswith("val/") and k != monitor:
                rows.append((f"  {k}", f"{v:.4f}"))
    for k, v in test.items():
        rows.append((k, f"{v:.4f}"))
    rows += [
        ("epochs", str(summary["epochs"])),
        ("updates", str(summary["updates"])),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("stopped", summary.get("stop_reason") or "-"),
        ("run folder", summary["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "Result"] + [f"  {k:<{width}}  {v}" for k, v in rows])
