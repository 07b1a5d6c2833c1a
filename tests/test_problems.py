"""Problems' metrics against scikit-learn's on the same predictions, one test per metric, in one
process and over 2 ranks; the problems' checks of data, losses and settings."""

from __future__ import annotations

import logging
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from sklearn import metrics as skm

from bprun.errors import BprunError
from bprun.problems import KINDS, metric_vocabulary
from bprun.problems.classification import Classification
from bprun.problems.multilabel import Multilabel
from bprun.problems.regression import Regression


def ece_reference(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin
    (b_i, b_i+1], weighted by the bin's share of the examples."""
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.digitize(conf, edges[1:-1], right=True)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += abs((pred[inside] == y[inside]).mean() - conf[inside].mean()) * inside.mean()
    return total


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def multiclass_case(n=300, c=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c  # every class present
    out = torch.randn(n, c, generator=g) + 1.5 * torch.nn.functional.one_hot(y, c)
    return out, y


def binary_case(n=400, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.1).long()  # 10% positives
    score = torch.randn(n, generator=g) + 1.2 * y
    return torch.stack([torch.zeros(n), score], 1), y


def multilabel_case(n=200, labels=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, labels, generator=g) < 0.3).float()
    out = torch.randn(n, labels, generator=g) + 1.5 * y
    return out, y


def regression_case(n=150, k=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, k, generator=g) + 3  # no target is 0
    out = y + 0.5 * torch.randn(n, k, generator=g)
    return out, y


def evaluate(problem, out, y, batches=3, prefix="val"):
    """The problem's metrics over `batches` uneven batches, as the trainer accumulates them."""
    ev = problem.evaluation("cpu")
    for idx in np.array_split(np.arange(len(y)), batches):
        idx = torch.as_tensor(idx)
        ev.update(torch.tensor(float(len(idx))), out[idx], y[idx])
    return ev.compute(prefix)


def label_metrics(yy, pred) -> dict:
    """scikit-learn's scores of predicted labels that every single-label problem reports."""
    return {
        "acc": skm.accuracy_score(yy, pred),
        "balanced_acc": skm.balanced_accuracy_score(yy, pred),
        "f1_macro": skm.f1_score(yy, pred, average="macro"),
        "precision_macro": skm.precision_score(yy, pred, average="macro", zero_division=0),
        "recall_macro": skm.recall_score(yy, pred, average="macro"),
    }


def multiclass_reference(out, y):
    p, yy = softmax(out.numpy().astype(np.float64)), y.numpy()
    pred = p.argmax(1)
    onehot = np.eye(p.shape[1])[yy]
    return {
        **label_metrics(yy, pred),
        "auroc": skm.roc_auc_score(yy, p, multi_class="ovr", average="macro"),
        "average_precision": skm.average_precision_score(onehot, p, average="macro"),
        "top5": skm.top_k_accuracy_score(yy, p, k=5),
        "ece": ece_reference(p, yy),
    }


def binary_reference(out, y, threshold):
    p1 = softmax(out.numpy().astype(np.float64))[:, 1]
    yy = y.numpy()
    pred = (p1 >= threshold).astype(int)
    thresholds = np.unique(p1)
    f1s = [skm.f1_score(yy, (p1 >= t).astype(int)) for t in thresholds]
    return {
        **label_metrics(yy, pred),
        "auroc": skm.roc_auc_score(yy, p1),
        "average_precision": skm.average_precision_score(yy, p1),
        "f1": skm.f1_score(yy, pred),
        "precision": skm.precision_score(yy, pred, zero_division=0),
        "recall": skm.recall_score(yy, pred),
        "ece": ece_reference(np.stack([1 - p1, p1], 1), yy),
        "best_threshold": float(thresholds[int(np.argmax(f1s))]),
    }


def multilabel_reference(out, y, threshold=0.5):
    p = 1 / (1 + np.exp(-out.numpy().astype(np.float64)))
    yy = y.numpy().astype(int)
    pred = (p >= threshold).astype(int)
    return {
        "acc": skm.accuracy_score(yy, pred),
        "hamming_acc": 1 - skm.hamming_loss(yy, pred),
        "f1_macro": skm.f1_score(yy, pred, average="macro"),
        "f1_micro": skm.f1_score(yy, pred, average="micro"),
        "auroc": skm.roc_auc_score(yy, p, average="macro"),
        "average_precision": skm.average_precision_score(yy, p, average="macro"),
    }


def regression_reference(out, y):
    o, t = out.numpy().astype(np.float64), y.numpy().astype(np.float64)
    return {
        "mae": skm.mean_absolute_error(t, o),
        "rmse": skm.mean_squared_error(t, o) ** 0.5,
        "r2": skm.r2_score(t, o),
        "mape": skm.mean_absolute_percentage_error(t, o),
    }


CASES = {
    "multiclass": (lambda: Classification(7), multiclass_case, multiclass_reference),
    "binary": (
        lambda: Classification(2, threshold=0.3),
        binary_case,
        lambda o, y: binary_reference(o, y, 0.3),
    ),
    "multilabel": (lambda: Multilabel(5), multilabel_case, multilabel_reference),
    "regression": (lambda: Regression(3), regression_case, regression_reference),
}
PER_METRIC = [
    (case, name) for case, (_, _, ref) in CASES.items() for name in ref(*CASES[case][1]())
]


@pytest.mark.parametrize("case, metric", PER_METRIC, ids=[f"{c}-{m}" for c, m in PER_METRIC])
def test_each_metric_equals_scikit_learn_on_the_same_predictions(case, metric):
    make, data, reference = CASES[case]
    out, y = data()
    got = evaluate(make(), out, y)
    assert got[f"val/{metric}"] == pytest.approx(reference(out, y)[metric], abs=1e-5)


def test_every_metric_a_problem_reports_is_named_before_data_and_tested_here():
    for case, (make, data, reference) in CASES.items():
        problem = make()
        got = evaluate(problem, *data())
        assert list(got) == problem.metric_names("val")  # the names known before data
        assert set(got) == {"val/loss"} | {f"val/{m}" for m in reference(*data())}, case
        assert {k.split("/")[1] for k in got} <= set(metric_vocabulary(problem.kind))


def test_the_loss_is_the_sample_weighted_mean_over_uneven_batches():
    out, y = multiclass_case(n=10)
    ev = Classification(7).evaluation("cpu")
    ev.update(torch.tensor(1.0), out[:7], y[:7])
    ev.update(torch.tensor(2.0), out[7:], y[7:])
    assert ev.compute("val")["val/loss"] == pytest.approx((7 * 1.0 + 3 * 2.0) / 10)


def test_a_subset_of_metrics_is_computed_and_a_wrong_name_says_which_exist():
    out, y = multiclass_case()
    got = evaluate(Classification(7, metrics=["acc", "auroc"]), out, y)
    assert list(got) == ["val/loss", "val/acc", "val/auroc"]
    with pytest.raises(BprunError, match="did you mean auroc"):
        Classification(7, metrics=["aucroc"])
    with pytest.raises(BprunError, match="f1 .*does not report|does not report"):
        Classification(7, metrics=["f1"])  # binary only


def test_auroc_on_a_split_with_one_class_is_left_out_with_a_warning(caplog):
    out, _ = binary_case()
    y = torch.zeros(len(out), dtype=torch.long)  # no positive at all
    with caplog.at_level(logging.WARNING, logger="bprun"):
        got = evaluate(Classification(2), out, y, prefix="val")
    assert "val/auroc" not in got and "val/average_precision" not in got
    assert all(np.isfinite(v) for v in got.values())
    assert "the val split holds one class only: auroc is left out" in caplog.text


def test_mape_with_a_zero_target_is_left_out_with_a_warning(caplog):
    out, y = regression_case()
    y[3, 1] = 0.0
    with caplog.at_level(logging.WARNING, logger="bprun"):
        got = evaluate(Regression(3), out, y, prefix="test")
    assert "test/mape" not in got and got["test/mae"] > 0
    assert "test split has a target equal to 0: mape is left out" in caplog.text


def test_soft_targets_count_as_their_argmax():
    out, y = multiclass_case()
    soft = torch.nn.functional.one_hot(y, 7).float() * 0.8 + 0.2 / 7
    assert evaluate(Classification(7), out, soft) == evaluate(Classification(7), out, y)


def test_decoding_follows_the_threshold():
    out = torch.tensor([[0.0, -1.0], [0.0, 0.0], [0.0, 2.0]])  # p1 = 0.27, 0.5, 0.88
    assert Classification(2).decode(out).tolist() == [0, 1, 1]
    assert Classification(2, threshold=0.6).decode(out).tolist() == [0, 0, 1]
    assert Multilabel(2).decode(torch.tensor([[-1.0, 1.0]])).tolist() == [[0, 1]]


@pytest.mark.parametrize("threshold", [0, 1, 1.5, -0.2, "high", True])
def test_a_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(BprunError, match="problem.threshold"):
        Classification(2, threshold=threshold)


def test_threshold_auto_is_for_binary_problems():
    assert Classification(2, threshold="auto").auto_threshold
    with pytest.raises(BprunError, match="threshold=auto applies to binary problems"):
        Classification(5, threshold="auto")


def test_the_registry_names_each_kind_and_its_class():
    from bprun.problems import problem_class

    for kind in KINDS:
        cls = problem_class(kind)
        assert cls.kind == kind and set(cls.names) == set(KINDS[kind][1])


# ------------------------------------------------------------------ two ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        got = {}
        for case, (make, data, _) in CASES.items():
            out, y = data()
            # uneven parts: rank 0 evaluates the first 60%, rank 1 the rest
            cut = int(0.6 * len(y))
            part = slice(0, cut) if rank == 0 else slice(cut, None)
            got[case] = evaluate(make(), out[part], y[part], batches=2)
        results[rank] = got
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_over_two_ranks_equal_scikit_learn_on_the_whole_split():
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert results[0] == results[1]  # every rank reads the same metrics
    for case, (_, data, reference) in CASES.items():
        out, y = data()
        expected = reference(out, y)
        for metric, value in expected.items():
            assert results[0][case][f"val/{metric}"] == pytest.approx(value, abs=1e-5), (
                case,
                metric,
            )
