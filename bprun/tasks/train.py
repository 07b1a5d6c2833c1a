"""`task=train`: build the run, fit, test with the best weights, write metrics.json.

The checkpoint's extra state carries what resume needs to re-create the run:
the resolved config and the command line (`trainer.resume=` itself left out).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bprun.engine import checkpoint as ckpt_io
from bprun.engine.distributed import current
from bprun.errors import Interrupted
from bprun.io import write_json
from bprun.optim import DEFAULT_IMPL, impl_of
from bprun.overrides import key_of
from bprun.search.pruning import search_callbacks
from bprun.tasks.setup import build_trainer, data_state, trainer_settings
from bprun.tracking.console import result_table
from bprun.tracking.trackers import open_trackers

log = logging.getLogger("bprun")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    """Train; returns the best monitored value (None when there is none) for sweepers."""
    started = time.time()
    s = trainer_settings(cfg)
    resumed = ckpt_io.resolve_checkpoint(s.resume) if s.resume else None
    state = ckpt_io.load_checkpoint(resumed, weights=False) if resumed else None
    if state is not None and (done := finished(state, s)):
        log.info(
            f"{run_dir} is finished ({done}); nothing to do. To train on, resume with a larger "
            "trainer.max_epochs or trainer.max_updates"
        )
        best = state["best"].get(s.monitor)
        return float(best) if best is not None and math.isfinite(best) else None
    writes = current().is_main  # under DDP rank 0 alone writes TensorBoard and metrics.json
    tracker = open_trackers(cfg, run_dir, state, overrides, group_choices()) if writes else None
    extra = {
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "overrides": [o for o in overrides if key_of(o) != "trainer.resume"],
        "trackers": tracker.ids if writes else {},  # the MLflow / W&B runs a resume continues
    }
    trainer, data = build_trainer(
        cfg,
        run_dir,
        s,
        tracker=tracker,
        extra_state=extra,
        data_state=data_state(state),
        callbacks=search_callbacks(cfg),
    )
    if data.dataset.classes and writes:  # so that predictions can be named
        write_json(list(data.dataset.classes), run_dir / "classes.json")
    if data.dataset.val_rows is not None and writes:  # a fold of task=cv: what it validated on
        write_json(data.dataset.val_rows, run_dir / "val_rows.json")
    tokenizer = (data.dataset.state or {}).get("tokenizer")
    if tokenizer is not None and writes:  # how the run reads (and writes) text
        from bprun.data.tokenizer import save_state

        save_state(tokenizer, run_dir / "tokenizer.json")
    trainer.check_monitors(validates=data.val is not None)
    problem = trainer.problem
    log.info(f"{problem.describe()}; monitoring {s.monitor} ({s.mode})")
    if state is not None:
        kept = trainer.extra_state
        trainer.load_state_dict(state, resumed)
        trainer.extra_state = kept  # this run's command line (and data state), for the next resume
        log.info(f"resumed from {resumed} at epoch {trainer.epoch + 1}, update {trainer.update}")
    elif writes:
        tracker.text("config", "```\n" + extra["config"] + "\n```")
    n_params = sum(p.numel() for p in trainer.module.parameters())
    impl = impl_of(trainer.optimizer.param_groups)
    log.info(
        f"optimizer {type(trainer.optimizer).__name__}, {impl} implementation "
        f"(optim.impl={cfg.optim.get('impl', DEFAULT_IMPL)})"
    )
    trainable = sum(p.numel() for p in trainer.module.parameters() if p.requires_grad)
    log.info(
        f"{model_name(trainer.module)} with {n_params:,} parameters ({trainable:,} trainable) "
        f"on {trainer.device}; "
        f"{data.train.num_samples} train / {data.val.num_samples if data.val else 0} val / "
        f"{data.test.num_samples} test samples; run folder {run_dir}"
        + (f"; {trainer.dist.world_size} ranks" if trainer.dist.enabled else "")
    )

    summary = {"status": "running", "monitor": s.monitor, "mode": s.mode, "run_dir": str(run_dir)}
    summary["problem"] = problem.kind
    summary["optimizer"] = {"name": type(trainer.optimizer).__name__, "impl": impl}
    summary["rehearsal_s"] = getattr(trainer, "rehearsal_seconds", None)  # the dry run's cost
    try:
        trainer.fit(data.train, data.val)
        threshold = decision_threshold(problem, trainer.best)
        if threshold is not None:
            summary["threshold"] = threshold
        summary["test"] = trainer.test(data.test)
        if writes:
            tracker.log(summary["test"], trainer.update)
            problem.report(trainer.last_evaluation, run_dir, "test", tracker)
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
            fit_time_s=getattr(trainer, "fit_seconds", None),
            fit_cpu_s=getattr(trainer, "fit_cpu_seconds", None),
            history=trainer.history,
        )
        if resumed:
            summary["resumed_from"] = str(resumed)
        trainer.summarize(summary)
        if writes:
            summary["world_size"] = trainer.dist.world_size
            write_json(summary, run_dir / "metrics.json")
            tracker.finish(cfg, summary, group_choices())
            tracker.close()
    log.info(result_table(summary))
    best = trainer.best.get(s.monitor)
    return float(best) if best is not None and math.isfinite(best) else None


def model_name(module) -> str:
    """The model's class name (FSDP2 wraps a sharded model's class in `FSDP<name>`)."""
    name = type(module).__name__
    wrapped = [c.__name__ for c in type(module).__mro__[1:] if c.__name__ == name[4:]]
    return wrapped[0] if name.startswith("FSDP") and wrapped else name


def decision_threshold(problem, best: dict) -> float | None:
    """`problem.threshold=auto`: the best validation F1's threshold of the best epoch, set on the
    problem for the test split (and recorded in metrics.json for task=eval); None otherwise."""
    if not getattr(problem, "auto_threshold", False):
        return None
    value = best.get("val/best_threshold")
    if value is None:
        log.warning(
            "problem.threshold=auto found no val/best_threshold (no validation split, or one "
            "class in it): the test split uses 0.5"
        )
        return None
    problem.set_threshold(value)
    log.info(f"problem.threshold=auto: {value:.4f}, the best F1 on the validation split")
    return float(value)


def finished(state: dict, s) -> str | None:
    """Why a checkpoint's run needs no more training under settings `s`, or None."""
    progress = state["progress"]
    reason = (state.get("early_stopping") or {}).get("stopped_reason")
    if progress["epoch"] >= s.max_epochs:
        return f"epoch {progress['epoch']} of trainer.max_epochs={s.max_epochs}"
    if s.max_updates is not None and progress["update"] >= s.max_updates:
        return f"update {progress['update']} of trainer.max_updates={s.max_updates}"
    if reason and progress["batch"] == 0:
        return f"early stopping: {reason}"
    return None


def group_choices() -> dict[str, str]:
    """The config groups picked (`optim: adamw`), for TensorBoard's HPARAMS tab."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {k: str(v) for k, v in HydraConfig.get().runtime.choices.items() if v is not None}
