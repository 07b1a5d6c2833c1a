"""The `bprun` command: the one module that knows Hydra's entry point.

Before Hydra composes, `trainer.resume=<run>` is turned into that run's own
overrides plus `hydra.run.dir=<run>`, so a resumed run continues in its
folder with its config, and later overrides on the line apply on top.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from bprun.config import register_configs
from bprun.errors import BprunError

log = logging.getLogger("bprun")
register_configs()


def _run_folder_of(path: Path) -> Path:
    if path.is_dir():
        return path
    folder = path.parent
    return folder.parent if folder.name == "checkpoints" else folder


def resume_overrides(argv: list[str]) -> list[str]:
    """Rewrite `trainer.resume=X ...` into the run's saved overrides + these ones."""
    resume = [a for a in argv if a.startswith("trainer.resume=")]
    if not resume or "-m" in argv or "--multirun" in argv:
        return argv
    target = Path(resume[-1].split("=", 1)[1]).expanduser()
    if not target.exists():
        raise BprunError(
            f"trainer.resume={target}: no such file or folder; give a run folder or a .pt file"
        )
    run = _run_folder_of(target)
    saved = run / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise BprunError(
            f"trainer.resume={target}: {saved} is missing, so the run's config is unknown; "
            "resume from a run folder written by bprun"
        )
    skip = ("trainer.resume=", "hydra.run.dir=")
    previous = [str(o) for o in OmegaConf.load(saved) if not str(o).startswith(skip)]
    # One override per key, the latest winning: Hydra refuses a group chosen twice.
    merged = {_key(o): o for o in [*previous, *argv]}
    return [*merged.values(), f"hydra.run.dir={run}"]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@hydra.main(version_base="1.3", config_path="pkg://bprun.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from bprun.run import run  # torch loads only once the config is valid

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        cfg.trainer.progress = False  # a sweep prints one line per job, not interleaved bars
    try:
        return run(cfg, Path(hc.runtime.output_dir))
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
    try:
        sys.argv[1:] = resume_overrides(sys.argv[1:])
    except BprunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    hydra_main()


if __name__ == "__main__":
    main()
