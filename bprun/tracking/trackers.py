"""The tracker interface the Trainer and callbacks write to, and the trackers of `tracker=[...]`.

    trackers = open_trackers(cfg, run_dir, checkpoint, overrides)
    trackers.log({"train/loss": 0.3, "lr": 1e-3}, step)   # the Trainer, the instruments
    trackers.text("config", text), trackers.histogram(tag, values, step)
    trackers.finish(cfg, summary, choices); trackers.close()

TensorBoard writes on the calling thread (a local file, as before). Every other
tracker runs behind a `Background` worker: a call costs the training thread an
append to a deque, and a tracker that fails keeps its events and retries.
`trackers.ids` holds the MLflow and W&B run ids; it is saved in the checkpoint's
extra state, so a resumed run continues the same runs.
"""

from __future__ import annotations

import getpass
import importlib.util
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path

from bprun.errors import BprunError
from bprun.tracking.background import METRICS, Background

NAMES = ("tensorboard", "mlflow", "wandb", "csv")
EXTRA = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker -> the module `bprun[track]` installs


def chosen(cfg) -> dict[str, dict]:
    """tracker name -> its settings, from the `tracker` node (one key per tracker picked)."""
    from omegaconf import OmegaConf

    node = cfg.get("tracker") if hasattr(cfg, "get") else None
    if node is None:
        return {}
    return {str(k): (v or {}) for k, v in OmegaConf.to_container(node, resolve=True).items()}


def check(cfg) -> None:
    """Raise BprunError for tracker settings that cannot work, before anything is trained."""
    picked = chosen(cfg)
    for name, settings in picked.items():
        if name not in NAMES:
            raise BprunError(
                f"tracker.{name} is not a tracker: pick from {', '.join(NAMES)} "
                f"with tracker=[{','.join(NAMES[:2])}]"
            )
        if not isinstance(settings, dict):  # tracker.tensorboard=<a value>: a node replaced
            raise BprunError(
                f"tracker.{name}={settings!r} replaces the tracker's settings with a value: "
                f"pick it with tracker={name} and set its keys as tracker.{name}.<key>=... "
                f"(`bprun tracker={name} --cfg job` lists them)"
            )
        module = EXTRA.get(name)
        if module and importlib.util.find_spec(module) is None:
            raise BprunError(
                f"tracker={name} needs the {module} package: pip install 'bprun[track]'"
            )
        for key in ("buffer", "exit_timeout_s", "flush_every_s"):
            if key not in settings:
                continue
            value = settings.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise BprunError(f"tracker.{name}.{key} must be a number >= 0, got {value!r}")
    if "mlflow" in picked:
        from bprun.tracking.mlflow_tracker import check_uri

        check_uri(picked["mlflow"].get("uri"))
    if "wandb" in picked:
        from bprun.tracking.wandb_tracker import MODES, has_api_key

        mode = picked["wandb"].get("mode", "offline")
        if mode not in MODES:
            raise BprunError(f"tracker.wandb.mode={mode}: choose one of {', '.join(MODES)}")
        if mode == "online" and not has_api_key():
            raise BprunError(
                "tracker.wandb.mode=online needs a W&B API key: run `wandb login` or set "
                "WANDB_API_KEY, or keep tracker.wandb.mode=offline and `wandb sync` later"
            )


class Trackers:
    """Every picked tracker behind one interface; `writer` is TensorBoard's (None without it),
    for the TensorBoard-only extras (graph, images)."""

    def __init__(self, tensorboard=None, workers=(), ids=None, params=None, tags=None):
        self.tensorboard, self.workers = tensorboard, list(workers)
        self.ids: dict = ids if ids is not None else {}
        self._opening = {"params": params or {}, "tags": tags or {}}
        self._begun = False
        from bprun.tracking.tensorboard import GroupLrs  # torch: only once a run opens

        self.lrs = GroupLrs()  # lr/group<i> added here once, for TensorBoard and the others

    @property
    def writer(self):
        return self.tensorboard.writer if self.tensorboard is not None else None

    def _put(self, kind: str, *payload) -> None:
        if not self._begun:  # the runs open with the first event: a refused run opens none
            self._begun = True
            for name, values in self._opening.items():
                if values:
                    for worker in self.workers:
                        worker.put(name, values)
        for worker in self.workers:
            worker.put(kind, *payload)

    def watch_param_groups(self, param_groups: list[dict]) -> None:
        """Log `lr/group<i>` of these groups wherever `lr` is logged."""
        self.lrs.param_groups = param_groups

    def log(self, scalars: dict[str, float], step: int) -> None:
        scalars = self.lrs.add(scalars, step)
        if self.tensorboard is not None:
            self.tensorboard.log(scalars, step)
        if self.workers and scalars:
            self._put(METRICS, {k: float(v) for k, v in scalars.items()}, int(step), time.time())

    def histogram(self, tag: str, values, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.histogram(tag, values, step)

    def figure(self, tag: str, figure, step: int = 0) -> None:
        """A matplotlib figure (a confusion matrix): TensorBoard's IMAGES tab; the others get
        its PNG among the run folder's files at the end."""
        if self.tensorboard is not None:
            self.tensorboard.figure(tag, figure, step)

    def image(self, tag: str, pixels, step: int = 0) -> None:
        """An (H, W, 3) uint8 image already rendered (a confusion matrix): TensorBoard's IMAGES
        tab; the others get its PNG among the run folder's files at the end."""
        if self.tensorboard is not None:
            self.tensorboard.image(tag, pixels, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.tensorboard is not None:
            self.tensorboard.text(tag, text, step)
        if self.workers:
            self._put("text", tag, text, step)

    def finish(self, cfg, summary: dict, choices: dict | None = None) -> None:
        """The run's end: TensorBoard's HPARAMS; the final metrics, the run folder's files
        and the status to the others."""
        from bprun.tracking.tensorboard import final_metrics, log_hparams

        if self.tensorboard is not None:
            log_hparams(self.tensorboard, cfg, summary, choices)
        if not self.workers:
            return
        final = {k: v for k, v in final_metrics(summary).items() if k.startswith("best/")}
        if final:
            self._put(METRICS, final, int(summary.get("updates") or 0), time.time())
        for path, folder in run_files(Path(summary["run_dir"]), cfg):
            self._put("artifact", str(path), folder)
        self._put("finish", summary.get("status", "completed"))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        for worker in self.workers:  # all drain at once: the waits overlap
            worker.request_close()
        for worker in self.workers:
            worker.close()


def run_files(run_dir: Path, cfg) -> list[tuple[Path, str | None]]:
    """What a run leaves for the trackers' artifacts: config, metrics.json, classes, charts,
    and the best checkpoint with tracker.mlflow.log_checkpoints=true."""
    files = [(run_dir / ".hydra", "config"), (run_dir / "metrics.json", None)]
    files += [(run_dir / "classes.json", None)]
    # the problem's reports of the test split: confusion matrix, per-class or per-label table
    files += [(p, None) for p in sorted(run_dir.glob("test_*.json"))]
    files += [(p, str(p.parent.relative_to(run_dir))) for p in sorted(run_dir.rglob("*.png"))]
    if chosen(cfg).get("mlflow", {}).get("log_checkpoints"):
        best = sorted((run_dir / "checkpoints").glob("epoch=*.pt"))  # the top-k, not last.pt
        files += [(p, "checkpoints") for p in best]
    return [(p, f if f != "." else None) for p, f in files if p.exists()]


def run_tags(run_dir: Path) -> dict[str, str]:
    """Where the run comes from: its folder, the git commit (and whether the checkout had
    changes) when run inside one, the host, the user and the world size."""
    tags = {
        "run_dir": str(run_dir),
        "run_folder": run_dir.name,
        "host": socket.gethostname(),
        "world_size": os.environ.get("WORLD_SIZE", "1"),
    }
    try:
        tags["user"] = getpass.getuser()
    except Exception:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode == 0:
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            tags["git_commit"] = tags["mlflow.source.git.commit"] = commit.stdout.strip()
            tags["git_dirty"] = str(bool(status.stdout.strip())).lower()
    except (OSError, subprocess.SubprocessError):
        pass
    return tags


def open_trackers(
    cfg, run_dir: Path, checkpoint: dict | None = None, overrides=(), choices=None
) -> Trackers:
    """The trackers `cfg.tracker` picks, for one run folder (rank 0 only). A resumed run
    (`checkpoint`) continues its MLflow and W&B runs and TensorBoard and CSV files past
    the checkpoint's step. `choices`: the config groups picked (`optim: adamw`), which the
    parameters list beside the config's values."""
    from bprun.tracking.tensorboard import Tracker, hparam_values

    check(cfg)
    run_dir = Path(run_dir)
    picked = chosen(cfg)
    purge = checkpoint["progress"]["update"] + 1 if checkpoint else None
    saved = ((checkpoint or {}).get("extra") or {}).get("trackers") or {}
    ids: dict = {}
    workers = []
    for name, settings in picked.items():
        capacity = settings.get("buffer", 10_000)
        timeout = settings.get("exit_timeout_s", 30.0)
        interval = settings.get("flush_every_s", 0.0)
        if name == "mlflow":
            from bprun.tracking.mlflow_tracker import MlflowBackend

            resuming = checkpoint is not None
            backend = MlflowBackend(settings, run_dir, ids, saved.get("mlflow"), resuming)
        elif name == "wandb":
            from bprun.tracking.wandb_tracker import WandbBackend

            # W&B takes the id it is given: known now, it is in the first checkpoint too
            ids["wandb"] = saved.get("wandb") or new_run_id()
            backend = WandbBackend(settings, run_dir, ids, ids["wandb"])
        elif name == "csv":
            from bprun.tracking.csv_tracker import CsvBackend

            backend = CsvBackend(run_dir, purge)
        else:
            continue
        workers.append(Background(name, backend, capacity, timeout, interval))
        workers[-1].warm()
    ids.update({k: v for k, v in saved.items() if k in picked})
    params, tags = {}, {}
    if workers:
        params = hparam_values(cfg, choices)
        params["overrides"] = " ".join(overrides) or "-"
        tags = run_tags(run_dir)
        if checkpoint is not None:
            tags["resumed_at_update"] = str(checkpoint["progress"]["update"])
    tensorboard = Tracker(run_dir, purge_step=purge) if "tensorboard" in picked else None
    return Trackers(tensorboard, workers, ids, params, tags)


def new_run_id() -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return "".join(secrets.choice(alphabet) for _ in range(8))


def open_sweep(config, sweep_dir: Path) -> None:
    """A sweep's or search's parent run, for the trackers that nest runs (MLflow)."""
    picked = chosen(config)
    if "mlflow" not in picked or importlib.util.find_spec("mlflow") is None:
        return
    from omegaconf import OmegaConf

    from bprun.tracking.mlflow_tracker import open_parent

    params = {"overrides": " ".join(OmegaConf.select(config, "hydra.overrides.task") or []) or "-"}
    search = OmegaConf.select(config, "search")
    if search is not None:
        params.update({f"search.{k}": v for k, v in OmegaConf.to_container(search).items()})
    open_parent(picked["mlflow"], Path(sweep_dir), params)


def close_sweep(config, sweep_dir: Path, failed: bool, files=()) -> None:
    """End the parent run, with the sweep's summary files."""
    if "mlflow" in chosen(config) and importlib.util.find_spec("mlflow") is not None:
        from bprun.tracking.mlflow_tracker import close_parent

        close_parent(chosen(config)["mlflow"], Path(sweep_dir), failed, files)
