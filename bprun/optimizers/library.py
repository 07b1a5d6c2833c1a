"""Optimizers from maintained libraries (`pip install 'bprun[optim]'`), with the library's own
arguments as config keys: SOAP and schedule-free AdamW from pytorch-optimizer, Shampoo from
heavyball.

Shampoo is heavyball's `KLShampoo` (Lin et al. 2025: Shampoo whose Kronecker factors are
accumulated with the KL correction, applied as the factors' inverse square roots to a momentum
of the gradient). pytorch-optimizer's `Shampoo` (4.1) produced non-finite statistics on the
MNIST-1D CNN within an epoch (and did not train a small Conv1d network with its defaults or
with a larger matrix_eps), and its `ScalableShampoo` keeps Python objects in its state, which
checkpoints read with `torch.load(weights_only=True)` refuse.

Schedule-free AdamW keeps two sets of weights: the ones gradients are taken at, and their
average, which is what evaluation and checkpoints must use. Its `eval()` and `train()`
methods swap between them; the Trainer calls them around validation, test and every
checkpoint save (see `bprun.engine.trainer`).
"""

from __future__ import annotations

from bprun.errors import BprunError

INSTALL = "pip install 'bprun[optim]'"


def _library():
    try:
        import pytorch_optimizer
    except ImportError:
        raise BprunError(
            f"this optimizer comes from the pytorch-optimizer library, which is not installed: {INSTALL}"
        ) from None
    return pytorch_optimizer


def soap(params, **kwargs):
    """pytorch_optimizer.SOAP (Vyas et al. 2024): Adam in Shampoo's eigenbasis."""
    kwargs["betas"] = tuple(kwargs.get("betas", (0.95, 0.95)))
    return _library().SOAP(params, **kwargs)


def adamw_schedulefree(params, **kwargs):
    """pytorch_optimizer.ScheduleFreeAdamW (Defazio et al. 2024)."""
    kwargs["betas"] = tuple(kwargs.get("betas", (0.9, 0.999)))
    return _library().ScheduleFreeAdamW(params, **kwargs)


def _heavyball():
    try:
        import heavyball
        import heavyball.utils
    except ImportError:
        raise BprunError(
            "optim=shampoo comes from the heavyball library (Python 3.11 or newer), which is not "
            f"installed: {INSTALL}"
        ) from None
    return heavyball


def _drop_pickled_schedule(optimizer, state_dict: dict) -> None:
    # heavyball stores its preconditioning schedule as pickled bytes and unpickles whatever
    # a loaded state_dict holds there: a checkpoint must not carry code. The schedule is
    # rebuilt from the config's precond_scheduler, so nothing is lost.
    state_dict.get("heavyball", {}).pop("precond_schedule", None)


def shampoo(params, compile: bool = False, **kwargs):
    """heavyball.KLShampoo (Lin et al. 2025), the KL-corrected Shampoo.

    `compile: false` runs heavyball's kernels eagerly: torch.compile of them takes minutes
    on a CPU. heavyball reads this switch process-wide (`heavyball.utils.compile_mode`).
    """
    _check_numbers(kwargs)
    heavyball = _heavyball()
    if not compile:
        heavyball.utils.compile_mode = None
    kwargs["betas"] = tuple(kwargs.get("betas", (0.9, 0.95)))
    optimizer = heavyball.KLShampoo(params, **kwargs)
    optimizer.register_state_dict_post_hook(_drop_pickled_schedule)
    return optimizer


# Shampoo's settings that must be numbers (heavyball takes any value and fails inside a step),
# with their least value; the counts must be integers.
_NUMBERS = {"lr": 0, "shampoo_beta": 0, "eps": 0, "weight_decay": 0, "init_factor": 0}
_NUMBERS.update({"dampening": 0, "warmup_steps": 0, "precondition_frequency": 1})
_NUMBERS.update({"max_precond_dim": 1})
_COUNTS = ("warmup_steps", "precondition_frequency", "max_precond_dim")


def _check_numbers(settings: dict) -> None:
    for key, least in _NUMBERS.items():
        if key not in settings:
            continue
        value = settings[key]
        kind = int if key in _COUNTS else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < least:
            what = "an integer" if key in _COUNTS else "a number"
            raise BprunError(f"optim.{key}={value!r} must be {what} >= {least} (check optim.{key})")
    betas = settings.get("betas", (0.9, 0.95))
    if len(betas) != 2 or not all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    ):
        raise BprunError(f"optim.betas={list(betas)} must be two numbers in [0, 1)")
