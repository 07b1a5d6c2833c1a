"""The `bprun` command: the one module that knows Hydra's entry point.

Before Hydra composes, `trainer.resume=<run>` is turned into that run's own
overrides (saved in its checkpoint) plus `hydra.run.dir=<run>`, so a resumed
run continues in its folder with its config, and later overrides on the line
apply on top.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from bprun.config import register_configs
from bprun.errors import BprunError
from bprun.overrides import merge

log = logging.getLogger("bprun")
register_configs()


def _run_folder_of(checkpoint: Path) -> Path:
    folder = checkpoint.parent
    return folder.parent if folder.name == "checkpoints" else folder


def resume_overrides(argv: list[str]) -> list[str]:
    """Rewrite `trainer.resume=X ...` into the run's own overrides + these ones.

    The run's overrides come from the checkpoint, which only a run that trained
    with them can have written. Hydra is told to leave the run's `.hydra/` as it
    is, so a resume that fails changes nothing in the folder.
    """
    resume = [a for a in argv if a.startswith("trainer.resume=")]
    if not resume or "-m" in argv or "--multirun" in argv:
        return argv
    from bprun.engine import checkpoint as ckpt_io

    target = resume[-1].split("=", 1)[1]
    path = ckpt_io.resolve_checkpoint(target)
    saved = (ckpt_io.load_checkpoint(path).get("extra") or {}).get("overrides")
    if saved is None:
        raise BprunError(f"trainer.resume={target}: {path} records no command line to resume with")
    run = _run_folder_of(path)
    line = merge([o for o in saved if not o.startswith("hydra.")], argv)
    return [*line, f"hydra.run.dir={run}", "hydra.output_subdir=null"]


@hydra.main(version_base="1.3", config_path="pkg://bprun.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from bprun.tasks import run_task  # torch loads only once the config is valid

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        cfg.trainer.progress = False  # a sweep prints one line per job, not interleaved bars
    try:
        return run_task(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
    except BprunError as e:
        log.error(f"error: {e}")
        if hc.mode == RunMode.MULTIRUN:
            raise  # the sweep records the failed job and goes on
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        log.error("aborted")
        sys.exit(130)


def main() -> None:
    # As with `python -m`, modules in the working directory can be `_target_`s.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Hydra's parser wants its flags before the overrides; accept them anywhere.
    argv = sys.argv[1:]
    if "--help" in argv or "-h" in argv:
        from bprun.help import render

        print(render(argv))
        return
    flags = [a for a in argv if a in ("-m", "--multirun")]
    argv = flags + [a for a in argv if a not in flags]
    try:
        sys.argv[1:] = resume_overrides(argv)
    except BprunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    hydra_main()


if __name__ == "__main__":
    main()
