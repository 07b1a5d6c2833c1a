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


def make_pruner(settings: SearchSettings, max_epochs: int):
    import optuna

    p = settings
    if p.pruner == "median":
        return optuna.pruners.MedianPruner(p.pruner_startup_trials, p.n_warmup_steps)
    if p.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            p.percentile, p.pruner_startup_trials, p.n_warmup_steps
        )
    if p.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=p.min_resource, reduction_factor=p.reduction_factor
        )
    if p.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=p.min_resource,
            max_resource=max(max_epochs, p.min_resource),
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


class StudyLock:
    """One process at a time counts and asks, across processes and machines."""

    def __init__(self, spec: str, study_name: str):
        self.spec, self.key = spec, zlib.crc32(f"bprun:{study_name}".encode()) & 0x7FFFFFFF
        self._threads = threading.Lock()
        self._engine = None
        if spec.startswith("postgresql"):
            import sqlalchemy

            try:
                self._engine = sqlalchemy.create_engine(spec, poolclass=sqlalchemy.pool.NullPool)
            except Exception as e:
                raise _storage_error(spec, e) from None
            self._file_lock = None
        else:
            from optuna.storages.journal import JournalFileSymlinkLock

            # Other databases (MySQL, ...): processes of this search share the thread lock
            # only, so searches on several machines may end a trial or two past n_trials.
            path = spec.split("///", 1)[1] if spec.startswith("sqlite") else spec
            self._file_lock = None if "://" in path else JournalFileSymlinkLock(path + ".ask")

    @contextlib.contextmanager
    def held(self):
        with self._threads:
            if self._engine is not None:
                import sqlalchemy

                try:
                    conn = self._engine.connect()
                except Exception as e:
                    raise _storage_error(self.spec, e) from None
                with conn:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
                    try:
                        yield
                    finally:
                        conn.execute(
                            sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key}
                        )
            elif self._file_lock is not None:
                self._file_lock.acquire()
                try:
                    yield
                finally:
                    self._file_lock.release()
            else:
                yield


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
            self.released = self._release_orphans()

    def _release_orphans(self) -> list:
        """Mark failed the trials left RUNNING by a search on this host that is gone."""
        from optuna.trial import TrialState

        released = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if _alive(t.user_attrs.get(OWNER)) is False:
                self.release(
                    t.number, "the search running it stopped; a later trial re-ran its slot"
                )
                released.append(t)
        return released

    def release(self, number: int, why: str) -> None:
        from optuna.trial import TrialState

        trial_id = self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, number
        )
        self.study._storage.set_trial_user_attr(trial_id, RELEASED, why)
        self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    def counted(self) -> int:
        return sum(counts(t) for t in self.study.get_trials(deepcopy=False))

    def ask(self, folder_of):
        """The next trial, or None when the study holds n_trials; `folder_of(number)` is the
        job folder recorded on it."""
        from optuna.trial import TrialState

        with self.lock.held():
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
        self.study.tell(
            number,
            value if target == TrialState.COMPLETE else None,
            state=target,
            skip_if_finished=True,
        )

    def trial(self, number: int) -> Any:
        return self.study.get_trials(deepcopy=False)[number]
