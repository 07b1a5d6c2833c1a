"""`optim.impl`: which of torch's kernels an optimizer steps with.

It lives in the engine because the Trainer checks, on resume, that a checkpoint
steps with the kernel it was trained with (`impl_of`); `bprun.optim` re-exports it.
"""

from __future__ import annotations

import inspect

import torch

from bprun.errors import BprunError

# `optim.impl`: which of torch's kernels an optimizer steps with. `fused` updates every
# parameter in one kernel per tensor group, `foreach` batches the element-wise ops over the
# parameter list, `single` loops over parameters (torch's own default on the CPU).
IMPLS = ("auto", "fused", "foreach", "single")
DEFAULT_IMPL = "auto"


def _accepts(make, name: str) -> bool:
    func = getattr(make, "func", make)  # a functools.partial from `_partial_: true`
    try:
        return name in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False


def _name(make) -> str:
    func = getattr(make, "func", make)
    return getattr(func, "__name__", str(func))


def choose_impl(make, params: list[torch.Tensor], impl: str) -> str:
    """The implementation `impl` means for this optimizer class and these parameters.

    `auto` follows torch's own support lists: fused where the class has a fused
    kernel for the parameters' device and dtype, else foreach where the device has
    foreach kernels, else single. An explicit choice the class or device cannot
    run is a BprunError naming what would.
    """
    from torch.utils._foreach_utils import (
        _get_foreach_kernels_supported_devices,
        _get_fused_kernels_supported_devices,
    )

    if impl not in IMPLS:
        raise BprunError(f"optim.impl='{impl}' is not known: choose one of {', '.join(IMPLS)}")
    has_fused, has_foreach = _accepts(make, "fused"), _accepts(make, "foreach")
    devices = {p.device.type for p in params}
    sharded = any(hasattr(p, "device_mesh") for p in params)  # FSDP's DTensor parameters
    fused_ok = (
        has_fused
        and not sharded  # DTensor has sharding rules for the foreach kernels, not all fused ones
        and devices <= set(_get_fused_kernels_supported_devices())
        and all(torch.is_floating_point(p) for p in params)
    )
    foreach_ok = has_foreach and devices <= set(_get_foreach_kernels_supported_devices())
    if impl == "auto":
        return "fused" if fused_ok else "foreach" if foreach_ok else "single"
    if impl == "fused" and not fused_ok:
        where = "has no fused kernel" if not has_fused else f"has no fused kernel on {devices}"
        if has_fused and sharded:
            where = "has no fused kernel for sharded (trainer.strategy=fsdp) parameters"
        other = "foreach" if has_foreach else "single"
        raise BprunError(
            f"optim.impl=fused: {_name(make)} {where}: use optim.impl=auto or optim.impl={other}"
        )
    if impl == "foreach" and not has_foreach:
        raise BprunError(
            f"optim.impl=foreach: {_name(make)} has no foreach implementation: "
            "use optim.impl=auto or optim.impl=single"
        )
    return impl


def impl_kwargs(make, impl: str) -> dict:
    """The constructor arguments that select `impl` (none for a class without the choice)."""
    kwargs = {}
    if _accepts(make, "fused"):
        kwargs["fused"] = impl == "fused"
    if _accepts(make, "foreach"):
        kwargs["foreach"] = impl == "foreach"
    return kwargs


def impl_of(param_groups: list[dict]) -> str | None:
    """The implementation an optimizer's (or a saved state_dict's) groups step with; None when
    they leave it to torch (built outside bprun, or before `optim.impl` existed)."""
    group = param_groups[0] if param_groups else {}
    if group.get("fused"):
        return "fused"
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is False or "foreach" not in group:
        return "single"  # chosen explicitly, or a class without the choice (LBFGS)
    return None
