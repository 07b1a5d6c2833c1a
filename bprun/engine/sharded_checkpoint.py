"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP), as torchtitan writes them.

A checkpoint is a folder, `checkpoints/<name>/`:

    __<rank>_0.distcp   each rank's shards of the model and the optimizer state, written
                        by all ranks at once (no gather onto one rank)
    state.pt            everything else a resume needs (progress, every rank's RNG state,
                        schedule, early stopping, best, history, the run's config), rank 0's
    .metadata           DCP's index of the shards, written last, once every rank wrote

It is written into `<name>.tmp/` and renamed into place after `.metadata`, so a process killed
mid-save leaves the previous `<name>/` whole. DCP stores each tensor's global shape and its
shards' offsets, so a checkpoint saved on N ranks loads on any number of ranks (the load
reshards), and `consolidate` reads it in one process without any process group.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from torch import nn

from bprun.errors import BprunError

STATE = "state.pt"  # the non-tensor part, beside the shards
METADATA = ".metadata"  # DCP's index: present only in a complete checkpoint


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is a complete sharded checkpoint folder."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file() and (path / STATE).is_file()


def folder_for(path: Path) -> Path:
    """The folder of the checkpoint that would otherwise be the file `path` (`last.pt` -> `last`)."""
    return path.with_name(path.name[:-3]) if path.name.endswith(".pt") else path


def save(folder: Path, module: nn.Module, optimizer, state: dict, dist) -> Path:
    """Write `folder`: every rank calls this (a collective) with its own module and optimizer;
    `state` (the rest) is rank 0's to write."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from bprun.engine.checkpoint import atomic_save

    tmp = folder.with_name(f"{folder.name}.tmp")
    if dist.is_main:  # a save killed part-way left its .tmp: start it afresh
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        atomic_save(state, tmp / STATE)
    dist.barrier()
    model_state, optim_state = get_state_dict(module, optimizer)
    if not dist.is_main:  # buffers are whole on every rank: rank 0's are the ones kept, as DDP's
        model_state = {k: v for k, v in model_state.items() if hasattr(v, "device_mesh")}
    with _single_process_quiet():
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp)
    if dist.is_main:
        _replace(tmp, folder)
    dist.barrier()
    return folder


def _replace(tmp: Path, folder: Path) -> None:
    """Rename `tmp` into `folder`. A directory cannot replace another in one rename, so the old
    one steps aside to `<name>.old` first; `previous` finds it if the process dies in between."""
    old = folder.with_name(f"{folder.name}.old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def previous(folder: Path) -> Path:
    """`folder`, or the `.old` copy a save killed between its two renames left."""
    old = folder.with_name(f"{folder.name}.old")
    return old if not is_sharded(folder) and is_sharded(old) else folder


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def read_state(folder: Path) -> dict:
    """The non-tensor part of a checkpoint (no model, no optimizer)."""
    from bprun.io import safe_load

    return safe_load(folder / STATE)


def load(folder: Path, module: nn.Module, optimizer=None, check_optimizer=None) -> None:
    """Load the checkpoint's shards into `module` (sharded by FSDP or not) and `optimizer`, at
    whatever world size wrote them; every rank calls this. `check_optimizer(param_groups)` sees
    the saved optimizer settings before they replace the optimizer's own."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as sd

    check_fits(folder, module)
    if optimizer is None:
        model_state = sd.get_model_state_dict(module)
        with _single_process_quiet():
            dcp.load({"model": model_state}, checkpoint_id=folder)
        sd.set_model_state_dict(module, model_state)
        return
    model_state, optim_state = sd.get_state_dict(module, optimizer)
    with _single_process_quiet():
        dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=folder)
    if check_optimizer is not None:
        check_optimizer(optim_state["param_groups"])
    sd.set_state_dict(module, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)


def check_fits(folder: Path, module: nn.Module) -> None:
    """The model's names and (global) shapes against the checkpoint's; the first difference is
    one error line naming the key and both shapes."""
    shapes = saved_shapes(folder)
    for name, tensor in module.state_dict().items():
        saved = shapes.get(name)
        if saved is None or saved != tuple(tensor.shape):
            found = f"is {saved}" if saved is not None else "is missing"
            raise BprunError(
                f"checkpoint {folder} does not fit the configured model: {name} {found} in the "
                f"checkpoint and {tuple(tensor.shape)} in the model; resume with the model "
                "config the checkpoint was trained with"
            )
    extra = sorted(set(shapes) - set(module.state_dict()))
    if extra:
        raise BprunError(
            f"checkpoint {folder} does not fit the configured model: it holds {extra[0]} "
            f"{shapes[extra[0]]}, which the model has not; resume with the model config the "
            "checkpoint was trained with"
        )


def saved_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """The model tensors' names and global shapes, from the checkpoint's metadata alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {
        key[len("model.") :]: tuple(meta.size)
        for key, meta in entries.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }


def consolidate(folder: Path, optimizer: bool = True) -> dict:
    """The whole checkpoint in one process, laid out like a `.pt` checkpoint: the full model
    state dict and (with `optimizer`) the optimizer's, keyed by position as
    `Optimizer.state_dict()` gives it, beside the non-tensor state."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    state = read_state(folder)
    keys = {"model", "optimizer"} if optimizer else {"model"}
    with _single_process_quiet():
        tensors = _load_state_dict_from_keys(keys, checkpoint_id=str(folder))
    state["model"] = tensors["model"]
    if optimizer:
        state["optimizer"] = _indexed(tensors["optimizer"])
    return state


def _indexed(state: dict) -> dict:
    """An optimizer state keyed by parameter names -> keyed by position, in the groups' order."""
    names = [n for group in state["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: v for n, v in state.get("state", {}).items()},  # none: plain SGD
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


class _single_process_quiet(warnings.catch_warnings):
    """DCP warns that it assumes one process when no process group is up: that is the intent."""

    def __enter__(self):
        super().__enter__()
        warnings.filterwarnings(
            "ignore", message=".*assuming the intent is to .* in a single process"
        )
        return self
