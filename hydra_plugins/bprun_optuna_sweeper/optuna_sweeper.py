"""`hydra/sweeper=optuna`: a search on Optuna that persists, prunes and runs in parallel.

Hydra imports this module when it scans for plugins, on every command: the work
is in bprun.search, imported only when a search runs. No `from __future__ import
annotations`: Hydra loads plugins outside sys.modules, where dataclasses cannot
resolve string annotations.
"""

import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaSweeperConf:
    """hydra.sweeper for `hydra/sweeper=optuna`; the search's settings are the `search` node."""

    _target_: str = "hydra_plugins.bprun_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    # The space: key -> Hydra override value, e.g. optim.lr: tag(log, interval(1e-4, 1e-1)).
    params: dict[str, str] = field(default_factory=dict)


ConfigStore.instance().store(group="hydra/sweeper", name="optuna_schema", node=OptunaSweeperConf)


class OptunaSweeper(Sweeper):
    def __init__(self, params: dict[str, str] | None = None) -> None:
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context = config, hydra_context
        _jobs_at_a_time(config)
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from bprun.errors import BprunError
        from bprun.search.sweeper import SearchRun

        try:
            return SearchRun(self, arguments).run()
        except BprunError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None


def _jobs_at_a_time(config: DictConfig) -> None:
    """A launcher that runs jobs side by side on this machine (joblib) runs search.n_jobs of
    them; set here rather than in conf/search, so that a launcher without `n_jobs`
    (submitit's) composes with a search too."""
    from omegaconf import OmegaConf, open_dict

    n_jobs = OmegaConf.select(config, "search.n_jobs")
    if n_jobs is not None and "n_jobs" in config.hydra.launcher:
        with open_dict(config.hydra.launcher):
            config.hydra.launcher.n_jobs = n_jobs
