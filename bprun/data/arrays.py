"""Your own arrays: an `.npz` (numpy) or `.pt` (torch) file of x_train, y_train, x_test, y_test.

Inputs keep their dtype and shape: (N, D) features, (N, C, L) sequences or
(N, C, H, W) images (uint8 images are scaled to [0, 1] per batch, and
normalised with `mean` and `std` when given). Integer targets classify, float
targets regress. Without x_test/y_test a seeded `test_fraction` is held out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bprun.data.sources import Dataset, carve
from bprun.errors import BprunError

REQUIRED = ("x_train", "y_train")


def _read(path: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise BprunError(f"dataset.path={path} does not exist: point it at an .npz or .pt file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                return {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in z.files}
        if p.suffix in (".pt", ".pth"):
            loaded = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise BprunError(f"{path} holds a {type(loaded).__name__}; save a dict of tensors")
            return {k: torch.as_tensor(v) for k, v in loaded.items()}
    except BprunError:
        raise
    except Exception as e:
        raise BprunError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    raise BprunError(f"dataset.path={path}: the file must end in .npz or .pt")


def load_arrays(
    path: str,
    task: str | None = None,
    num_classes: int | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> Dataset:
    if not path:
        raise BprunError("dataset=arrays needs dataset.path=<file.npz or file.pt>")
    arrays = _read(path)
    missing = [k for k in REQUIRED if k not in arrays]
    if missing or ("x_test" in arrays) != ("y_test" in arrays):
        raise BprunError(
            f"{path} needs arrays x_train and y_train (and optionally x_test with y_test); "
            f"it holds {', '.join(sorted(arrays)) or 'nothing'}"
        )
    x, y = arrays["x_train"], arrays["y_train"]
    if len(x) != len(y):
        raise BprunError(f"{path}: x_train has {len(x)} rows but y_train has {len(y)}")
    if x.dim() < 2 or len(x) == 0:
        raise BprunError(f"{path}: x_train must be (N, ...) with N > 0, got shape {tuple(x.shape)}")
    if "x_test" in arrays:
        x_te, y_te = arrays["x_test"], arrays["y_test"]
        if tuple(x_te.shape[1:]) != tuple(x.shape[1:]) or len(x_te) != len(y_te):
            raise BprunError(
                f"{path}: x_test {tuple(x_te.shape)} / y_test {tuple(y_te.shape)} do not match "
                f"x_train {tuple(x.shape)}"
            )
    else:
        keep, held = carve(len(x), test_fraction, split_seed)
        x, y, x_te, y_te = x[keep], y[keep], x[held], y[held]
    if task is None:
        task = "regression" if y.is_floating_point() else "classification"
    if task == "classification":
        if y.is_floating_point() or y.dim() != 1:
            raise BprunError(
                f"{path}: classification needs integer class labels of shape (N,), y_train is "
                f"{y.dtype} {tuple(y.shape)}; set dataset.task=regression for float targets"
            )
        y, y_te = y.long(), y_te.long()
        if int(y.min()) < 0:
            raise BprunError(f"{path}: class labels must be 0..C-1, y_train has {int(y.min())}")
        classes = num_classes or int(y.max()) + 1
        unseen = sorted(set(y_te.unique().tolist()) - set(y.unique().tolist()))
        if unseen:
            raise BprunError(
                f"{path}: y_test has label(s) {unseen[:5]} that y_train never has: "
                "add training examples for them or drop them from the test set"
            )
        if int(y_te.max()) >= classes:
            raise BprunError(f"{path}: y_test has label {int(y_te.max())} >= num_classes={classes}")
    elif task == "regression":
        y, y_te = y.float(), y_te.float()
        if y.dim() == 1:
            y, y_te = y.unsqueeze(1), y_te.unsqueeze(1)
        classes = y.shape[1]
    else:
        raise BprunError(f"dataset.task must be classification, regression or null, got {task}")
    if x.dtype != torch.uint8:
        x, x_te = x.float(), x_te.float()
    return Dataset(
        x_train=x,
        y_train=y,
        x_test=x_te,
        y_test=y_te,
        num_classes=classes,
        problem=task,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
