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
    state = ckpt_io.load_checkpoint(path)
    if "overrides" not in state:
        raise BprunError(f"trainer.resume={target}: {path} records no command line to resume with")
    run = _run_folder_of(path)
    # One override per key, the latest winning: Hydra refuses a group chosen twice.
    merged = {_key(o): o for o in [*state["overrides"], *argv] if not o.startswith("hydra.")}
    merged.update({_key(o): o for o in argv if o.startswith("hydra.")})
    return [*merged.values(), f"hydra.run.dir={run}", "hydra.output_subdir=null"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@hydra.main(version_base="1.3", config_path="pkg://bprun.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from bprun.run import run  # torch loads only once the config is valid

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        cfg.trainer.progress = False  # a sweep prints one line per job, not interleaved bars
    try:
        return run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task))
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
