"""The grid sweeper bprun selects by default (`hydra/sweeper: bprun` in conf/config.yaml).

It runs the cartesian product of the swept values, as Hydra's basic sweeper
does, with two differences a long sweep needs:

- every job runs even when some fail: a job's failure is recorded by the
  sweep callback (job.json) and the summary, instead of the first failed
  job's exception ending the sweep and skipping the rest;
- with `sweep.skip_done=true`, a re-run of the same command with the same
  `hydra.sweep.dir` launches only the jobs that have not completed there.
  A job is identified by its overrides (`sweep.*` aside), whatever its
  number; a job stopped after saving `checkpoints/last.pt` resumes from it.

Built on Hydra's public plugin API only. Hydra imports every plugin at start-up
(`--help` included), so this module imports no torch, and it runs without
`from __future__ import annotations`: Hydra loads it outside sys.modules, where
dataclasses cannot resolve string annotations.
"""

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.errors import HydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from bprun.sweep import summary


@dataclass
class BprunSweeperConf:
    _target_: str = "hydra_plugins.bprun_sweeper.sweeper.BprunSweeper"
    max_batch_size: int | None = None  # jobs handed to the launcher at once; None: all
    params: dict[str, str] | None = None  # sweep overrides kept in a config (key: "a,b,c")


ConfigStore.instance().store(
    group="hydra/sweeper", name="bprun", node=BprunSweeperConf, provider="bprun"
)


class BprunSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict | None = None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise HydraException(
                f"hydra.sweeper.max_batch_size must be at least 1, got {max_batch_size}"
            )
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        lines = [*(f"{k}={v}" for k, v in self.params.items()), *arguments]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        jobs = grid(parser.parse_overrides(lines))
        sweep_dir = Path(self.config.hydra.sweep.dir).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        skip = OmegaConf.select(self.config, "sweep.skip_done", default=False)
        existing = {
            f: summary.job_key(summary.job_overrides(f)) for f in summary.job_folders(sweep_dir)
        }
        done = {key: f for f, key in existing.items() if summary.is_done(f)} if skip else {}
        swept = summary.swept_keys(self.config)

        returns, size = [], self.max_batch_size or max(1, len(jobs))
        for start in range(0, len(jobs), size):
            batch = jobs[start : start + size]
            self.validate_batch_is_legal(batch)
            launch = []
            for index, overrides in enumerate(batch, start=start):
                folder = done.get(summary.job_key(overrides))
                if folder is not None:
                    name = folder.relative_to(sweep_dir).as_posix()
                    shown = summary.describe(overrides, swept)
                    print(summary.job_line(name, "skipped: done", shown, folder), flush=True)
                elif skip:
                    subdir = self._free_subdir(overrides, index, sweep_dir, existing)
                    job = [*overrides, f"hydra.sweep.subdir={_quote(subdir)}"]
                    if summary.resumable(sweep_dir / subdir):
                        job.append(f"trainer.resume={_quote(str(sweep_dir / subdir))}")
                    launch.append(job)
                else:
                    launch.append(overrides)
            if launch:
                returns.append(self.launcher.launch(launch, initial_job_idx=start))
        return returns

    def _free_subdir(self, overrides, index: int, sweep_dir: Path, existing: dict) -> str:
        """The folder job `index` would get; another if an earlier job of other overrides has it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.num = index
        base = name = str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
        n = 2
        key = summary.job_key(overrides)
        while (sweep_dir / name) in existing and existing[sweep_dir / name] != key:
            name, n = f"{base}-{n}", n + 1
        existing[sweep_dir / name] = key
        return name


def grid(overrides: list[Override]) -> list[list[str]]:
    """The cartesian product of the overrides' values, one `key=value` list per job."""
    axes: dict[str, list[str]] = {}
    for o in overrides:
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep():
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            raise HydraException(
                f"{key}: the grid sweeper takes lists, choice() and range(), not "
                f"{o.value_type.name}; use a search (bprun -m search=...) for intervals"
            )
    return [list(job) for job in itertools.product(*axes.values())]


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
