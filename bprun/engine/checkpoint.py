"""Checkpoint files: atomic writes, safe reads, RNG state, top-k bookkeeping.

A checkpoint holds tensors and plain Python values only, so it is read with
`torch.load(weights_only=True)` and nothing in it can run code.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bprun.engine import sharded_checkpoint as sharded
from bprun.errors import BprunError
from bprun.io import atomic_write, safe_load

FORMAT_VERSION = 1


def atomic_save(obj, path: str | Path) -> Path:
    """`torch.save` so that `path` always holds either the old or the new file, never a torn one."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def last_checkpoint(run: Path) -> Path | None:
    """A run folder's last checkpoint: `checkpoints/last.pt` or, sharded, `checkpoints/last/`
    (the newer where a run switched formats on resume); None when it has none."""
    found = []
    for folder in (run / "checkpoints", run):
        file, shards = folder / "last.pt", sharded.previous(folder / "last")
        if file.is_file():
            found.append((file.stat().st_mtime, file))
        if sharded.is_sharded(shards):
            found.append(((shards / sharded.STATE).stat().st_mtime, shards))
        if found:
            return max(found)[1]
    return None


def resolve_checkpoint(path: str | Path, what: str = "trainer.resume") -> Path:
    """A run folder means its last checkpoint; a file or a sharded checkpoint's folder is taken
    as it is."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BprunError(f"{what}={path}: no such file or folder; give a run folder or a .pt file")
    if path.is_dir() and not sharded.is_sharded(path):
        last = last_checkpoint(path)
        if last is None:
            raise BprunError(
                f"{what}={path}: the folder has no checkpoints/last.pt (nor a sharded "
                "checkpoints/last/); give a run folder that saved checkpoints, or a .pt file"
            )
        return last
    return path


def load_checkpoint(path: str | Path, weights: bool = True) -> dict:
    """Read a checkpoint safely; any problem becomes a one-line BprunError.

    A sharded checkpoint is consolidated in this process, laid out as a `.pt` one; with
    `weights=False` its model and optimizer are left on disk (a sharded resume reads each
    rank's part itself), and the state has no `model` entry.
    """
    path = Path(path)
    if sharded.is_sharded(path):
        return sharded.consolidate(path) if weights else sharded.read_state(path)
    if path.suffix == ".safetensors":
        return _exported(path)
    ckpt = safe_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise BprunError(f"{path} is not a bprun checkpoint (no 'model' entry)")
    return ckpt


def _exported(path: Path) -> dict:
    """A `task=export export.format=safetensors` file: the weights, and the run's record in
    the file's metadata."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            record = (f.metadata() or {}).get("bprun")
            model = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BprunError(
            f"cannot read {path}: not a valid .safetensors file ({str(e)[:120]})"
        ) from None
    if record is None:
        raise BprunError(f"{path} holds weights only (no run record): use it as model.weights")
    return {**json.loads(record), "model": model}


def remove(path: Path) -> None:
    """Delete a checkpoint, a file or a sharded one's folder."""
    if path.is_dir():
        sharded.remove(path)
    else:
        path.unlink(missing_ok=True)


def load_model_state(module: nn.Module, state: dict, path: str | Path) -> None:
    """load_state_dict with a message that lists exactly what does not match."""
    state = upgraded(module, state)
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise BprunError(
            f"checkpoint {path} does not match the configured model ({'; '.join(parts)}); "
            "use the model config the checkpoint was trained with"
        )
    module.load_state_dict(state)


def upgraded(module: nn.Module, state: dict) -> dict:
    """`state` with the keys of an older layout in the module's: each submodule whose
    parameters changed shape over time (the GPT's fused query/key/value, now split) converts
    what it finds in its `upgrade_state(state, prefix)`."""
    for name, sub in module.named_modules():
        upgrade = getattr(sub, "upgrade_state", None)
        if upgrade is not None:
            state = upgrade(state, f"{name}." if name else "")
    return state


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile / DDP wrappers, so saved keys carry no prefixes."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


# RNG states as tensors, so they load under weights_only=True.
def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_version": version,
        "python_gauss": gauss,
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(
        (state["python_version"], tuple(state["python"].tolist()), state["python_gauss"])
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class TopK:
    """The best `k` checkpoints by a monitored metric; the best one is never removed."""

    def __init__(self, folder: Path, monitor: str, mode: str, k: int):
        self.folder, self.monitor, self.mode, self.k = folder, monitor, mode, k
        self.entries: list[tuple[float, str]] = []  # (score, file name), best first

    def _key(self, score: float) -> float:
        return score if self.mode == "min" else -score

    @property
    def best(self) -> Path | None:
        return self.folder / self.entries[0][1] if self.entries else None

    def wants(self, score: float) -> bool:
        if self.k == 0 or not np.isfinite(score):
            return False
        if self.k < 0 or len(self.entries) < self.k:
            return True
        return self._key(score) < self._key(self.entries[-1][0])

    def file_name(self, epoch: int, update: int, score: float) -> str:
        metric = re.sub(r"[^A-Za-z0-9]+", "_", self.monitor).strip("_")
        return f"epoch={epoch:03d}-step={update}-{metric}={score:.4f}.pt"

    def add(self, score: float, name: str) -> list[Path]:
        """Record a saved file; return the files that dropped out of the top k."""
        self.entries.append((float(score), name))
        self.entries.sort(key=lambda e: self._key(e[0]))
        dropped = self.entries[self.k :] if self.k > 0 else []
        self.entries = self.entries[: self.k] if self.k > 0 else self.entries
        return [self.folder / name for _, name in dropped]

    def state_dict(self) -> dict:
        return {"entries": [[s, n] for s, n in self.entries]}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [(float(s), str(n)) for s, n in state["entries"]]
