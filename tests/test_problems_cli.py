"""Problems end to end through the real `bprun` command: a fraud-like table with 3% positives
monitored by PR-AUC, a multilabel problem, reports, and the bad input of the problem settings."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import BPRUN

pytestmark = pytest.mark.slow

BASE = ["trainer.threads=1", "trainer.progress=false"]


def run(cwd: Path, *args: str, data_dir: Path, check: bool = True, multirun: bool = False):
    cmd = [BPRUN, *(["-m"] if multirun else []), f"paths.data_dir={data_dir}", *BASE, *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def fraud_table(path: Path, n: int = 3000) -> Path:
    """Rows with 3% positives that a small MLP can rank well but rarely calls positive."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n, n_features=8, n_informative=4, weights=[0.97], flip_y=0.0,
        class_sep=1.2, random_state=0,
    )  # fmt: skip
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)])
    frame["fraud"] = y
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def fraud(tmp_path_factory, data_dir):
    """One run on the table monitored by val/average_precision (max), with early stopping and
    problem.threshold=auto: its folder serves the checks below."""
    root = tmp_path_factory.mktemp("fraud")
    table = fraud_table(root / "fraud.csv")
    args = [
        "dataset=table", f"dataset.path={table}", "dataset.target=fraud",
        "trainer.monitor=val/average_precision", "trainer.mode=max",
        "trainer.early_stopping.patience=3", "trainer.max_epochs=12",
        "problem.threshold=auto", "dataset.val_fraction=0.3",
        f"hydra.run.dir={root / 'run'}",
    ]  # fmt: skip
    proc = run(root, *args, data_dir=data_dir)
    return root, root / "run", proc.stdout + proc.stderr, table


def test_a_rare_positive_table_is_scored_by_pr_auc_end_to_end(fraud):
    root, run_dir, output, _ = fraud
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["problem"] == "classification" and m["monitor"] == "val/average_precision"
    assert "problem binary classification (threshold 0.5); metrics loss, acc" in output
    assert "monitoring val/average_precision (max)" in output
    history = [h["val/average_precision"] for h in m["history"]]
    # the best epoch is the one with the highest PR-AUC, and the best checkpoint holds it
    assert m["best"]["val/average_precision"] == max(history)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    (best_name,) = [name for _, name in state["topk"]["entries"]]
    best = torch.load(run_dir / "checkpoints" / best_name, weights_only=True)
    assert best["progress"]["epoch"] == history.index(max(history)) + 1
    # PR-AUC, not accuracy, tells this model from one that calls every row legitimate
    assert m["test"]["test/average_precision"] > 0.3 > 0.03
    for name in ("auroc", "f1", "precision", "recall", "balanced_acc", "ece"):
        assert np.isfinite(m["test"][f"test/{name}"])


def test_early_stopping_follows_the_monitored_metric(fraud):
    _, run_dir, _, _ = fraud
    m = json.loads((run_dir / "metrics.json").read_text())
    history = [h["val/average_precision"] for h in m["history"]]
    if m["stop_reason"].startswith("early stopping"):
        best = history.index(max(history))
        assert len(history) - 1 - best == 3  # patience checks without a better PR-AUC
        assert "val/average_precision" in m["stop_reason"]
    else:  # it kept improving: then no 3 checks in a row were without improvement
        assert m["stop_reason"] == "max_epochs=12 reached"


def test_threshold_auto_takes_the_best_validation_f1_for_the_test_and_eval(fraud, data_dir):
    root, run_dir, output, _ = fraud
    m = json.loads((run_dir / "metrics.json").read_text())
    threshold = m["best"]["val/best_threshold"]
    assert m["threshold"] == pytest.approx(threshold) and 0 < threshold < 1
    assert f"problem.threshold=auto: {threshold:.4f}" in output
    proc = run(root, "task=eval", f"ckpt={run_dir}", "problem.threshold=auto", data_dir=data_dir)
    ev = json.loads(next((run_dir / "checkpoints").glob("eval.json")).read_text())
    assert ev["threshold"] == pytest.approx(threshold)
    assert ev["test/f1"] == pytest.approx(m["test"]["test/f1"], abs=1e-6)
    assert "test split, per class:" in proc.stdout + proc.stderr


def test_the_test_split_writes_a_confusion_matrix_and_a_per_class_table(fraud):
    root, run_dir, output, _ = fraud
    cm = json.loads((run_dir / "test_confusion_matrix.json").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    matrix = np.array(cm["matrix"])
    assert matrix.shape == (2, 2) and cm["classes"] == ["0", "1"]
    (tn, fp), (fn, tp) = matrix
    assert tp / max(tp + fp, 1) == pytest.approx(m["test"]["test/precision"], abs=1e-6)
    assert tp / max(tp + fn, 1) == pytest.approx(m["test"]["test/recall"], abs=1e-6)
    rows = json.loads((run_dir / "test_per_class.json").read_text())
    assert [r["support"] for r in rows] == matrix.sum(1).tolist()
    assert (run_dir / "test_confusion_matrix.png").stat().st_size > 1000
    assert "test split, per class:" in output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert "test/confusion_matrix" in events.Tags()["images"]


def test_a_search_can_maximise_the_pr_auc(fraud, data_dir, tmp_path):
    _, _, _, table = fraud
    proc = run(
        tmp_path, "search=mlp_lr", "search.n_trials=2", "search.n_jobs=1",
        "dataset=table", f"dataset.path={table}", "dataset.target=fraud",
        "trainer.monitor=val/average_precision", "trainer.mode=max", "trainer.max_epochs=2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        data_dir=data_dir, multirun=True,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert "best trial" in out and "val/average_precision" in out
    values = [
        json.loads(p.read_text())["best"]["val/average_precision"]
        for p in (tmp_path / "sweep").glob("*/metrics.json")
    ]
    assert len(values) == 2
    assert f"{max(values):.4f}" in out  # maximised: the best trial is the higher PR-AUC


def test_multilabel_targets_train_and_write_per_label_scores(tmp_path, data_dir):
    g = np.random.default_rng(0)
    x = g.normal(size=(600, 6)).astype(np.float32)
    y = np.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, x[:, 3] > 0.5], 1).astype(np.float32)
    np.savez(tmp_path / "ml.npz", x_train=x, y_train=y)
    proc = run(
        tmp_path, "dataset=arrays", f"dataset.path={tmp_path / 'ml.npz'}", "problem=multilabel",
        "trainer.max_epochs=15", "optim.lr=0.01", f"hydra.run.dir={tmp_path / 'run'}",
        data_dir=data_dir,
    )  # fmt: skip
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["problem"] == "multilabel"
    assert m["test"]["test/f1_macro"] > 0.8 and m["test"]["test/auroc"] > 0.9
    rows = json.loads((tmp_path / "run" / "test_per_label.json").read_text())
    assert [r["label"] for r in rows] == ["0", "1", "2"]
    assert "problem multilabel (3 labels" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "args, says",
    [
        (["problem=multilabel"], "problem=multilabel needs one 0/1 column per label"),
        (["problem.threshold=1.5", "dataset=digits"], "problem.threshold=1.5 is outside (0, 1)"),
        (["dataset=regression", "trainer.monitor=val/acc"], "trainer.monitor=val/acc is not a"),
        (["trainer.monitor=val/aucroc"], "did you mean trainer.monitor=val/auroc"),
        (["metrics=[acc,f1_macr]"], "did you mean f1_macro"),
        (["problem=regression"], "problem=regression cannot score this data"),
        (["problem.threshold=auto"], "threshold=auto applies to binary problems"),
    ],
)
def test_bad_problem_settings_are_one_line_and_leave_no_run_folder(args, says, tmp_path, data_dir):
    proc = run(tmp_path, "trainer.max_epochs=1", *args, data_dir=data_dir, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and says in errors[0], out
    assert "Traceback" not in out
    assert not list(tmp_path.glob("outputs/*/*")), "a run folder was left behind"
