"""`trainer.strategy=fsdp`: FSDP2 sharding applied to the model as a plain function, before the
optimizer is built on its (now sharded, DTensor) parameters, as torchtitan does.

Each repeated block is its own unit (`fully_shard`), then the root: a unit's parameters are
all-gathered just before its forward and backward and freed after, so a rank holds one unit
in full at a time besides its shards of the rest. Gradients are reduce-scattered (averaged over
the ranks, as DDP's all-reduce), and the optimizer steps on each rank's shards only.

Checkpoints are sharded (`bprun.engine.sharded_checkpoint`): each rank writes its shards, and a
run saved on N ranks resumes on any number of ranks; `task=eval` consolidates one in one process.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
from collections import Counter

import torch
from torch import nn

from bprun.errors import BprunError

log = logging.getLogger("bprun")


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the modules that are a model's repeated blocks: the children of every
    `nn.ModuleList` or `nn.Sequential` with at least two containers of one class (a
    transformer's layers, a ResNet's stages, a GPT's blocks); the outermost where they nest."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = [(n, c) for n, c in module.named_children() if next(c.children(), None)]
        counts = Counter(type(c) for _, c in children)
        found += [f"{name}.{n}" if name else n for n, c in children if counts[type(c)] >= 2]
    return [n for n in found if not any(n.startswith(f"{o}.") for o in found)]


def shard_units(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """The module names sharded as units: those `model.shard_units` patterns (fnmatch on
    names, e.g. `encoder.layers.*`) match, else the repeated blocks."""
    if not patterns:
        return repeated_blocks(model)
    names = [n for n, _ in model.named_modules() if n]
    units = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not units:
        raise BprunError(
            f"model.shard_units={list(patterns)} names no module of {type(model).__name__}: "
            f"give patterns of its module names, e.g. {', '.join(names[:4])}"
        )
    return [n for n in units if not any(n.startswith(f"{o}.") for o in units if o != n)]


def shard(model: nn.Module, settings, precision: str, device: torch.device, mesh=None) -> nn.Module:
    """Apply `fully_shard` to each unit, then the root; returns the model (sharded in place).
    `settings` is `TrainerSettings.fsdp`; bf16-mixed gives bf16 parameters in the forward and
    backward with float32 gradient reductions. `mesh`: the (1-D) mesh to shard over, the dp
    dimension under tensor parallelism; None: every rank."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {"reshard_after_forward": settings.reshard_after_forward, "mesh": mesh}
    if precision == "bf16-mixed":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if settings.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    units = shard_units(model, getattr(model, "shard_units", None))
    modules = dict(model.named_modules())
    for name in units:
        fully_shard(modules[name], **kwargs)
    fully_shard(model, **kwargs)
    share_running_stats(model, mesh)
    shown = ", ".join(units[:4]) + (f", ... ({len(units)} in all)" if len(units) > 4 else "")
    local, full = parameter_bytes(model)
    log.info(
        f"fsdp: {len(units)} unit(s) and the root sharded ({shown or 'root only'}); this rank "
        f"holds {_size(local)} of the {_size(full)} of parameters, and as much again of "
        "gradients (optimizer state likewise sharded)"
    )
    return model


def share_running_stats(model: nn.Module, mesh=None) -> None:
    """Before each training forward, give every rank rank 0's normalisation statistics
    (BatchNorm's running mean and variance), as DDP does with its buffers.

    FSDP shards parameters, not buffers: without this, each rank's running statistics would
    follow its own data alone, a checkpoint would hold whichever rank's the writer picked, and
    each rank would validate with different ones. With it, FSDP's statistics are DDP's exactly,
    and a resumed run's equal an unbroken one's after its first forward. Models without such
    statistics (the GPT, the transformer) get no hook and pay nothing."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    stats = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
        for b in m.buffers()
    ]
    if not stats:
        return
    group = mesh.get_group() if mesh is not None else None
    by_dtype: dict = {}
    for b in stats:
        by_dtype.setdefault(b.dtype, []).append(b)

    def broadcast(module, args):
        if not module.training:
            return
        with torch.no_grad():
            for buffers in by_dtype.values():
                flat = _flatten_dense_tensors(buffers)
                dist.broadcast(flat, group=group, group_src=0)
                for b, value in zip(buffers, _unflatten_dense_tensors(flat, buffers), strict=True):
                    b.copy_(value)

    model.register_forward_pre_hook(broadcast)


def parameter_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of parameters this rank holds, bytes of the whole model's parameters)."""
    local = full = 0
    for p in model.parameters():
        part = getattr(p, "_local_tensor", p)
        local += part.numel() * part.element_size()
        full += p.numel() * p.element_size()
    return local, full


def state_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """Bytes this rank holds of parameters, gradients and optimizer state."""

    def size(t) -> int:
        t = getattr(t, "_local_tensor", t)
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    params = list(model.parameters())
    return {
        "parameters": sum(size(p) for p in params),
        "gradients": sum(size(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(size(v) for s in optimizer.state.values() for v in s.values()),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_gradient_sync(model: nn.Module):
    """Micro-batches before an update's last: gradients accumulate unreduced."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts gathered in full, on the CPU (a collective: every rank
    calls it), keyed like the unsharded model's."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = _options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if optim_state:  # rank 0's: in torch's own layout, so any process loads it
        optim_state = _indexed(optim_state, _param_names(model, optimizer))
    return model_state, optim_state


def load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state=None) -> None:
    """Shard full state dicts (every rank read the same checkpoint) into the model and the
    optimizer, whatever world size wrote them."""
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    set_model_state_dict(model, model_state, options=_options())
    if optim_state is not None:
        named = _named(optim_state, _param_names(model, optimizer))
        set_optimizer_state_dict(model, optimizer, named, options=_options())


def _param_names(model: nn.Module, optimizer) -> list[str]:
    """The optimizer's parameters by name, in its own order (group by group)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _indexed(state: dict, names: list[str]) -> dict:
    """An optimizer state keyed by parameter names -> keyed by position, as
    `Optimizer.state_dict()` gives it."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def _named(state: dict, names: list[str]) -> dict:
    """The reverse of `_indexed`."""
    return {
        "state": {names[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]
        ],
    }


def plain(t):
    """A DTensor's full value (a clipping norm, say); other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def placed_like(full: torch.Tensor, like):
    """`full` laid out as `like`: sharded over its mesh when `like` is a DTensor (a collective:
    every rank passes the same value, as when all read one checkpoint), as it is otherwise."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
