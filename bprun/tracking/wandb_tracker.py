"""Weights & Biases: offline by default, a run folder under `<run>/wandb` that
`wandb sync <run>/wandb/offline-run-*` uploads later; online when asked."""

from __future__ import annotations

import netrc
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

from bprun.tracking.mlflow_tracker import PARENT_FILE

MODES = ("offline", "online", "disabled")


def has_api_key() -> bool:
    """An API key in WANDB_API_KEY or in ~/.netrc for the W&B host (where `wandb login` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbBackend:
    """One W&B run; its id goes into `ids["wandb"]` (the checkpoint's extra state), so a
    resumed run continues it. A sweep's jobs share a group named after the sweep folder."""

    def __init__(self, settings: dict, run_dir: Path, ids: dict, resume_id: str | None = None):
        self.settings, self.run_dir, self.ids = settings, Path(run_dir), ids
        self.resume_id = resume_id
        self.run = None

    def prepare(self) -> None:
        import wandb  # noqa: F401  (seconds: on the worker, while the run is built)

    def start(self) -> None:
        import wandb

        s, sweep = self.settings, (self.run_dir.parent / PARENT_FILE).is_file()
        self.run = wandb.init(
            project=s.get("project") or (self.run_dir.parent.name if sweep else self.run_dir.name),
            entity=s.get("entity"),
            name=s.get("run_name") or self.run_dir.name,
            group=self.run_dir.parent.name if sweep else None,
            dir=str(self.run_dir),
            mode=s.get("mode", "offline"),
            id=self.resume_id,
            resume="allow",
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.ids["wandb"] = self.run.id

    def handle(self, kind: str, items: list) -> None:
        if kind == "metrics":
            for scalars, step, _ in items:
                self.run.log(dict(scalars), step=int(step))
        elif kind == "params":
            self.run.config.update(items[0][0], allow_val_change=True)
        elif kind == "tags":
            self.run.tags = tuple(f"{k}:{v}"[:64] for k, v in items[0][0].items())
        elif kind == "artifact":
            path, folder = items[0]  # files in the run's folder are synced with it
            target = Path(self.run.dir) / (folder or "") / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if Path(path).is_dir():
                shutil.copytree(path, target, dirs_exist_ok=True)
            elif Path(path).is_file():
                shutil.copy2(path, target)
        elif kind == "finish":
            (status,) = items[0]
            self.run.summary["status"] = status
            self.run.finish(exit_code=0 if status in ("completed", "pruned") else 1)
            self.run = None

    def stop(self) -> None:
        if self.run is not None:
            self.run.finish()
