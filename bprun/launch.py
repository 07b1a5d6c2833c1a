"""One training run over several processes (DistributedDataParallel).

    bprun trainer.devices=2 ...      this machine: the `bprun` process composes the config,
                                     freezes it in the run folder and starts the ranks
                                     through `torch.distributed.run` (torchrun's module)
    torchrun ... -m bprun ...        several machines: rank 0 composes and sends the frozen
                                     config to the others
    hydra/launcher=submitit_slurm    one SLURM task per rank, the same way (rank 0 composes)

Ranks load the frozen config and never compose again, so there is one run folder
(rank 0's), one TensorBoard log and one metrics.json. The rendezvous of a
single-machine run is on 127.0.0.1 (torch.distributed has no authentication).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from datetime import timedelta
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bprun.errors import BprunError, Interrupted

log = logging.getLogger("bprun")

FROZEN = "frozen_config.yaml"  # in the run folder: what every rank runs
# A collective that waits longer than this ends the job (a rank stuck, not dead: a dead
# rank's peers fail at once on the closed connection).
TIMEOUT = timedelta(minutes=10)


def under_torchrun() -> bool:
    """True in a process that torchrun started (it sets these for every rank)."""
    return "TORCHELASTIC_RUN_ID" in os.environ and "LOCAL_RANK" in os.environ


def started_as_rank() -> bool:
    """True in a rank that a launcher other than `bprun` started: torchrun, or a SLURM task
    of bprun's submitit launcher (hydra_plugins/bprun_submitit), which joined the process
    group before Hydra composed. Rank 0 of these freezes the config for the others."""
    return under_torchrun() or "BPRUN_RANKS_STARTED" in os.environ


def freeze(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> str:
    """The resolved config and the command line, as every rank will read them."""
    frozen = {
        "run_dir": str(run_dir),
        "overrides": list(overrides),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    return OmegaConf.to_yaml(OmegaConf.create(frozen))


def check(cfg: DictConfig) -> None:
    """What can be refused before any rank starts."""
    if cfg.task != "train":
        raise BprunError(
            f"trainer.devices={cfg.trainer.devices} runs task=train only; "
            f"run task={cfg.task} with trainer.devices=1"
        )
    OmegaConf.to_object(cfg.trainer)  # TrainerSettings.validate(): its refusals, once, here
    if cfg.trainer.get("strategy") == "fsdp_tp":
        from bprun.engine import tensor_parallel

        tensor_parallel.check(cfg.model, cfg.trainer.tp)  # the model's plan, once, here
    if str(OmegaConf.select(cfg, "optim._target_")).endswith("LBFGS"):
        raise BprunError(
            "optim=lbfgs re-evaluates each rank's own loss to decide its steps, so "
            "ranks would part ways: train it with trainer.devices=1"
        )
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    on_cpu = cfg.trainer.device == "cpu" or (cfg.trainer.device == "auto" and not count)
    if cfg.trainer.sync_batchnorm and on_cpu:
        raise BprunError(
            "trainer.sync_batchnorm=true needs CUDA (SyncBatchNorm runs on GPUs only): "
            "drop it on the CPU, where each rank keeps its own BatchNorm statistics"
        )
    if cfg.trainer.device.startswith("cuda") or cfg.trainer.device == "auto":
        if cfg.trainer.device != "auto" and count == 0:
            raise BprunError(
                f"trainer.device={cfg.trainer.device} but CUDA is not available here: "
                "use trainer.device=cpu (gloo) or auto"
            )
        if count and cfg.trainer.devices > count:
            raise BprunError(
                f"trainer.devices={cfg.trainer.devices} but this machine has {count} GPU(s): "
                f"use trainer.devices={count} or fewer (one GPU per rank)"
            )


def launch(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float | None:
    """Start `cfg.trainer.devices` ranks on this machine and wait for them."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    check(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    frozen = run_dir / FROZEN
    frozen.write_text(freeze(cfg, run_dir, overrides))
    n = cfg.trainer.devices
    args = get_args_parser().parse_args(
        [
            "--nnodes=1",
            f"--nproc-per-node={n}",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            "--max-restarts=0",
            "--monitor-interval=0.2",
            "-m",
            "bprun.launch",
            str(frozen),
        ]
    )
    log.info(f"starting {n} ranks on 127.0.0.1; run folder {run_dir}")
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    # Failures become bprun's own errors, so that a sweep records this job and goes on.
    resume = f"Resume with:\n  bprun trainer.resume={run_dir}"
    try:
        run(args)
    except SignalException as e:  # the ranks got the signal too, and saved last.pt
        sig = signal.Signals(int(e.sigval))
        raise Interrupted(f"stopped by {sig.name}; {resume}", int(sig)) from None
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        from bprun.engine.checkpoint import last_checkpoint

        last = last_checkpoint(run_dir)
        kept = f"; last checkpoint {last}" if last is not None else ""
        if code < 0:  # killed by a signal before it could say anything
            name = signal.Signals(-code).name
            raise BprunError(f"rank {rank} was killed by {name}; the job stopped{kept}") from None
        if code > 128 and code - 128 in signal.Signals._value2member_map_:
            sig = signal.Signals(code - 128)
            raise Interrupted(f"stopped by {sig.name}; {resume}", int(sig)) from None
        error = BprunError(f"rank {rank} exited with code {code} (its message is above){kept}")
        error.exit_code = code
        raise error from None
    metrics = run_dir / "metrics.json"
    if metrics.exists():
        import json

        best = json.loads(metrics.read_text()).get("best", {}).get(cfg.trainer.monitor)
        return float(best) if isinstance(best, (int, float)) else None
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this rank when its launcher dies, even by SIGKILL: the rank then
    saves and stops like on any SIGTERM instead of training on as an orphan."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def init_process_group() -> None:
    """gloo for CPU tensors, and NCCL for CUDA tensors where there are GPUs (one per rank)."""
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend, timeout=TIMEOUT)


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs like a one-process run (console and the run's bprun.log); the other
    ranks print warnings and errors only, marked with their rank."""
    root = logging.getLogger()
    root.handlers.clear()
    console = logging.StreamHandler(sys.stdout)
    if rank == 0:
        console.setFormatter(logging.Formatter("%(message)s"))
        file = logging.FileHandler(run_dir / "bprun.log")
        file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] %(message)s"))
        root.addHandler(file)
        root.setLevel(logging.INFO)
    else:
        console.setFormatter(logging.Formatter(f"[rank {rank}] %(message)s"))
        root.setLevel(logging.WARNING)
    root.addHandler(console)


def run_rank(frozen_text: str) -> float | None:
    """Run the frozen config as this rank (the process group is up)."""
    import torch.distributed as dist

    from bprun.config import typed
    from bprun.tasks import run_task

    frozen = OmegaConf.create(frozen_text)
    run_dir = Path(frozen.run_dir)
    cfg = frozen.config
    typed(cfg)
    setup_logging(run_dir, dist.get_rank())
    result = run_task(cfg, run_dir, list(frozen.overrides))
    # Every rank, however it was started, leaves together: a rank that closes its group
    # while a peer still talks to the store can abort at exit.
    dist.barrier()
    return result


def lead(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float | None:
    """Rank 0 under a user's `torchrun -m bprun`: freeze the composed config in the run
    folder, send it to the other ranks, and run it like them."""
    import torch.distributed as dist

    run_dir.mkdir(parents=True, exist_ok=True)
    text = freeze(cfg, run_dir, overrides)
    (run_dir / FROZEN).write_text(text)
    dist.broadcast_object_list([text], src=0)
    return run_rank(text)


def join() -> None:
    """Every rank of `torchrun ... -m bprun <overrides>`: rank 0 composes through Hydra (the
    caller's `hydra_main`, which calls `lead`); the others wait for its frozen config."""
    import torch.distributed as dist

    init_process_group()
    if dist.get_rank() == 0:
        return
    received: list = [None]
    _as_rank(lambda: (dist.broadcast_object_list(received, src=0), run_rank(received[0])))


def _as_rank(body) -> None:
    """Run `body` as a rank; exit with the run's code, the process group closed."""
    import torch.distributed as dist

    code = 0
    try:
        body()
    except BprunError as e:
        if not e.every_rank or not dist.is_initialized() or dist.get_rank() == 0:
            log.error(f"error: {e}")
        code = e.exit_code
    except KeyboardInterrupt:
        log.error("aborted")
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The rank's work is done and its files are closed: leave without the interpreter's and
    # C++'s teardown, where a gloo thread still joinable once a peer has closed the store
    # can abort the process (std::terminate, SIGABRT) and fail a finished job.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    """`python -m bprun.launch <run>/frozen_config.yaml`: one rank, started by `launch`."""
    _die_with_parent()
    frozen_text = Path(sys.argv[1]).read_text()
    init_process_group()
    _as_rank(lambda: run_rank(frozen_text))


if __name__ == "__main__":
    main()
