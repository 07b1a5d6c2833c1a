"""What a search leaves behind besides the sweep summary: trial.json in each job
folder (read back by bprun.sweep.summary), the best trial as a command, and
Optuna's parameter importances."""

from __future__ import annotations

import json
import logging
import math
import shlex
from pathlib import Path

from bprun.search.study import FOLDER, RELEASED

log = logging.getLogger("bprun")

MIN_TRIALS_FOR_IMPORTANCE = 5  # complete trials before importances mean anything


def trial_record(
    trial, error: str = "", timing: dict | None = None, pruned_at: dict | None = None
) -> dict:
    value = trial.value if trial.values else None
    record = {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": value,
        "params": dict(trial.params),
        "error": error,
        "released": trial.user_attrs.get(RELEASED, ""),
    }
    if pruned_at and record["state"] == "pruned":  # the epoch and update it stopped after
        record["pruned_at"] = pruned_at
    if timing:  # seconds: asking, composing, the job, its training loop, telling
        record["timing"] = {k: round(v, 4) for k, v in timing.items()}
    return record


def write_trial(
    folder: Path, trial, error: str = "", timing: dict | None = None, pruned_at=None
) -> None:
    if folder.is_dir():
        record = trial_record(trial, error, timing, pruned_at)
        (folder / "trial.json").write_text(json.dumps(record, indent=2) + "\n")


def trial_folder(trial, sweep_dir: Path) -> Path | None:
    """The job folder of a trial: the one recorded when it was asked, else the folder
    under `sweep_dir` whose overrides name it (a custom hydra.sweep.subdir)."""
    recorded = trial.user_attrs.get(FOLDER)
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    for overrides in Path(sweep_dir).glob("*/.hydra/overrides.yaml"):
        if f"search.trial={trial.number}" in overrides.read_text().split():
            return overrides.parent.parent
    return None


def mark_replaced(trial, job_file: str, sweep_dir: Path) -> None:
    """A trial left running by a search that died: its folder says it was replaced."""
    folder = trial_folder(trial, sweep_dir)
    if folder is None:
        return
    record = {
        "status": "replaced",
        "error": "the search stopped while this trial ran; a later trial re-ran its slot",
        "overrides": [],
        "wall_time_s": None,
    }
    (folder / job_file).write_text(json.dumps(record, indent=2) + "\n")
    write_trial(folder, trial, record["error"])


def best_command(base: list[str], space, params: dict) -> str:
    return " ".join(
        ["bprun", *(shlex.quote(o) for o in [*base, *space.overrides(params)[len(space.fixed) :]])]
    )


def print_best(study, monitor: str, base: list[str], space) -> None:
    from optuna.trial import TrialState

    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if RELEASED not in t.user_attrs:
            states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    counts = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    print(f"\nstudy {study.study_name}: {counts or 'no trials'}", flush=True)
    if not complete:
        return
    best = study.best_trial
    print(
        f"best trial {best.number}: {monitor} {best.value:.4f}\n    "
        + best_command(base, space, best.params),
        flush=True,
    )


def write_importances(study, sweep_dir: Path, seed: int | None) -> dict | None:
    """importances.json (fANOVA) once enough trials completed; None before that."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE:
        return None
    try:
        import optuna

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as e:  # a space with one value per parameter, say
        log.warning(f"no parameter importances: {type(e).__name__}: {e}")
        return None
    values = {k: float(v) for k, v in values.items() if math.isfinite(v)}
    (sweep_dir / "importances.json").write_text(json.dumps(values, indent=2) + "\n")
    shown = ", ".join(f"{k} {v:.2f}" for k, v in values.items())
    print(f"parameter importances ({len(complete)} complete trials): {shown}", flush=True)
    return values
