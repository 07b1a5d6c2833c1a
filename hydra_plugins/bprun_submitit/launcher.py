"""`hydra/launcher=submitit_slurm` and `hydra/launcher=submitit_local`: sweep jobs as SLURM
jobs (or as processes of this machine, through the same code).

hydra-submitit-launcher's launchers, with what long training jobs on a cluster need:

- Requeue: `signal_delay_s` before its time limit a job gets submitit's signal (USR2).
  bprun's training loop takes it like SIGTERM (it finishes the update and saves
  checkpoints/last.pt); then submitit requeues the job. A job that SLURM itself stops
  (`scontrol requeue`, preemption, cancel) gets SIGTERM, saves the same way and leaves
  the rest to SLURM.
- Resume: a job that starts again under the same job id finds the id it wrote in its
  job folder (`submitit_job_id.txt`) and continues from its own last.pt
  (`trainer.resume=<job folder>`, as `sweep.skip_done` does). A new sweep over an old
  folder starts afresh.
- Ranks: with more than one task (`tasks_per_node`, by default `trainer.devices`) each
  task is one DDP rank: SLURM_PROCID, SLURM_LOCALID and the first node of the job become
  RANK, LOCAL_RANK and MASTER_ADDR. Rank 0 composes the config and freezes it in its job
  folder, as under `torchrun -m bprun`; the other ranks run that frozen config.
- Every job recorded: a job that ends without a result (cancelled, killed) is logged
  and counted as failed instead of ending the sweep with the first one.

No `from __future__ import annotations` and no torch import at the top: Hydra imports
every plugin at start-up, outside sys.modules.
"""

import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, setup_globals
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as base
from hydra_plugins.hydra_submitit_launcher.config import (
    BaseQueueConf,
    LocalQueueConf,
    SlurmQueueConf,
)
from omegaconf import OmegaConf, open_dict

from bprun.errors import BprunError, Interrupted

log = logging.getLogger(__name__)

JOB_ID_FILE = "submitit_job_id.txt"  # in the job folder: the scheduler's job that runs it
RANKS_STARTED = "BPRUN_RANKS_STARTED"  # set in a task made a rank here (bprun.launch reads it)
_MODULE = "hydra_plugins.bprun_submitit.launcher"


def gpus_per_node(device: str, devices: int) -> int | None:
    """One GPU per rank, none for trainer.device=cpu (a cluster without GPUs)."""
    return None if str(device) == "cpu" else int(devices)


OmegaConf.register_new_resolver("bprun_gpus_per_node", gpus_per_node, replace=True)


@dataclass
class SlurmConf(SlurmQueueConf):
    """hydra.launcher for `hydra/launcher=submitit_slurm`: the plugin's settings, with
    defaults for training jobs that checkpoint, are requeued and resume."""

    _target_: str = f"{_MODULE}.SlurmLauncher"
    name: str = "bprun"
    timeout_min: int = 240  # the job's time limit (sbatch --time), in minutes
    # One task per rank and one GPU per task: a DDP job over trainer.devices GPUs.
    tasks_per_node: Any = "${trainer.devices}"
    gpus_per_node: Any = "${bprun_gpus_per_node:${trainer.device},${trainer.devices}}"
    cpus_per_task: int | None = None  # None: the partition's default
    partition: str | None = None  # None: the cluster's default partition
    # USR2 this long before the time limit: the job saves last.pt and is requeued.
    signal_delay_s: int = 120
    max_num_timeout: int = 20  # requeues after reaching the time limit before it gives up


@dataclass
class LocalConf(LocalQueueConf):
    """hydra.launcher for `hydra/launcher=submitit_local`: the same path on this machine."""

    _target_: str = f"{_MODULE}.LocalLauncher"
    name: str = "bprun"
    timeout_min: int = 240
    tasks_per_node: Any = "${trainer.devices}"


def store_configs() -> None:
    """Put bprun's defaults in place of the plugin's own `submitit_slurm`/`submitit_local`
    (called after Hydra's plugin discovery, which stores the plugin's)."""
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="submitit_slurm", node=SlurmConf, provider="bprun")
    cs.store(group="hydra/launcher", name="submitit_local", node=LocalConf, provider="bprun")


class _BprunSubmitit(base.BaseSubmititLauncher):
    def launch(self, job_overrides, initial_job_idx: int):
        """The plugin's launch, except that a job without a result is recorded, not raised."""
        import submitit

        if self._EXECUTOR == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
            _fail(
                "hydra/launcher=submitit_slurm needs SLURM's sbatch and srun on the PATH: run "
                "the sweep on a node of the cluster, or use hydra/launcher=submitit_local to "
                "run the jobs on this machine"
            )
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=params.pop("submitit_folder"),
            **{f"{self._EXECUTOR}_max_num_timeout": params.pop("max_num_timeout", 3)},
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in shared else f"{self._EXECUTOR}_{k}": v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        state = Singleton.get_state()
        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        try:
            jobs = executor.map_array(
                self,
                [list(o) for o in job_overrides],
                ["hydra.sweep.dir"] * len(job_overrides),
                list(numbers),
                [f"job_id_for_{n}" for n in numbers],
                [state] * len(job_overrides),
            )
        except submitit.core.utils.FailedJobError as e:  # sbatch refused the array
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            said = next((line for line in lines if "error" in line.lower()), str(e))
            fix = "fix the hydra.launcher.* setting it names"
            if "gres" in said.lower() and params.get("gpus_per_node"):
                fix = (
                    f"hydra.launcher.gpus_per_node={params['gpus_per_node']} asks for GPUs; "
                    "on a cluster without them add trainer.device=cpu"
                )
            _fail(f"the jobs were not submitted: {said}; {fix}")
        log.info(f"submitit '{self._EXECUTOR}': {len(jobs)} jobs; logs in {executor.folder}")
        for n, job, overrides in zip(numbers, jobs, job_overrides, strict=True):
            log.info(f"\t#{n} job {job.job_id}: {' '.join(filter_overrides(overrides))}")
        tasks = int(params.get("tasks_per_node") or 1) * int(params.get("nodes") or 1)
        return [
            _result(job, list(o), n, tasks)
            for n, job, o in zip(numbers, jobs, job_overrides, strict=True)
        ]

    def __call__(self, sweep_overrides, job_dir_key, job_num, job_id, singleton_state):
        """One job, in the process (one per task) that submitit started for it."""
        import submitit

        env = submitit.JobEnvironment()
        ranks = env.num_tasks > 1
        if ranks:
            _become_rank(env)
            if env.global_rank != 0:
                return _follow(env)
        Singleton.set_state(singleton_state)
        setup_globals()
        resume = self._resume_overrides(list(sweep_overrides), job_num, env)
        try:
            ret = super().__call__(
                [*sweep_overrides, *resume], job_dir_key, job_num, job_id, singleton_state
            )
        finally:
            if ranks:
                _leave_process_group()
        _hand_over(ret, env)
        return ret

    def _resume_overrides(self, overrides: list, job_num: int, env) -> list:
        """`trainer.resume=<job folder>` when this job runs again (requeued) and saved
        last.pt there; it records its job id in the folder for the next start."""
        if any(o.split("=", 1)[0] == "trainer.resume" for o in overrides):
            return []  # sweep.skip_done resumes it already
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = job_num
            cfg.hydra.job.id = env.job_id
        folder = Path(str(cfg.hydra.sweep.dir), str(cfg.hydra.sweep.subdir)).absolute()
        last = folder / "checkpoints" / "last.pt"
        if not (restarted_in(folder, env) and last.is_file()):
            return []
        log.info(f"job {env.job_id} started again: resuming from {last}")
        return ["trainer.resume='" + str(folder).replace("\\", "\\\\").replace("'", "\\'") + "'"]


def restarted_in(folder: Path, env) -> bool:
    """Whether this job ran in `folder` before (requeued: the same job id); records its id
    there for its next start. A new sweep over an old folder is not a restart."""
    marker = folder / JOB_ID_FILE
    again = marker.is_file() and marker.read_text().strip() == env.job_id
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(env.job_id + "\n")
    return again


class SlurmLauncher(_BprunSubmitit):
    _EXECUTOR = "slurm"


class LocalLauncher(_BprunSubmitit):
    _EXECUTOR = "local"


def _fail(message: str) -> None:
    """A sweep that cannot start: one line, exit 1, no traceback (as the sweep callback)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def _result(job, overrides: list, number: int, tasks: int) -> JobReturn:
    """Job `number`'s return (rank 0's under DDP); a failed return when none came back."""
    try:
        return (job.task(0) if tasks > 1 else job).result()
    except Exception as e:  # submitit's UncompletedJobError or FailedJobError
        lines = [line for line in str(e).splitlines() if line.strip()]
        text = " ".join(lines[:2])
        log.error(f"job #{number} ({job.job_id}) ended without a result: {text}")
        log.error(f"its log: {job.paths.stdout}")
        error = RuntimeError(f"job {job.job_id} ended without a result (see {job.paths.stdout})")
        return JobReturn(overrides=overrides, status=JobStatus.FAILED, _return_value=error)


def _stopped_by(ret: Any) -> int | None:
    exc = getattr(ret, "_return_value", None)
    if getattr(ret, "status", None) == JobStatus.FAILED and isinstance(exc, Interrupted):
        return exc.exit_code - 128
    return None


def _left_to_the_scheduler(signum: int | None, env) -> bool:
    """Signals after which the job ends without a result: submitit's requeue signal, and
    SIGTERM from SLURM, which requeues the job or ends it, as it decided."""
    return signum == env._usr_sig() or (signum == signal.SIGTERM and env.cluster == "slurm")


def _hand_over(ret: JobReturn, env) -> None:
    """After last.pt was saved on a stop signal, let submitit or SLURM go on from there.

    On submitit's signal, its handler (back in place once training stopped) is run: it
    requeues the job and exits. On SIGTERM under SLURM the job exits without a result:
    SLURM requeues it (then it resumes) or ends it (then the sweep records it)."""
    signum = _stopped_by(ret)
    if signum == env._usr_sig():
        log.info(f"saved last.pt on {signal.Signals(signum).name}; requeueing the job")
        signal.raise_signal(signum)  # submitit: scontrol requeue (or a local restart), exit
    if _left_to_the_scheduler(signum, env):
        raise SystemExit(128 + signum)


def _become_rank(env) -> None:
    """torch.distributed's environment from the scheduler's, and the process group."""
    from bprun.launch import init_process_group

    first = env.hostnames[0] if env.cluster == "slurm" else "127.0.0.1"
    os.environ.update(
        RANK=str(env.global_rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_WORLD_SIZE=str(env.num_tasks // max(1, env.num_nodes)),
        MASTER_ADDR=first,
        # every task of the job derives the same port; jobs on one node get different ones
        MASTER_PORT=str(15000 + int(env.raw_job_id) % 20000),
    )
    os.environ[RANKS_STARTED] = env.cluster
    init_process_group()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _follow(env) -> None:
    """A rank other than 0: run the config that rank 0 froze in its job folder."""
    import torch.distributed as dist

    from bprun.launch import run_rank

    received: list = [None]
    try:
        dist.broadcast_object_list(received, src=0)
        run_rank(received[0])
    except Interrupted as e:
        if _left_to_the_scheduler(e.exit_code - 128, env):
            raise SystemExit(e.exit_code) from None
        log.error(f"error: {e}")
    except BprunError as e:
        log.error(f"error: {e}")  # rank 0 records the job's error
    finally:
        _leave_process_group()
