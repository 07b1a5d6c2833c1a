"""Your own time series: a CSV or Parquet file in long form, one row per (series, time).

    bprun dataset=series dataset.path=sales.csv dataset.time=date dataset.target=units \
        dataset.id=store dataset.covariates=[promo] dataset.window=28 dataset.horizon=7

Each example is one forecast origin of one series: the `window` steps before it are the
input, the `horizon` steps from it the target. The input is (channels, steps), channels
first as MNIST-1D's: the target, then the past-only covariates (`dataset.past_covariates`,
known up to the origin), then the known-in-advance covariates (`dataset.covariates`: a
calendar, a promotion plan). With known covariates the input runs `window + horizon` steps,
the horizon's target and past covariates left at 0, so every model (mlp, gru, lstm,
transformer, linear_forecast) sees the future it is told about and nothing else.
`dataset.calendar` adds known covariates derived from the timestamps (`calendar`), which
`task=predict` derives for the horizon itself. With `dataset.id_embedding`, a last channel
holds the series' index in the training vocabulary (`state["ids"]`), which the model's
`SeriesEmbedding` swaps for a learned vector.

Splits are by time. `dataset.val_start` and `dataset.test_start` (timestamps), or else
`dataset.val_fraction` and `dataset.test_fraction` of the time axis, are cutoffs: a training
example's target ends before `val_start`, a validation example's target lies in
[val_start, test_start), a test example's from test_start on. Inputs reach back from an
origin (the history a forecaster has there) and never forward past it; an example whose
target straddles a cutoff is dropped. The target is standardised per series, and covariates
per column, with statistics of the training span alone, kept as the source's `state` (in
checkpoints), so eval, resume and `task=predict` scale as training did.

Targets carry what the forecast problem scores with, beside the scaled horizon the loss
sees: the horizon in the original units, the seasonal-naive and naive forecasts, the
series' scaling and its MASE scale (see `bprun.problems.forecast`).

`dataset.path=demo` writes and reads a generated multi-store demand file (`write_demo`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from bprun.data.sources import Dataset
from bprun.errors import BprunError

log = logging.getLogger("bprun")

FILLS = ("ffill", "zero", "interpolate")
# Seasonal period by pandas frequency: a day of hours, a week of days, a year of months, ...
SEASONS = {"h": 24, "D": 7, "B": 5, "W": 52, "M": 12, "ME": 12, "MS": 12, "Q": 4, "QE": 4}
SEASONS.update({"QS": 4, "min": 60, "s": 60})
# Columns of a target row after the scaled horizon, each `horizon` wide or one wide.
EXTRA = ("original", "seasonal_naive")  # horizon wide each
TAIL = ("naive", "mean", "std", "scale")  # one each
DEMO_FILE = "series_demo/demand.csv"
# Calendar covariates: attribute -> its period. Each becomes two channels, the sine and cosine
# of the attribute's phase (Darts' cyclic encoder), so December sits next to January.
CALENDAR = {
    "minute": 60,
    "hour": 24,
    "dayofweek": 7,
    "day": 31,
    "dayofyear": 366,
    "weekofyear": 53,
    "month": 12,
    "quarter": 4,
}
# dataset.calendar=auto, by the frequency's base: the attributes that repeat within a year.
AUTO_CALENDAR = {
    "s": ["minute", "hour"],
    "min": ["minute", "hour", "dayofweek"],
    "h": ["hour", "dayofweek"],
    "D": ["dayofweek", "dayofyear"],
    "B": ["dayofweek", "dayofyear"],
    "W": ["weekofyear"],
    "M": ["month"],
    "ME": ["month"],
    "MS": ["month"],
    "Q": ["quarter"],
    "QE": ["quarter"],
    "QS": ["quarter"],
}


def target_width(horizon: int) -> int:
    """Columns of a target row: scaled horizon, the two horizon-wide extras, the tail."""
    return (1 + len(EXTRA)) * horizon + len(TAIL)


def load_series(
    path: str | None = None,
    time: str | None = None,
    target: str | list[str] | None = None,
    id: str | None = None,  # noqa: A002 - the word users know (dataset.id)
    covariates: list[str] | None = None,
    past_covariates: list[str] | None = None,
    window: int = 28,
    horizon: int = 7,
    freq: str | None = None,
    season: int | None = None,
    val_start: str | None = None,
    test_start: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    fill: str | None = None,
    skip_short: bool = False,
    calendar: list[str] | str | None = None,
    id_embedding: int | str = 0,
    start: str | None = None,
    end: str | None = None,
    data_dir: str = "data",
    state: dict | None = None,
) -> Dataset:
    """Windows of the series in `path`, split by time; see the module docstring."""
    if path == "demo":
        path = str(Path(data_dir) / DEMO_FILE)
        if not Path(path).is_file():
            write_demo(path)
        time, target, id, covariates = (
            time or "date",
            target or "demand",
            id or "store",
            (covariates or ["promo"]),
        )
    if state is None:
        spec = make_spec(
            path,
            time,
            target,
            id,
            covariates,
            past_covariates,
            window,
            horizon,
            freq,
            season,
            fill,
            skip_short,
            calendar,
            id_embedding,
        )
    else:
        spec = dict(state)
    frame = read(path)
    series = clip(prepare(frame, spec, path), spec, start, end)
    if state is None:
        spec["freq"], spec["season"] = infer_frequency(series, spec, path)
        spec["calendar"] = calendar_features(spec["calendar"], spec)
    check_regular(series, spec, path)
    series = drop_short(series, spec, path)
    if state is None:
        spec["ids"], spec["id_embedding"] = series_ids(series, spec)
        spec["val_start"], spec["test_start"] = cutoffs(
            series, spec, val_start, test_start, val_fraction, test_fraction
        )
        fit(series, spec)
    else:  # cutoffs given explicitly move (a backtest's folds); the fitted scaling stays
        unknown = [n for n in series if n not in spec["series"]]
        if unknown:  # a model has no scaling (nor id vector) for them
            raise BprunError(
                f"{path}: series {', '.join(unknown[:5])} were not in the training data: "
                f"evaluate the series the model knows ({', '.join(list(spec['series'])[:5])}"
                f"{' ...' if len(spec['series']) > 5 else ''})"
            )
        steps = bool(spec.get("steps"))
        for key, value in (("val_start", val_start), ("test_start", test_start)):
            if value is not None:
                spec[key] = str(_time(value, steps))
    parts = windows(series, spec)
    names = ("train", "val", "test")
    counts = ", ".join(f"{len(parts[n][0])} {n}" for n in names)
    log.info(
        f"series: {len(series)} series, window {spec['window']}, horizon {spec['horizon']}, "
        f"frequency {spec['freq']}, season {spec['season']}; validation from "
        f"{spec['val_start']}, test from {spec['test_start']}; {counts} windows"
    )
    for name in ("train", "test"):
        if len(parts[name][0]) == 0:
            raise BprunError(
                f"the {name} span of {path} holds no whole window ({spec['window']} + "
                f"{spec['horizon']} steps): move dataset.val_start/test_start or lower "
                "dataset.window/horizon"
            )
    x_val, y_val = parts["val"]
    return Dataset(
        x_train=parts["train"][0],
        y_train=parts["train"][1],
        x_test=parts["test"][0],
        y_test=parts["test"][1],
        x_val=x_val if len(x_val) else None,
        y_val=y_val if len(y_val) else None,
        num_classes=spec["horizon"],
        problem="forecast",
        state=spec,
    )


def make_spec(
    path,
    time,
    target,
    id_,
    covariates,
    past,
    window,
    horizon,
    freq,
    season,
    fill,
    skip_short,
    calendar=None,
    id_embedding=0,
) -> dict:
    """The settings, checked, as plain values: the start of the source's `state`."""
    if not path:
        raise BprunError("dataset=series needs dataset.path=<file.csv or file.parquet> (or demo)")
    if not time or not target:
        raise BprunError(
            "dataset=series needs dataset.time=<timestamp column> and dataset.target=<column>"
        )
    for key, value in (("window", window), ("horizon", horizon)):
        if not isinstance(value, int) or value < 1:
            raise BprunError(f"dataset.{key} must be a whole number of at least 1, got {value}")
    if fill is not None and fill not in FILLS:
        raise BprunError(f"dataset.fill must be ffill, zero, interpolate or null, got {fill}")
    if season is not None and (not isinstance(season, int) or season < 1):
        raise BprunError(f"dataset.season must be a whole number of at least 1, got {season}")
    if id_embedding != "auto" and (
        isinstance(id_embedding, bool) or not isinstance(id_embedding, int) or id_embedding < 0
    ):
        raise BprunError(
            f"dataset.id_embedding must be auto or a whole number (0: none), got {id_embedding}"
        )
    if calendar is not None and calendar != "auto":
        calendar = [calendar] if isinstance(calendar, str) else list(calendar)
        unknown = [c for c in calendar if c not in CALENDAR]
        if unknown:
            raise BprunError(
                f"dataset.calendar names {', '.join(map(str, unknown))}: choose from auto or "
                f"[{', '.join(CALENDAR)}]"
            )
    return {
        "time": time,
        "target": [target] if isinstance(target, str) else list(target),
        "id": id_,
        "covariates": list(covariates or []),
        "past_covariates": list(past or []),
        "window": window,
        "horizon": horizon,
        "freq": freq,
        "season": season,
        "fill": fill,
        "skip_short": bool(skip_short),
        "calendar": calendar,
        "id_embedding": id_embedding,
    }


def read(path: str):
    from bprun.data.table import read_table

    return read_table(path, "dataset.path")


def _rows(index, limit: int = 5) -> str:
    """Row numbers of the file (1 = the first row after the header), the first few."""
    shown = ", ".join(str(int(i) + 1) for i in list(index)[:limit])
    return shown + (f" and {len(index) - limit} more" if len(index) > limit else "")


def prepare(frame, spec: dict, path: str, future_ok: bool = False) -> dict:
    """{series id: frame indexed by time, numeric columns} after the checks every file gets.

    `future_ok`: rows after a series' last target may have no target (a prediction file's
    known covariates for the horizon); such rows are kept, their target NaN.
    """
    import pandas as pd

    frame = frame.reset_index(drop=True)
    frame.columns = [str(c) for c in frame.columns]
    needed = [spec["time"], *spec["target"], *spec["covariates"], *spec["past_covariates"]]
    needed += [spec["id"]] if spec["id"] else []
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise BprunError(
            f"{path} lacks column(s) {', '.join(missing)} (dataset.time/target/id/covariates); "
            f"its columns are {', '.join(frame.columns)}"
        )
    raw = frame[spec["time"]]
    if pd.api.types.is_integer_dtype(raw):
        times = raw.astype("int64")  # step numbers: a regular axis of step 1
        spec.setdefault("steps", True)
    else:
        times = pd.to_datetime(raw, errors="coerce", format="mixed")
        bad = times.isna()
        if bad.any():
            raise BprunError(
                f"{path}: column '{spec['time']}' has unparseable timestamps in row(s) "
                f"{_rows(bad[bad].index)} (e.g. '{raw[bad].iloc[0]}'): write them as "
                "YYYY-MM-DD[ HH:MM:SS]"
            )
    frame = frame.assign(**{spec["time"]: times})
    for col in [*spec["target"], *spec["covariates"], *spec["past_covariates"]]:
        numbers = pd.to_numeric(frame[col], errors="coerce")
        text = numbers.isna() & frame[col].notna()
        if text.any():
            role = "target" if col in spec["target"] else "covariate"
            raise BprunError(
                f"{path}: the {role} column '{col}' holds text in row(s) {_rows(text[text].index)} "
                f"(e.g. '{frame[col][text].iloc[0]}'): a {role} must be numeric"
            )
        frame[col] = numbers.astype("float64")
    keys = [spec["id"], spec["time"]] if spec["id"] else [spec["time"]]
    dup = frame.duplicated(keys, keep=False)
    if dup.any():
        raise BprunError(
            f"{path}: duplicate ({', '.join(keys)}) rows {_rows(dup[dup].index)}: keep one row "
            "per series and time"
        )
    order = frame.sort_values(keys, kind="stable").index
    if not (order == frame.index).all():
        log.info(f"series: the rows of {path} are not in time order; sorted by {', '.join(keys)}")
        frame = frame.loc[order]
    out = {}
    groups = frame.groupby(spec["id"], sort=True) if spec["id"] else [(None, frame)]
    for key, rows in groups:
        rows = rows.set_index(spec["time"])
        for col in spec["target"]:
            name = _series_name(key, col, spec)
            out[name] = rows[[col, *spec["past_covariates"], *spec["covariates"]]].rename(
                columns={col: "__target__"}
            )
    return out


def clip(series: dict, spec: dict, start, end) -> dict:
    """Only the rows from `start` to `end` (both kept; None: no bound)."""
    steps = bool(spec.get("steps"))
    lo = _time(start, steps) if start is not None else None
    hi = _time(end, steps) if end is not None else None
    return {n: s.loc[lo:hi] for n, s in series.items()}


def _series_name(key, col: str, spec: dict) -> str:
    if len(spec["target"]) == 1:
        return str(key) if key is not None else col
    return f"{key}/{col}" if key is not None else col


def infer_frequency(series: dict, spec: dict, path: str) -> tuple[str, int]:
    """(frequency, season): dataset.freq, or inferred from the timestamps and said."""
    import pandas as pd
    from pandas.tseries.frequencies import to_offset

    freq = spec["freq"]
    if spec.get("steps"):
        freq = "1"
    elif freq is None:
        with warnings.catch_warnings():  # pandas 3 says its return type will change
            warnings.simplefilter("ignore")
            found = [pd.infer_freq(s.index) for s in series.values() if len(s) >= 3]
        found = [to_offset(f).freqstr for f in found if f]
        if found:
            freq = max(set(found), key=found.count)
        else:  # gaps defeat infer_freq: take the commonest step
            steps = pd.Series(np.concatenate([np.diff(s.index.values) for s in series.values()]))
            if steps.empty:
                raise BprunError(f"{path}: too few rows to infer the frequency: set dataset.freq")
            freq = to_offset(pd.Timedelta(steps.mode().iloc[0])).freqstr
        log.info(f"series: frequency {freq}, inferred from the timestamps (dataset.freq to set it)")
    else:
        try:
            freq = to_offset(freq).freqstr
        except ValueError:
            raise BprunError(
                f"dataset.freq={freq} is not a pandas frequency: use e.g. D, h, W, MS"
            ) from None
    season = spec["season"]
    if season is None:
        base = freq.split("-")[0]
        season = SEASONS.get(base, 1)
        if base not in SEASONS:
            log.info(
                f"series: no season known for frequency {freq}; the seasonal naive is the naive "
                "forecast (set dataset.season=<steps> to change it)"
            )
    return freq, int(season)


def calendar_features(calendar, spec: dict) -> list[str]:
    """The calendar attributes to derive: dataset.calendar, or `auto`'s by the frequency."""
    if not calendar:
        return []
    if spec.get("steps"):
        if calendar == "auto":
            log.info("series: the time column holds step numbers, so no calendar is derived")
            return []
        raise BprunError(
            f"dataset.calendar={calendar} needs timestamps, and dataset.time={spec['time']} holds "
            "step numbers: write dates in it, or set dataset.calendar=null"
        )
    if calendar == "auto":
        calendar = AUTO_CALENDAR.get(spec["freq"].split("-")[0], [])
        log.info(
            f"series: calendar covariates {', '.join(calendar) or 'none'} for frequency "
            f"{spec['freq']} (dataset.calendar=[...] to choose)"
        )
    return list(calendar)


def calendar(index, names: list[str]) -> np.ndarray:
    """(len(index), 2 * len(names)): the sine and cosine of each attribute's phase."""
    import pandas as pd

    index = pd.DatetimeIndex(index)
    columns = []
    for name in names:
        if name == "weekofyear":
            value = index.isocalendar().week.to_numpy() - 1
        else:  # pandas counts days, months and quarters from 1
            attribute = {"dayofweek": "day_of_week", "dayofyear": "day_of_year"}.get(name, name)
            first = 1 if name in ("day", "dayofyear", "month", "quarter") else 0
            value = getattr(index, attribute).to_numpy() - first
        phase = 2 * np.pi * value.astype(np.float64) / CALENDAR[name]
        columns += [np.sin(phase), np.cos(phase)]
    return np.stack(columns, 1) if columns else np.zeros((len(index), 0))


def series_ids(series: dict, spec: dict) -> tuple[list[str], int]:
    """(the series' names, the id embedding's width; 0: none). `auto` takes fastai's rule for
    a categorical's width, 1.6 * n ** 0.56, at most 16 (0 for a single series).

    Off unless asked for: a global model over per-series scaled windows is what NeuralForecast
    and Darts train by default, and on the embedded demo (stores that differ in level and
    growth, which the scaling and the window already carry) the embedding lowers no error:
    it learns each series' offset in the training span, which its trend then leaves behind.
    It pays where series of one scale behave differently (see the README)."""
    names, dim = list(series), spec["id_embedding"]
    if dim == "auto":
        dim = min(16, round(1.6 * len(names) ** 0.56)) if len(names) > 1 else 0
    if dim:
        log.info(
            f"series: a {dim}-wide embedding of the id of each of the {len(names)} series makes "
            "the model global (dataset.id_embedding=0 to leave it out)"
        )
    return names, int(dim)


def known_channels(spec: dict) -> int:
    """Channels of covariates known over the horizon: the file's and two per calendar item."""
    return len(spec["covariates"]) + 2 * len(spec.get("calendar") or [])


def _grid(index, freq: str, steps: bool):
    import pandas as pd

    if steps:
        return pd.Index(np.arange(index[0], index[-1] + 1), dtype="int64")
    return pd.date_range(index[0], index[-1], freq=freq)


def check_regular(series: dict, spec: dict, path: str, future_ok: bool = False) -> None:
    """Gaps in the frequency, and missing values: an error unless dataset.fill says how to fill.

    Filling happens in place in `series`. Rows off the frequency's grid are always an error.
    """
    steps, fill = bool(spec.get("steps")), spec["fill"]
    for name in list(series):
        s = series[name]
        grid = _grid(s.index, spec["freq"], steps)
        off = s.index.difference(grid)
        if len(off):
            raise BprunError(
                f"{path}: series {name} has timestamps off its {spec['freq']} frequency "
                f"({', '.join(map(str, off[:3]))}): fix them or set dataset.freq"
            )
        gaps = grid.difference(s.index)
        values = s.drop(columns=spec["covariates"]) if future_ok else s
        if future_ok:  # a prediction file's last rows hold the horizon's covariates alone
            last = s["__target__"].last_valid_index()
            values = values.loc[:last] if last is not None else values
        holes = int(values.isna().to_numpy().sum())
        if (len(gaps) or holes) and fill is None:
            what = (
                f"missing time steps ({', '.join(map(str, gaps[:3]))}"
                + (f" and {len(gaps) - 3} more" if len(gaps) > 3 else "")
                + ")"
                if len(gaps)
                else f"{holes} empty cell(s)"
            )
            raise BprunError(
                f"{path}: series {name} has {what} in its {spec['freq']} frequency: fill the "
                "file, or set dataset.fill=ffill|zero|interpolate"
            )
        if len(gaps) or holes:
            s = s.reindex(grid)
            target = s["__target__"]
            if future_ok:
                last = target.last_valid_index()
                s = s.loc[:last] if last is not None else s
                rest = series[name].loc[series[name].index > last] if last is not None else None
            if fill == "zero":
                s = s.fillna(0.0)
            elif fill == "ffill":
                s = s.ffill().bfill()
            else:
                s = s.interpolate(limit_direction="both")
            if future_ok and rest is not None and len(rest):
                import pandas as pd

                s = pd.concat([s, rest])
            series[name] = s


def drop_short(series: dict, spec: dict, path: str) -> dict:
    """Series shorter than window + horizon: listed in an error, or skipped and said."""
    need = spec["window"] + spec["horizon"]
    short = [f"{n} ({len(s)})" for n, s in series.items() if len(s) < need]
    if not short:
        return series
    listed = ", ".join(short[:10]) + (f" and {len(short) - 10} more" if len(short) > 10 else "")
    if not spec["skip_short"]:
        raise BprunError(
            f"{path}: series shorter than window + horizon = {need} steps: {listed}; lower "
            "dataset.window/horizon, or set dataset.skip_short=true to leave them out"
        )
    log.warning(f"series: skipped {len(short)} series shorter than {need} steps: {listed}")
    kept = {n: s for n, s in series.items() if len(s) >= need}
    if not kept:
        raise BprunError(f"{path}: every series is shorter than window + horizon = {need} steps")
    return kept


def _time(value, steps: bool):
    import pandas as pd

    if steps:
        return int(value)
    try:
        return pd.Timestamp(value)
    except (ValueError, TypeError):
        raise BprunError(f"'{value}' is not a timestamp: write it as YYYY-MM-DD") from None


def cutoffs(series, spec, val_start, test_start, val_fraction, test_fraction) -> tuple[str, str]:
    """(val_start, test_start) as text: given, or at fractions of the common time axis."""
    steps = bool(spec.get("steps"))
    axis = sorted(set().union(*(s.index for s in series.values())))
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise BprunError(f"dataset.{key} must be in [0, 1), got {value}")
    if test_start is None:
        test_start = axis[min(len(axis) - 1, int(round(len(axis) * (1 - test_fraction))))]
    test_start = _time(test_start, steps)
    if val_start is None:
        before = [t for t in axis if t < test_start]
        k = int(round(len(before) * (1 - val_fraction)))
        val_start = before[k] if k < len(before) else test_start
    val_start = _time(val_start, steps)
    if val_start > test_start:
        raise BprunError(
            f"dataset.val_start={val_start} is after dataset.test_start={test_start}: swap them"
        )
    spec["first"], spec["last"] = str(axis[0]), str(axis[-1])
    return str(val_start), str(test_start)


def fit(series: dict, spec: dict) -> None:
    """Per-series target scaling and MASE scale, per-column covariate scaling: training span."""
    steps, m = bool(spec.get("steps")), spec["season"]
    val_start = _time(spec["val_start"], steps)
    stats, columns = {}, {}
    covs = [*spec["past_covariates"], *spec["covariates"]]
    train = {n: s.loc[s.index < val_start] for n, s in series.items()}
    for name, s in train.items():
        y = s["__target__"].to_numpy()
        if len(y) == 0:
            stats[name] = {"mean": 0.0, "std": 1.0, "scale": 1.0}
            continue
        std = float(y.std())
        stats[name] = {
            "mean": float(y.mean()),
            "std": std if std > 0 else 1.0,
            "scale": _mase_scale(y, m),
        }
    for col in covs:
        values = np.concatenate([s[col].to_numpy() for s in train.values()])
        std = float(values.std()) if len(values) else 1.0
        columns[col] = {
            "mean": float(values.mean()) if len(values) else 0.0,
            "std": std if std > 0 else 1.0,
        }
    spec["series"], spec["columns"] = stats, columns


def _mase_scale(y: np.ndarray, m: int) -> float:
    """Mean absolute seasonal difference in the training span (the seasonal naive's in-sample
    error); the naive's when the span is shorter than a season, 1 when the series is flat."""
    for lag in (m, 1):
        if len(y) > lag:
            d = float(np.abs(y[lag:] - y[:-lag]).mean())
            if d > 0:
                return d
    return 1.0


def encode(s, spec: dict, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scaled target, scaled past covariates (n, p), known covariates (n, k)): the file's,
    scaled, then the calendar of the series' timestamps."""
    st = spec["series"][name]
    y = (s["__target__"].to_numpy() - st["mean"]) / st["std"]

    def scaled(cols):
        if not cols:
            return np.zeros((len(s), 0))
        c = spec["columns"]
        return np.stack([(s[k].to_numpy() - c[k]["mean"]) / c[k]["std"] for k in cols], 1)

    known = scaled(spec["covariates"])
    if spec.get("calendar"):
        known = np.concatenate([known, calendar(s.index, spec["calendar"])], 1)
    return y, scaled(spec["past_covariates"]), known


def input_window(y, past, known, origin: int, spec: dict, name: str) -> np.ndarray:
    """One input (channels, steps) at `origin`: the window before it, and with known
    covariates the horizon after it (target and past covariates 0 there). With an id
    embedding, a last channel holds the series' index in `spec["ids"]` at every step (the
    model's `SeriesEmbedding` swaps it for the learned vector)."""
    w, h = spec["window"], spec["horizon"]
    lo = origin - w
    rows = [y[lo:origin], *past[lo:origin].T]
    if known.shape[1]:
        pad = np.zeros(h)
        rows = [np.concatenate([r, pad]) for r in rows]
        rows += list(known[lo : origin + h].T)
    if spec.get("id_embedding"):
        rows.append(np.full(len(rows[0]), spec["ids"].index(name), dtype=np.float64))
    return np.stack(rows).astype(np.float32)


def seasonal_naive(values: np.ndarray, origin: int, horizon: int, season: int) -> np.ndarray:
    """y[t + h] forecast as y[t + h - m * (h // m + 1)], the last value before the origin in
    the same season (the naive forecast where the series starts too late for a season)."""
    h = np.arange(horizon)
    index = origin + h - season * (h // season + 1)
    return np.where(index >= 0, values[np.maximum(index, 0)], values[origin - 1])


def windows(series: dict, spec: dict) -> dict:
    """{split: (x (N, C, L), y (N, target_width))} over every origin of every series."""
    steps = bool(spec.get("steps"))
    val_start, test_start = _time(spec["val_start"], steps), _time(spec["test_start"], steps)
    w, h, m = spec["window"], spec["horizon"], spec["season"]
    out = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for name, s in series.items():
        st = spec["series"][name]
        y, past, known = encode(s, spec, name)
        raw = s["__target__"].to_numpy()
        times = s.index
        for origin in range(w, len(s) - h + 1):
            first, last = times[origin], times[origin + h - 1]
            if last < val_start:
                split = "train"
            elif first >= val_start and last < test_start:
                split = "val"
            elif first >= test_start:
                split = "test"
            else:
                continue  # the target straddles a cutoff
            row = np.concatenate(
                [
                    y[origin : origin + h],
                    raw[origin : origin + h],
                    seasonal_naive(raw, origin, h, m),
                    [raw[origin - 1], st["mean"], st["std"], st["scale"]],
                ]
            )
            out[split][0].append(input_window(y, past, known, origin, spec, name))
            out[split][1].append(row)
    known = known_channels(spec)
    channels = 1 + len(spec["past_covariates"]) + known + bool(spec.get("id_embedding"))
    length = w + (h if known else 0)
    result = {}
    for split, (xs, ys) in out.items():
        x = torch.from_numpy(np.stack(xs)) if xs else torch.zeros(0, channels, length)
        yv = torch.from_numpy(np.stack(ys)) if ys else torch.zeros(0, target_width(h))
        result[split] = (x.float(), yv.float())
    return result


def write_demo(path: str, stores: int = 6, days: int = 3 * 365, seed: int = 0) -> Path:
    """A generated daily demand file: `stores` stores with their own level and growth, a weekly
    and a yearly season, promotions (known in advance: the `promo` column) that lift demand,
    and noise. Columns: date, store, demand, promo."""
    import pandas as pd

    from bprun.io import atomic_write

    rng = np.random.default_rng(seed)
    t = np.arange(days)
    dates = pd.date_range("2021-01-01", periods=days, freq="D")
    weekly = np.array([0.9, 0.85, 0.9, 1.0, 1.15, 1.35, 1.05])
    frames = []
    for k in range(stores):
        level = rng.uniform(50, 150)
        growth = rng.uniform(-0.1, 0.4) / 365
        yearly = 1 + 0.2 * np.sin(2 * np.pi * (t / 365.25 + rng.uniform()))
        promo = (rng.random(days) < 0.12).astype(int)
        mean = level * (1 + growth * t) * weekly[dates.dayofweek] * yearly * (1 + 0.5 * promo)
        demand = np.maximum(0, mean + rng.normal(0, 0.06 * level, days)).round(1)
        frames.append(
            pd.DataFrame({"date": dates.date, "store": f"s{k}", "demand": demand, "promo": promo})
        )
    text = pd.concat(frames).to_csv(index=False).encode()
    return atomic_write(path, lambda f: f.write(text))
