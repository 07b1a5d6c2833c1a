"""`task=predict ckpt=<run> dataset.path=<file>`: forecast the `horizon` steps after each
series' last observed value with a trained forecaster, in the original units.

The file is long form like the training file. It may end each series with rows whose target
is empty: their times (and known covariates, which the model needs there) are the horizon's;
without them the horizon's times follow the training frequency. The scaling is the one
fitted on the training span, from the checkpoint. Writes, in the run folder, forecast.csv
(time, id, prediction, and with loss=quantile one column per quantile), forecast.png and a TensorBoard image of a few series' history and
forecast.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bprun.data import series as ts
from bprun.data.sources import Dataset
from bprun.engine import checkpoint as ckpt_io
from bprun.errors import BprunError
from bprun.overrides import key_of

log = logging.getLogger("bprun")

PLOTTED = 4  # series drawn in forecast.png


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> None:
    import pandas as pd

    from bprun.build import build_model
    from bprun.problems.forecast import Forecast

    if not cfg.get("ckpt"):
        raise BprunError("task=predict needs ckpt=<run folder or .pt file> of a dataset=series run")
    path = ckpt_io.resolve_checkpoint(cfg.ckpt, "ckpt")
    state = ckpt_io.load_checkpoint(path)
    if Path(cfg.ckpt).is_dir() and (state.get("topk") or {}).get("entries"):
        best = path.parent / state["topk"]["entries"][0][1]
        if best.exists():  # a file, or a sharded checkpoint's folder
            path, state = best, ckpt_io.load_checkpoint(best)
    extra = state.get("extra") or {}
    spec = extra.get("data")
    if not extra.get("config") or not spec or "horizon" not in spec:
        raise BprunError(f"{path} is not a forecaster's checkpoint: train one with dataset=series")
    saved = OmegaConf.create(extra["config"])
    given = any(key_of(o) == "dataset.path" for o in overrides)
    file = cfg.dataset.path if given else saved.dataset.path
    if file == "demo":
        file = str(Path(saved.dataset.data_dir) / ts.DEMO_FILE)
    w, h = spec["window"], spec["horizon"]

    frame = ts.read(file)
    lacking = [c for c in [*spec["covariates"], *spec["past_covariates"]] if c not in frame]
    if lacking:
        raise BprunError(
            f"{file} lacks the covariate column(s) {', '.join(lacking)} the model was trained "
            "with: add them (known covariates also over the horizon's rows)"
        )
    series = ts.prepare(frame, dict(spec), file)
    ts.check_regular(series, spec, file, future_ok=True)
    inputs, stamps, names = [], [], []
    for name, s in series.items():
        if name not in spec["series"]:  # nor, for a global model, a learned id vector
            known = list(spec["series"])
            raise BprunError(
                f"{file}: series {name} was not in the training data, so the model has no "
                f"scaling{' nor id embedding' if spec.get('id_embedding') else ''} for it: "
                f"forecast the {len(known)} series it knows "
                f"({', '.join(known[:10])}{' ...' if len(known) > 10 else ''}), or train on a "
                "file that holds this one"
            )
        last = s["__target__"].last_valid_index()
        origin = 0 if last is None else s.index.get_loc(last) + 1
        if origin < w:
            raise BprunError(
                f"{file}: series {name} has {origin} observed steps; the model reads {w}"
            )
        future = s.index[origin : origin + h]
        if spec["covariates"]:
            holes = s.iloc[origin : origin + h][spec["covariates"]].isna().to_numpy().any()
            if len(future) < h or holes:
                raise BprunError(
                    f"{file}: series {name} lacks the known covariates "
                    f"({', '.join(spec['covariates'])}) of its {h} horizon steps: add {h} rows "
                    f"after {last} with the target empty and the covariates filled"
                )
        if len(future) < h:  # the horizon's times follow the frequency
            future = _future(s.index[origin - 1], h, spec)
        # the horizon's rows, made where the file stops: the calendar is derived over them
        s = s.reindex(s.index[:origin].append(pd.Index(future)))
        y, past, known = ts.encode(s, spec, name)
        inputs.append(ts.input_window(y, past, known, origin, spec, name))
        stamps.append(list(future))
        names.append(name)

    problem = Forecast(num_classes=h, **Forecast.from_spec(spec))
    problem.use_loss(saved.get("loss"))
    model = build_model(
        saved.model,
        Dataset(
            x_train=torch.from_numpy(inputs[0][None]),
            y_train=torch.zeros(1, h),
            x_test=torch.zeros(0),
            y_test=torch.zeros(0),
            num_classes=h,
            problem="forecast",
        ),
        problem,
    )
    ckpt_io.load_model_state(model, state["model"], path)
    model.eval()
    with torch.no_grad():
        scaled = model(torch.from_numpy(np.stack(inputs))).double().view(len(names), -1, h).numpy()
    rows = []
    for name, future, out in zip(names, stamps, scaled, strict=True):
        st = spec["series"][name]
        values = out * st["std"] + st["mean"]  # (quantiles or 1, horizon)
        for i, t in enumerate(future):
            row = {"time": t, "id": name, "prediction": float(values[problem.point, i])}
            row.update({f"q{q:g}": float(values[j, i]) for j, q in enumerate(problem.quantiles)})
            rows.append(row)
    table = pd.DataFrame(rows)
    out_file = Path(run_dir) / "forecast.csv"
    table.to_csv(out_file, index=False)
    log.info(f"forecast of {len(names)} series, {h} steps each: wrote {out_file}")
    _plot(series, table, names[:PLOTTED], w, Path(run_dir))


def _future(last, h: int, spec: dict) -> list:
    import pandas as pd

    if spec.get("steps"):
        return list(range(int(last) + 1, int(last) + 1 + h))
    return list(pd.date_range(last, periods=h + 1, freq=spec["freq"])[1:])


def _plot(series: dict, table, names: list[str], window: int, run_dir: Path) -> None:
    """History (the last few windows) and forecast of a few series: PNG and TensorBoard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bprun.tracking.tensorboard import Tracker

    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.4 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        history = series[name]["__target__"].dropna().iloc[-3 * window :]
        mine = table[table["id"] == name]
        ax.plot(history.index, history.to_numpy(), color="black", lw=1, label="history")
        ax.plot(mine["time"], mine["prediction"], color="tab:blue", lw=1.5, label="forecast")
        bands = [c for c in mine.columns if c.startswith("q")]
        if len(bands) >= 2:
            ax.fill_between(
                mine["time"],
                mine[bands[0]],
                mine[bands[-1]],
                color="tab:blue",
                alpha=0.2,
                label=f"{bands[0][1:]} to {bands[-1][1:]}",
            )
        ax.set_title(str(name), fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(run_dir / "forecast.png", dpi=100)
    tracker = Tracker(run_dir)
    tracker.figure("predict/forecast", fig)
    tracker.close()
    plt.close(fig)
