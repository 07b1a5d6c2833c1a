"""One GPU per job for sweeps whose jobs run side by side (hydra/launcher=joblib).

Each job, in its own worker process, claims a GPU of those visible to the sweep
by locking `<sweep>/.gpus/<id>.lock` (`fcntl.flock`, released by the kernel if
the worker dies) and sets `CUDA_VISIBLE_DEVICES` to it before CUDA starts, so
the job's `cuda` is that GPU. With more parallel jobs than GPUs the extra ones
wait for a GPU to be free: queued, never two on one device.

A worker process that ran a job has CUDA set up for that job's GPU and cannot
move, so its later jobs wait for that same GPU.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("bprun")

_pinned: str | None = None  # the GPU this worker's CUDA was set up for


def visible_gpus() -> list[str]:
    """The sweep's GPUs: CUDA_VISIBLE_DEVICES when set (ids or UUIDs), else all there are."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [g.strip() for g in env.split(",") if g.strip()]
        return [] if ids[:1] == ["-1"] else ids
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class GpuClaim:
    def __init__(self, gpu: str, handle):
        self.gpu, self._handle = gpu, handle

    def release(self) -> None:
        global _pinned
        import torch

        if torch.cuda.is_initialized():  # this worker's CUDA now lives on this GPU
            _pinned = self.gpu
        if self._handle is not None:
            self._handle.close()  # closing the file drops the lock
            self._handle = None


def claim(sweep_dir: Path, gpus: list[str], poll_s: float = 0.2) -> GpuClaim:
    """Lock a free GPU of `gpus` (waiting while all are taken) and make it this process's."""
    choices = [_pinned] if _pinned in gpus else gpus
    folder = sweep_dir / ".gpus"
    folder.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for gpu in choices:
            handle = open(folder / f"{gpu}.lock", "w")  # noqa: SIM115 - held until release
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            return GpuClaim(gpu, handle)
        if not waited:
            log.info(f"waiting for a free GPU of {','.join(choices)}")
            waited = True
        time.sleep(poll_s)
