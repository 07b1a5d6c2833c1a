"""`task=lr_find`: the learning-rate range test of the configured run, its chart, and the
command that trains with the suggestion (see `bprun.diagnostics.lr_find`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bprun.diagnostics import plots
from bprun.diagnostics.lr_find import find_lr
from bprun.diagnostics.settings import LrFindSettings
from bprun.errors import BprunError
from bprun.io import write_json
from bprun.tasks.setup import build_trainer, trainer_settings

log = logging.getLogger("bprun")


def rerun_command(overrides: list[str], lr: float) -> str:
    """`bprun <the same overrides> optim.lr=<lr>`, without the lr_find ones."""
    keep = [
        o
        for o in overrides
        if not o.lstrip("+~").startswith(("task=", "optim.lr=", "lr_find.", "lr_find="))
    ]
    return " ".join(["bprun", *map(shlex.quote, keep), f"optim.lr={lr:.3g}"])


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float | None:
    """Build the configured run, sweep, plot, print the suggestion and the command using it."""
    s: LrFindSettings = OmegaConf.to_object(cfg.lr_find)
    if "lr" not in cfg.optim:
        raise BprunError(
            f"optim={cfg.optim.get('_target_')} has no lr to sweep: pick another optim"
        )
    ts = trainer_settings(cfg)
    if ts.fast_dev_run:
        log.warning("task=lr_find skipped: trainer.fast_dev_run=true (as Lightning does)")
        return None
    ts.resume = None
    trainer, data = build_trainer(cfg, None, ts)
    log.info(
        f"lr range test: {s.num_steps} updates, lr {s.min_lr:g} -> {s.max_lr:g} (exponential), "
        f"{type(trainer.module).__name__} with {type(trainer.optimizer).__name__}"
    )
    r = find_lr(trainer, data.train, s)
    if r.stopped_early:
        log.info(f"stopped early after {len(r.lrs)} updates: the loss diverged")
    run_dir = Path(run_dir)
    fig = plots.lr_find_figure(r.lrs, r.losses, r.index, r.suggestion)
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(run_dir))
    try:
        for i, (lr, loss) in enumerate(zip(r.lrs, r.losses, strict=True)):
            writer.add_scalar("lr_find/lr", lr, i + 1)
            if math.isfinite(loss):
                writer.add_scalar("lr_find/smoothed_loss", loss, i + 1)
        png = plots.save(fig, run_dir / "lr_find.png", writer, "lr_find")
    finally:
        writer.close()
    command = rerun_command(list(overrides), r.suggestion) if r.suggestion else None
    write_json(
        {**dataclasses.asdict(r), "settings": dataclasses.asdict(s), "command": command},
        run_dir / "lr_find.json",
    )
    log.info(f"plot: {png}")
    if r.suggestion is None:
        raise BprunError(
            f"lr_find recorded {len(r.lrs)} points, too few for a suggestion: raise "
            "lr_find.num_steps, lower lr_find.skip_begin, or lower lr_find.min_lr"
        )
    log.info(f"suggested learning rate: {r.suggestion:.3g}\ntrain with it:\n  {command}")
    return r.suggestion
