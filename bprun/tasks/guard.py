"""Failures while a run is built become one `error:` line, whatever raised them.

Every part of a run is made from a config node the user can set to anything: a
constructor, the first forward pass, the loss or the first scheduler step can
reject a value that no check foresaw (a width torch refuses, a schedule that
divides by zero, a list one item short). Rather than one validator per case, the
set-up builds each part inside `building(group)` and rehearses one update with
`dry_run` before training starts; an exception there becomes a BprunError that
names the group, its option, the keys the user set in it and the library's own
message:

    error: sched=onecycle could not be built with sched.div_factor=0: the first step:
    ZeroDivisionError: float division by zero (check sched.div_factor)

`HYDRA_FULL_ERROR=1` or `BPRUN_DEBUG=1` lets the original exception through, with its
traceback. The dry run leaves the run as it was: random states, buffers (BatchNorm's
running statistics), learning rates and the scheduler's state are restored, no weight changes,
so a run's metrics are the same with and without it.
"""

from __future__ import annotations

import contextlib
import copy
import random
import warnings

from bprun.errors import BprunError, debugging
from bprun.overrides import key_of

# What the message says a part failed at, for the steps of the dry run.
PHASES = {
    None: "",
    "forward": "the first forward pass on one batch: ",
    "loss": "the loss of the first batch: ",
    "backward": "the first backward pass: ",
    "step": "the first step: ",
}


@contextlib.contextmanager
def building(group: str, node=None, phase: str | None = None, overrides: list[str] | None = None):
    """Build (or run) a part of the run; an exception becomes a BprunError naming `group`.

    `node`: the group's config node (its `_target_` names the class when the option is the
    user's own); `overrides`: the command line (the Hydra job's when None)."""
    try:
        yield
    except (BprunError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        if debugging():
            raise
        raise BprunError(describe(group, node, e, phase, overrides)) from e


def describe(group: str, node, error: BaseException, phase=None, overrides=None) -> str:
    """`<group>=<option> could not be built with <key>=<value>: <message> (check <key>)`."""
    line = command_line() if overrides is None else list(overrides)
    mine = [o.lstrip("+~") for o in line if key_of(o).split(".")[0] == group and "." in key_of(o)]
    message = _message(error)
    named = [o for o in mine if key_of(o).rsplit(".", 1)[-1] in message] or mine
    picked = option(group, node, line)
    text = f"{group}={picked} could not be built"
    if mine:
        text += " with " + ", ".join(mine)
    text += f": {PHASES.get(phase, '')}{message}"
    if named:
        return text + f" (check {', '.join(dict.fromkeys(key_of(o) for o in named))})"
    return text + f" (check {group}'s settings, which bprun --cfg job {group}={picked} lists)"


def option(group: str, node, line: list[str]) -> str:
    """The option picked for `group`, or the class a `_target_` of the user's own names."""
    target = None
    with contextlib.suppress(Exception):
        target = node.get("_target_")
    chosen = [o.split("=", 1)[1] for o in line if key_of(o) == group and "=" in o]
    if any(key_of(o) == f"{group}._target_" for o in line) and target:
        return str(target)
    if chosen:
        return chosen[-1]
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            picked = HydraConfig.get().runtime.choices.get(group)
            if picked:
                return str(picked)
    return str(target) if target else "?"


def command_line() -> list[str]:
    """The overrides of the Hydra job being run (none outside one: ranks, notebooks)."""
    with contextlib.suppress(Exception):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return list(HydraConfig.get().overrides.task)
    return []


def _message(error: BaseException) -> str:
    """The library's own words, on one line: the exception's class and first line."""
    cause = error
    while cause.__cause__ is not None and not str(cause).strip():
        cause = cause.__cause__
    lines = [ln.strip() for ln in str(cause).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    if len(first) > 300:
        first = first[:297] + "..."
    name = type(cause).__name__
    return f"{name}: {first}" if first else name


def dry_run(trainer, loader, cfg=None) -> float:
    """One forward pass, loss and backward pass on (two rows of) the first training batch, an
    optimizer step (on a stand-in parameter) and a scheduler step, each guarded; then what they
    touched (buffers, random states, the learning rates and the scheduler's state) goes back
    as it was.

    In-memory loaders give their first two examples; a token-window loader its first batch's
    first two windows (a read of one batch from the memory-mapped stream). A loader of
    streaming workers is skipped: starting its workers costs more than the rehearsal saves.
    Two rows keep the cost to a few milliseconds on the shipped models; a per-example shape
    error shows on two rows as on a hundred.
    Returns the seconds it took (metrics.json's `rehearsal_s`; the bench reports it)."""
    import time

    import numpy as np
    import torch

    started = time.perf_counter()

    if len(loader) == 0 or not _holds_rows(loader):
        return 0.0
    module = trainer.module
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    training = module.training
    try:
        x, y = _first_rows(loader, 2)
        module.train()
        with trainer.precision.autocast():
            with building("model", _node(cfg, "model"), "forward"):
                out = module(x)
            with building("loss", _node(cfg, "loss"), "loss"):
                loss = trainer.loss_fn(out, y)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            # back to the first trainable parameter only: the whole graph is traversed, but no
            # weight gradients are made or kept (a third of the cost of .backward() on ResNet-18)
            first = next((p for p in module.parameters() if p.requires_grad), None)
            with building("model", _node(cfg, "model"), "backward"):
                if first is not None:
                    torch.autograd.grad(loss.float().sum(), [first], allow_unused=True)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        module.train(training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
    _optimizer_step(trainer.optimizer, _node(cfg, "optim"))
    _scheduler_step(trainer, _node(cfg, "sched"))
    return time.perf_counter() - started


def _optimizer_step(optimizer, node=None) -> None:
    """One step of the optimizer's class and hyperparameters on a stand-in parameter of two
    values (what a step rejects, LBFGS's history_size=-1 say, does not depend on the model):
    microseconds, and the run's optimizer is not touched. An optimizer of the user's own that
    cannot be re-made from its defaults is not rehearsed."""
    import torch

    first = next((p for g in optimizer.param_groups for p in g["params"]), None)
    if first is None:
        return
    stand_in = torch.zeros(2, device=first.device, dtype=first.dtype, requires_grad=True)
    try:
        twin = type(optimizer)([stand_in], **optimizer.defaults)
    except Exception:
        return

    def closure():  # what LBFGS re-evaluates
        twin.zero_grad()
        with torch.enable_grad():
            loss = ((stand_in - 1) ** 2).sum()
            loss.backward()
        return loss

    with building("optim", node, "step"):
        closure()
        twin.step(closure)


def _holds_rows(loader) -> bool:
    """Whether `loader` gives rows without starting workers: in-memory tensors, or token
    windows (each batch a pure function of its position in a memory-mapped stream)."""
    return hasattr(loader, "starts") or (hasattr(loader, "x") and hasattr(loader, "order"))


def _first_rows(loader, n: int):
    """The first `n` examples of the first training batch, through the loader's transform
    (gathered alone: the loader's own batches gather a whole block of them)."""
    import torch

    if hasattr(loader, "starts"):  # token windows: one batch read, its first rows kept
        x, y = loader.batch(0, 0)
        return x[:n], y[:n]
    order = loader.order(0)
    index = order[:n] if order is not None else torch.arange(min(n, len(loader.x)))
    x = loader.x.index_select(0, index.to(loader.x.device))
    y = loader.y.index_select(0, index.to(loader.y.device))
    return (x if loader.transform is None else loader.transform(x)), y


def _hyperparameters(optimizer) -> list[dict]:
    return [
        copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups
    ]


def _node(cfg, group: str):
    return cfg.get(group) if cfg is not None else None


def _scheduler_step(trainer, node=None) -> None:
    """The scheduler's first step, on the optimizer's hyperparameters, then both put back."""
    scheduler = trainer.scheduler
    if scheduler is None:
        return
    optimizer = trainer.optimizer
    hyper = _hyperparameters(optimizer)
    state = copy.deepcopy(scheduler.state_dict())
    try:
        with warnings.catch_warnings(), building("sched", node, "step"):
            warnings.simplefilter("ignore")  # "step() before optimizer.step()": on purpose here
            if getattr(trainer, "plateau", False):
                scheduler.step(0.0)
            else:
                scheduler.step()
    finally:
        scheduler.load_state_dict(state)
        for group, saved in zip(optimizer.param_groups, hyper, strict=True):
            group.update(saved)
