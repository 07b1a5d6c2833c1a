"""One run: config -> objects -> Trainer -> run folder.

`run(cfg, run_dir)` is what the command line calls once Hydra has composed
the config; it returns the monitored metric for sweepers.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bprun.build import build_data, build_loss, build_model, build_optimizer, build_scheduler
from bprun.diagnostics import diagnostic_callbacks
from bprun.engine import checkpoint as ckpt_io
from bprun.engine.precision import resolve_device
from bprun.engine.settings import TrainerSettings
from bprun.engine.trainer import Trainer
from bprun.errors import BprunError, Interrupted
from bprun.tracking import Tracker, log_hparams, result_table, tensorboard_callbacks, write_json

log = logging.getLogger("bprun")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    """Run `cfg.task`; `overrides` is the command line, kept in checkpoints for resume."""
    if cfg.task == "train":
        return train(cfg, run_dir, overrides)
    if cfg.task == "eval":
        return evaluate(cfg)
    if cfg.task == "gradcheck":
        from bprun.diagnostics.gradcheck import gradcheck_task

        return gradcheck_task(cfg, run_dir)
    if cfg.task == "lr_find":
        from bprun.diagnostics.lr_find import lr_find_task

        return lr_find_task(cfg, run_dir)
    raise BprunError(f"task='{cfg.task}' is not known: use task=train, eval, gradcheck or lr_find")


def _settings(cfg: DictConfig) -> TrainerSettings:
    s: TrainerSettings = OmegaConf.to_object(cfg.trainer)
    if s.fast_dev_run:
        s.max_epochs, s.max_updates = 1, None
    return s


def build_trainer(
    cfg: DictConfig, run_dir: Path | None, s: TrainerSettings, overrides: list[str] = ()
):
    """Data, model, loss, optimizer, scheduler and Trainer for one config."""
    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    data = build_data(
        cfg.dataset,
        device,
        cfg.seed,
        s.limit_train_batches,
        s.limit_val_batches,
        s.overfit_batches,
        s.fast_dev_run,
    )
    seed_everything(cfg.seed)  # after the data, whose generators may reseed global RNGs
    model = build_model(cfg.model, data.dataset).to(device)
    optimizer = build_optimizer(cfg.optim, model)
    updates_per_epoch = -(-len(data.train) // s.accumulate)
    scheduler, interval = build_scheduler(
        cfg.sched, optimizer, updates_per_epoch, s.max_epochs, s.max_updates
    )
    trainer = Trainer(
        s,
        model,
        build_loss(cfg.loss),
        optimizer,
        scheduler,
        interval,
        device=device,
        task=data.dataset.task,
        num_classes=data.dataset.num_classes,
        run_dir=run_dir,
        config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
        overrides=overrides,
        callbacks=[
            *tensorboard_callbacks(s, run_dir),
            *diagnostic_callbacks(s, run_dir),
        ],
    )
    return trainer, data


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    started = time.time()
    s = _settings(cfg)
    trainer, data = build_trainer(cfg, run_dir, s, overrides)
    resumed = None
    if s.resume:
        resumed = ckpt_io.resolve_checkpoint(s.resume)
        trainer.load_state_dict(ckpt_io.load_checkpoint(resumed), resumed)
        log.info(f"resumed from {resumed} at epoch {trainer.epoch + 1}, update {trainer.update}")
    n_params = sum(p.numel() for p in trainer.module.parameters())
    log.info(
        f"{type(trainer.module).__name__} with {n_params:,} parameters on {trainer.device}; "
        f"{data.train.num_samples} train / {data.val.num_samples if data.val else 0} val / "
        f"{data.test.num_samples} test samples; run folder {run_dir}"
    )
    trainer.tracker = Tracker(run_dir, purge_step=trainer.update + 1 if resumed else None)
    if not resumed:
        trainer.tracker.text("config", "```\n" + trainer.config_yaml + "\n```")

    summary = {
        "status": "running",
        "monitor": s.monitor,
        "mode": s.mode,
        "run_dir": str(run_dir),
    }
    try:
        trainer.fit(data.train, data.val)
        summary["test"] = trainer.test(data.test)
        trainer.tracker.log(summary["test"], trainer.update)
        summary["status"] = "completed"
    except BaseException as e:
        summary["status"] = (
            "interrupted" if isinstance(e, (KeyboardInterrupt, Interrupted)) else "failed"
        )
        summary["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise
    finally:
        summary.update(
            stop_reason=trainer.stop_reason,
            best=trainer.best,
            final=trainer.history[-1] if trainer.history else {},
            epochs=trainer.epoch,
            updates=trainer.update,
            wall_time_s=time.time() - started,
            history=trainer.history,
        )
        if resumed:
            summary["resumed_from"] = str(resumed)
        if getattr(trainer, "grad_watch_events", None):
            summary["grad_watch_events"] = trainer.grad_watch_events
        write_json(summary, run_dir / "metrics.json")
        log_hparams(trainer.tracker, cfg, summary)
        trainer.tracker.close()
    log.info(result_table(summary))
    best = trainer.best.get(s.monitor)
    return float(best) if best is not None and math.isfinite(best) else None


def evaluate(cfg: DictConfig) -> float | None:
    """task=eval: rebuild the model from the checkpoint's own config and test it."""
    if not cfg.get("ckpt"):
        raise BprunError("task=eval needs ckpt=<run folder or .pt file>")
    path = ckpt_io.resolve_checkpoint(cfg.ckpt, "ckpt")
    state = ckpt_io.load_checkpoint(path)
    if Path(cfg.ckpt).is_dir() and state.get("topk") and state["topk"]["entries"]:
        best = path.parent / state["topk"]["entries"][0][1]  # a run folder means its best weights
        if best.is_file():
            path, state = best, ckpt_io.load_checkpoint(best)
    if not state.get("config"):
        raise BprunError(f"{path} carries no config; it was not written by bprun train")
    saved = OmegaConf.create(state["config"])
    s = TrainerSettings(
        **{
            k: v
            for k, v in OmegaConf.to_container(saved.trainer).items()
            if not isinstance(v, dict)
        }
    )
    s.device, s.resume, s.compile = cfg.trainer.device, None, False
    if s.precision == "16-mixed" and resolve_device(s.device).type != "cuda":
        s.precision = "32"  # float16 autocast needs CUDA; evaluate in full precision
    trainer, data = build_trainer(saved, None, s)
    ckpt_io.load_model_state(trainer.module, state["model"], path)
    metrics = trainer.evaluate(data.test, "test")
    out = write_json({"checkpoint": str(path), **metrics}, path.parent / "eval.json")
    for k, v in metrics.items():
        log.info(f"{k:<10} {v:.4f}")
    log.info(f"wrote {out}")
    return metrics.get("test/loss")
