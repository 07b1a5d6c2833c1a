"""TensorBoard event files in the run folder: scalars, text, histograms and the HPARAMS tab."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class GroupLrs:
    """`lr/group<i>` of the watched param groups beside each logged `lr`, once per step (the
    trainer logs lr twice at an epoch's last update): what every tracker logs alike."""

    def __init__(self):
        self.param_groups: list[dict] | None = None
        self._step: int | None = None

    def add(self, scalars: dict[str, float], step: int) -> dict[str, float]:
        if "lr" not in scalars:
            return scalars
        if step == self._step:
            return {k: v for k, v in scalars.items() if k != "lr"}
        self._step = step
        groups = enumerate(self.param_groups or ())
        return {**scalars, **{f"lr/group{i}": g["lr"] for i, g in groups}}


class Tracker:
    """Scalars to TensorBoard. `purge_step` drops events a crashed run logged after its checkpoint."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        self.run_dir, self.purge_step = str(run_dir), purge_step
        self._writer: SummaryWriter | None = None
        self.lrs = GroupLrs()

    @property
    def writer(self) -> SummaryWriter:
        """The event file, opened at the first event: a run refused before it logs anything
        (a resume that does not fit, say) adds no file to its folder."""
        if self._writer is None:
            self._writer = SummaryWriter(log_dir=self.run_dir, purge_step=self.purge_step)
        return self._writer

    def watch_param_groups(self, param_groups: list[dict]) -> None:
        """Log `lr/group<i>` of these groups wherever `lr` is logged."""
        self.lrs.param_groups = param_groups

    def log(self, scalars: dict[str, float], step: int) -> None:
        for name, value in self.lrs.add(scalars, step).items():
            self.writer.add_scalar(name, value, step)

    def histogram(self, tag: str, values, step: int) -> None:
        self.writer.add_histogram(tag, values.cpu(), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text, step)

    def figure(self, tag: str, figure, step: int = 0) -> None:
        """A matplotlib figure as an image (IMAGES tab); the figure stays open."""
        self.writer.add_figure(tag, figure, step, close=False)

    def image(self, tag: str, pixels, step: int = 0) -> None:
        """An (H, W, 3) uint8 image (IMAGES tab)."""
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


# Config parts that say where things are or belong to other tasks, not how a run trains.
_NOT_HPARAMS = ("paths", "gradcheck", "lr_find", "sweep", "ckpt", "hydra", "tracker")
_NOT_HPARAM_LEAVES = ("_partial_", "data_dir", "resume", "progress", "storage")


def hparam_values(cfg, choices: dict[str, str] | None = None) -> dict[str, float | int | str]:
    """Flattened scalar config values plus the group choices (`optim: adamw`)."""
    from omegaconf import OmegaConf

    values: dict = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if key in _NOT_HPARAM_LEAVES:
                continue
            if isinstance(value, dict):
                walk(value, f"{name}.")
            elif isinstance(value, (list, tuple)):
                if all(isinstance(v, (int, float, str, bool)) for v in value):
                    values[name] = str(list(value))
            elif isinstance(value, bool):
                values[name] = str(value).lower()
            elif isinstance(value, (int, float, str)):
                values[name] = value

    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    skip = _NOT_HPARAMS + (() if container.get("task") == "meta" else ("meta",))
    walk({k: v for k, v in container.items() if k not in skip}, "")
    values.update(
        {
            k: str(v)
            for k, v in (choices or {}).items()
            if v is not None and not k.startswith("hydra/") and k not in _NOT_HPARAMS
        }
    )
    return values


def final_metrics(summary: dict) -> dict[str, float]:
    """`best/val/...` at the best epoch, and the test metrics: the HPARAMS tab's columns."""
    monitor_best = summary.get("best") or {}
    metrics = {f"best/{k}": v for k, v in monitor_best.items() if k.startswith("val/")}
    metrics.update(summary.get("test") or {})
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def log_hparams(tracker: Tracker, cfg, summary: dict, choices: dict | None = None) -> None:
    """Hyperparameters with the final metrics, for TensorBoard's HPARAMS tab.

    Written into the run's own event file, not through SummaryWriter.add_hparams,
    which writes to a sub-folder and adds an `hp_metric` scalar. No experiment
    summary is written, so TensorBoard builds one from all runs of a sweep: the
    union of their hyperparameters, and their scalar tags as metrics. A failure
    here only warns: it runs while a failed run is being recorded.
    """
    if tracker is None:
        return
    try:
        from torch.utils.tensorboard.summary import hparams

        metrics = final_metrics(summary)
        step = summary.get("updates") or 0
        for name, value in metrics.items():
            if name.startswith("best/") and math.isfinite(value):
                tracker.writer.add_scalar(name, value, step)
        _, start, _ = hparams(hparam_values(cfg, choices), metrics)
        writer = tracker.writer._get_file_writer()
        writer.add_summary(start, step)
        writer.add_summary(_session_end(summary.get("status") in ("completed", "pruned")), step)
    except Exception as e:
        logging.getLogger("bprun").warning(f"could not log hyperparameters to TensorBoard: {e}")


def _session_end(success: bool):
    """The HPARAMS tab's session status: success, or failure for a failed or stopped run."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import api_pb2, metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    status = api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE
    content = HParamsPluginData(
        session_end_info=SessionEndInfo(status=status, end_time_secs=time.time()),
        version=metadata.PLUGIN_DATA_VERSION,
    )
    plugin = SummaryMetadata.PluginData(
        plugin_name=metadata.PLUGIN_NAME, content=content.SerializeToString()
    )
    tag = metadata.SESSION_END_INFO_TAG
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])
