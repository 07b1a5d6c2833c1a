"""task=export: a run's weights as one file, `ckpt=<run> export.format=pt|safetensors`.

A sharded checkpoint (a folder of each rank's shards) is consolidated in this process, without
a process group; a `.pt` checkpoint is copied without its optimizer and resume state. A run
folder gives its best checkpoint (by the run's checkpoint monitor), else its last one, as
task=eval reads it. The file is what task=eval, task=generate (`ckpt=<file>`), model.init_from
and model.weights take. A `.safetensors` file keeps the run's record (config, tokenizer, best
metrics) as JSON in its metadata, under "bprun".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from bprun.engine import checkpoint as ckpt_io
from bprun.errors import BprunError
from bprun.io import atomic_write

log = logging.getLogger("bprun")

FORMATS = ("pt", "safetensors")
# What an exported file keeps of a checkpoint besides the weights: the run's record, which
# task=eval and task=generate rebuild the model and its data from. Optimizer, schedule and
# RNG states are training's alone.
RECORD = ("format", "extra", "best", "history", "progress", "world_size")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> None:
    from bprun.tasks.eval import saved_run

    fmt = cfg.export.format
    if not cfg.get("ckpt"):
        raise BprunError("task=export needs ckpt=<run folder, checkpoint folder or .pt file>")
    if fmt not in FORMATS:
        raise BprunError(f"export.format='{fmt}' is not known: choose one of {', '.join(FORMATS)}")
    path, state, _ = saved_run(cfg.ckpt)
    out = Path(cfg.export.out) if cfg.export.out else Path(run_dir) / f"model.{fmt}"
    record = {k: state[k] for k in RECORD if k in state}
    model = {k: v for k, v in state["model"].items() if torch.is_tensor(v)}
    if fmt == "pt":
        ckpt_io.atomic_save({**record, "model": model}, out)
    else:
        from safetensors.torch import save

        blob = save(_unshared(model), metadata={"bprun": json.dumps(record)})
        atomic_write(out, lambda f: f.write(blob))
    size = out.stat().st_size / 2**20
    log.info(f"exported {len(model)} tensors of {path} to {out} ({size:.1f} MiB)")
    return None


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors stores each tensor's own bytes: tied weights (a GPT's embedding and head)
    become copies, contiguous."""
    seen: set[int] = set()
    out = {}
    for name, t in tensors.items():
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t.contiguous()
        seen.add(storage)
    return out
