"""`task=meta`: MAML on a distribution of tasks (`dataset=sine_tasks`), then the adaptation to
held-out tasks measured after 0, 1 and k inner steps, beside a network trained jointly on the
same points and fine-tuned the same way. Writes metrics.json, TensorBoard events and
checkpoints/last.pt (resume with `trainer.resume=<run folder>`), see `bprun.meta`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bprun.build import build_loss, build_model, build_optimizer, build_scheduler, build_tasks
from bprun.engine import checkpoint as ckpt_io
from bprun.engine.settings import TrainerSettings
from bprun.errors import BprunError, Interrupted
from bprun.io import write_json
from bprun.meta.settings import MetaSettings
from bprun.meta.trainer import Learner, MetaTrainer
from bprun.overrides import key_of
from bprun.problems.regression import Regression
from bprun.tasks.setup import seed_everything, setup_device, trainer_settings
from bprun.tasks.train import group_choices
from bprun.tracking.tensorboard import Tracker, log_hparams

log = logging.getLogger("bprun")

MONITOR = "test/mse_1step"  # the value returned to sweepers: the paper's one-step MSE

# The trainer settings task=meta reads; any other one changed from its default is refused.
TRAINER_KEYS = (
    "device", "threads", "progress", "log_every_n_updates", "grad_clip", "checkpoint", "resume",
    "devices", "fast_dev_run",
)  # fmt: skip


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float:
    """Meta-train, evaluate on held-out tasks, write metrics.json; returns the 1-step MSE."""
    started = time.time()
    s: MetaSettings = OmegaConf.to_object(cfg.meta)
    check_trainer_settings(OmegaConf.to_object(cfg.trainer))  # as given, before fast_dev_run
    ts = trainer_settings(cfg)
    if ts.fast_dev_run:  # a smoke test, as in training: a couple of updates, no checkpoints
        s.iterations, s.eval_tasks = 2, min(s.eval_tasks, 10)
    resumed = ckpt_io.resolve_checkpoint(ts.resume) if ts.resume else None
    state = ckpt_io.load_checkpoint(resumed) if resumed else None
    check_resume(state, s, cfg, resumed)
    device = setup_device(ts)
    tasks = build_tasks(cfg.dataset)
    loss_fn = build_loss(cfg.loss, Regression(num_classes=1))  # each task: y = f(x), one output
    learner = build_learner(cfg, tasks, s, device)
    # The baseline starts from the same initial weights: the run's seed is set again first.
    baseline = build_learner(cfg, tasks, s, device) if s.baseline else None
    run_dir = Path(run_dir)
    tracker = Tracker(run_dir, purge_step=state["progress"]["iteration"] + 1 if state else None)
    extra = {
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "overrides": [o for o in overrides if key_of(o) != "trainer.resume"],
    }
    trainer = MetaTrainer(
        s,
        tasks,
        learner,
        loss_fn,
        baseline=baseline,
        seed=cfg.seed,
        device=device,
        run_dir=None if ts.fast_dev_run else run_dir,
        checkpoint=ts.checkpoint,
        grad_clip=ts.grad_clip,
        log_every=ts.log_every_n_updates,
        progress=ts.progress,
        tracker=tracker,
        extra_state=extra,
    )
    if state is not None:
        trainer.load_state_dict(state, resumed)
        log.info(f"resumed from {resumed} at meta-iteration {trainer.iteration}")
    else:
        tracker.text("config", "```\n" + extra["config"] + "\n```")
    n_params = sum(p.numel() for p in learner.model.parameters())
    log.info(
        f"{s.algorithm.upper()} on {tasks!r}: {type(learner.model).__name__} with {n_params:,} "
        f"parameters on {device}; {s.iterations} meta-iterations of {s.tasks_per_batch} tasks, "
        f"{s.shots} shots + {s.query} query points each, {s.inner_steps} inner step(s) at "
        f"lr {s.inner_lr:g}; outer {type(learner.optimizer).__name__} at lr "
        f"{learner.optimizer.param_groups[0]['lr']:g}"
        + ("; a jointly trained baseline beside it" if baseline is not None else "")
        + f"; run folder {run_dir}"
    )

    summary = {"status": "running", "task": "meta", "algorithm": s.algorithm}
    summary.update(monitor=MONITOR, mode="min", run_dir=str(run_dir))
    try:
        trainer.fit()
        fit_seconds = time.time() - started
        losses = trainer.evaluate(s.eval_seed)
        summary["adaptation"] = adaptation_summary(losses, s)
        summary["test"] = flat_metrics(summary["adaptation"], s)
        summary["best"] = {MONITOR: summary["test"][MONITOR]}
        tracker.log(summary["test"], trainer.iteration)
        for name, curve in summary["adaptation"].items():
            for step, value in enumerate(curve["mse"]):
                tracker.log({f"adaptation/{name}_mse": value}, step)
        summary["fit_time_s"] = fit_seconds
        summary["status"] = "completed"
    except BaseException as e:
        stopped = isinstance(e, (KeyboardInterrupt, Interrupted))
        summary["status"] = "interrupted" if stopped else "failed"
        summary["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise
    finally:
        summary.update(
            iterations=trainer.iteration,
            updates=trainer.iteration,
            epochs=None,
            wall_time_s=time.time() - started,
            settings=dataclasses.asdict(s),
            history=trainer.history,
        )
        if resumed:
            summary["resumed_from"] = str(resumed)
        write_json(summary, run_dir / "metrics.json")
        log_hparams(tracker, cfg, summary, group_choices())
        tracker.close()
    log.info(adaptation_table(summary["adaptation"], s))
    return summary["test"][MONITOR]


def check_trainer_settings(ts: TrainerSettings) -> None:
    """A trainer setting that task=meta would ignore is an error, not a silent no-op."""
    defaults = TrainerSettings()
    for field in dataclasses.fields(TrainerSettings):
        if field.name in TRAINER_KEYS:
            continue
        if getattr(ts, field.name) != getattr(defaults, field.name):
            hint = "; meta.iterations sets the length" if "max_" in field.name else ""
            raise BprunError(
                f"trainer.{field.name} is not used by task=meta: drop it{hint} (task=meta reads "
                f"trainer.{', trainer.'.join(TRAINER_KEYS[:6])} and the meta.* settings)"
            )
    if ts.checkpoint.save_top_k != defaults.checkpoint.save_top_k:
        raise BprunError(
            "trainer.checkpoint.save_top_k is not used by task=meta, which keeps "
            "checkpoints/last.pt only: drop it"
        )


def check_resume(state: dict | None, s: MetaSettings, cfg: DictConfig, path) -> None:
    """A resumed schedule must keep the length it was built for."""
    if state is None or state.get("kind") != "meta":
        return  # MetaTrainer.load_state_dict names a checkpoint of another task
    before = state["progress"]["iterations"]
    if cfg.sched.get("_target_") and before != s.iterations:
        raise BprunError(
            f"{path} was trained with meta.iterations={before}, which its sched was built for: "
            f"resume with meta.iterations={before}, or with sched=none"
        )
    if state["progress"]["iteration"] >= s.iterations:
        log.info(
            f"{path} finished its {state['progress']['iteration']} meta-iterations; evaluating "
            "(to train on, resume with a larger meta.iterations)"
        )


def build_learner(cfg: DictConfig, tasks, s: MetaSettings, device: torch.device) -> Learner:
    """Model (seeded by the run's seed), outer optimizer and schedule, one scheduler step per
    meta-iteration."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model, tasks).to(device)
    norms = (torch.nn.modules.batchnorm._BatchNorm,)
    if any(isinstance(m, norms) for m in model.modules()):
        raise BprunError(
            "task=meta runs the network on weights held apart from it (one copy per task), where "
            "BatchNorm's running statistics cannot be updated: use model.norm=layer or none"
        )
    optimizer = build_optimizer(cfg.optim, model)
    if isinstance(optimizer, torch.optim.LBFGS):
        raise BprunError("optim=lbfgs needs a closure, which task=meta does not give: use adam")
    if str(cfg.sched.get("_target_", "")).endswith("ReduceLROnPlateau"):
        raise BprunError(
            "sched=plateau reads a validation metric, which task=meta has not during training: "
            "use sched=none, cosine or step"
        )
    scheduler, _ = build_scheduler(cfg.sched, optimizer, 1, s.iterations)
    return Learner(model, optimizer, scheduler)


def adaptation_summary(losses: dict[str, torch.Tensor], s: MetaSettings) -> dict:
    """Per network: the mean query MSE over the held-out tasks after 0..k inner steps, and
    the half-width of its 95% confidence interval (as the paper reports)."""
    out = {}
    for name, per_task in losses.items():  # (steps + 1, tasks)
        per_task = per_task.double().cpu()
        ci = 1.96 * per_task.std(dim=1) / per_task.shape[1] ** 0.5
        out[name] = {
            "inner_steps": list(range(s.eval_steps + 1)),
            "mse": per_task.mean(dim=1).tolist(),
            "ci95": ci.nan_to_num().tolist(),
            "tasks": per_task.shape[1],
            "shots": s.shots,
            "query_points": s.eval_query,
            "inner_lr": s.inner_lr,
        }
    return out


def flat_metrics(adaptation: dict, s: MetaSettings) -> dict[str, float]:
    """`test/mse_<n>step` of the meta-learned network, `test/baseline_mse_<n>step` of the
    baseline, for n = 0, 1 and k: what sweep summaries and TensorBoard's HPARAMS tab show."""
    flat = {}
    for name, curve in adaptation.items():
        prefix = "test/baseline_" if name == "baseline" else "test/"
        for n in sorted({0, 1, s.eval_steps}):
            flat[f"{prefix}mse_{n}step"] = curve["mse"][n]
    return flat


def adaptation_table(adaptation: dict, s: MetaSettings) -> str:
    steps = sorted({0, 1, s.eval_steps})
    first = next(iter(adaptation.values()))
    head = "".join(f"{f'{n} step' + ('s' if n != 1 else ''):>16}" for n in steps)
    lines = [
        "",
        f"Query MSE on {first['tasks']} held-out tasks after inner steps on {s.shots} points "
        f"(lr {s.inner_lr:g}), mean +- 95% CI",
        f"  {'':<10}{head}",
    ]
    for name, curve in adaptation.items():
        cells = "".join(f"{curve['mse'][n]:.3f} +- {curve['ci95'][n]:.2f}".rjust(16) for n in steps)
        lines.append(f"  {name:<10}{cells}")
    return "\n".join(lines)
