"""The Optuna sweeper's loop: one trial per free slot, until the study holds n_trials.

Each slot asks the study for a trial, launches it as one Hydra job through the
configured launcher (`launch([overrides], initial_job_idx=<trial number>)`, so
the job's folder is `<sweep dir>/<trial number>` and no two trials share one),
then tells the study how it ended. With one slot it runs on the main thread;
with more, each slot is a thread, so a pruned or failed trial frees its slot
for the next one at once while the others go on. With `search.workers=N`
(the default when n_jobs > 1) each of the N slots runs its trials on its own
long-lived worker process (bprun.search.workers) instead of the launcher.
"""

from __future__ import annotations

import logging
import math
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobStatus
from omegaconf import DictConfig, OmegaConf

from bprun.errors import BprunError, Interrupted
from bprun.io import read_json
from bprun.overrides import key_of
from bprun.search import report, workers
from bprun.search.settings import SearchSettings
from bprun.search.space import Space, parse_space
from bprun.search.study import RELEASED, Search, shown, storage_spec
from bprun.sweep import summary as sweep_summary

log = logging.getLogger("bprun")

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def settings_of(config: DictConfig) -> SearchSettings:
    if OmegaConf.select(config, "search") is None:
        raise BprunError("the Optuna sweeper needs the `search` node of bprun's config")
    return OmegaConf.to_object(config.search).validate()


class SearchRun:
    def __init__(self, sweeper, arguments: list[str]):
        self.sweeper, self.config = sweeper, sweeper.config
        self.settings = settings_of(self.config)
        if self.settings.trial is not None:
            raise BprunError("search.trial is set by the search for each job: drop it")
        self.space: Space = parse_space(dict(sweeper.params), arguments)
        self.monitor = self.config.trainer.monitor
        mode = self.config.trainer.mode
        if mode not in ("min", "max"):
            raise BprunError(f"trainer.mode={mode}: use min or max")
        self.direction = "minimize" if mode == "min" else "maximize"
        self._check_space()
        launcher = OmegaConf.select(self.config, "hydra.launcher._target_")
        workers.check_launcher(self.settings, launcher)
        self.settings.check_epochs(self.config.trainer.max_epochs)
        self.report_overrides = self._report_overrides()
        self.workers = workers.pool_size(self.settings, launcher)
        if self.settings.trial_timeout is not None and not self.workers:
            raise BprunError(
                f"search.trial_timeout={self.settings.trial_timeout:g} is kept by worker "
                "processes: set search.workers (1 or more), or drop the timeout"
            )
        if not self.workers and self.settings.n_jobs > 1 and launcher == BASIC_LAUNCHER:
            raise BprunError(
                f"search.n_jobs={self.settings.n_jobs} runs trials side by side in worker "
                "processes: add hydra/launcher=joblib (conf/search/*.yaml do)"
            )
        self.sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        self.spec = storage_spec(self.settings, self.sweep_dir)
        self.stop = threading.Event()
        self.interrupted: Interrupted | None = None
        self.error: BaseException | None = None  # what stopped a slot's thread
        self._marked, self._marking = 0, threading.Lock()  # released trials marked so far

    def _report_overrides(self) -> list[str]:
        """search.report_every_n_updates=N: the trials validate (and report) every N updates."""
        every = self.settings.report_every_n_updates
        if every is None:
            return []
        own = self.config.trainer.val_every_n_updates
        if own is not None and own != every:
            raise BprunError(
                f"search.report_every_n_updates={every} has the trials validate every {every} "
                f"updates, but trainer.val_every_n_updates={own}: drop one, or set them equal"
            )
        return [f"trainer.val_every_n_updates={every}"]

    def _check_space(self) -> None:
        """Compose one trial's config now, so an unknown key fails before any trial runs."""
        s = self.settings
        if s.sampler == "grid":
            self.space.grid()
        size = self.space.size()
        if size is not None and size < s.n_trials:
            raise BprunError(
                f"search.n_trials={s.n_trials} but the space has only {size} points: lower "
                f"search.n_trials to {size} or widen the space"
            )
        first = {}
        for name, d in self.space.distributions.items():
            first[name] = d.choices[0] if hasattr(d, "choices") else d.low
        loader = self.sweeper.hydra_context.config_loader
        try:
            loader.load_sweep_config(self.config, self.space.overrides(first))
        except Exception as e:
            message = " ".join(str(e).split("\n")[0].split())
            raise BprunError(f"search space: {message}") from None

    # ---------------------------------------------------------------- the loop
    def run(self) -> list:
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, self.sweep_dir / "multirun.yaml")
        s = self.settings
        self.search = Search(
            s, self.space, self.spec, self.direction, self.config.trainer.max_epochs
        )
        try:
            return self._run()
        finally:
            self.search.close()

    def _mark_released(self) -> None:
        """Each trial released from a stopped search: its folder, where this host sees it,
        says a later trial re-ran its slot."""
        with self._marking:
            for trial in self.search.released[self._marked :]:
                report.mark_replaced(trial, sweep_summary.JOB_FILE, self.sweep_dir)
            self._marked = len(self.search.released)

    def _run(self) -> list:
        s = self.settings
        self._mark_released()
        before = self.search.counted()
        print(
            f"search {s.study_name}: {before} of {s.n_trials} trials done or running in "
            f"{shown(self.spec)}; {self.slots} at a time ({workers.describe(self.workers)}), sampler {s.sampler}, pruner {s.pruner}"
            + (
                f"; {len(self.search.released)} stopped trial(s) released"
                if self.search.released
                else ""
            )
            + f"\n  watch it: optuna-dashboard {shlex.quote(shown(self.spec))}",
            flush=True,
        )
        # The launcher announces each one-job batch in three lines; the job's own line says it.
        logging.getLogger("hydra_plugins.hydra_joblib_launcher").setLevel(logging.WARNING)
        logging.getLogger("hydra._internal.core_plugins.basic_launcher").setLevel(logging.WARNING)
        returns: list = []
        runners = [self._runner(i) for i in range(self.slots)]
        try:
            self._slots(returns, runners)
        finally:
            for runner in runners:
                if isinstance(runner, workers.WorkerSlot):
                    runner.close()
        if self.interrupted is not None:
            self._finish()
            print(f"search stopped: {self.interrupted}; run the same command to continue it")
            raise SystemExit(self.interrupted.exit_code)
        self._finish()
        return returns

    @property
    def slots(self) -> int:
        """Trials at a time: one per worker, else search.n_jobs."""
        return self.workers or self.settings.n_jobs

    def _runner(self, i: int):
        """What runs a slot's trials: its worker, or the launcher."""
        if not self.workers:
            return self.sweeper.launcher
        return workers.WorkerSlot(
            self.sweeper.launcher,
            f"worker-{i}",
            self.settings.trial_timeout,
            self.settings.worker_memory_mb,
        )

    def _slots(self, returns: list, runners: list) -> None:
        if len(runners) == 1:
            self._slot(returns, runners[0])
        else:
            threads = [
                threading.Thread(
                    target=self._slot, args=(returns, runner), name=f"slot-{i}", daemon=True
                )
                for i, runner in enumerate(runners)
            ]
            for t in threads:
                t.start()
            try:
                while any(t.is_alive() for t in threads):
                    for t in threads:
                        t.join(0.2)
            except KeyboardInterrupt:
                self.stop.set()  # the jobs got the same SIGINT and stop after saving
                for t in threads:
                    t.join()
                raise
            if self.error is not None:
                raise self.error

    def _slot(self, returns: list, runner) -> None:
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                trial = self.search.ask(lambda n: self.sweep_dir / str(n))
                ask_s = time.perf_counter() - start
                self._mark_released()
                if trial is None:
                    # The study is full, but a trial of a search that looks stopped may yet be
                    # released: wait to see, then ask again.
                    wait = self.search.stale_wait()
                    if wait is None:
                        return
                    self.stop.wait(wait)
                    continue
                returns.append(self._run_trial(trial, runner, {"ask_s": ask_s}))
        except BaseException as e:  # the storage went away, the space ran out: stop every slot
            if threading.current_thread() is threading.main_thread():
                raise
            self.error = self.error or e
            self.stop.set()

    def _run_trial(self, trial, runner, timing: dict) -> Any:
        """Run the trial, tell the study how it ended, write its trial.json (with where its
        time went: `timing`, seconds)."""
        number = trial.number
        overrides = [
            *self.space.overrides(trial.params),
            *self.report_overrides,
            f"search.trial={number}",
        ]
        if self.settings.storage is None:
            overrides.append(f"search.storage={_quote(self.spec)}")
        folder = self.sweep_dir / str(number)
        start = time.perf_counter()
        try:
            if isinstance(runner, workers.WorkerSlot):
                ret = runner.launch(overrides, number)
                timing.update(runner.timing)
            else:
                ret = runner.launch([overrides], initial_job_idx=number)[0]
        except Exception as e:  # the job's process died (killed, out of memory, timed out)
            error = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            self.search.tell(number, "failed")
            report.write_trial(folder, self.search.trial(number), error)
            print(f"[failed]  trial {number}  error: {error}", flush=True)
            return None
        timing["launch_s"] = time.perf_counter() - start
        if ret.hydra_cfg is not None:
            folder = Path(ret.hydra_cfg.hydra.runtime.output_dir).absolute()
        metrics = read_json(folder / "metrics.json") or {}
        for key in ("wall_time_s", "fit_time_s", "fit_cpu_s"):  # the run, its training loop
            if isinstance(metrics.get(key), (int, float)):
                timing[key.replace("_time", "")] = metrics[key]
        for key, seconds in (metrics.get("search_storage_s") or {}).items():
            timing[f"job_storage_{key}_s"] = seconds  # the job's own round trips to the study
        pruned_at = metrics.get("search_pruned_at")
        error = ""
        if ret.status == JobStatus.FAILED:
            exc = ret._return_value
            if isinstance(exc, (Interrupted, KeyboardInterrupt)):
                self.interrupted = exc if isinstance(exc, Interrupted) else Interrupted("SIGINT", 2)
                self.stop.set()
                self.search.release(number, f"interrupted ({exc}); a later trial re-runs its slot")
                report.write_trial(folder, self.search.trial(number), str(exc))
                return ret
            state, value, error = "failed", None, str(exc)
        elif metrics.get("status") == "pruned":
            state, value = "pruned", None
        else:
            value = ret.return_value
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            state = "complete" if ok else "failed"
            if not ok:
                error = f"the job returned no finite {self.monitor}"
        start = time.perf_counter()
        self.search.tell(number, state, value)
        told = self.search.trial(number)
        timing["tell_s"] = time.perf_counter() - start
        report.write_trial(folder, told, error, timing, pruned_at)
        return ret

    def _finish(self) -> None:
        study = self.search.study
        report.print_best(study, self.monitor, self._base_overrides(), self.space)
        report.write_importances(study, self.sweep_dir, self.settings.seed)

    def _base_overrides(self) -> list[str]:
        """The command line's overrides a single run needs (search settings left out)."""
        return [
            o
            for o in self.space.fixed
            if not key_of(o).startswith(("hydra.", "search.", "sweep.")) and key_of(o) != "search"
        ]


def counted_states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if RELEASED not in t.user_attrs:
            out[t.state.name.lower()] = out.get(t.state.name.lower(), 0) + 1
    return out
