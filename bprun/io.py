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
from collections.abc import Callable
from pathlib import Path
from typing import IO


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
