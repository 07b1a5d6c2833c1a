"""`bprun --help`: the groups and their options, the tasks, the settings and examples.

Written here rather than through Hydra's help template, which lists the typed
schemas registered in the ConfigStore as if they were options and ignores
config folders added with `hydra.searchpath=` on the same command line. No
torch and no composition: the config folders are read as they are on disk.
"""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
from pathlib import Path

from bprun.tasks import TASKS

HEADER = "bprun: train neural networks by backpropagation from the command line."

USAGE = """\
Usage:
  bprun [group=option ...] [key=value ...]          one run
  bprun -m key=a,b [key=x,y ...]                    a sweep over every combination
  bprun trainer.resume=<run folder>                 continue a stopped run"""

FOOTER = """\
Settings (override any value with key=value; `bprun --cfg job` prints them all):
  trainer.*    the training loop: max_epochs, precision, grad_clip, early_stopping, checkpoint, ...
  dataset.*    batch_size, val_fraction, augment, sampler (random|balanced), loader
               (auto|memory|stream), memory_budget, num_workers and the source's own arguments
  optim.*      lr, weight_decay, ... of the chosen optimizer;  sched.* likewise
  meta.*       task=meta (MAML): iterations, tasks_per_batch, shots, inner_steps, inner_lr,
               first_order, eval_steps, ... (bprun experiment=maml_sine)
  seed         the global seed (0 is a seed like any other)
  paths.*      data_dir (datasets and their cache), output_dir (run folders)

Examples:
  bprun                                      MLP on MNIST-1D with the defaults
  bprun model=cnn optim=adamw                swap any group by name
  bprun trainer.max_epochs=5 optim.lr=3e-3   override any value
  bprun -m optim=sgd,adam optim.lr=1e-3,1e-2 sweep (multirun)
  bprun task=eval ckpt=outputs/<date>/<time> test a saved run
  bprun hydra.searchpath=[file://my_conf]    add your own options (my_conf/model/*.yaml, ...)

Runs land in outputs/<date>/<time>/; view them with `tensorboard --logdir outputs`.
Powered by Hydra (https://hydra.cc); `bprun --hydra-help` shows Hydra's own options."""

# Folders of the config tree that are not groups a user picks from.
NOT_GROUPS = ("hydra", "loading")  # loading: keys every dataset node includes


def config_folders(argv: list[str]) -> list[tuple[str, Path]]:
    """(label, folder) of bprun's own config tree and of each `hydra.searchpath` entry."""
    folders = [("bprun", Path(str(importlib.resources.files("bprun.conf"))))]
    for entry in _searchpath(argv):
        folder = _resolve(entry)
        if folder is not None:
            folders.append((entry, folder))
    return folders


def _searchpath(argv: list[str]) -> list[str]:
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") == "hydra.searchpath":
            try:
                parsed = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                parsed = [v.strip() for v in value.strip("[]").split(",")]
            return [str(v) for v in (parsed if isinstance(parsed, list) else [parsed])]
    return []


def _resolve(entry: str) -> Path | None:
    if entry.startswith("pkg://"):
        spec = importlib.util.find_spec(entry.removeprefix("pkg://"))
        locations = list(spec.submodule_search_locations or []) if spec else []
        return Path(locations[0]) if locations else None
    folder = Path(entry.removeprefix("file://")).expanduser()
    return folder if folder.is_dir() else None


def groups(folders: list[tuple[str, Path]]) -> dict[str, dict[str, str]]:
    """group -> option -> where it comes from ("bprun" or the searchpath entry)."""
    found: dict[str, dict[str, str]] = {}
    for label, root in folders:
        for yaml in sorted(root.rglob("*.yaml")):
            group = yaml.parent.relative_to(root).as_posix()
            if group == "." or group.split("/")[0] in NOT_GROUPS:
                continue
            found.setdefault(group, {}).setdefault(yaml.stem, label)
    return dict(sorted(found.items()))


def render(argv: list[str]) -> str:
    lines = [HEADER, "", USAGE, "", "Tasks (task=...; default train):"]
    width = max(map(len, TASKS))
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in TASKS.items()]
    lines += ["", "Config groups (pick one option each, e.g. model=cnn):"]
    found = groups(config_folders(argv))
    width = max(map(len, found)) + 1
    for group, options in found.items():
        shown = [name if src == "bprun" else f"{name} ({src})" for name, src in options.items()]
        lines.append(f"  {group + ':':<{width}} {', '.join(shown)}")
    lines += ["", FOOTER]
    return "\n".join(lines)
