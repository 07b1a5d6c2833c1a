"""Your own table: a CSV or Parquet file, one row per example, one column the target.

Numeric columns are standardised with the training split's mean and std;
string (categorical) columns are one-hot encoded over the training split's
categories (a category first seen in validation or test encodes as all
zeros). What was fitted is the source's `state`, kept in checkpoints so eval
and resume encode exactly as training did.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from bprun.data.sources import Dataset, carve
from bprun.errors import BprunError

FILL = ("mean", "median", "zero")


def read_table(path: str, key: str = "dataset.path"):
    import pandas as pd

    if not path:
        raise BprunError(f"dataset=table needs {key}=<file.csv or file.parquet>")
    p = Path(path).expanduser()
    if not p.is_file():
        raise BprunError(f"{key}={path} does not exist: point it at a CSV or Parquet file")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            frame = pd.read_parquet(p, engine="pyarrow")
        elif p.suffix.lower() in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(p, sep="\t" if p.suffix.lower() == ".tsv" else ",")
        else:
            raise BprunError(f"{key}={path}: the file must end in .csv, .tsv or .parquet")
    except BprunError:
        raise
    except Exception as e:
        raise BprunError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if len(frame) == 0:
        raise BprunError(f"{path} has no rows")
    return frame


def _is_numeric(series) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def _is_bool(series) -> bool:
    import pandas as pd

    return pd.api.types.is_bool_dtype(series)


def _check_numeric_text(frame, column: str, path: str) -> None:
    """A text column whose values are mostly numbers holds a typo, not categories."""
    import pandas as pd

    values = frame[column].dropna()
    parsed = pd.to_numeric(values, errors="coerce")
    bad = values[parsed.isna()]
    if len(values) and len(bad) and len(bad) <= len(values) / 2:
        row = bad.index[0]
        raise BprunError(
            f"column '{column}' of {path} is numeric but has {len(bad)} non-numeric value(s), "
            f"e.g. {bad.iloc[0]!r} in row {row + 2}: fix the file, or list the column in "
            "dataset.categorical"
        )


def load_table(
    path: str,
    target: str | None = None,
    task: str | None = None,
    test_path: str | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    categorical: list[str] | None = None,
    drop: list[str] | None = None,
    fill_missing: str | float | None = None,
    val_fraction: float = 0.1,
    val_seed: int = 0,
    state: dict | None = None,
    fold: dict | None = None,
) -> Dataset:
    """Features and target from a table file; see the module docstring.

    `fold` (from `task=cv`): the training pool's fold `fold["k"]` validates instead of a random
    `val_fraction`, stratified by a classification target, keeping each value of the column
    `fold["group"]` (which is then not a feature) in one fold.

    `task` (classification | regression) is inferred from the target when null: text,
    booleans and integers classify, floats regress. `fill_missing` (mean | median | zero |
    a number) fills empty numeric cells with the training split's statistic; empty text
    cells become their own category. Without it an empty cell is an error.
    """
    frame = read_table(path)
    if not target:
        raise BprunError(
            f"dataset=table needs dataset.target=<column>; the columns are {', '.join(map(str, frame.columns))}"
        )
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if target not in columns:
        raise BprunError(
            f"dataset.target={target} is not a column of {path}; the columns are {', '.join(columns)}"
        )
    for name in list(categorical or []) + list(drop or []):
        if name not in columns:
            raise BprunError(
                f"column '{name}' (dataset.categorical/drop) is not in {path}; the columns are {', '.join(columns)}"
            )
    if (
        fill_missing is not None
        and fill_missing not in FILL
        and not isinstance(fill_missing, (int, float))
    ):
        raise BprunError(
            f"dataset.fill_missing must be mean, median, zero, a number or null; got {fill_missing}"
        )

    for name in columns:  # typos in number columns, checked on every row before splitting
        if name in (categorical or []) or (name == target and task == "classification"):
            continue
        if not _is_numeric(frame[name]) and not _is_bool(frame[name]):
            _check_numeric_text(frame, name, path)
    if test_path:
        test_frame = read_table(test_path, "dataset.test_path")
        test_frame.columns = [str(c) for c in test_frame.columns]
        missing = [c for c in columns if c not in test_frame.columns]
        if missing:
            raise BprunError(
                f"dataset.test_path={test_path} lacks column(s) {', '.join(missing)} of {path}"
            )
        train_frame = frame
    else:
        keep, held = carve(len(frame), test_fraction, split_seed)
        train_frame, test_frame = frame.iloc[keep.tolist()], frame.iloc[held.tolist()]
    if fold is not None:
        keep, held = table_fold(train_frame, target, task, fold, columns)
        drop = [*(drop or []), *([fold["group"]] if fold.get("group") else [])]
    else:
        keep, held = carve(len(train_frame), val_fraction, val_seed)
    train_frame, val_frame = train_frame.iloc[keep.tolist()], train_frame.iloc[held.tolist()]
    if len(train_frame) == 0:
        raise BprunError(
            f"{path} has too few rows ({len(frame)}) for the test and validation splits"
        )

    if state is None:
        state = fit(train_frame, target, task, categorical or [], drop or [], fill_missing, path)
    x_tr, y_tr = encode(train_frame, state, path, "training")
    x_va, y_va = encode(val_frame, state, path, "validation")
    x_te, y_te = encode(test_frame, state, path, "test")
    classes = state["classes"]
    return Dataset(
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        x_val=x_va if len(x_va) else None,
        y_val=y_va if len(y_va) else None,
        num_classes=len(classes) if state["task"] == "classification" else 1,
        problem=state["task"],
        classes=classes or None,
        state=state,
        val_rows=[int(i) for i in val_frame.index] if fold is not None else None,
    )


def table_fold(frame, target: str, task: str | None, fold: dict, columns: list[str]):
    """(kept, held) positions of `frame` for fold `fold["k"]`: stratified when the target is
    class labels, grouped by the column `fold["group"]` when given."""
    import pandas as pd

    from bprun.data.folds import fold_split

    group = fold.get("group")
    if group and group not in columns:
        raise BprunError(
            f"cv.group={group} is not a column of the table; the columns are {', '.join(columns)}"
        )
    y = frame[target]
    classify = task == "classification" or (task is None and not pd.api.types.is_float_dtype(y))
    labels = y.astype(str).to_numpy() if classify else None
    groups = frame[group].astype(str).to_numpy() if group else None
    return fold_split(len(frame), fold, labels, groups)


def fit(frame, target, task, categorical, drop, fill_missing, path) -> dict:
    """The encoding, learnt from the training split: plain values only (checkpoint-safe)."""
    import pandas as pd

    y = frame[target]
    if task is None:
        task = "regression" if pd.api.types.is_float_dtype(y) else "classification"
    if task not in ("classification", "regression"):
        raise BprunError(f"dataset.task must be classification, regression or null, got {task}")
    if y.isna().any():
        raise BprunError(
            f"target column '{target}' has {int(y.isna().sum())} missing value(s): drop those rows"
        )
    if task == "regression":
        if not _is_numeric(y):
            _check_numeric_text(frame, target, path)
            raise BprunError(
                f"dataset.task=regression needs a numeric target, but '{target}' holds text"
            )
        classes = []
    else:
        classes = sorted(str(v) for v in y.unique())
        if len(classes) < 2:
            raise BprunError(
                f"target column '{target}' has one value ({classes[0]}); a classifier needs two"
            )
    features = []
    for name in frame.columns:
        if name == target or name in drop:
            continue
        col = frame[name]
        if name in categorical or not _is_numeric(col):
            if name not in categorical and not pd.api.types.is_bool_dtype(col):
                _check_numeric_text(frame, name, path)
            missing = int(col.isna().sum())
            if missing and fill_missing is None:
                raise BprunError(_missing(name, missing))
            cats = sorted(str(v) for v in col.dropna().unique()) + (
                ["<missing>"] if missing else []
            )
            features.append({"name": name, "kind": "category", "categories": cats})
        else:
            values = col.astype("float64")
            missing = int(values.isna().sum())
            if missing and fill_missing is None:
                raise BprunError(_missing(name, missing))
            fill = 0.0
            if fill_missing == "mean":
                fill = float(values.mean())
            elif fill_missing == "median":
                fill = float(values.median())
            elif isinstance(fill_missing, (int, float)):
                fill = float(fill_missing)
            values = values.fillna(fill)
            mean, std = float(values.mean()), float(values.std(ddof=0))
            if not math.isfinite(fill):
                fill = 0.0
            features.append(
                {
                    "name": name,
                    "kind": "number",
                    "mean": mean,
                    "std": std if std > 0 else 1.0,
                    "fill": fill,
                }
            )
    if not features:
        raise BprunError(f"{path} has no feature columns besides the target '{target}'")
    return {
        "target": target,
        "task": task,
        "classes": classes,
        "fill_missing": fill_missing,
        "features": features,
    }


def _missing(column: str, count: int) -> str:
    return (
        f"column '{column}' has {count} missing value(s): fill them in the file, or set "
        "dataset.fill_missing=mean|median|zero|<number>"
    )


def encode(frame, state: dict, path: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, F) float32, targets) of `frame` under the fitted `state`."""
    import pandas as pd

    parts = []
    for f in state["features"]:
        name = f["name"]
        if name not in frame.columns:
            raise BprunError(f"the {split} split of {path} lacks column '{name}'")
        col = frame[name]
        missing = int(col.isna().sum())
        if missing and state["fill_missing"] is None:
            raise BprunError(_missing(name, missing) + f" (in the {split} split)")
        if f["kind"] == "category":
            text = col.astype(object).where(col.notna(), "<missing>").astype(str)
            index = {c: i for i, c in enumerate(f["categories"])}
            codes = text.map(index).fillna(-1).to_numpy(dtype=np.int64)  # unseen: all zeros
            onehot = np.zeros((len(frame), len(f["categories"])), dtype=np.float32)
            rows = np.nonzero(codes >= 0)[0]
            onehot[rows, codes[rows]] = 1.0
            parts.append(onehot)
        else:
            values = pd.to_numeric(col, errors="coerce")
            if int(values.isna().sum()) > missing:
                _check_numeric_text(frame, name, path)
            values = values.astype("float64").fillna(f["fill"]).to_numpy()
            parts.append(((values - f["mean"]) / f["std"]).astype(np.float32)[:, None])
    x = torch.from_numpy(np.concatenate(parts, axis=1))
    y = frame[state["target"]]
    if state["task"] == "regression":
        target = torch.tensor(
            pd.to_numeric(y, errors="coerce").to_numpy(dtype="float64"), dtype=torch.float32
        )
        return x, target.view(-1, 1)
    labels = y.astype(str).to_numpy()
    classes = state["classes"]
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted({v for v in labels if v not in index})
    if unseen:
        raise BprunError(
            f"the {split} split has target value(s) {', '.join(unseen[:5])} that training never sees "
            f"(training has {', '.join(classes[:10])}): add such rows to the training data or drop them"
        )
    return x, torch.tensor([index[v] for v in labels], dtype=torch.long)
