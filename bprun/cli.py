"""The `bprun` command: the one module that knows Hydra's entry point.

Before Hydra composes, `trainer.resume=<run>` is turned into that run's own
overrides (saved in its checkpoint) plus `hydra.run.dir=<run>`, so a resumed
run continues in its folder with its config, and later overrides on the line
apply on top; `task=eval ckpt=<run>` runs in that run's folder. The command line
is checked first (`bprun.checks`): a mistake is one line and leaves no run folder.
Stop signals are handled from the first line on: outside the training loop
(which saves before it stops) they end the command with a message and 128 + N.
"""

from __future__ import annotations

from bprun.errors import SignalExit, fast_exit, stop_on_signals

stop_on_signals()  # a stop signal at any moment of start-up ends with a message and 128 + N

import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from bprun.checks import check_command_line  # noqa: E402
from bprun.config import register_configs  # noqa: E402
from bprun.errors import BprunError  # noqa: E402
from bprun.launch import started_as_rank, under_torchrun  # noqa: E402
from bprun.overrides import key_of, merge  # noqa: E402

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
    saved = (ckpt_io.load_checkpoint(path, weights=False).get("extra") or {}).get("overrides")
    if saved is None:
        raise BprunError(f"trainer.resume={target}: {path} records no command line to resume with")
    run = _run_folder_of(path)
    line = merge([o for o in saved if not o.startswith("hydra.")], argv)
    return [*line, f"hydra.run.dir={run}", "hydra.output_subdir=null"]


# Tasks that work on a saved run and write beside its checkpoint, in its folder.
IN_RUN_FOLDER = ("eval", "generate", "recommend", "export")


def eval_overrides(argv: list[str]) -> list[str]:
    """`task=eval ckpt=X` (and generate, recommend, export): the run folder of X is the job's folder
    (eval.json, samples.txt, recommendations.csv, model.pt go beside the checkpoint); no new run folder,
    and Hydra leaves the run's `.hydra/` as it is."""
    task = next((t for t in IN_RUN_FOLDER if f"task={t}" in argv), None)
    if task is None or "-m" in argv or "--multirun" in argv:
        return argv
    ckpt = [a.split("=", 1)[1] for a in argv if key_of(a) == "ckpt"]
    if not ckpt or not ckpt[-1]:
        raise BprunError(f"task={task} needs ckpt=<run folder or .pt file>")
    from bprun.engine import checkpoint as ckpt_io

    path = ckpt_io.resolve_checkpoint(ckpt[-1], "ckpt")
    return [*argv, f"hydra.run.dir={_run_folder_of(path)}", "hydra.output_subdir=null"]


def predict_overrides(argv: list[str]) -> list[str]:
    """`task=predict ckpt=X dataset.path=F`: the file is a series file (dataset=series), unless
    the command line names another dataset."""
    if "task=predict" not in argv or any(key_of(a) == "dataset" for a in argv):
        return argv
    return ["dataset=series", *argv]


def _exit_code(e: KeyboardInterrupt) -> int:
    return e.exit_code if isinstance(e, SignalExit) else 130


def _interrupt_text(e: KeyboardInterrupt) -> str:
    """Ctrl-C aborts; SIGTERM and SIGUSR1 say what stopped the command."""
    stopped = isinstance(e, SignalExit) and e.signum != signal.SIGINT
    return f"error: {e}" if stopped else "aborted"


def discard_unused(run_dir: Path) -> None:
    """Remove a run folder that holds nothing but Hydra's record, the log and event files
    without a result: what a command rejected before training leaves behind."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.name not in (".hydra", "bprun.log") and not entry.name.startswith("events."):
            return
    shutil.rmtree(run_dir, ignore_errors=True)
    with contextlib.suppress(OSError):
        run_dir.parent.rmdir()  # the date folder, when this run was its only one


@hydra.main(version_base="1.3", config_path="pkg://bprun.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    own_folder = not multirun and cfg.task not in IN_RUN_FOLDER and not cfg.trainer.get("resume")
    if multirun:
        cfg.trainer.progress = False  # a sweep prints one line per job, not interleaved bars
    try:
        if started_as_rank():  # rank 0 of `torchrun -m bprun` or of SLURM tasks: share the config
            from bprun.launch import lead

            return lead(cfg, run_dir, list(hc.overrides.task))
        if cfg.trainer.devices > 1:  # ranks of their own, which load the config frozen here
            from bprun.launch import launch

            return launch(cfg, run_dir, list(hc.overrides.task))
        from bprun.tasks import run_task  # torch loads only once the config is valid

        return run_task(cfg, run_dir, list(hc.overrides.task))
    except BprunError as e:
        log.error(f"error: {e}")
        if multirun:
            raise  # the sweep records the failed job and goes on
        if own_folder:
            discard_unused(run_dir)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        log.error(_interrupt_text(e))
        if multirun and isinstance(e, SignalExit):
            raise
        if own_folder:
            discard_unused(run_dir)
        sys.exit(_exit_code(e))


def main() -> None:
    stop_on_signals(raising=True)
    try:
        _main(sys.argv[1:])
    except KeyboardInterrupt as e:
        print(_interrupt_text(e), file=sys.stderr)
        sys.exit(_exit_code(e))
    finally:
        fast_exit()


def _tell_hydra_the_mode(mode) -> None:
    """Hydra composes the whole config once more before a run only to read `hydra.mode`
    (`Hydra.get_mode`, about 0.4 s, a tenth of the start-up). The command-line check has just
    composed the same config from the same overrides, so its answer stands in for that."""
    from hydra._internal.hydra import Hydra

    Hydra.get_mode = lambda self, *args, **kwargs: mode


def _main(argv: list[str]) -> None:
    # As with `python -m`, modules in the working directory can be `_target_`s.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if "--help" in argv or "-h" in argv:
        from bprun.help import render

        print(render(argv))
        return
    # Hydra's parser wants its flags before the overrides; accept them anywhere.
    flags = [a for a in argv if a in ("-m", "--multirun")]
    argv = flags + [a for a in argv if a not in flags]
    # No experiment is in the defaults list: `experiment=X` means `+experiment=X`.
    argv = [f"+{a}" if a.startswith("experiment=") else a for a in argv]
    argv = predict_overrides(argv)
    modes = sorted({a for a in argv if a in ("--cfg", "-c", "--info", "-i")} | set(flags[:1]))
    if len(modes) > 1:
        print(f"error: {' and '.join(modes)} cannot go together: give one of them", file=sys.stderr)
        sys.exit(1)
    try:
        if not any(a.startswith("--") and a != "--multirun" for a in argv):
            multirun = bool(flags) or "hydra.mode=MULTIRUN" in argv
            mode = check_command_line(argv, multirun=multirun)  # Hydra's own flags pass through
            _tell_hydra_the_mode(mode)
        sys.argv[1:] = eval_overrides(resume_overrides(argv))
    except BprunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    if under_torchrun():
        from bprun.launch import join

        join()  # ranks other than 0 run the frozen config there and exit
    hydra_main()


if __name__ == "__main__":
    main()
