"""`task=cv`: k-fold cross-validation. Folds partition the training pool (every row validates
exactly once), classes are stratified, groups stay whole, and the parent folder sums it up."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import numpy as np
import pandas as pd
import pytest
from conftest import BPRUN

from bprun.data.folds import fold_split
from bprun.errors import BprunError


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("labelled", [False, True])
def test_folds_partition_the_pool_and_keep_groups_whole(grouped, labelled):
    rng = np.random.default_rng(0)
    n, folds = 203, 5
    labels = rng.integers(0, 3, n) if labelled else None
    groups = rng.integers(0, 40, n) if grouped else None
    held_all = []
    for k in range(folds):
        kept, held = fold_split(n, {"k": k, "folds": folds, "seed": 1}, labels, groups)
        assert set(kept.tolist()).isdisjoint(held.tolist())
        assert len(kept) + len(held) == n
        held_all.append(held.numpy())
        if labelled and not grouped:  # each class's share is the pool's, within one example
            for c in range(3):
                expected = (labels == c).sum() / folds
                assert abs((labels[held.numpy()] == c).sum() - expected) <= 1
    every = np.concatenate(held_all)
    assert sorted(every.tolist()) == list(range(n))  # each example validates exactly once
    if grouped:
        owner = {}
        for k, held in enumerate(held_all):
            for g in np.unique(groups[held]):
                assert owner.setdefault(int(g), k) == k  # no group in two folds


def test_fold_assignment_is_seeded():
    a = fold_split(50, {"k": 1, "folds": 5, "seed": 3})[1]
    assert a.tolist() == fold_split(50, {"k": 1, "folds": 5, "seed": 3})[1].tolist()
    assert a.tolist() != fold_split(50, {"k": 1, "folds": 5, "seed": 4})[1].tolist()


def test_too_few_groups_or_class_members_for_the_folds_is_an_error():
    with pytest.raises(BprunError, match="cv.group has 3 distinct values, fewer than cv.folds=5"):
        fold_split(30, {"k": 0, "folds": 5}, None, np.arange(30) % 3)
    with pytest.raises(BprunError, match="a class has 2 example"):
        fold_split(30, {"k": 0, "folds": 5}, np.r_[np.zeros(28), np.ones(2)])


def bprun(cwd, *args, data_dir, check=True):
    proc = subprocess.run(
        [BPRUN, f"paths.data_dir={data_dir}", "trainer.threads=1", "trainer.progress=false",
         *args],
        capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if check and proc.returncode:
        raise AssertionError(proc.stdout[-2000:] + proc.stderr[-3000:])
    return proc


@pytest.mark.slow
def test_cv_on_a_grouped_table_end_to_end(tmp_path, data_dir):
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.iloc[:250].copy()
    frame["patient"] = np.arange(len(frame)) // 4  # 4 rows per patient
    frame.to_csv(tmp_path / "train.csv", index=False)
    frame.iloc[:40].to_csv(tmp_path / "test.csv", index=False)
    run = tmp_path / "run"
    proc = bprun(
        tmp_path, "task=cv", "cv.folds=5", "cv.group=patient", "dataset=table",
        f"dataset.path={tmp_path / 'train.csv'}", f"dataset.test_path={tmp_path / 'test.csv'}",
        "dataset.target=target", "trainer.max_epochs=2", f"hydra.run.dir={run}",
        data_dir=data_dir,
    )  # fmt: skip
    rows = [json.loads((run / f"fold_{k}" / "val_rows.json").read_text()) for k in range(5)]
    every = [r for fold in rows for r in fold]
    assert sorted(every) == list(range(len(frame)))  # every row validates in exactly one fold
    owner = {}
    for k, fold in enumerate(rows):
        for patient in set(frame["patient"].iloc[fold]):
            assert owner.setdefault(patient, k) == k  # no patient split across folds
    summary = json.loads((run / "cv.json").read_text())
    acc = summary["metrics"]["val/acc"]
    per_fold = [json.loads((run / f"fold_{k}" / "metrics.json").read_text()) for k in range(5)]
    assert acc["folds"] == [m["best"]["val/acc"] for m in per_fold]
    assert acc["mean"] == pytest.approx(np.mean(acc["folds"]))
    assert acc["std"] == pytest.approx(np.std(acc["folds"], ddof=1))
    with open(run / "cv.csv") as f:
        table = {row["metric"]: row for row in csv.DictReader(f)}
    assert float(table["val/acc"]["mean"]) == pytest.approx(acc["mean"])
    assert "cross-validation, 5 folds" in proc.stdout + proc.stderr
    assert "mean ± std" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["cv.folds=1"], "cv.folds must be a whole number of at least 2"),
        (["dataset=mnist1d", "~dataset.path"], "task=cv splits a source's training pool"),
        (["cv.group=nope"], "cv.group=nope is not a column of the table"),
    ],
)
def test_bad_cv_settings_are_one_line_and_leave_no_folder(args, says, tmp_path, data_dir):
    pd.DataFrame({"a": np.arange(60.0), "y": np.arange(60) % 2}).to_csv(tmp_path / "t.csv")
    table = ["dataset=table", f"dataset.path={tmp_path / 't.csv'}", "dataset.target=y"]
    if "dataset=mnist1d" in args:
        table, args = [], ["dataset=mnist1d"]
    proc = bprun(tmp_path, "task=cv", *table, *args, data_dir=data_dir, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and says in errors[0], out
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))
