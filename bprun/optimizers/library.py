"""Optimizers from pytorch-optimizer (`pip install 'bprun[optim]'`): SOAP and schedule-free
AdamW, with the library's own arguments as config keys.

Shampoo is not offered: the library's `Shampoo` (4.1) produces non-finite statistics on the
MNIST-1D CNN within an epoch, and its `ScalableShampoo` keeps Python objects in its state,
which checkpoints read with `torch.load(weights_only=True)` refuse.

Schedule-free AdamW keeps two sets of weights: the ones gradients are taken at, and their
average, which is what evaluation and checkpoints must use. Its `eval()` and `train()`
methods swap between them; the Trainer calls them around validation, test and every
checkpoint save (see `bprun.engine.trainer`).
"""

from __future__ import annotations

from bprun.errors import BprunError


def _library():
    try:
        import pytorch_optimizer
    except ImportError:
        raise BprunError(
            "this optimizer comes from the pytorch-optimizer library, which is not installed: "
            "pip install 'bprun[optim]'"
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
