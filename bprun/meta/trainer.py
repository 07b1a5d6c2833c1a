"""The meta-training loop: MAML's meta-updates and, in lockstep on the same points, the
jointly trained baseline; checkpoints, signals and exact resume as the Trainer has them.

Like `bprun.engine.Trainer` it takes objects and settings and knows nothing of Hydra. The
task stream comes from one seeded `torch.Generator`, whose state the checkpoint holds with
everything else that decides the rest of the run, so a resumed run ends on the same weights.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from bprun.engine import checkpoint as ckpt_io
from bprun.engine.settings import Checkpointing, GradClip
from bprun.engine.signals import StopSignals
from bprun.errors import BprunError, Interrupted
from bprun.meta import maml
from bprun.meta.settings import MetaSettings

log = logging.getLogger("bprun")


@dataclass
class Learner:
    """A network with its optimizer and (optional) schedule."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object | None = None

    def step(self, loss: torch.Tensor, clip: GradClip) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip.max is not None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            if clip.algorithm == "norm":
                nn.utils.clip_grad_norm_(params, clip.max)
            else:
                nn.utils.clip_grad_value_(params, clip.max)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
        }

    def load_state_dict(self, state: dict, path: str | Path) -> None:
        ckpt_io.load_model_state(self.model, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])


class MetaTrainer:
    """Meta-trains `learner` on tasks drawn from `tasks` (see `bprun.meta.sine`) and, when
    given, trains `baseline` jointly on the same points."""

    def __init__(
        self,
        settings: MetaSettings,
        tasks,
        learner: Learner,
        loss_fn: nn.Module,
        *,
        baseline: Learner | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        run_dir: Path | None = None,
        checkpoint: Checkpointing | None = None,
        grad_clip: GradClip | None = None,
        log_every: int = 50,
        progress: bool = True,
        tracker=None,
        extra_state: dict | None = None,
    ):
        self.settings, self.tasks, self.loss_fn = settings, tasks, loss_fn
        self.learner, self.baseline = learner, baseline
        self.device = torch.device(device)
        self.tracker, self.extra_state = tracker, extra_state or {}
        self.grad_clip = grad_clip or GradClip()
        self.log_every, self.progress = log_every, progress
        self.checkpoint = checkpoint or Checkpointing()
        self.ckpt_dir = Path(run_dir) / "checkpoints" if run_dir is not None else None
        self.checkpointing = self.checkpoint.enabled and self.ckpt_dir is not None
        # The training tasks' own stream, apart from the held-out tasks' (see evaluate).
        self.generator = torch.Generator().manual_seed(stream_seed(seed, "train"))
        self.iteration = 0  # meta-updates done
        self.history: list[dict] = []  # the logged means, one entry per log interval
        self._sums: dict[str, torch.Tensor] = {}  # running sums on the device, read when logged
        self._count = 0
        self._last_saved: Path | None = None
        self._last_written = 0.0

    # ------------------------------------------------------------------ training
    def fit(self) -> None:
        s = self.settings
        self._last_written = time.perf_counter()
        bar = self._bar()
        with StopSignals() as signals:
            while self.iteration < s.iterations:
                self.step()
                if bar is not None:
                    bar.update(1)
                if self.iteration % self.log_every == 0 or self.iteration == s.iterations:
                    self._flush_log()
                if self.checkpointing and self.iteration < s.iterations and self._save_due():
                    self.save()
                if signals.received is not None:
                    self._interrupt(signals.received)
        if bar is not None:
            bar.close()
        if self.checkpointing:
            self.save()

    def step(self) -> None:
        """One meta-update on a fresh batch of tasks; the baseline trains on the same points."""
        s = self.settings
        batch = self.tasks.sample(s.tasks_per_batch, s.shots, s.query, self.generator)
        batch = batch.to(self.device)
        model = self.learner.model
        steps, lr = s.inner_steps, s.inner_lr
        loss = maml.meta_loss(
            model, self.loss_fn, batch.support, batch.query, steps, lr, s.first_order
        )
        self.learner.step(loss, self.grad_clip)
        self._add("meta/query_loss", loss)
        if self.baseline is not None:
            x, y = batch.x.flatten(0, 1), batch.y.flatten(0, 1)  # all points of all tasks
            loss = self.loss_fn(self.baseline.model(x), y)
            self.baseline.step(loss, self.grad_clip)
            self._add("baseline/loss", loss)
        self.iteration += 1
        self._count += 1

    def _add(self, name: str, loss: torch.Tensor) -> None:
        self._sums[name] = self._sums.get(name, 0) + loss.detach()

    def _flush_log(self) -> None:
        """Log the means since the last flush: one host sync per log interval, not per step."""
        if not self._count:
            return
        self._check_finite()
        means = {name: float(total) / self._count for name, total in self._sums.items()}
        self._sums, self._count = {}, 0
        means["lr"] = self.learner.optimizer.param_groups[0]["lr"]
        self.history.append({"iteration": self.iteration, **means})
        if self.tracker is not None:
            self.tracker.log(means, self.iteration)
        tenth = max(1, self.settings.iterations // 10)
        if self.iteration % tenth < self.log_every or self.iteration == self.settings.iterations:
            shown = "  ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "lr")
            log.info(f"meta-iteration {self.iteration:>6}/{self.settings.iterations}  {shown}")

    def _check_finite(self) -> None:
        """Stop on a non-finite loss or weight, before a checkpoint keeps it."""
        learners = {"meta": self.learner, "baseline": self.baseline}
        tensors = {name: total for name, total in self._sums.items()}
        for name, learner in learners.items():
            if learner is not None:
                params = [p.detach().flatten() for p in learner.model.parameters()]
                tensors[f"{name} weights"] = torch.cat(params)
        finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
        bad = [name for name, ok in zip(tensors, finite, strict=True) if not ok]
        if bad:
            last = self._last_saved or "none was written"
            raise BprunError(
                f"{', '.join(bad)} became non-finite by meta-iteration {self.iteration}; last "
                f"good checkpoint: {last}. Lower optim.lr or meta.inner_lr, or set "
                "trainer.grad_clip.max"
            )

    def _bar(self):
        if not (self.progress and sys.stdout.isatty()):
            return None
        return tqdm(
            total=self.settings.iterations,
            initial=self.iteration,
            desc="meta-training",
            unit="it",
            leave=False,
            dynamic_ncols=True,
        )

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, seed: int) -> dict[str, torch.Tensor]:
        """(steps + 1, tasks) query losses on the held-out tasks, per network (`maml` or
        `fomaml`, and `baseline`), after 0..meta.eval_steps inner steps on each support set."""
        s = self.settings
        generator = torch.Generator().manual_seed(stream_seed(seed, "eval"))
        batch = self.tasks.sample(s.eval_tasks, s.shots, s.eval_query, generator).to(self.device)
        networks = {s.algorithm: self.learner.model}
        if self.baseline is not None:
            networks["baseline"] = self.baseline.model
        return {
            name: maml.adaptation_losses(
                model, self.loss_fn, batch.support, batch.query, s.eval_steps, s.inner_lr
            )
            for name, model in networks.items()
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "format": ckpt_io.FORMAT_VERSION,
            "kind": "meta",
            "model": self.learner.model.state_dict(),
            "learner": self.learner.state_dict(),
            "baseline": self.baseline.state_dict() if self.baseline is not None else None,
            "generator": self.generator.get_state(),
            "rng": ckpt_io.rng_state(),
            "progress": {"iteration": self.iteration, "iterations": self.settings.iterations},
            "history": list(self.history),
            "pending": {"sums": dict(self._sums), "count": self._count},  # the unlogged losses
            "extra": self.extra_state,
        }

    def load_state_dict(self, state: dict, path: str | Path = "checkpoint") -> None:
        if state.get("kind") != "meta":
            raise BprunError(
                f"{path} was written by task=train, not task=meta: resume it with its own task"
            )
        if (state["baseline"] is None) != (self.baseline is None):
            saved = "true" if state["baseline"] is not None else "false"
            raise BprunError(f"{path} was trained with meta.baseline={saved}: resume with it")
        self.learner.load_state_dict(state["learner"], path)
        if self.baseline is not None:
            self.baseline.load_state_dict(state["baseline"], path)
        self.generator.set_state(state["generator"])
        ckpt_io.set_rng_state(state["rng"])
        self.iteration = state["progress"]["iteration"]
        self.history = list(state["history"])
        self._sums = {k: v.to(self.device) for k, v in state["pending"]["sums"].items()}
        self._count = state["pending"]["count"]
        self._last_saved = Path(path)

    def save(self) -> Path:
        """last.pt, written atomically, once losses and weights are checked to be finite."""
        self._check_finite()
        path = ckpt_io.atomic_save(self.state_dict(), self.ckpt_dir / "last.pt")
        self._last_saved, self._last_written = path, time.perf_counter()
        return path

    def _save_due(self) -> bool:
        every_n, every_s = self.checkpoint.every_n_updates, self.checkpoint.last_every_n_seconds
        if every_n and self.iteration % every_n == 0:
            return True
        return bool(every_s) and time.perf_counter() - self._last_written >= every_s

    def _interrupt(self, signum: int) -> None:
        import signal

        where = ""
        if self.checkpointing:
            path = self.save()
            where = f"; saved {path}. Resume with:\n  bprun trainer.resume={path.parent.parent}"
        raise Interrupted(
            f"stopped by {signal.Signals(signum).name} after meta-iteration {self.iteration}"
            + where,
            signum,
        )


def stream_seed(seed: int, stream: str) -> int:
    """A seed for one named random stream of a run: the training tasks and the held-out ones
    never coincide, whatever `seed` and `meta.eval_seed` are."""
    import numpy as np

    key = [seed % 2**32, seed // 2**32 % 2**32, *stream.encode()]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1)
