"""`trainer.detect_anomaly=true`: name the layer and the operation that made a value non-finite.

The Trainer already runs fit under `torch.autograd.detect_anomaly`, which
records where each operation was created in the forward pass and raises a
RuntimeError naming the backward function that returned NaN, but not the
layer, and after a wall of traceback. This callback adds the layer:

* forward hooks on every module hand each autograd node created in the module's
  forward to that module (a node is claimed by the first module whose inputs or
  outputs reach it, innermost first), and attach a post-hook to the node;
* the node's post-hook runs right after the node computed its gradients (before
  anomaly mode's own check) and raises a `BprunError` naming the operation
  (`SqrtBackward0`), the layer (`blocks.3.act`), the line of forward code that
  created it and the update, when one of the gradients is NaN or infinite
  (NaN only under float16 loss scaling, where an infinite gradient is an
  overflow the scaler handles);
* with `trainer.nonfinite=stop`, a module whose forward output is non-finite
  while training stops the run as well, naming the layer (or the batch, when a
  module's inputs were already non-finite).

Everything here syncs with the device per node; it is a debugging mode, as
anomaly detection itself is.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from bprun.engine.callbacks import Callback
from bprun.errors import BprunError

FIX = "lower optim.lr, set trainer.grad_clip.max, or guard the operation (e.g. clamp its input)"
FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


class AnomalyLocator(Callback):
    def __init__(self, settings):
        self.check_forward = settings.nonfinite == "stop"

    def on_fit_start(self, trainer, train_loader) -> None:
        self.trainer = trainer
        self.nan_only = trainer.scaler is not None
        self.claimed: set = set()
        self.stack: list[str] = []
        self.handles = []
        modules = [
            (n or type(trainer.module).__name__, m) for n, m in trainer.module.named_modules()
        ]
        if isinstance(trainer.loss_fn, nn.Module):
            modules.append(("loss", trainer.loss_fn))
        root = modules[0][0]
        self.labels = {
            name: f"layer '{name}' ({type(m).__name__})" if name != root else f"model {name}"
            for name, m in modules
        }
        # Anomaly mode prints the whole forward stack when a hook raises; the error names the line.
        warnings.filterwarnings("ignore", message="Error detected in ", category=UserWarning)
        self.quiet = warnings.filters[0]
        for name, m in modules:
            self.handles.append(
                m.register_forward_pre_hook(
                    self._enter(name, m is trainer.module), with_kwargs=True
                )
            )
            self.handles.append(m.register_forward_hook(self._leave(name), with_kwargs=True))

    def on_update_end(self, trainer) -> None:
        self.claimed.clear()  # the graph of this update is gone; do not keep its nodes

    def on_fit_end(self, trainer) -> None:
        if self.quiet in warnings.filters:
            warnings.filters.remove(self.quiet)
        self._release()

    def _release(self) -> None:
        """Remove the module hooks (also before raising: the fit is over). The warning filter
        stays until fit end, or for good after an error, when anomaly mode still warns."""
        for h in self.handles:
            h.remove()
        self.handles = []
        self.claimed.clear()

    # ------------------------------------------------------------------ forward hooks
    def _enter(self, name: str, root: bool):
        def pre(module, args, kwargs):
            if not torch.is_grad_enabled():
                return
            if root:
                self.stack.clear()
            inputs = _tensors((args, kwargs))
            # Nodes made between modules (a flatten, a residual add) belong to the caller.
            self._claim(inputs, self.stack[-1] if self.stack else name)
            self.stack.append(name)

        return pre

    def _leave(self, name: str):
        def post(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            outputs = _tensors(output)
            self._claim(outputs, name)
            if self.check_forward and module.training:
                self._check_forward(name, _tensors((args, kwargs)), outputs)

        return post

    def _claim(self, tensors: list[torch.Tensor], owner: str) -> None:
        todo = [t.grad_fn for t in tensors if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or node in self.claimed:
                continue
            self.claimed.add(node)
            if node.name().endswith("AccumulateGrad"):
                continue
            node.register_hook(self._check_backward(node, owner))
            todo.extend(fn for fn, _ in node.next_functions)

    def _check_forward(self, name: str, inputs: list, outputs: list) -> None:
        bad = _first_bad(outputs, nan_only=False)
        if bad is None:
            return
        update = self.trainer.update + 1
        self._release()
        if _first_bad(inputs, nan_only=False) is not None:
            raise BprunError(
                f"update {update}: the inputs of {self.labels[name]} are already {bad} in the "
                f"forward pass: check the data (or the code between layers) for {bad}"
            )
        raise BprunError(
            f"update {update}: the forward of {self.labels[name]} turned finite inputs into "
            f"{bad} outputs; {FIX}"
        )

    # ------------------------------------------------------------------ backward hooks
    def _check_backward(self, node, owner: str):
        def hook(grad_inputs, grad_outputs):
            bad = _first_bad([g for g in grad_inputs if g is not None], self.nan_only)
            if bad is None:
                return
            where = _forward_line(node)
            self._release()
            raise BprunError(
                f"update {self.trainer.update + 1}: {node.name()} in {self.labels[owner]} "
                f"produced {bad} gradients in the backward pass"
                f"{f' (forward: {where})' if where else ''}; {FIX}"
            )

        return hook


def _tensors(obj) -> list[torch.Tensor]:
    """The tensors in a (nested) tuple, list or dict of module inputs or outputs."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _first_bad(tensors: list[torch.Tensor], nan_only: bool) -> str | None:
    """'nan' or 'inf' for the first floating tensor holding one, else None."""
    for t in tensors:
        if not t.is_floating_point() and not t.is_complex():
            continue
        if bool(torch.isnan(t).any()):
            return "nan"
        if not nan_only and bool(torch.isinf(t).any()):
            return "inf"
    return None


def _forward_line(node) -> str:
    """file:line of the forward code that created `node`, outside torch, when anomaly mode
    recorded it."""
    trace = getattr(node, "metadata", {}).get("traceback_", "")
    if isinstance(trace, list):  # torch >= 2.x: the formatted stack, one entry per frame
        trace = "".join(trace)
    frames = [f for f in FRAME.findall(trace) if "/torch/" not in f[0]]
    if not frames:
        return ""
    path, line, func = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} in {func}"
