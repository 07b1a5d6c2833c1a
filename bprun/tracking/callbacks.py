"""TensorBoard extras as Trainer callbacks, each one only when its switch is on.

Per-update hooks (`on_before_optimizer_step`, `on_update_end`) run in the hot
loop, so only the histogram callback has one, and it exists only when
`trainer.log_histograms_every_n_epochs` is set.
"""

from __future__ import annotations

import logging
import warnings

import torch

from bprun.engine.callbacks import Callback

log = logging.getLogger("bprun")


class LearningRates(Callback):
    """`lr/group0`, `lr/group1`, ... beside every `lr` the trainer logs.

    The trainer logs `lr` (group 0) at its log intervals and epoch ends; the
    Tracker adds one scalar per parameter group at the same steps, so this
    costs nothing per update.
    """

    def on_fit_start(self, trainer, train_loader) -> None:
        if trainer.tracker is not None:
            trainer.tracker.watch_param_groups(trainer.optimizer.param_groups)


class Histograms(Callback):
    """Weight and gradient histograms per parameter every `every` epochs.

    Weights are logged at the end of such an epoch; gradients in
    `on_before_optimizer_step` of its last update (or of the run's last update
    under `trainer.max_updates`), when they are final: clipped and, with a
    GradScaler, unscaled. LBFGS steps through a closure and gets weights only.
    """

    def __init__(self, every: int):
        self.every = every
        self.updates_per_epoch = 1

    def on_fit_start(self, trainer, train_loader) -> None:
        self.updates_per_epoch = max(1, -(-len(train_loader) // trainer.settings.accumulate))

    def _due(self, trainer) -> bool:
        return trainer.tracker is not None and (trainer.epoch + 1) % self.every == 0

    def on_before_optimizer_step(self, trainer) -> None:
        if not self._due(trainer):
            return
        step = trainer.update + 1
        max_updates = trainer.settings.max_updates
        if step % self.updates_per_epoch and not (max_updates and step >= max_updates):
            return
        scale = 1.0
        if trainer.scaler is not None and trainer.settings.grad_clip.max is None:
            scale = 1.0 / trainer.scaler.get_scale()  # not unscaled without clipping
        for name, p in trainer.module.named_parameters():
            if p.grad is not None:
                trainer.tracker.histogram(f"grads/{name}", p.grad.detach().float() * scale, step)

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if not self._due(trainer):
            return
        for name, p in trainer.module.named_parameters():
            trainer.tracker.histogram(f"weights/{name}", p.detach().float(), trainer.update)


class Graph(Callback):
    """The model graph, traced once on two samples of the first training batch.

    Tracing runs the model in eval mode under a forked RNG, so the run's
    results do not depend on the switch; a model that cannot be traced gets a
    warning and the run goes on.
    """

    def on_fit_start(self, trainer, train_loader) -> None:
        writer = getattr(trainer.tracker, "writer", None)  # TensorBoard's, when it is picked
        if writer is None:
            return
        module = trainer.module
        devices = [trainer.device.index or 0] if trainer.device.type == "cuda" else []
        was_training = module.training
        try:
            with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # jit.trace's deprecation and tracer notes
                x, _ = next(iter(train_loader.batches(0, 0)))
                module.eval()
                writer.add_graph(module, x[:2], use_strict_trace=False)
        except Exception as e:
            text = " ".join(str(e).split())[:200]
            log.warning(
                f"trainer.log_graph: could not trace {type(module).__name__} "
                f"({type(e).__name__}: {text}); the run goes on without the graph"
            )
        finally:
            module.train(was_training)


def tensorboard_callbacks(settings, run_dir) -> list:
    """Trainer callbacks for the TensorBoard extras; none without a run folder."""
    if run_dir is None:
        return []
    callbacks: list = [LearningRates()]
    every = settings.log_histograms_every_n_epochs
    if every is not None:
        callbacks.append(Histograms(every))
    if settings.log_graph:
        callbacks.append(Graph())
    return callbacks
