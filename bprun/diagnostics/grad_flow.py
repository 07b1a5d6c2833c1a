"""Gradient flow: per-layer gradient norms, update-to-weight ratios, the vanishing/exploding
watch and the gradient-flow chart, as one Trainer callback sharing its gradient reads.

Cost model: nothing runs on an update that no instrument needs. Norms and
ratios are computed on log-interval updates only (`trainer.log_every_n_updates`);
the watch needs one norm per layer every update, which stays on the device
(`GradWatch`); chart epochs add two norms per layer per update. All numbers
reach the host in one read per log interval.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from bprun.diagnostics import plots
from bprun.diagnostics.norms import grads, is_weight, named_trainable, stacked_norms
from bprun.diagnostics.watch import GradWatch, describe
from bprun.engine.callbacks import Callback

log = logging.getLogger("bprun")


class GradientMonitor(Callback):
    """TensorBoard tags: `grad_norm/<param>` for every parameter, `update_ratio/<weight>`
    (||dW|| / ||W|| of the update, for weight matrices and kernels), `grad_watch/<kind>_layers` (layers now in an episode) and the `grad_watch` text;
    images `grad_flow`. Charts also land in `<run>/grad_flow/epoch_NNN.png`. Watch events
    are counted per epoch in the epoch metrics and listed in metrics.json."""

    def __init__(self, settings, run_dir):
        self.every = settings.log_every_n_updates
        self.log_norms = settings.log_grad_norms
        self.flow_every = settings.grad_flow_every_n_epochs
        self.watch_settings = settings.grad_watch
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.events: list[dict] = []
        self.watch: GradWatch | None = None

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, train_loader) -> None:
        self.names, self.params = named_trainable(trainer.module)
        picked = [i for i, p in enumerate(self.params) if is_weight(p)]
        self.weight_names = [self.names[i] for i in picked]
        self.weights = [self.params[i] for i in picked]
        device = trainer.device
        self.numel = torch.tensor([float(p.numel()) for p in self.weights], device=device)
        # With float16 loss scaling and no clipping, the gradients are still scaled here.
        self.unscale = trainer.scaler is not None and trainer.settings.grad_clip.max is None
        if trainer.uses_closure:
            log.warning(
                "optim=lbfgs steps inside its closure: the gradient-flow instruments see no "
                "gradients and log nothing"
            )
        w = self.watch_settings
        if not self.weights:
            log.warning(
                f"{type(trainer.module).__name__} has no weight matrices or kernels: the "
                "gradient watch and the gradient-flow chart have nothing to show"
            )
            self.flow_every = None
        elif w.vanish_below is not None or w.explode_above is not None:
            self.watch = GradWatch(
                self.weight_names, w.vanish_below, w.explode_above, w.patience, device
            )
            self.watch.window_start = trainer.update
        self._epoch_seen = 0
        self._gn = self._before = None
        self._flow: list = []

    def on_before_optimizer_step(self, trainer) -> None:
        update = trainer.update + 1
        log_now = self.log_norms and update % self.every == 0
        flow = self._chart_epoch(trainer)
        if self.watch is None and not log_now and not flow:
            return
        if self.unscale:
            trainer.scaler.unscale_(trainer.optimizer)
        if self.watch is not None or flow:
            g = grads(self.weights)
            if self.watch is not None:
                self.watch.step(stacked_norms(g), update)
            if flow:
                mean = stacked_norms(g, 1.0) / self.numel
                peak = stacked_norms(g, math.inf)
                if self._flow:
                    self._flow[0] += mean
                    torch.maximum(self._flow[1], peak, out=self._flow[1])
                    self._flow[2] += 1
                else:
                    self._flow = [mean, peak, 1]
        if log_now:
            self._gn = stacked_norms(grads(self.params))
            self._before = ([p.detach().clone() for p in self.weights], update)

    def on_update_end(self, trainer) -> None:
        update = trainer.update
        if update % self.every:
            return
        payload = []
        ratios = self._before is not None and self._before[1] == update
        if ratios:
            payload.append(self._gn)
            before = self._before[0]
            if before:
                delta = torch._foreach_sub([p.detach() for p in self.weights], before)
                payload.append(stacked_norms(delta) / stacked_norms(before).clamp_min(1e-12))
        if self.watch is not None:
            payload.append(self.watch.state())
        self._gn = self._before = None
        if not payload:
            return
        values = torch.cat(payload).tolist()  # the one host read of this log interval
        scalars = {}
        if ratios:
            n, m = len(self.names), len(self.weight_names)
            scalars.update(
                {f"grad_norm/{k}": v for k, v in zip(self.names, values[:n], strict=True)}
            )
            ratio = values[n : n + m]
            scalars.update(
                {f"update_ratio/{k}": v for k, v in zip(self.weight_names, ratio, strict=True)}
            )
            values = values[n + m :]
        if self.watch is not None:
            scalars.update(self._report(trainer, values, update))
        if trainer.tracker is not None and scalars:
            trainer.tracker.log(scalars, update)

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if self.watch is not None:
            if trainer.update != self.watch.window_start:
                values = self.watch.state().tolist()
                scalars = self._report(trainer, values, trainer.update)
                if trainer.tracker is not None:
                    trainer.tracker.log(scalars, trainer.update)
            new = self.events[self._epoch_seen :]
            self._epoch_seen = len(self.events)
            for kind, _ in self.watch.kinds:
                metrics[f"grad_watch/{kind}_events"] = sum(e["kind"] == kind for e in new)
        if self._chart_epoch(trainer) and self._flow:
            self._chart(trainer)

    # ------------------------------------------------------------------ pieces
    def on_summary(self, trainer, summary: dict) -> None:
        if self.events:
            summary["grad_watch_events"] = self.events

    def _chart_epoch(self, trainer) -> bool:
        return bool(self.flow_every) and (trainer.epoch + 1) % self.flow_every == 0

    def _report(self, trainer, values: list[float], update: int) -> dict:
        events, active = self.watch.read(values, update)
        if events:
            self.events.extend(events)
            lines = describe(events)
            for line in lines:
                log.warning(line)
            if trainer.tracker is not None:
                trainer.tracker.text("grad_watch", "\n\n".join(lines), update)
        return {f"grad_watch/{kind}_layers": float(n) for kind, n in active.items()}

    def _chart(self, trainer) -> None:
        total, peak, count = self._flow
        self._flow = []
        mean = (total / count).tolist()
        epoch = trainer.epoch + 1
        fig = plots.grad_flow_figure(
            self.weight_names,
            mean,
            peak.tolist(),
            f"gradient flow, epoch {epoch} (mean and max over its {count} updates)",
        )
        writer = trainer.tracker.writer if trainer.tracker is not None else None
        if self.run_dir is not None:
            path = self.run_dir / "grad_flow" / f"epoch_{epoch:03d}.png"
            plots.save(fig, path, writer, "grad_flow", trainer.update)
            log.info(f"gradient-flow chart: {path}")
        elif writer is not None:
            writer.add_image("grad_flow", plots.to_rgb(fig), trainer.update, dataformats="HWC")
