"""`task=gradcheck`: autograd's gradients of the configured model and loss against central
finite differences, in float64, per parameter tensor.

For every checked coordinate i of a parameter, the numerical derivative is
(L(w + eps e_i) - L(w - eps e_i)) / 2 eps and the error is

    |autograd - numerical| / max(|autograd|, |numerical|, floor)

(`floor` keeps gradients that are zero up to rounding from dividing by zero).
Models under `full_below` parameters are checked at every coordinate, and each
parameter also goes through `torch.autograd.gradcheck` (fast mode, its default
tolerances); larger models at `max_coords` coordinates per tensor, drawn with
`seed`. A parameter fails when its largest error exceeds `threshold`.

Kinks: ReLU, max-pooling and the like are not differentiable everywhere; when
a step of eps crosses a kink, central differences disagree with autograd for
a reason that is not a bug. At a single kink the two one-sided differences
differ by twice the central difference's error, while at a smooth point they
differ by eps |L''|, far less than the error a wrong backward makes. A failing
coordinate whose one-sided differences differ by at least its error is
counted as a kink, reported, and left out of the verdict.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bprun.diagnostics.settings import GradcheckSettings
from bprun.errors import BprunError

log = logging.getLogger("bprun")


@dataclass
class ParamCheck:
    name: str
    shape: list[int]
    checked: int  # coordinates compared
    max_rel_error: float  # over the compared coordinates that are not kinks
    max_abs_error: float
    kinks: int  # coordinates left out: a step crossed a non-differentiable point
    autograd_gradcheck: bool | None  # torch.autograd.gradcheck's verdict (small models only)
    passed: bool
    worst: dict | None = None  # index, autograd and numerical values of the worst coordinate


class DeterministicLoss:
    """The loss as a function of the parameters, the same function at every call.

    The model stays in training mode, so that the check covers the function that
    is trained (batch norm normalises with the batch's own statistics, a
    deterministic function of the batch), and every call reseeds the RNG in a
    forked RNG state, so that dropout draws the same masks each time and the
    caller's RNG is untouched. Batch norm's running statistics change with every
    call; they do not enter the training-mode output.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, x, y, seed: int):
        self.model, self.loss_fn, self.x, self.y, self.seed = model, loss_fn, x, y, seed
        device = x.device
        self.devices = [device.index or 0] if device.type == "cuda" else []

    def __call__(self, params: dict | None = None) -> torch.Tensor:
        with torch.random.fork_rng(devices=self.devices):
            torch.manual_seed(self.seed)
            if params is None:
                out = self.model(self.x)
            else:
                out = torch.func.functional_call(self.model, params, (self.x,))
            return self.loss_fn(out, self.y)


def check_gradients(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, settings=None
) -> list[ParamCheck]:
    """Compare autograd with finite differences for every trainable parameter of `model`.
    Works on float64 copies of `model` and `loss_fn`; the originals are left as they are."""
    s = settings or GradcheckSettings()
    model = copy.deepcopy(model).double().train()
    loss_fn = copy.deepcopy(loss_fn).double() if isinstance(loss_fn, nn.Module) else loss_fn
    x = x.double() if x.is_floating_point() else x
    y = y.double() if y.is_floating_point() else y
    f = DeterministicLoss(model, loss_fn, x, y, s.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise BprunError(f"{type(model).__name__} has no trainable parameters to check")
    model.zero_grad(set_to_none=True)
    f().backward()
    full = sum(p.numel() for _, p in named) < s.full_below
    rng = torch.Generator().manual_seed(s.seed)
    with torch.no_grad():
        base = float(f())
    return [_check_param(f, name, p, base, full, rng, s) for name, p in named]


def _check_param(f, name: str, p: nn.Parameter, base: float, full: bool, rng, s) -> ParamCheck:
    analytic = p.grad.detach().flatten().cpu() if p.grad is not None else torch.zeros(p.numel())
    n = p.numel()
    coords = range(n) if full else torch.randperm(n, generator=rng)[: s.max_coords].tolist()
    worst_rel, worst_abs, kinks, worst = 0.0, 0.0, 0, None
    with torch.no_grad():
        for i in coords:
            at = np.unravel_index(i, tuple(p.shape)) if p.dim() else ()
            orig = p[at].item()
            p[at] = orig + s.eps
            up = float(f())
            p[at] = orig - s.eps
            down = float(f())
            p[at] = orig
            numerical = (up - down) / (2 * s.eps)
            a = float(analytic[i])
            err = abs(a - numerical)
            rel = err / max(abs(a), abs(numerical), s.floor)
            if not math.isfinite(rel):
                rel = math.inf
            if rel > s.threshold and abs((up - base) - (base - down)) / s.eps >= err:
                kinks += 1  # one-sided slopes differ as much as the error: a kink, not a bug
                continue
            worst_abs = max(worst_abs, err)
            if rel > worst_rel or worst is None:
                worst_rel = max(worst_rel, rel)
                worst = {"index": [int(j) for j in at], "autograd": a, "numerical": numerical}
    verdict = _autograd_gradcheck(f, name, p, s) if full else None
    return ParamCheck(
        name=name,
        shape=list(p.shape),
        checked=len(coords),
        max_rel_error=worst_rel,
        max_abs_error=worst_abs,
        kinks=kinks,
        autograd_gradcheck=verdict,
        passed=worst_rel <= s.threshold and verdict is not False,
        worst=worst,
    )


def _autograd_gradcheck(f: DeterministicLoss, name: str, p: nn.Parameter, s) -> bool:
    """torch.autograd.gradcheck (fast mode) of the loss as a function of this one tensor."""
    t = p.detach().clone().requires_grad_(True)
    return torch.autograd.gradcheck(
        lambda w: f({name: w}), (t,), eps=s.eps, fast_mode=True, raise_exception=False
    )


def table(results: list[ParamCheck]) -> str:
    """The per-parameter table printed by task=gradcheck. The `autograd.gradcheck` column
    is shown when that check ran (models under `full_below` parameters)."""
    width = max(9, *(len(r.name) for r in results))
    ran = any(r.autograd_gradcheck is not None for r in results)
    head = f"  {'parameter':<{width}}  {'shape':<14} {'checked':>7} {'max rel err':>11} "
    head += f"{'kinks':>5}  " + (f"{'autograd.gradcheck':<18}  " if ran else "") + "result"
    rows = [head]
    for r in results:
        shape = "x".join(map(str, r.shape)) or "scalar"
        verdict = {None: "-", True: "passed", False: "FAILED"}[r.autograd_gradcheck]
        rows.append(
            f"  {r.name:<{width}}  {shape:<14} {r.checked:>7} {r.max_rel_error:>11.2e} "
            f"{r.kinks:>5}  "
            + (f"{verdict:<18}  " if ran else "")
            + ("ok" if r.passed else "FAILED")
        )
    return "\n".join(rows)
