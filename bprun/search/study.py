"""The study: storage, sampler, pruner, and the rules that make a search resumable.

- Storage: a journal file (`optuna.journal` in the sweep folder, locked with
  Optuna's symlink lock, which holds on NFS) unless `search.storage` names a
  file or a SQLAlchemy URL.
- The cap: `ask` counts the study's trials and creates the next one under a
  lock shared by every process using the study (a lock file beside the journal,
  or a PostgreSQL advisory lock), so searches on several machines end with
  exactly `search.n_trials` trials between them.
- Resume: a trial still RUNNING whose owner (host:pid, a user attribute) was
  on this host and is gone is marked failed and *released*: it no longer
  counts, so a later trial re-runs its slot. Its folder keeps its files.
- Heartbeat: another host's processes cannot be asked, so while a trial runs
  the search that asked it stamps it with its clock (`bprun.heartbeat`) from a
  thread in the sweeper process, every `search.heartbeat_s`. The sweeper, not
  the job, beats because the sweeper tells the trial how it ended: a job stuck
  in data loading still has an owner, a dead sweeper's trial has none. A trial
  of another host is released when its stamp is `search.grace_s` old by this
  host's clock *and* did not change while this search waited two of its
  owner's beats: a skewed clock can only delay a release, never release a
  trial whose search still runs.
- No repeats: each trial is sampled with the seed `search.seed + its number`,
  so no two trials share a seed whichever process asks them, and a proposal
  equal to a trial already run is released and asked again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import optuna

from bprun.errors import BprunError
from bprun.search.settings import SearchSettings
from bprun.search.space import Space

log = logging.getLogger("bprun")

JOURNAL = "optuna.journal"
OWNER = "bprun.owner"  # host:pid of the search that asked the trial
FOLDER = "bprun.folder"  # the trial's job folder
RELEASED = "bprun.released"  # why the trial no longer counts toward n_trials
HEARTBEAT = "bprun.heartbeat"  # the owner's time.time() when it last said it runs the trial
HEARTBEAT_S = "bprun.heartbeat_s"  # how often the owner says so
MAX_REPEATS = 50  # proposals in a row equal to trials already run before giving up


def storage_spec(settings: SearchSettings, sweep_dir: Path) -> str:
    """A SQLAlchemy URL, or the absolute path of a journal file."""
    if settings.storage is None:
        return str((Path(sweep_dir) / JOURNAL).absolute())
    if "://" in settings.storage:
        return settings.storage
    return str(Path(settings.storage).expanduser().absolute())


def shown(spec: str) -> str:
    """The storage as printed: a URL's password hidden."""
    if "://" not in spec:
        return spec
    from sqlalchemy.engine import make_url

    with contextlib.suppress(Exception):
        return make_url(spec).render_as_string(hide_password=True)
    return spec


def open_storage(spec: str):
    import optuna

    if "://" not in spec:
        from optuna.storages.journal import JournalFileBackend

        Path(spec).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(spec))
    try:
        return optuna.storages.RDBStorage(spec)
    except Exception as e:
        raise _storage_error(spec, e) from None


def _storage_error(spec: str, e: Exception) -> BprunError:
    """A wrong URL, a server that is down, a missing driver: one line."""
    first = " ".join(str(e).split())[:300]
    return BprunError(
        f"search.storage={shown(spec)}: cannot open it ({type(e).__name__}: {first}); check the "
        "URL, that the server runs, and its driver (psycopg for postgresql://)"
    )


def make_pruner(settings: SearchSettings, max_epochs: int, steps_per_epoch: int = 1):
    """The study's pruner. Its settings count epochs; a trial that reports every N updates
    (search.report_every_n_updates) reports at update counts, so its pruner gets them in
    updates (`steps_per_epoch`: the trial's updates per epoch). Hyperband's brackets depend
    on max/min resource only, so the search's pruner (in epochs) and a trial's (in updates)
    put a trial in the same bracket."""
    import optuna

    p, k = settings, steps_per_epoch
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(p.pruner_startup_trials, p.n_warmup_steps * k)
    if p.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, p.pruner_startup_trials, p.n_warmup_steps * k
        )
    if p.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource * k, reduction_factor=p.reduction_factor
        )
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource * k,
            max_resource=max(max_epochs, p.min_resource) * k,
            reduction_factor=p.reduction_factor,
        )
    return optuna.pruners.NopPruner()


def make_sampler(settings: SearchSettings, space: Space, offset: int):
    """The sampler for the trial numbered `offset`; its seed moves on with the number, so a
    continued search, or another process on the same study, does not draw the same
    parameters again. QMC is indexed by the trial number, and the grid numbers its points
    by its seed, so both keep it; the grid skips the points already run by itself."""
    import optuna

    s = settings
    seed = None if s.seed is None else s.seed + offset
    if s.sampler == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=s.n_startup_trials, constant_liar=True
        )
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=s.n_startup_trials, warn_independent_sampling=False
        )
    if s.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=s.seed, warn_independent_sampling=False)
    return _Grid(space.grid(), seed=s.seed)


class _Grid(optuna.samplers.GridSampler):
    """The grid without its study.stop() once the last point is told, which works only
    inside study.optimize; the search stops at search.n_trials by itself."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


def open_study(settings: SearchSettings, spec: str, *, pruner=None, sampler=None, direction=None):
    """Create or load the study named `search.study_name` in storage `spec`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(spec)
    if direction is None:
        try:
            return optuna.load_study(
                study_name=settings.study_name, storage=storage, pruner=pruner, sampler=sampler
            )
        except KeyError:
            raise BprunError(
                f"search.study_name={settings.study_name} is not in {shown(spec)}"
            ) from None
    study = optuna.create_study(
        study_name=settings.study_name,
        storage=storage,
        pruner=pruner,
        sampler=sampler,
        direction=direction,
        load_if_exists=True,
    )
    if study.direction.name.lower() != direction:
        raise BprunError(
            f"study {settings.study_name} in {shown(spec)} was made to {study.direction.name.lower()}"
            f" its metric, this run's trainer.mode asks to {direction} it: use the same "
            "trainer.mode, or another search.study_name"
        )
    return study


def counts(trial) -> bool:
    """Whether a trial takes one of the study's n_trials slots."""
    return RELEASED not in trial.user_attrs


def _alive(owner: str | None) -> bool | None:
    """Whether the search that owns a trial still runs; None when it ran on another host."""
    if not owner or ":" not in owner:
        return None
    host, pid = owner.rsplit(":", 1)
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


# Session-level locks of the database servers that have them: (take, give back, what `take`
# answers once it holds the lock, None: nothing to check). MySQL's and MariaDB's GET_LOCK is
# by name and answers 1, or 0 on its timeout (a year here) and NULL on an error.
_SERVER_LOCKS = {
    "postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)", None),
    "mysql": ("SELECT GET_LOCK(:name, 31536000)", "SELECT RELEASE_LOCK(:name)", 1),
    "mariadb": ("SELECT GET_LOCK(:name, 31536000)", "SELECT RELEASE_LOCK(:name)", 1),
}


class StudyLock:
    """One process at a time counts and asks, across processes and machines."""

    def __init__(self, spec: str, study_name: str):
        self.spec, self.key = spec, zlib.crc32(f"bprun:{study_name}".encode()) & 0x7FFFFFFF
        self._threads = threading.Lock()
        self._engine, self._file_lock = None, None
        self._sql = _SERVER_LOCKS.get(spec.split("://", 1)[0].split("+", 1)[0])
        if self._sql is not None:
            import sqlalchemy

            try:
                self._engine = sqlalchemy.create_engine(spec, poolclass=sqlalchemy.pool.NullPool)
            except Exception as e:
                raise _storage_error(spec, e) from None
        else:
            from optuna.storages.journal import JournalFileSymlinkLock

            # Other databases (Oracle, MS SQL, ...): processes of this search share the thread
            # lock only, so searches on several machines may end a trial or two past n_trials.
            path = spec.split("///", 1)[1] if spec.startswith("sqlite") else spec
            self._file_lock = None if "://" in path else JournalFileSymlinkLock(path + ".ask")

    @contextlib.contextmanager
    def held(self):
        with self._threads:
            if self._engine is not None:
                import sqlalchemy

                take, give_back, granted = self._sql
                names = {"k": self.key, "name": f"bprun:{self.key}"}
                try:
                    conn = self._engine.connect()
                except Exception as e:
                    raise _storage_error(self.spec, e) from None
                with conn:  # closing the session frees its lock, should the release fail
                    answer = conn.execute(sqlalchemy.text(take), names).scalar()
                    if granted is not None and answer != granted:
                        raise BprunError(
                            f"search.storage={shown(self.spec)}: the server did not grant the "
                            f"study's lock ({take} answered {answer}); run the search again"
                        )
                    try:
                        yield
                    finally:
                        conn.execute(sqlalchemy.text(give_back), names)
            elif self._file_lock is not None:
                self._file_lock.acquire()
                try:
                    yield
                finally:
                    self._file_lock.release()
            else:
                yield


class Heartbeat:
    """A daemon thread that stamps the trials this search runs with the time, every
    `interval` seconds, until they end."""

    def __init__(self, storage, interval: float):
        self.storage, self.interval = storage, interval
        self._trials: set[int] = set()  # trial ids
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bprun-heartbeat", daemon=True)
        self._warned = False

    def add(self, trial_id: int) -> None:
        with self._lock:
            self._trials.add(trial_id)
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def discard(self, trial_id: int) -> None:
        with self._lock:
            self._trials.discard(trial_id)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        while not self._stop.wait(self.interval):
            with self._lock:
                trials = sorted(self._trials)
            for trial_id in trials:
                try:
                    self.storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())
                except UpdateFinishedTrialError:  # told between the copy and the stamp
                    self.discard(trial_id)
                except Exception as e:  # the storage is away for a while: beat again later
                    if not self._warned:
                        log.warning(f"search heartbeat: {type(e).__name__}: {e}")
                        self._warned = True


class Search:
    """The sweeper's handle on its study: ask under the cap, tell, release."""

    def __init__(
        self, settings: SearchSettings, space: Space, spec: str, direction: str, max_epochs
    ):
        self.settings, self.space, self.spec = settings, space, spec
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lock = StudyLock(spec, settings.study_name)
        pruner = make_pruner(settings, max_epochs)
        with self.lock.held():  # two searches starting at once would both create the tables
            self.study = open_study(settings, spec, pruner=pruner, direction=direction)
        self.heartbeat = Heartbeat(self.study._storage, settings.heartbeat_s)
        # Another host's trials whose stamp is grace_s old: number -> (that stamp, our
        # monotonic clock when we first saw it, its owner's beat, whether it had moved);
        # released by a later ask once the stamp has stood still for two beats.
        self._suspects: dict[int, tuple[float, float, float, bool]] = {}
        self.released: list = []  # trials released from stopped searches, at the start or later
        self._release_orphans()

    def close(self) -> None:
        """Stop the heartbeat (the trials it stamped have ended, or are left to be released)."""
        self.heartbeat.close()

    def _release_orphans(self) -> None:
        """At the start: release the trials left RUNNING by a search that is gone. On this
        host, its process is; on another, its heartbeat is grace_s old and stays still while
        this search waits two of its owner's beats (a clock that runs behind ours cannot
        make a live search's trial look stopped)."""
        with self.lock.held():
            self._release_stopped_now()
        due = self._due()
        if due:
            wait = max(due) - time.monotonic()
            print(
                f"search: {len(due)} trial(s) of other hosts have not beaten for "
                f"{self.settings.grace_s:g} s; checking for {wait:.0f} s that their search "
                "stopped",
                flush=True,
            )
            time.sleep(max(0.0, wait))
            with self.lock.held():
                self._release_stopped_now()

    def _release_stopped_now(self) -> None:
        """Under the lock, at the start and as each trial is asked: release the trials of
        searches that stopped, without waiting. A process of this host that is gone is
        released at once; another host's stamp grace_s old is watched, and released by a
        later call once it stood still for two of its owner's beats. So a search on shared
        storage also re-runs the slots of a search that died on another machine while it
        still has work, as Optuna's heartbeat fails stale trials whenever a worker starts one."""
        from optuna.trial import TrialState

        now, clock = time.time(), time.monotonic()
        watched = {}
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.user_attrs.get(OWNER)
            if not owner or owner == self.owner:
                continue
            alive = _alive(owner)
            if alive is False:
                if self._release_running(t.number, "the search running it stopped"):
                    self.released.append(t)
                continue
            beat, every = t.user_attrs.get(HEARTBEAT), t.user_attrs.get(HEARTBEAT_S)
            if not (isinstance(beat, (int, float)) and isinstance(every, (int, float))):
                continue
            if alive is None and now - beat > self.settings.grace_s:
                seen = self._suspects.get(t.number)
                if seen is None or seen[0] != beat:
                    # A stamp that moved belongs to a live search whose clock runs behind ours:
                    # watched still, but no reason for a search with nothing to ask to wait.
                    watched[t.number] = (beat, clock, every, seen is not None)
                elif clock - seen[1] >= 2 * every + 1:
                    host = owner.rsplit(":", 1)[0]
                    why = f"its search on {host} stopped (silent {now - beat:.0f} s)"
                    if self._release_running(t.number, why):
                        self.released.append(t)
                else:
                    watched[t.number] = seen
        self._suspects = watched

    def _due(self) -> list[float]:
        """When (monotonic clock) each trial that looks stopped, its stamp still, can go."""
        return [t + 2 * every + 1 for _, t, every, moved in self._suspects.values() if not moved]

    def stale_wait(self) -> float | None:
        """Seconds until a trial that looks stopped can be released by another ask; None when
        no trial looks stopped (a search with nothing to ask can end)."""
        due = self._due()
        return None if not due else max(0.1, min(due) - time.monotonic())

    def _release_running(self, number: int, why: str) -> bool:
        """Release a trial found RUNNING, unless another search released it meanwhile."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            self.release(number, f"{why}; a later trial re-ran its slot")
        except UpdateFinishedTrialError:
            return False
        return True

    def release(self, number: int, why: str) -> None:
        from optuna.trial import TrialState

        trial_id = self._trial_id(number)
        self.heartbeat.discard(trial_id)
        self.study._storage.set_trial_user_attr(trial_id, RELEASED, why)
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def counted(self) -> int:
        return sum(counts(t) for t in self.study.get_trials(deepcopy=False))

    def ask(self, folder_of):
        """The next trial, or None when the study holds n_trials; `folder_of(number)` is the
        job folder recorded on it."""
        from optuna.trial import TrialState

        with self.lock.held():
            self._release_stopped_now()
            for _ in range(MAX_REPEATS):
                trials = self.study.get_trials(deepcopy=False)
                if sum(counts(t) for t in trials) >= self.settings.n_trials:
                    return None
                seen = [
                    t.params
                    for t in trials
                    if counts(t)
                    and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
                ]
                # Seeded by the number the trial will get: no two trials share a seed,
                # whichever process or run asks them.
                self.study.sampler = make_sampler(self.settings, self.space, len(trials))
                trial = self.study.ask(self.space.distributions)
                trial.set_user_attr(OWNER, self.owner)
                if trial.params not in seen:
                    trial.set_user_attr(FOLDER, str(folder_of(trial.number)))
                    trial.set_user_attr(HEARTBEAT_S, self.settings.heartbeat_s)
                    trial.set_user_attr(HEARTBEAT, time.time())
                    self.heartbeat.add(trial._trial_id)
                    return trial
                self.release(trial.number, "the sampler proposed parameters already run")
        raise BprunError(
            f"the sampler proposed parameters already run {MAX_REPEATS} times in a row: the space "
            "is nearly exhausted; widen it or lower search.n_trials"
        )

    def tell(self, number: int, state: str, value: float | None = None) -> None:
        from optuna.trial import TrialState

        states = {"complete": TrialState.COMPLETE, "pruned": TrialState.PRUNED}
        target = states.get(state, TrialState.FAIL)
        self.heartbeat.discard(self._trial_id(number))
        self.study.tell(
            number,
            value if target == TrialState.COMPLETE else None,
            state=target,
            skip_if_finished=True,
        )

    def _trial_id(self, number: int) -> int:
        return self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, number
        )

    def trial(self, number: int) -> Any:
        return self.study.get_trials(deepcopy=False)[number]
