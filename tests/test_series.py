"""dataset=series, problem=forecast, model=linear_forecast and task=predict."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from bprun.data.series import load_series, seasonal_naive, target_width
from bprun.errors import BprunError
from bprun.models import LinearForecaster
from bprun.problems.forecast import Forecast

W, H = 6, 3


def frame(days: int = 40, stores: int = 2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dates = pd.date_range("2024-01-01", periods=days, freq="D")
    parts = []
    for k in range(stores):
        promo = (rng.random(days) < 0.3).astype(int)
        demand = 10 * (k + 1) + 3 * np.sin(np.arange(days) * 2 * np.pi / 7) + 4 * promo
        demand = demand + rng.normal(0, 0.5, days)
        parts.append(
            pd.DataFrame(
                {
                    "date": dates.strftime("%Y-%m-%d"),
                    "store": f"s{k}",
                    "demand": demand,
                    "promo": promo,
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def load(path, **kw):
    args = dict(
        path=str(path),
        time="date",
        target="demand",
        id="store",
        covariates=["promo"],
        window=W,
        horizon=H,
        val_start="2024-01-25",
        test_start="2024-02-01",
    )
    args.update(kw)
    return load_series(**args)


def write(tmp_path, f: pd.DataFrame, name: str = "s.csv"):
    path = tmp_path / name
    f.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("extra", [{}, {"calendar": "auto", "id_embedding": "auto"}])
def test_values_after_test_start_do_not_reach_training_or_validation(tmp_path, extra):
    f = frame()
    a = load(write(tmp_path, f, "a.csv"), **extra)
    late = pd.to_datetime(f["date"]) >= "2024-02-01"
    g = f.copy()
    rng = np.random.default_rng(1)
    g.loc[late, "demand"] = rng.permutation(g.loc[late, "demand"].to_numpy()) * 7 + 100
    g.loc[late, "promo"] = 1 - g.loc[late, "promo"]
    b = load(write(tmp_path, g, "b.csv"), **extra)
    for part in ("x_train", "y_train", "x_val", "y_val"):
        assert torch.equal(getattr(a, part), getattr(b, part)), part
    assert not torch.equal(a.y_test, b.y_test)  # the perturbation did reach the test span
    assert a.state["series"] == b.state["series"] and a.state["columns"] == b.state["columns"]


def test_scaling_is_the_training_span_alone_per_series(tmp_path):
    f = frame()
    ds = load(write(tmp_path, f))
    train = f[pd.to_datetime(f["date"]) < "2024-01-25"]
    for store, rows in train.groupby("store"):
        st = ds.state["series"][store]
        assert st["mean"] == pytest.approx(rows["demand"].mean(), rel=1e-12)
        assert st["std"] == pytest.approx(rows["demand"].std(ddof=0), rel=1e-12)
        y = rows["demand"].to_numpy()
        assert st["scale"] == pytest.approx(np.abs(y[7:] - y[:-7]).mean(), rel=1e-12)
    assert ds.state["columns"]["promo"]["mean"] == pytest.approx(train["promo"].mean())


def test_no_window_crosses_a_cutoff(tmp_path):
    # The target is the step number, so every value says where it lies in time.
    n = 40
    f = pd.DataFrame({"t": np.arange(n), "y": np.arange(n, dtype=float)})
    ds = load_series(
        path=str(write(tmp_path, f)),
        time="t",
        target="y",
        window=W,
        horizon=H,
        val_start=25,
        test_start=32,
        season=1,
    )
    assert ds.state["freq"] == "1"

    def spans(x, y):
        inputs = x[:, 0].double() * ds.state["series"]["y"]["std"] + ds.state["series"]["y"]["mean"]
        return inputs.round(), y[:, H : 2 * H].double()

    for (x, y), lo, hi in (
        ((ds.x_train, ds.y_train), 0, 25),
        ((ds.x_val, ds.y_val), 25, 32),
        ((ds.x_test, ds.y_test), 32, n),
    ):
        inputs, targets = spans(x, y)
        assert targets.min() >= lo and targets.max() < hi
        assert (inputs.max(1).values < targets.min(1).values).all()  # inputs end at the origin
    assert len(ds.y_train) == 25 - W - H + 1 and len(ds.y_val) == 7 - H + 1
    assert len(ds.y_test) == n - 32 - H + 1


def test_known_covariates_reach_over_the_horizon(tmp_path):
    ds = load(write(tmp_path, frame()), id_embedding=0)
    assert ds.input_shape == (2, W + H)
    assert torch.all(ds.x_train[:, 0, W:] == 0)  # the horizon's target is not an input
    assert ds.y_train.shape[1] == target_width(H)


def test_seasonal_naive_and_naive_columns():
    v = np.arange(20.0)
    assert seasonal_naive(v, 10, 4, 3).tolist() == [7, 8, 9, 7]
    assert seasonal_naive(v, 10, 3, 1).tolist() == [9, 9, 9]
    assert seasonal_naive(v, 1, 2, 7).tolist() == [0, 0]  # no season back yet: the naive


def test_metrics_match_numpy_references():
    torch.manual_seed(0)
    n = 17
    target = torch.rand(n, H, dtype=torch.float64) * 10 + 1
    snaive = target + torch.randn(n, H, dtype=torch.float64)
    naive = torch.rand(n, 1, dtype=torch.float64) * 10
    mean, std, scale = torch.rand(n, 1) * 5, torch.rand(n, 1) + 0.5, torch.rand(n, 1) + 0.1
    scaled = (target - mean) / std
    y = torch.cat([scaled, target, snaive, naive, mean, std, scale], 1).float()
    out = torch.randn(n, H)
    problem = Forecast(num_classes=H, window=W)
    ev = problem.evaluation("cpu")
    loss = problem.criterion(torch.nn.MSELoss())(out, y)
    for lo in (0, 9):  # two batches
        ev.update(loss, out[lo : lo + 9], y[lo : lo + 9])
    got = ev.compute("test")
    t, s = y[:, H : 2 * H].double().numpy(), y[:, -1:].double().numpy()
    preds = {
        "": out.double().numpy() * y[:, -2:-1].double().numpy() + y[:, -3:-2].double().numpy(),
        "naive_": np.repeat(y[:, 3 * H : 3 * H + 1].double().numpy(), H, 1),
        "snaive_": y[:, 2 * H : 3 * H].double().numpy(),
    }
    for prefix, p in preds.items():
        e = np.abs(p - t)
        assert got[f"test/{prefix}mae"] == pytest.approx(e.mean(), rel=1e-6)
        assert got[f"test/{prefix}rmse"] == pytest.approx(np.sqrt((e**2).mean()), rel=1e-6)
        smape = np.mean(200 * e / (np.abs(p) + np.abs(t)))
        assert got[f"test/{prefix}smape"] == pytest.approx(smape, rel=1e-6)
        assert got[f"test/{prefix}mase"] == pytest.approx((e / s).mean(), rel=1e-6)


def test_linear_forecaster_maps_window_and_covariates():
    m = LinearForecaster((2, W + H), H, window=W, kernel=3)
    assert m(torch.randn(5, 2, W + H)).shape == (5, H)
    plain = LinearForecaster((1, W), H, decompose=False)
    assert plain.covariates is None and plain(torch.randn(4, 1, W)).shape == (4, H)


def test_calendar_is_the_sine_and_cosine_of_each_attribute_over_the_horizon(tmp_path):
    ds = load(write(tmp_path, frame()), calendar=["dayofweek", "month"])
    assert ds.state["calendar"] == ["dayofweek", "month"]
    assert ds.input_shape == (2 + 4, W + H)  # target, promo, 2 per attribute
    # the first training window starts on the first date; its horizon ends W + H - 1 days on
    dates = pd.date_range("2024-01-01", periods=W + H, freq="D")
    week = 2 * np.pi * dates.day_of_week.to_numpy() / 7
    month = 2 * np.pi * (dates.month.to_numpy() - 1) / 12
    want = np.stack([np.sin(week), np.cos(week), np.sin(month), np.cos(month)])
    np.testing.assert_allclose(ds.x_train[0, 2:].numpy(), want, atol=1e-6)


def test_calendar_auto_follows_the_frequency(tmp_path, caplog):
    caplog.set_level("INFO", logger="bprun")
    daily = load(write(tmp_path, frame()), calendar="auto")
    assert daily.state["calendar"] == ["dayofweek", "dayofyear"]
    assert "calendar covariates dayofweek, dayofyear for frequency D" in caplog.text
    f = frame(days=40 * 24)
    f["date"] = np.tile(pd.date_range("2024-01-01", periods=40 * 24, freq="h").astype(str), 2)
    hourly = load(write(tmp_path, f, "h.csv"), val_start="2024-02-01", test_start="2024-02-05")
    assert hourly.state["calendar"] == []  # null: none unless asked for
    auto = load(write(tmp_path, f, "h.csv"), calendar="auto", val_start="2024-02-01")
    assert auto.state["calendar"] == ["hour", "dayofweek"]


def test_id_embedding_gives_each_series_its_index_and_vector(tmp_path):
    from bprun.build import build_model
    from bprun.models.forecast import SeriesEmbedding

    ds = load(write(tmp_path, frame(stores=3)), id_embedding="auto")
    assert ds.state["ids"] == ["s0", "s1", "s2"] and ds.state["id_embedding"] == 3
    assert ds.input_shape == (3, W + H)  # target, promo, the series index
    index = ds.x_train[:, -1]
    assert set(index[:, 0].tolist()) == {0.0, 1.0, 2.0}
    assert torch.equal(index, index[:, :1].expand_as(index))  # the same at every step
    problem = Forecast.from_data(ds)
    assert problem.id_embedding == (3, 3)
    node = {"_target_": "bprun.models.MLP", "hidden": [8]}
    model = build_model(OmegaConf.create(node), ds, problem)
    assert isinstance(model, SeriesEmbedding) and model.embedding.weight.shape == (3, 3)
    x = ds.x_train[:1].repeat(3, 1, 1)
    x[:, -1] = torch.arange(3.0).view(3, 1)  # one window, told it belongs to each series
    out = model(x)
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])
    assert load(write(tmp_path, frame(stores=3)), id_embedding=0).input_shape == (2, W + H)


@pytest.mark.parametrize("name", ["mlp", "gru", "lstm", "transformer", "linear_forecast"])
def test_every_forecaster_takes_the_id_and_the_calendar(tmp_path, name):
    from bprun.build import build_model

    ds = load(write(tmp_path, frame()), id_embedding=3, calendar=["dayofweek"])
    node = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / f"{name}.yaml")
    model = build_model(node, ds, Forecast.from_data(ds))
    out = model(ds.x_train[:4])
    assert out.shape == (4, H)
    out.sum().backward()
    assert model.embedding.weight.grad.abs().sum() > 0  # the id reaches the forecast


# ------------------------------------------------------------------ bad input
def test_bad_calendar_and_id_embedding_settings(tmp_path):
    bad(tmp_path, frame(), "dataset.calendar names weekday: choose from auto", calendar=["weekday"])
    bad(tmp_path, frame(), "dataset.id_embedding must be auto or a whole", id_embedding=-1)
    f = frame().assign(date=lambda d: d.groupby("store").cumcount())
    with pytest.raises(BprunError, match="needs timestamps, and dataset.time=date holds step"):
        load(write(tmp_path, f), calendar=["month"], val_start=24, test_start=31)


def bad(tmp_path, f, match, **kw):
    with pytest.raises(BprunError, match=match):
        load(write(tmp_path, f), **kw)


def test_unparseable_timestamps_name_the_rows(tmp_path):
    f = frame()
    f.loc[4, "date"] = "not a date"
    bad(tmp_path, f, r"unparseable timestamps in row\(s\) 5 \(e.g. 'not a date'\)")


def test_duplicate_rows_are_named(tmp_path):
    f = frame()
    f = pd.concat([f, f.iloc[[3]]], ignore_index=True)
    bad(tmp_path, f, r"duplicate \(store, date\) rows 4, 81")


def test_gaps_are_an_error_unless_filled(tmp_path):
    f = frame().drop(index=[10, 11]).reset_index(drop=True)
    bad(tmp_path, f, r"series s0 has missing time steps \(2024-01-11.*dataset.fill=ffill")
    ds = load(write(tmp_path, f, "g.csv"), fill="interpolate")
    full = load(write(tmp_path, frame(), "full.csv"))
    assert ds.x_train.shape == full.x_train.shape


def test_non_numeric_target(tmp_path):
    f = frame()
    f["demand"] = f["demand"].astype(object)
    f.loc[7, "demand"] = "lots"
    bad(tmp_path, f, r"target column 'demand' holds text in row\(s\) 8")


def test_short_series_are_listed_or_skipped(tmp_path):
    f = pd.concat([frame(), frame(days=5, stores=1).assign(store="tiny")], ignore_index=True)
    bad(tmp_path, f, r"shorter than window \+ horizon = 9 steps: tiny \(5\)")
    ds = load(write(tmp_path, f, "k.csv"), skip_short=True)
    assert sorted(ds.state["series"]) == ["s0", "s1"]


def test_unsorted_rows_are_sorted_and_said(tmp_path, caplog):
    f = frame()
    shuffled = f.sample(frac=1, random_state=0)
    with caplog.at_level("INFO", logger="bprun"):
        a = load(write(tmp_path, shuffled, "u.csv"))
    assert "not in time order; sorted by store, date" in caplog.text
    assert torch.equal(a.x_train, load(write(tmp_path, f, "o.csv")).x_train)


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.slow
def test_train_then_predict_on_a_csv(bprun, tmp_path):
    path = write(tmp_path, frame(days=60, stores=3))
    common = [
        "dataset=series",
        f"dataset.path={path}",
        "dataset.time=date",
        "dataset.target=demand",
        "dataset.id=store",
        "dataset.covariates=[promo]",
        f"dataset.window={W}",
        f"dataset.horizon={H}",
        "dataset.id_embedding=auto",
        "dataset.calendar=[dayofweek]",
    ]
    r = bprun(*common, "model=linear_forecast", "trainer.max_epochs=40", "optim.lr=0.03")
    assert r.returncode == 0, r.output
    assert "frequency D, inferred" in r.output and "season 7" in r.output
    test = r.metrics["test"]
    assert test["test/mase"] < test["test/snaive_mase"]  # the promotions are known in advance
    assert "seasonal naive" in r.output and "naive" in r.output

    future = frame(days=60, stores=3)
    extra = pd.DataFrame(
        {
            "date": pd.date_range("2024-03-01", periods=H).strftime("%Y-%m-%d").tolist() * 3,
            "store": [s for s in ("s0", "s1", "s2") for _ in range(H)],
            "demand": np.nan,
            "promo": 0,
        }
    )
    fut = write(tmp_path, pd.concat([future, extra]), "future.csv")
    out = tmp_path / "pred"
    p = bprun("task=predict", f"ckpt={r.run_dir}", f"dataset.path={fut}", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.output
    got = pd.read_csv(out / "forecast.csv")
    assert list(got.columns) == ["time", "id", "prediction"] and len(got) == 3 * H
    assert got["time"].iloc[0] == "2024-03-01"
    assert (out / "forecast.png").is_file()
    # in the original units: near each store's level (10, 20, 30), not the scaled one
    levels = got.groupby("id")["prediction"].mean()
    assert levels["s0"] < levels["s1"] < levels["s2"] and levels["s2"] > 20

    missing = write(tmp_path, future.drop(columns=["promo"]), "nopromo.csv")
    e = bprun(
        "task=predict",
        f"ckpt={r.run_dir}",
        f"dataset.path={missing}",
        f"hydra.run.dir={tmp_path / 'pred2'}",
        check=False,
    )
    assert e.returncode != 0
    assert "error: " in e.output and "lacks the covariate column(s) promo" in e.output
    assert not (tmp_path / "pred2").exists()

    stranger = write(
        tmp_path, pd.concat([future, extra]).replace({"store": {"s2": "s9"}}), "s9.csv"
    )
    e = bprun("task=predict", f"ckpt={r.run_dir}", f"dataset.path={stranger}", check=False)
    errors = [line for line in e.output.splitlines() if line.startswith("error:")]
    assert e.returncode != 0 and len(errors) == 1
    assert "series s9 was not in the training data" in errors[0] and "id embedding" in errors[0]


def ar_frame(steps: int = 400) -> pd.DataFrame:
    """Two series of one scale that differ in how they move: AR(1) with phi +0.8 and -0.8.
    A window does not say which is which; the id does."""
    rng = np.random.default_rng(0)
    parts = []
    for name, phi in (("up", 0.8), ("flip", -0.8)):
        y = np.zeros(steps)
        for t in range(1, steps):
            y[t] = phi * y[t - 1] + rng.normal()
        dates = pd.date_range("2024-01-01", periods=steps, freq="D").strftime("%Y-%m-%d")
        parts.append(pd.DataFrame({"date": dates, "unit": name, "value": y}))
    return pd.concat(parts, ignore_index=True)


@pytest.mark.slow
def test_a_global_model_tells_series_apart_by_their_id(bprun, tmp_path):
    path = write(tmp_path, ar_frame())
    common = [
        "dataset=series",
        f"dataset.path={path}",
        "dataset.time=date",
        "dataset.target=value",
        "dataset.id=unit",
        "dataset.window=1",
        "dataset.horizon=1",
        "dataset.season=1",
        "model=mlp",
        "model.hidden=[16]",
        "trainer.max_epochs=15",
        "optim.lr=0.01",
    ]
    without = bprun(*common, "dataset.id_embedding=0").metrics["test"]["test/mase"]
    r = bprun(*common, "dataset.id_embedding=2", "dataset.calendar=[dayofweek]")
    assert r.returncode == 0, r.output
    # one value back, phi alone predicts: a shared phi near 0 helps neither series
    assert r.metrics["test"]["test/mase"] < 0.8 * without
    out = tmp_path / "pred"
    p = bprun("task=predict", f"ckpt={r.run_dir}", f"hydra.run.dir={out}")
    assert p.returncode == 0, p.output
    got = pd.read_csv(out / "forecast.csv")  # the calendar of the horizon made by predict
    assert got["time"].tolist() == ["2025-02-04", "2025-02-04"] and len(got) == 2


def test_a_bad_file_is_one_error_line_and_no_run_folder(bprun, tmp_path):
    f = frame()
    f = pd.concat([f, f.iloc[[0]]], ignore_index=True)
    path = write(tmp_path, f)
    r = bprun(
        "dataset=series",
        f"dataset.path={path}",
        "dataset.time=date",
        "dataset.target=demand",
        "dataset.id=store",
        check=False,
    )
    assert r.returncode != 0
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "duplicate (store, date) rows 1, 81" in errors[0]
    assert not r.run_dir.exists()


@pytest.mark.slow
def test_the_demand_demo_beats_the_seasonal_naive(bprun):
    r = bprun("experiment=demand_forecast", "trainer.max_epochs=3")
    test = r.metrics["test"]
    assert test["test/snaive_mase"] > 1.0 > 0.6 > test["test/mase"]
    assert "does not beat the seasonal naive" not in r.output


@pytest.mark.slow
def test_backtest_sliding_refits_on_spans_of_one_length(bprun, tmp_path):
    path = write(tmp_path, frame(days=60, stores=2))
    r = bprun(
        "task=backtest",
        "dataset=series",
        f"dataset.path={path}",
        "dataset.time=date",
        "dataset.target=demand",
        "dataset.id=store",
        f"dataset.window={W}",
        f"dataset.horizon={H}",
        "dataset.test_start=2024-02-18",
        "model=linear_forecast",
        "trainer.max_epochs=1",
        "backtest.folds=2",
        "backtest.window=sliding",
    )
    assert r.returncode == 0, r.output
    assert "backtest, 2 folds (sliding window, refit=true)" in r.output
    trained = re.findall(r"; (\d+) train, (\d+) val, (\d+) test windows", r.output)
    # the whole test span first (the folds' plan), then each fold: the span slid, its length kept
    assert len(trained) == 3 and trained[1] == trained[2]
    assert (r.run_dir / "fold_1" / "checkpoints").exists()  # refit: a model of its own


@pytest.mark.slow
def test_backtest_writes_a_table_per_fold_and_the_mean(bprun, tmp_path):
    path = write(tmp_path, frame(days=60, stores=2))
    r = bprun(
        "task=backtest",
        "dataset=series",
        f"dataset.path={path}",
        "dataset.time=date",
        "dataset.target=demand",
        "dataset.id=store",
        f"dataset.window={W}",
        f"dataset.horizon={H}",
        "dataset.test_start=2024-02-18",
        "model=linear_forecast",
        "trainer.max_epochs=2",
        "backtest.folds=2",
        "backtest.refit=false",
    )
    assert r.returncode == 0, r.output
    table = pd.read_csv(r.run_dir / "backtest.csv")
    assert table["test_start"].tolist() == ["2024-02-18 00:00:00", "2024-02-24 00:00:00"]
    assert table["end"].tolist() == ["2024-02-23 00:00:00", "2024-02-29 00:00:00"]
    summary = __import__("json").loads((r.run_dir / "backtest.json").read_text())
    mase = summary["metrics"]["test/mase"]
    assert mase["mean"] == pytest.approx(table["test/mase"].mean())
    assert mase["std"] == pytest.approx(table["test/mase"].std(ddof=0))
    assert "backtest, 2 folds (expanding window, refit=false)" in r.output
    assert not (r.run_dir / "fold_1" / "checkpoints").exists()  # fold 0's model, tested again


def test_the_saved_state_rebuilds_the_same_windows(tmp_path):
    """Eval and resume hand the checkpoint's state back: same cutoffs, same scaling."""
    path = write(tmp_path, frame())
    a = load(path)
    b = load_series(path=str(path), state=a.state)
    for part in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(a, part), getattr(b, part)), part


def test_the_saved_state_refuses_series_it_never_saw(tmp_path):
    a = load(write(tmp_path, frame()), id_embedding=2)
    other = write(tmp_path, frame().replace({"store": {"s1": "s7"}}), "other.csv")
    with pytest.raises(BprunError, match="series s7 were not in the training data"):
        load_series(path=str(other), state=a.state)


def test_quantile_loss_and_coverage_match_numpy():
    from bprun.losses import QuantileLoss

    torch.manual_seed(1)
    qs = [0.1, 0.5, 0.9]
    out, target = torch.randn(5, 3 * H), torch.randn(5, H)
    e = target.numpy()[:, None, :] - out.view(5, 3, H).numpy()
    q = np.array(qs)[None, :, None]
    want = np.maximum(q * e, (q - 1) * e).mean()
    assert QuantileLoss(qs)(out, target).item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(BprunError, match="increasing values in"):
        QuantileLoss([0.9, 0.1])

    problem = Forecast(num_classes=H, window=W)
    problem.use_loss({"_target_": "bprun.losses.QuantileLoss", "quantiles": qs})
    assert problem.output_size == 3 * H and "coverage" in problem.selected
    n = 8
    original = torch.rand(n, H) * 10
    mean, std = torch.full((n, 1), 2.0), torch.full((n, 1), 3.0)
    y = torch.cat(
        [(original - mean) / std, original, original, original[:, :1], mean, std, torch.ones(n, 1)],
        1,
    )
    out = torch.randn(n, 3 * H).sort(1).values  # blocks: low, median, high
    ev = problem.evaluation("cpu")
    ev.update(torch.tensor(0.0), out, y)
    got = ev.compute("test")
    blocks = out.view(n, 3, H) * 3 + 2
    inside = (blocks[:, 0] <= original) & (original <= blocks[:, 2])
    assert got["test/coverage"] == pytest.approx(inside.float().mean().item())
    assert got["test/mae"] == pytest.approx((blocks[:, 1] - original).abs().mean().item(), rel=1e-5)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_equal_weights(bprun, data_dir, tmp_path):
    import signal

    from test_checkpoint import model_state, resumed_at, saved_update, start, wait_for_update

    path = write(tmp_path, frame(days=60, stores=2))
    args = [
        "dataset=series",
        f"dataset.path={path}",
        "dataset.time=date",
        "dataset.target=demand",
        "dataset.id=store",
        "dataset.covariates=[promo]",
        f"dataset.window={W}",
        f"dataset.horizon={H}",
        "dataset.batch_size=8",
        "model=mlp",
        "model.hidden=[32]",
        "model.dropout=0.1",
        "trainer.max_epochs=4",
        "trainer.checkpoint.every_n_updates=1",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    total = reference.metrics["updates"]
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, last, 4)  # 9 updates an epoch: mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = saved_update(last)
    assert killed_at < total, "the run finished before it was killed"
    proc = start([f"trainer.resume={run_dir}"], data_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and resumed_at(killed_at, out), out
    expected, got = model_state(reference.run_dir), model_state(run_dir)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
