"""The summary of a sweep: one row per job folder, written as summary.csv and summary.md.

Rows are read back from each job's own files (`.hydra/overrides.yaml`,
`metrics.json` and the `job.json` the sweep callback writes), never from
memory, so the summary is the same whichever launcher ran the jobs; a job
that crashed before writing metrics.json still gets a row, and jobs skipped by
`sweep.skip_done` appear with the results of the run that produced them.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from bprun.io import read_json
from bprun.overrides import key_of, run_overrides

JOB_FILE = "job.json"  # written by the sweep callback when a job ends
TRIAL_FILE = "trial.json"  # written by the Optuna sweeper when it tells the trial's result
# Job states that are not failures: a pruned trial stopped on purpose, a replaced one was
# stopped with its search and re-run under a new trial number.
NOT_FAILED = ("ok", "pruned", "replaced")


@dataclass
class Job:
    name: str  # the job folder, relative to the sweep folder
    folder: Path
    overrides: list[str]
    status: str = "failed"  # ok | failed | interrupted | pruned | replaced
    error: str = ""
    monitor: str = ""
    mode: str = "min"
    best: float | None = None
    best_epoch: int | None = None
    test: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None
    wall_time_s: float | None = None
    trial: int | None = None  # a search's trial: number, state, value, parameters
    state: str = ""
    value: float | None = None
    params: dict = field(default_factory=dict)

    @property
    def ranked(self) -> bool:
        return self.status == "ok" and self.best is not None and math.isfinite(self.best)


def job_key(overrides) -> tuple[str, ...]:
    """What identifies a job across re-runs of a sweep: its overrides, in any order."""
    return tuple(sorted(run_overrides(list(overrides))))


def num(value) -> float | None:
    try:
        return None if value is None else float(value)  # "nan"/"inf" come back as strings
    except (TypeError, ValueError):
        return None


def read_job(folder: Path, sweep_dir: Path) -> Job:
    job = Job(folder.relative_to(sweep_dir).as_posix(), folder, job_overrides(folder))
    record = read_json(folder / JOB_FILE) or {}
    metrics = read_json(folder / "metrics.json")
    if metrics is not None:
        job.status = {"completed": "ok", "interrupted": "interrupted", "pruned": "pruned"}.get(
            metrics.get("status"), "failed"
        )
        job.error = metrics.get("error", "")
        job.monitor, job.mode = metrics.get("monitor", ""), metrics.get("mode", "min")
        best = metrics.get("best") or {}
        job.best, job.best_epoch = num(best.get(job.monitor)), best.get("epoch")
        job.test = {k: num(v) for k, v in (metrics.get("test") or {}).items()}
        job.epochs, job.wall_time_s = metrics.get("epochs"), num(metrics.get("wall_time_s"))
        if metrics.get("status") == "running" and not record:
            job.error = "the job ended without finishing (killed?); metrics.json says running"
    if record and not (job.status == "pruned" and record["status"] == "ok"):
        job.status, job.error = record["status"], record.get("error") or job.error
        if job.wall_time_s is None:
            job.wall_time_s = num(record.get("wall_time_s"))
    if metrics is None and not record:
        job.error = "no metrics.json: the job ended before it could write one (killed?)"
    if job.status in ("ok", "pruned"):
        job.error = ""
    trial = read_json(folder / TRIAL_FILE)
    if trial is not None:
        job.trial, job.state = trial.get("number"), trial.get("state", "")
        job.value, job.params = num(trial.get("value")), trial.get("params") or {}
    return job


def job_overrides(folder: Path) -> list[str]:
    """The overrides a job folder was run with (Hydra's `.hydra/overrides.yaml`)."""
    return [str(o) for o in OmegaConf.load(folder / ".hydra" / "overrides.yaml")]


def swept_keys(config) -> list[str]:
    """The keys the sweep's command line varies (`optim=sgd,adam` -> `optim`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OmegaConf.to_container(config.hydra.overrides.task)
    return [
        o.key_or_group.lstrip("+~")
        for o in OverridesParser.create().parse_overrides(task)
        if o.is_sweep_override()
    ]


def job_line(name: str, status: str, overrides: str, folder: Path, error: str = "") -> str:
    """One line per finished job: status, monitored metric, overrides."""
    metrics = read_json(folder / "metrics.json") or {}
    best = num((metrics.get("best") or {}).get(metrics.get("monitor")))
    metric = f"{metrics['monitor']} {best:.4f}" if best is not None else ""
    seconds = num(metrics.get("wall_time_s"))
    parts = [f"[{status}]", f"job {name}", metric, overrides]
    parts.append(f"{seconds:.1f}s" if seconds is not None else "")
    parts.append(f"error: {error}" if error else "")
    return "  ".join(p for p in parts if p)


def is_done(folder: Path) -> bool:
    """A job that needs no re-run: metrics.json says completed (or, for tasks that
    write none, the job ended without error)."""
    metrics = read_json(folder / "metrics.json")
    if metrics is not None:
        return metrics.get("status") == "completed"
    return (read_json(folder / JOB_FILE) or {}).get("status") == "ok"


def resumable(folder: Path) -> bool:
    """A job stopped part-way (not failed) that saved checkpoints/last.pt (or, sharded,
    a complete checkpoints/last/)."""
    metrics = read_json(folder / "metrics.json") or {}
    stopped = metrics.get("status") in ("interrupted", "running")
    last = folder / "checkpoints"
    return stopped and ((last / "last.pt").is_file() or (last / "last" / ".metadata").is_file())


def job_folders(sweep_dir: Path) -> list[Path]:
    found = [p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")]
    return sorted((f for f in found if f != Path(sweep_dir)), key=lambda f: _natural(f.name))


def read_jobs(sweep_dir: Path) -> list[Job]:
    return [read_job(f, Path(sweep_dir)) for f in job_folders(sweep_dir)]


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def sort_jobs(jobs: list[Job]) -> list[Job]:
    """Best first by each job's monitored metric and mode; unranked ok jobs next;
    failed and interrupted jobs last."""

    def order(j: Job):
        if j.ranked:
            return (0, j.best if j.mode == "min" else -j.best, _natural(j.name))
        rest = {"ok": 1, "pruned": 2, "replaced": 4}.get(j.status, 3)
        return (rest, 0.0, _natural(j.name))

    return sorted(jobs, key=order)


def shown_keys(jobs: list[Job], swept: list[str]) -> list[str]:
    """The override keys worth a column: the swept ones and any that differ between jobs."""
    values: dict[str, set] = {}
    for j in jobs:
        present = {key_of(o): o for o in run_overrides(j.overrides)}
        for k in {*values, *present}:
            values.setdefault(k, set()).add(present.get(k))
    varying = [k for k, v in values.items() if len(v) > 1]
    return list(dict.fromkeys([*(k for k in swept if k in values), *sorted(varying)]))


def describe(overrides: list[str], keys: list[str]) -> str:
    """The overrides of `keys` (all of them when `keys` is empty), space-separated."""
    chosen = [o for o in run_overrides(overrides) if not keys or key_of(o) in keys]
    return " ".join(chosen) or "-"


def best_command(job: Job) -> str:
    """A command line that re-runs `job` on its own."""
    return " ".join(["bprun", *(shlex.quote(o) for o in run_overrides(job.overrides))])


@dataclass
class Group:
    """The jobs of one configuration that differ only in their seed."""

    config: str
    jobs: list[Job]
    stats: dict[str, tuple[float, float | None]]  # column -> (mean, sample std or None)


def seed_groups(jobs: list[Job], keys: list[str]) -> list[Group]:
    """Mean and standard deviation (n - 1) over seeds, per configuration; empty unless
    at least one configuration ran with several seeds."""
    by_config: dict[tuple, list[Job]] = {}
    for j in jobs:
        rest = tuple(o for o in job_key(j.overrides) if key_of(o) != "seed")
        by_config.setdefault(rest, []).append(j)
    if not any(len(g) > 1 for g in by_config.values()):
        return []
    shown = [k for k in keys if k != "seed"]
    groups = []
    for rest, members in by_config.items():
        ok = [j for j in members if j.status == "ok"]
        columns = {"best": [j.best for j in ok]}
        for name in sorted({t for j in ok for t in j.test}):
            columns[name] = [j.test.get(name) for j in ok]
        stats = {}
        for name, values in columns.items():
            values = [v for v in values if v is not None and math.isfinite(v)]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else None
                stats[name] = (statistics.fmean(values), std)
        groups.append(Group(describe(list(rest), shown) if shown else "-", members, stats))

    def order(g: Group):
        mode = next((j.mode for j in g.jobs if j.status == "ok"), "min")
        if "best" not in g.stats:
            return (1, 0.0)
        mean = g.stats["best"][0]
        return (0, mean if mode == "min" else -mean)

    return sorted(groups, key=order)


def _cell(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


@dataclass
class Summary:
    jobs: list[Job]  # sorted, best first
    keys: list[str]
    groups: list[Group]
    best: Job | None
    markdown: str

    @property
    def failed(self) -> list[Job]:
        return [j for j in self.jobs if j.status not in NOT_FAILED]


def summarize(sweep_dir: Path, swept: list[str] = ()) -> Summary:
    """Read every job of the sweep, write summary.csv and summary.md (and
    summary_seeds.csv for multi-seed sweeps) into the sweep folder."""
    sweep_dir = Path(sweep_dir).absolute()
    jobs = sort_jobs(read_jobs(sweep_dir))
    keys = shown_keys(jobs, list(swept))
    groups = seed_groups(jobs, keys) if "seed" in keys else []
    best = next((j for j in jobs if j.ranked), None)
    tests = sorted({t for j in jobs for t in j.test})
    monitors = sorted({j.monitor for j in jobs if j.monitor})
    monitor = monitors[0] if len(monitors) == 1 else "monitored metric"
    _write_csv(sweep_dir / "summary.csv", jobs, keys, tests)
    if groups:
        _write_seed_csv(sweep_dir / "summary_seeds.csv", groups, monitor, tests)
    markdown = _markdown(jobs, keys, groups, best, monitor, tests)
    (sweep_dir / "summary.md").write_text(markdown + "\n")
    return Summary(jobs, keys, groups, best, markdown)


def _write_csv(path: Path, jobs: list[Job], keys: list[str], tests: list[str]) -> None:
    search = any(j.trial is not None for j in jobs)
    header = ["rank", "job", "status", *keys, "monitor", "best", "best_epoch", *tests]
    header += ["epochs", "wall_time_s", "error", "overrides", "folder"]
    header += ["trial", "state", "value", "params"] if search else []
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for rank, j in enumerate(jobs, start=1):
            values = {key_of(o): o.split("=", 1)[1] for o in run_overrides(j.overrides)}
            w.writerow(
                [
                    rank if j.ranked else "",
                    j.name,
                    j.status,
                    *(values.get(k, "") for k in keys),
                    j.monitor,
                    "" if j.best is None else repr(j.best),
                    "" if j.best_epoch is None else j.best_epoch,
                    *("" if j.test.get(t) is None else repr(j.test[t]) for t in tests),
                    "" if j.epochs is None else j.epochs,
                    "" if j.wall_time_s is None else round(j.wall_time_s, 3),
                    j.error,
                    " ".join(run_overrides(j.overrides)),
                    str(j.folder),
                    *(_trial_cells(j) if search else []),
                ]
            )


def _trial_cells(j: Job) -> list:
    if j.trial is None:
        return ["", "", "", ""]
    value = "" if j.value is None else repr(j.value)
    return [j.trial, j.state, value, json.dumps(j.params, sort_keys=True)]


def _write_seed_csv(path: Path, groups: list[Group], monitor: str, tests: list[str]) -> None:
    columns = ["best", *tests]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "config",
                "runs",
                "ok",
                *(f"{c}_{s}" for c in [monitor, *tests] for s in ("mean", "std")),
            ]
        )
        for g in groups:
            row = [g.config, len(g.jobs), sum(j.status == "ok" for j in g.jobs)]
            for c in columns:
                mean, std = g.stats.get(c, (None, None))
                row += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
            w.writerow(row)


def _markdown(jobs, keys, groups, best, monitor, tests) -> str:
    ok = sum(j.status in NOT_FAILED for j in jobs)
    n = f"{len(jobs)} job" + ("" if len(jobs) == 1 else "s")
    lines = [f"# Sweep summary: {n}, {ok} ok, {len(jobs) - ok} not ok", ""]
    search = any(j.trial is not None for j in jobs)
    header = ["#", "job", "status", "overrides", f"best {monitor}", *tests, "epochs", "wall time"]
    header += ["trial", "state", "value"] if search else []
    rows = []
    for rank, j in enumerate(jobs, start=1):
        rows.append(
            [
                str(rank) if j.ranked else "",
                j.name,
                j.status,
                describe(j.overrides, keys),
                _cell(j.best),
                *(_cell(j.test.get(t)) for t in tests),
                _cell(j.epochs),
                "-" if j.wall_time_s is None else f"{j.wall_time_s:.1f} s",
                *([_cell(j.trial), j.state or "-", _cell(j.value)] if search else []),
            ]
        )
    lines.append(_md_table(header, rows))
    errors = [j for j in jobs if j.status not in ("ok", "pruned")]
    if errors:
        lines += ["", "## Jobs that did not finish", ""]
        lines += [f"- job {j.name} ({j.status}): {j.error or 'no error recorded'}" for j in errors]
    if groups:
        lines += ["", "## Over seeds (mean ± std, n - 1)", ""]
        header = ["config", "runs ok", monitor, *tests]
        rows = []
        for g in groups:
            cells = [g.config, f"{sum(j.status == 'ok' for j in g.jobs)}/{len(g.jobs)}"]
            for c in ["best", *tests]:
                mean, std = g.stats.get(c, (None, None))
                cells.append(_cell(mean) + ("" if std is None else f" ± {std:.4f}"))
            rows.append(cells)
        lines.append(_md_table(header, rows))
    if best is not None:
        lines += ["", f"Best: job {best.name}, {best.monitor} {best.best:.4f}", ""]
        lines += ["    " + best_command(best)]
    return "\n".join(lines)
