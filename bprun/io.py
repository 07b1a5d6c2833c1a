"""Files that are either the old version or the new one, never half of each.

Every file bprun rewrites (checkpoints, metrics.json, dataset caches) goes
through `atomic_write`: a temporary file in the same folder, flushed, fsynced
and `os.replace`d, then the folder fsynced so the rename itself survives a
power cut.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from bprun.errors import BprunError


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call `write(f)` on a temporary binary file, then move it to `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _plain(value):
    """JSON has no NaN or infinity: write them as strings a reader can still parse."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(data: dict, path: str | Path) -> Path:
    text = json.dumps(_plain(data), indent=2) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str | Path) -> dict | None:
    """The file's object, or None when it is missing or not (yet) valid JSON."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def safe_load(path: str | Path, what: str = "checkpoint") -> object:
    """torch.load(weights_only=True) with no fallback; any problem becomes a one-line BprunError.

    `what` names the file in messages: "checkpoint" (a bprun run's), or "weights file".
    """
    import torch  # here, not at the top: the command line's --help imports this module

    path = Path(path)
    ours = what == "checkpoint"
    if path.is_file() and not _torch_file(path):
        raise BprunError(
            f"{path} is not a {'bprun checkpoint' if ours else what} (not a file torch.save "
            "wrote): "
            + (
                "give a run folder or one of its checkpoints/*.pt"
                if ours
                else "give a .pth/.pt state dict or a .safetensors file"
            )
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BprunError(
            f"refused to load {path}: it holds Python objects, not only tensors and plain values "
            f"({_shorten(str(e))}); "
            + (
                "it was not written by bprun and may run code, so it is not loaded"
                if ours
                else "it may run code, so it is not loaded: save its state_dict() instead"
            )
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise BprunError(
            f"cannot read {what} {path}: the file is truncated or corrupted "
            f"({type(e).__name__}); use another {what} from {path.parent}"
        ) from None


def _torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, in its legacy format, a pickle: byte 0x80)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # a truncated zip included


def _shorten(text: str, limit: int = 160) -> str:
    """The first line of `text`, cut at a word boundary."""
    first = text.strip().splitlines()[0] if text.strip() else "no details"
    return first if len(first) <= limit else first[:limit].rsplit(" ", 1)[0] + " ..."
