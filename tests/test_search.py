"""Optuna search: `bprun -m search=<name>` / hydra/sweeper=optuna (bprun.search)."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import threading
import time

import pytest
from conftest import BPRUN, ROOT, job_dir
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from search_helpers import FAST, counted, finished, load, param_sets

from bprun.errors import BprunError
from bprun.search.settings import SearchSettings
from bprun.search.space import parse_space
from bprun.sweep.summary import summarize


# ------------------------------------------------------------------ the space
def test_override_grammar_becomes_optuna_distributions():
    space = parse_space(
        {"optim.lr": "tag(log, interval(1e-4, 1e-1))", "trainer.max_epochs": "3"},
        [
            "model.dropout=choice(0.0,0.3)",
            "+dataset.batch_size=range(32,129,32)",
            "model.width=int(interval(8,64))",
            "optim=adam,adamw",
            "seed=1",
        ],
    )
    d = space.distributions
    assert d["optim.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["model.dropout"] == CategoricalDistribution([0.0, 0.3])
    assert d["dataset.batch_size"] == IntDistribution(32, 128, step=32)
    assert d["model.width"] == IntDistribution(8, 64)
    assert d["optim"] == CategoricalDistribution(["adam", "adamw"])
    assert space.fixed == ["trainer.max_epochs=3", "seed=1"]
    overrides = space.overrides({"optim.lr": 0.01, "dataset.batch_size": 64, "optim": "adamw"})
    assert overrides == [
        "trainer.max_epochs=3",
        "seed=1",
        "optim.lr=0.01",
        "+dataset.batch_size=64",
        "optim=adamw",
    ]
    assert space.size() is None
    assert parse_space({}, ["a=choice(1,2)", "b=range(0,3)"]).size() == 6


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=interval(0.1,0.01)", "has low > high"),
        ("optim.lr=tag(log,interval(0,0.1))", "a log scale needs bounds above 0"),
        ("model.width=tag(log,range(0,8))", "a log scale needs bounds above 0"),
        ("model.dropout=choice()", "empty choice"),
        ("dataset.batch_size=range(64,32)", "is empty"),
        ("optim=adam,adam", "lists a value twice"),
    ],
)
def test_invalid_space_is_a_one_line_error(override, message):
    with pytest.raises(BprunError, match=message) as e:
        parse_space({}, [override])
    assert "\n" not in str(e.value)


def test_grid_needs_lists_of_values():
    with pytest.raises(BprunError, match="sampler=grid needs a list of values for optim.lr"):
        parse_space({}, ["optim.lr=interval(0.1,0.2)"]).grid()


def test_unknown_key_fails_before_any_trial(bprun, tmp_path):
    r = bprun("-m", "search=mlp_lr", "optim.lrr=tag(log,interval(1e-4,1e-1))", check=False)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: search space: Could not override")
    assert "Traceback" not in r.output
    assert not job_dir(tmp_path / "sweep", 0).exists()
    assert not (tmp_path / "sweep" / "optuna.journal").exists()


# ------------------------------------------------------------------ must hold
def search_args(sweep, data_dir, *extra):
    return [
        BPRUN,
        "-m",
        "search=mlp_lr",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={data_dir}",
        "trainer.threads=1",
        "trainer.progress=false",
        *FAST,
        *extra,
    ]


def run(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.slow
def test_search_with_pruning_prunes_and_beats_the_median(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    r = run(
        search_args(
            sweep,
            data_dir,
            "search.n_trials=12",
            "search.n_jobs=1",
            "search.sampler=random",
            "search.pruner_startup_trials=2",
            "search.n_warmup_steps=1",
            "optim=adam",
            "optim.lr=tag(log,interval(1e-5,1e-1))",
        )
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    study = load(sweep / "optuna.journal", "mlp_lr")
    states = [t.state for t in study.trials]
    assert len(states) == 12 and TrialState.FAIL not in states
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    complete = [t.value for t in study.trials if t.state == TrialState.COMPLETE]
    assert pruned, "no trial was pruned"
    assert study.best_value < statistics.median(complete)
    # A pruned job is recorded as pruned, not failed, and keeps its files.
    folder = sweep / str(pruned[0].number)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["stop_reason"].startswith("pruned")
    assert metrics["epochs"] < 4 and (folder / "checkpoints" / "last.pt").is_file()
    assert json.loads((folder / "trial.json").read_text())["state"] == "pruned"
    # The summary: trial number, state, value, parameters; the best trial as a command.
    jobs = {j.trial: j for j in summarize(sweep).jobs}
    assert jobs[pruned[0].number].status == "pruned"
    best = jobs[study.best_trial.number]
    assert best.state == "complete" and best.value == pytest.approx(study.best_value)
    assert best.params == study.best_trial.params
    assert f"best trial {study.best_trial.number}:" in r.stdout
    lr = study.best_trial.params["optim.lr"]
    assert f"optim.lr={lr!r}" in r.stdout.split(f"best trial {study.best_trial.number}:")[1]
    importances = json.loads((sweep / "importances.json").read_text())
    assert set(importances) == {"optim.lr", "optim.weight_decay"}


# Each trial a job of the launcher, or trial after trial on a long-lived worker process.
MODES = ["search.workers=0", "search.workers=1"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_killed_search_continues_to_exactly_n_trials(tmp_path, data_dir, mode):
    sweep = tmp_path / "sweep"
    args = search_args(
        sweep,
        data_dir,
        mode,
        "search.n_trials=4",
        "search.n_jobs=1",
        "trainer.max_epochs=8",
        "search.pruner=none",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        deadline, killed = time.time() + 120, None
        while killed is None:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
            if not (sweep / "optuna.journal").is_file():
                continue
            try:
                trials = load(sweep / "optuna.journal", "mlp_lr").trials
            except KeyError:  # the journal exists, the study not yet
                continue
            running = [t for t in trials if t.state == TrialState.RUNNING and t.number >= 1]
            if running and running[0].intermediate_values:  # mid-training
                killed = running[0].number
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    r = run(args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 stopped trial(s) released" in r.stdout
    study = load(sweep / "optuna.journal", "mlp_lr")
    assert len(finished(study)) == len(counted(study)) == 4
    stopped = study.trials[killed]
    assert stopped.state == TrialState.FAIL and "bprun.released" in stopped.user_attrs
    assert len(study.trials) == 5 and study.trials[-1].state == TrialState.COMPLETE
    sets = param_sets(finished(study))
    assert len(set(sets)) == len(sets)
    # The killed trial's folder is kept as it was, and the summary does not call it failed.
    assert "run folder" in (sweep / str(killed) / "bprun.log").read_text()
    assert json.loads((sweep / str(killed) / "job.json").read_text())["status"] == "replaced"
    assert sorted(int(p.name) for p in sweep.iterdir() if p.name.isdigit()) == list(range(5))
    assert {j.trial: j.status for j in summarize(sweep).jobs}[killed] == "replaced"


# Seeded random draws of a good (1e-2) or a bad (1e-6) lr; bad ones are pruned early.
GOOD_OR_BAD_LR = [
    "search.sampler=random",
    "search.seed=11",
    "search.pruner_startup_trials=1",
    "search.n_warmup_steps=1",
    "optim=adam",
    "optim.lr=choice(1e-2,1e-6)",
    "optim.weight_decay=interval(0,1e-6)",
]


@pytest.mark.slow
def test_pruned_trial_frees_its_slot_while_the_other_runs(tmp_path, data_dir):
    sweep = tmp_path / "sweep"
    # Trial n is drawn with seed 10 + n: lr good, good, bad, good, bad. Bad trials are pruned
    # after their second epoch; good ones run 40, long enough to outlast a pruned one under load.
    r = run(
        search_args(
            sweep,
            data_dir,
            "search.n_trials=5",
            "search.n_jobs=2",
            *GOOD_OR_BAD_LR,
            "trainer.max_epochs=40",
        )
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = load(sweep / "optuna.journal", "mlp_lr").trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned
    reused = False
    for p in pruned:
        after = [t for t in trials if t.datetime_start >= p.datetime_complete]
        others = [
            t
            for t in trials
            if t.number != p.number and t.datetime_start < p.datetime_complete < t.datetime_complete
        ]
        # The next trial started in the pruned one's slot before the other running one ended.
        reused |= any(n.datetime_start < o.datetime_complete for n in after[:1] for o in others)
    assert reused, [(t.number, t.state, t.datetime_start, t.datetime_complete) for t in trials]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_two_rank_trials_share_rank0s_parameters_and_prune_decision(tmp_path, data_dir, mode):
    """Under trainer.devices=2 the trial belongs to rank 0: both ranks train with its
    parameters (the frozen config) and stop at its prune decision, so the job ends pruned
    instead of one rank waiting for the other in an all-reduce."""
    sweep = tmp_path / "sweep"
    # One trial at a time, seeded: trial 0 draws the good lr and completes, trial 1 the bad
    # lr and is pruned.
    r = run(
        search_args(
            sweep,
            data_dir,
            "search.n_trials=2",
            mode,
            "search.n_jobs=1",
            *GOOD_OR_BAD_LR,
            "trainer.devices=2",
        )
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = load(sweep / "optuna.journal", "mlp_lr").trials
    complete, pruned = TrialState.COMPLETE, TrialState.PRUNED
    assert [t.state for t in trials] == [complete, pruned]
    for t in trials:
        folder = sweep / str(t.number)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["world_size"] == 2
        frozen = OmegaConf.load(folder / "frozen_config.yaml")
        assert frozen.config.optim.lr == t.params["optim.lr"]
        assert frozen.config.optim.weight_decay == t.params["optim.weight_decay"]
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        if t.state == pruned:  # both ranks stopped at rank 0's decision, and the job ended
            assert metrics["status"] == "pruned" and metrics["epochs"] < 4
        else:
            assert metrics["status"] == "completed" and metrics["epochs"] == 4


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (ROOT / "conf" / "search").glob("*.yaml") if p.stem != "none")
)
def test_shipped_search_spaces_compose(name):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from bprun.config import register_configs
    from bprun.search.settings import SearchSettings

    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"search={name}"], return_hydra_config=True)
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        settings = OmegaConf.to_object(cfg.search)
        assert isinstance(settings, SearchSettings) and settings.validate().study_name == name
        space = parse_space(dict(cfg.hydra.sweeper.params), [])
        for pick in (0, -1):  # the lowest and the highest point of every parameter
            point = {
                k: d.choices[pick] if hasattr(d, "choices") else (d.low, d.high)[pick]
                for k, d in space.distributions.items()
            }
            trial = compose("config", overrides=[f"search={name}", *space.overrides(point)])
            assert trial.model._target_ and trial.optim.lr == point["optim.lr"]


# ------------------------------------------------------------------ the study
def _search(tmp_path, sampler, *arguments, direction="minimize", spec=None, **settings):
    from bprun.search.settings import SearchSettings
    from bprun.search.study import Search

    s = SearchSettings(
        study_name="unit", sampler=sampler, n_trials=4, n_startup_trials=2, **settings
    ).validate()
    space = parse_space({}, list(arguments) or ["a=interval(0,1)", "b=choice(x,y,z)"])
    return Search(s, space, spec or str(tmp_path / "optuna.journal"), direction, 3)


def test_sqlite_storage_counts_to_n_trials(tmp_path):
    search = _search(tmp_path, "tpe", spec=f"sqlite:///{tmp_path / 'study.db'}")
    while (trial := search.ask(lambda n: tmp_path / str(n))) is not None:
        search.tell(trial.number, "pruned" if trial.number % 2 else "complete", 1.0)
    states = [t.state.name for t in search.study.trials]
    assert states == ["COMPLETE", "PRUNED", "COMPLETE", "PRUNED"]
    assert not (tmp_path / "study.db.ask").exists()  # the ask lock is released


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "qmc", "grid"])
def test_every_sampler_asks_exactly_n_trials_without_repeats(tmp_path, sampler):
    args = ["a=range(0,3)", "b=choice(x,y)"] if sampler == "grid" else []
    search = _search(tmp_path, sampler, *args)
    asked = []
    while (trial := search.ask(lambda n: tmp_path / str(n))) is not None:
        asked.append(tuple(sorted(trial.params.items())))
        search.tell(trial.number, "complete", float(len(asked)))
    assert len(asked) == 4 and len(set(asked)) == 4


def test_same_seed_continued_study_draws_new_parameters(tmp_path):
    first = _search(tmp_path, "random")
    t0 = first.ask(lambda n: tmp_path / str(n))
    first.tell(t0.number, "complete", 1.0)
    again = _search(tmp_path, "random")  # the same command run again on the same study
    t1 = again.ask(lambda n: tmp_path / str(n))
    assert t1.number == 1 and t1.params != t0.params


def test_study_of_the_other_direction_is_a_one_line_error(tmp_path):
    _search(tmp_path, "tpe")
    with pytest.raises(BprunError, match="made to minimize its metric, this run's trainer.mode"):
        _search(tmp_path, "tpe", direction="maximize")


def test_unreachable_database_is_a_one_line_error(tmp_path):
    from bprun.search.study import open_storage

    with pytest.raises(
        BprunError,
        match=r"search.storage=postgresql://u:\*\*\*@127.0.0.1:9/x: "
        "cannot open it",
    ) as e:
        open_storage("postgresql://u:secret@127.0.0.1:9/x")
    assert "secret" not in str(e.value) and "\n" not in str(e.value)


def test_settings_reject_unknown_sampler_and_pruner():
    from bprun.search.settings import SearchSettings

    with pytest.raises(BprunError, match="search.sampler=tpee is not known"):
        SearchSettings(sampler="tpee").validate()
    with pytest.raises(BprunError, match="search.pruner=medain is not known"):
        SearchSettings(pruner="medain").validate()
    with pytest.raises(BprunError, match="search.heartbeat_s=0: must be more than 0"):
        SearchSettings(heartbeat_s=0).validate()
    with pytest.raises(BprunError, match="search.grace_s=50.0: must be at least twice"):
        SearchSettings(heartbeat_s=30, grace_s=50.0).validate()


def test_grace_shorter_than_two_heartbeats_fails_before_any_trial(bprun, tmp_path):
    r = bprun("-m", "search=mlp_lr", "search.heartbeat_s=60", "search.grace_s=100", check=False)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: search.grace_s=100.0: must be at least twice search.heartbeat_s")
    assert "Traceback" not in r.output
    assert not (tmp_path / "sweep" / "optuna.journal").exists()


# --------------------------------------------------- trials of a search on another host
BEAT = {"heartbeat_s": 0.2, "grace_s": 5.0}  # a stopped search's trial is checked for 1.4 s


def _other_host_trial(study, owner: str, beat: float) -> int:
    """A trial RUNNING under a search on another host, last stamped at `beat`."""
    trial = study.ask({"a": FloatDistribution(0, 1), "b": CategoricalDistribution(["x", "y", "z"])})
    trial.set_user_attr("bprun.owner", owner)
    trial.set_user_attr("bprun.heartbeat_s", BEAT["heartbeat_s"])
    trial.set_user_attr("bprun.heartbeat", beat)
    return trial.number


def check_stale_other_host_trial_is_released(tmp_path, spec):
    """Shared with the PostgreSQL test: one trial done here, one of a stopped search on
    otherhost (stamped an hour ago), one of a live one (stamped now); the search run again
    releases the stopped one only and asks to exactly n_trials."""
    first = _search(tmp_path, "random", spec=spec, **BEAT)
    done = first.ask(lambda n: tmp_path / str(n))
    first.tell(done.number, "complete", 1.0)
    first.close()
    stale = _other_host_trial(first.study, "otherhost:123", time.time() - 3600)
    fresh = _other_host_trial(first.study, "otherhost:124", time.time())

    again = _search(tmp_path, "random", spec=spec, **BEAT)
    assert [t.number for t in again.released] == [stale]
    while (trial := again.ask(lambda n: tmp_path / str(n))) is not None:
        again.tell(trial.number, "complete", 2.0)
    again.close()

    study = load(spec, "unit")
    assert study.trials[stale].state == TrialState.FAIL
    assert "search on otherhost stopped" in study.trials[stale].user_attrs["bprun.released"]
    assert study.trials[fresh].state == TrialState.RUNNING
    assert "bprun.released" not in study.trials[fresh].user_attrs
    # n_trials=4: the done one, the live one, and two asked now (one in the stale one's slot).
    assert len(counted(study)) == 4 and len(study.trials) == 5
    assert [t.state for t in study.trials[3:]] == [TrialState.COMPLETE] * 2


def test_stale_other_host_trial_is_released_and_its_slot_rerun(tmp_path):
    check_stale_other_host_trial_is_released(tmp_path, str(tmp_path / "optuna.journal"))


def test_other_host_trial_with_a_slow_clock_but_a_live_heartbeat_is_kept(tmp_path):
    """Its owner's clock runs an hour behind ours: the stamp looks stale, but it moves."""
    first = _search(tmp_path, "random", **BEAT)
    number = _other_host_trial(first.study, "otherhost:125", time.time() - 3600)
    trial_id = first._trial_id(number)
    stop = threading.Event()

    def beat():  # the live search on otherhost, its clock an hour behind
        while not stop.wait(BEAT["heartbeat_s"]):
            first.study._storage.set_trial_user_attr(
                trial_id, "bprun.heartbeat", time.time() - 3600
            )

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        again = _search(tmp_path, "random", **BEAT)
    finally:
        stop.set()
        beating.join()
    assert again.released == []
    assert load(tmp_path / "optuna.journal", "unit").trials[number].state == TrialState.RUNNING


def test_heartbeat_advances_while_a_trial_runs_and_stops_when_it_ends(tmp_path):
    search = _search(tmp_path, "random", heartbeat_s=0.1, grace_s=1.0)
    trial = search.ask(lambda n: tmp_path / str(n))

    def stamp():  # as another process reads it
        return (
            load(tmp_path / "optuna.journal", "unit")
            .trials[trial.number]
            .user_attrs["bprun.heartbeat"]
        )

    asked = stamp()
    time.sleep(0.5)
    running = stamp()
    assert asked < running <= time.time()
    search.tell(trial.number, "complete", 1.0)
    ended = stamp()
    time.sleep(0.3)
    assert stamp() == ended
    search.close()
    assert not search.heartbeat._thread.is_alive()


class TrialsThatTakeTime:
    """The search's slot loop with trials that complete after `seconds` (no jobs launched)."""

    def __init__(self, search, sweep_dir, seconds: float):
        from bprun.search.sweeper import SearchRun

        self.run = object.__new__(SearchRun)  # its slot loop alone: no sweeper, no launcher
        self.run.search, self.run.sweep_dir, self.run.stop = search, sweep_dir, threading.Event()
        self.run._marked, self.run._marking, self.run.error = 0, threading.Lock(), None
        self.run._run_trial = self._run_trial
        self.seconds = seconds

    def _run_trial(self, trial, runner, timing):
        time.sleep(self.seconds)
        self.run.search.tell(trial.number, "complete", 1.0)
        return trial.number

    def slot(self) -> list:
        returns = []
        self.run._slot(returns, None)
        return returns


def test_a_search_that_dies_mid_run_has_its_slot_rerun_by_the_live_one(tmp_path):
    """otherhost's search beats while this one starts, then dies: before this search ends it
    releases that trial (stamp grace_s old and still for two beats) and re-runs its slot."""
    search = _search(tmp_path, "random", heartbeat_s=0.2, grace_s=1.0)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    foreign = _other_host_trial(search.study, "otherhost:126", time.time())
    search.study._storage.set_trial_user_attr(
        search._trial_id(foreign), "bprun.folder", str(folder)
    )
    ran = TrialsThatTakeTime(search, tmp_path, seconds=0.4).slot()
    search.close()

    study = load(tmp_path / "optuna.journal", "unit")
    assert len(ran) == 4  # its 3 slots of n_trials=4, and the dead search's
    assert study.trials[foreign].state == TrialState.FAIL
    assert "search on otherhost stopped" in study.trials[foreign].user_attrs["bprun.released"]
    assert [t.state for t in counted(study)].count(TrialState.COMPLETE) == 4
    assert json.loads((folder / "job.json").read_text())["status"] == "replaced"


def test_a_live_search_with_a_slow_clock_does_not_hold_a_full_search_open(tmp_path):
    """otherhost's clock runs an hour behind, so its stamp looks stale, but it moves: the
    search checks once, sees it move, and ends when it has nothing to ask."""
    search = _search(tmp_path, "random", heartbeat_s=0.2, grace_s=1.0)
    stop = threading.Event()
    number = _other_host_trial(search.study, "otherhost:127", time.time() - 3600)
    trial_id = search._trial_id(number)

    def beat():  # the live search on otherhost, for 15 s (a search that waited on it ends)
        end = time.monotonic() + 15
        while not stop.wait(0.2) and time.monotonic() < end:
            search.study._storage.set_trial_user_attr(
                trial_id, "bprun.heartbeat", time.time() - 3600
            )

    beating = threading.Thread(target=beat, daemon=True)
    beating.start()
    try:
        ran = TrialsThatTakeTime(search, tmp_path, seconds=0.0).slot()
    finally:
        stop.set()
        beating.join()
        search.close()
    assert len(ran) == 3 and search.stale_wait() is None
    assert load(tmp_path / "optuna.journal", "unit").trials[number].state == TrialState.RUNNING


@pytest.mark.parametrize("answer", [1, 0])
def test_mysql_study_lock_takes_and_gives_back_a_named_lock(tmp_path, monkeypatch, answer):
    """MySQL's GET_LOCK / RELEASE_LOCK, played by SQLite functions (no MySQL server here)."""
    import sqlalchemy

    from bprun.search.study import _SERVER_LOCKS, StudyLock

    calls = []
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'x.db'}")

    @sqlalchemy.event.listens_for(engine, "connect")
    def functions(conn, _):
        conn.create_function("GET_LOCK", 2, lambda n, t: calls.append(("get", n)) or answer)
        conn.create_function("RELEASE_LOCK", 1, lambda n: calls.append(("release", n)) or 1)

    monkeypatch.setattr(sqlalchemy, "create_engine", lambda *a, **k: engine)
    lock = StudyLock("mysql+pymysql://u@db/x", "unit")
    assert lock._sql == _SERVER_LOCKS["mysql"]
    if answer == 1:
        with lock.held():
            assert calls == [("get", f"bprun:{lock.key}")]
        assert calls[-1] == ("release", f"bprun:{lock.key}")
    else:
        with pytest.raises(BprunError, match="the server did not grant the study's lock"):
            with lock.held():
                pass
        assert calls == [("get", f"bprun:{lock.key}")]


@pytest.mark.slow
def test_reports_every_n_updates_and_a_pruned_trial_stops_mid_epoch(tmp_path, data_dir):
    """search.report_every_n_updates=N: trials validate and report every N updates (step =
    the update count), and a pruned trial stops at the check that pruned it, mid-epoch;
    metrics.json and trial.json say at which update."""
    sweep = tmp_path / "sweep"
    # Trials 0 and 1 draw a good and a bad lr: the second is worse than the first at its
    # first report, 5 updates into its first epoch.
    r = run(
        search_args(
            sweep,
            data_dir,
            "search.n_trials=2",
            "search.n_jobs=1",
            "search.workers=1",
            *GOOD_OR_BAD_LR,
            "search.n_warmup_steps=0",
            "search.report_every_n_updates=5",
            "trainer.max_epochs=2",
        )
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    trials = load(sweep / "optuna.journal", "mlp_lr").trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    complete, pruned = trials
    per_epoch = json.loads((sweep / "0" / "metrics.json").read_text())["updates"] // 2
    assert per_epoch > 10  # so that update 5 lies well inside the first epoch
    # The study got a report every 5 updates, across the epoch boundary.
    assert sorted(complete.intermediate_values) == list(range(5, 2 * per_epoch + 1, 5))
    assert list(pruned.intermediate_values) == [5]
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert metrics["status"] == "pruned" and metrics["updates"] == 5
    assert "after update 5 (epoch 1)" in metrics["stop_reason"]
    record = json.loads((sweep / "1" / "trial.json").read_text())
    assert record["state"] == "pruned" and record["pruned_at"] == {"epoch": 1, "update": 5}
    overrides = OmegaConf.load(sweep / "1" / ".hydra" / "overrides.yaml")
    assert "trainer.val_every_n_updates=5" in overrides


def test_report_every_n_updates_must_agree_with_the_trainers_checks(bprun, tmp_path):
    r = bprun(
        "-m",
        "search=mlp_lr",
        "search.report_every_n_updates=5",
        "trainer.val_every_n_updates=7",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        check=False,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == (
        "error: search.report_every_n_updates=5 has the trials validate every 5 updates, but "
        "trainer.val_every_n_updates=7: drop one, or set them equal"
    )
    assert not (tmp_path / "sweep" / "optuna.journal").exists()


def test_report_every_n_updates_below_one_is_refused():
    with pytest.raises(BprunError, match=r"search.report_every_n_updates=0: must be at least 1"):
        SearchSettings(report_every_n_updates=0).validate()
