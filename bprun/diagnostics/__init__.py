"""Instruments for seeing backpropagation at work: gradient flow, gradient checks, lr finder.

Training-time instruments are Trainer callbacks, built here only for the
settings switched on, so a run with all of them off has no callback at all:

    trainer.log_grad_norms=true            grad_norm/<param>, update_ratio/<param>
    trainer.grad_flow_every_n_epochs=N     <run>/grad_flow/epoch_NNN.png + TensorBoard image
    trainer.grad_watch.vanish_below=X      warn when a layer's gradient norm stays below X
    trainer.grad_watch.explode_above=Y     ... or above Y, for grad_watch.patience updates
    trainer.dead_units=true                dead_units/<layer>
    trainer.detect_anomaly=true            name the layer and op that produced NaN/inf

The tasks `task=gradcheck` and `task=lr_find` live in `gradcheck.py` and `lr_find.py`.
Modules importing torch are imported lazily, so that config validation stays light.
"""


def diagnostic_callbacks(settings, run_dir) -> list:
    """Trainer callbacks for the instruments switched on in `settings`."""
    callbacks: list = []
    watch = settings.grad_watch
    if (
        settings.log_grad_norms
        or settings.grad_flow_every_n_epochs
        or watch.vanish_below is not None
        or watch.explode_above is not None
    ):
        from bprun.diagnostics.grad_flow import GradientMonitor

        callbacks.append(GradientMonitor(settings, run_dir))
    if settings.dead_units:
        from bprun.diagnostics.dead_units import DeadUnits

        callbacks.append(DeadUnits(settings))
    if settings.detect_anomaly:
        from bprun.diagnostics.anomaly import AnomalyLocator

        callbacks.append(AnomalyLocator(settings))
    return callbacks
