"""The command line checked before anything runs: one line per mistake, with its fix.

`check_command_line` composes the config once, as Hydra will, and turns
composition errors into a message that names the key or option and the
closest valid ones ("did you mean"). It also refuses `+key=value` on the
typed nodes (trainer, gradcheck, lr_find, meta, attack), where Hydra would add a key that
nothing reads. No torch here: this runs before the task is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from omegaconf import DictConfig, OmegaConf, open_dict

from bprun.errors import BprunError
from bprun.overrides import key_of

REQUIRED = ("dataset", "model", "loss", "optim", "sched", "trainer")

TYPED = {  # node -> its schema, imported lazily by name
    "trainer": ("bprun.engine.settings", "TrainerSettings"),
    "gradcheck": ("bprun.diagnostics.settings", "GradcheckSettings"),
    "lr_find": ("bprun.diagnostics.settings", "LrFindSettings"),
    "meta": ("bprun.meta.settings", "MetaSettings"),
    "attack": ("bprun.engine.settings", "Attack"),
}


def closest(word: str, choices, n: int = 3) -> list[str]:
    return difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    near = closest(word, choices)
    return f"did you mean {' or '.join(prefix + c for c in near)}?" if near else ""


def single_run(argv: list[str]) -> list[str]:
    """A sweep's command line reduced to its first job (the first value of each list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = []
    for text, o in zip(argv, OverridesParser.create().parse_overrides(argv), strict=True):
        if not o.is_sweep_override():
            lines.append(text)
        elif o.is_discrete_sweep():
            first = next(iter(o.sweep_string_iterator()))
            lines.append(f"{text.split('=', 1)[0]}={first}")
        # intervals belong to searches; the search checks them itself
    return lines


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module("bprun.conf", version_base="1.3"):
        return hydra_compose("config", overrides, return_hydra_config=return_hydra_config)


def check_command_line(argv: list[str], multirun: bool = False):
    """Raise BprunError naming the first override that cannot work, and its fix. Returns the
    composed `hydra.mode` (None unless a config or the command line sets it)."""
    from hydra.errors import (
        ConfigCompositionException,
        MissingConfigException,
        OverrideParseException,
    )

    overrides = [a for a in argv if not a.startswith("-")]
    try:
        if multirun:
            overrides = single_run(overrides)
        cfg = compose(overrides, return_hydra_config=True)
    except MissingConfigException as e:
        raise BprunError(_missing_option(str(e), overrides)) from None
    except ConfigCompositionException as e:
        if "Could not load '" in str(e):  # an option of a list of a group (tracker=[a,b])
            raise BprunError(_missing_option(str(e), overrides)) from None
        raise BprunError(_bad_override(e, overrides)) from None
    except OverrideParseException as e:
        raise BprunError(f"cannot read the command line: {_first_line(e)}") from None
    mode = cfg.hydra.mode
    with open_dict(cfg):
        del cfg["hydra"]  # as Hydra hands the config to the run: without its own node
    for node in REQUIRED:
        if node not in cfg:
            raise BprunError(
                f"~{node} removes a part every run needs: drop it, or pick another option "
                f"with {node}=<name> (bprun --help lists them)"
            )
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that names nothing, and the like
        where = getattr(e, "full_key", None)
        raise BprunError(f"{where or 'the config'}: {_first_line(e)}") from None
    check_typed_keys(cfg)
    check_metric_names(cfg)
    from bprun.tracking.trackers import check as check_trackers

    check_trackers(cfg)
    check_run_folder(cfg, overrides, multirun)
    if cfg.get("task") == "meta":
        OmegaConf.to_object(cfg.meta)  # its values, checked by MetaSettings before torch loads
    attack = [o for o in overrides if key_of(o).split(".")[0] == "attack"]
    if attack and cfg.task != "eval":
        raise BprunError(
            f"{attack[0]} attacks a trained model under task=eval ckpt=<run>; to train on "
            "adversarial examples set trainer.adversarial.method=fgsm|pgd (and its eps, steps)"
        )
    from bprun.tasks import TASKS

    if cfg.task not in TASKS:
        hint = did_you_mean(str(cfg.task), TASKS, "task=")
        raise BprunError(
            f"task={cfg.task} is not a task: "
            + (hint + " " if hint else "")
            + f"(choose one of {', '.join(TASKS)})"
        )
    return mode


def check_run_folder(cfg: DictConfig, overrides: list[str], multirun: bool = False) -> None:
    """A run (or sweep) folder that cannot be made: under a file, or in a folder this user cannot
    write to. Hydra would fail making it with a traceback."""
    if cfg.get("task") == "eval" or any(key_of(o) == "trainer.resume" for o in overrides):
        return  # these run in an existing run's folder
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.split("=", 1)[1] for o in overrides if key_of(o) == key and "=" in o]
    if given and "${" not in given[-1]:
        _can_make(given[-1], f"{key}={given[-1]}", key)
    elif not given:
        out = str(cfg.paths.output_dir)
        _can_make(out, f"paths.output_dir={out}", "paths.output_dir")


def _can_make(folder: str, what: str, key: str) -> None:
    import contextlib
    from pathlib import Path

    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = f"choose another {key}"
    if existing.exists() and not existing.is_dir():
        raise BprunError(
            f"{what}: cannot make the run folder {path}: {existing} is a file, not a folder: {fix}"
        )
    if path.exists():
        return
    try:  # the one sure test (root passes os.access, /proc refuses anyway): make it, remove it
        path.mkdir(parents=True)
    except OSError as e:
        raise BprunError(
            f"{what}: cannot make the run folder {path}: {e.strerror or e} in {existing}: {fix}"
        ) from None
    made = path
    while made != existing:
        with contextlib.suppress(OSError):
            made.rmdir()
        made = made.parent


def check_metric_names(cfg: DictConfig) -> None:
    """Monitored metrics and `metrics=[...]` that no problem the run can pose reports, before
    any data loads (the trainer checks the exact names once the data has picked the problem)."""
    from bprun.problems import is_known_metric, metric_vocabulary

    problem = cfg.get("problem") or {}
    kind = problem.get("kind", "auto") if not problem.get("_target_") else None
    if kind is None:
        return  # a problem of the user's own: its names are known once it is built
    known = metric_vocabulary(kind)

    def lacks(metric) -> str:
        if kind == "auto":
            return f"no problem has a metric '{metric}'"
        return f"the {kind} problem has no metric '{metric}'"

    chosen = cfg.get("metrics")
    if chosen is not None:
        if isinstance(chosen, str) or not OmegaConf.is_list(chosen):
            raise BprunError(
                f"metrics takes a list of names, got {chosen!r}: write metrics=[{chosen}]"
            )
        for name in chosen:
            if not is_known_metric(str(name), known):
                hint = did_you_mean_metric(str(name), known)
                raise BprunError(
                    f"metrics=[...]: {lacks(name)}: "
                    + (hint + " " if hint else "")
                    + f"(choose from {', '.join(n for n in known if n != 'loss')})"
                )
    trainer = cfg.get("trainer") or {}
    watched = [
        ("trainer.monitor", trainer.get("monitor")),
        ("trainer.early_stopping.monitor", (trainer.get("early_stopping") or {}).get("monitor")),
        ("trainer.checkpoint.monitor", (trainer.get("checkpoint") or {}).get("monitor")),
    ]
    for key, name in watched:
        if not name or "/" not in str(name):
            continue
        prefix, metric = str(name).split("/", 1)
        if not prefix.startswith("val") or is_known_metric(metric, known):
            continue  # train/loss and the like: the trainer checks those
        hint = did_you_mean_metric(metric, known, f"{key}={prefix}/")
        raise BprunError(
            f"{key}={name}: {lacks(metric)}: "
            + (hint + " " if hint else "")
            + f"(choose from {', '.join(known)})"
        )


def did_you_mean_metric(word: str, known, prefix: str = "") -> str:
    """As `did_you_mean`, with the short name of a long one first (`accuracy` -> `acc`)."""
    short = sorted((k for k in known if len(k) > 2 and word.startswith(k)), key=len)
    near = short[-1:] or closest(word, known)  # the longest short name, or the closest ones
    return f"did you mean {' or '.join(prefix + c for c in near)}?" if near else ""


def check_typed_keys(cfg: DictConfig) -> None:
    """Keys added with `+` under a typed node: nothing would read them."""
    import importlib

    for node, (module, name) in TYPED.items():
        if node not in cfg:
            continue
        schema = getattr(importlib.import_module(module), name)
        _unknown_keys(OmegaConf.to_container(cfg[node]), schema, node)


def _unknown_keys(values: dict, schema, path: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in values.items():
        if key not in fields:
            hint = (
                did_you_mean(key, fields, f"{path}.") or f"bprun --cfg job lists {path}'s settings"
            )
            raise BprunError(
                f"{path}.{key} is not a setting of {path} (a + adds a key nothing reads): {hint}"
            )
        sub = (
            fields[key].default_factory
            if fields[key].default_factory is not dataclasses.MISSING
            else None
        )
        if isinstance(value, dict) and sub is not None and dataclasses.is_dataclass(sub):
            _unknown_keys(value, sub, f"{path}.{key}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _missing_option(message: str, overrides: list[str]) -> str:
    """`model=cnnn` -> the closest options of the group."""
    found = re.search(r"Could not (?:find|load) '([^']+)'", message)
    if not found:
        return _first_line(Exception(message))
    group, _, option = found.group(1).rpartition("/")
    from bprun.help import config_folders, groups

    options = groups(config_folders(overrides)).get(group, {})
    if not options:
        return f"{group} is not a config group: bprun --help lists them"
    hint = did_you_mean(option, options, f"{group}=")
    return (
        f"{group}={option} is not an option of {group}: "
        + (hint + " " if hint else "")
        + f"(choose one of {', '.join(options)})"
    )


def _bad_override(e: BaseException, overrides: list[str]) -> str:
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    text = _first_line(cause) if cause is not None else _first_line(e)
    if key and "not in" in text:
        parent, _, leaf = key.rpartition(".")
        # without the override (and any other under the same missing key), which cannot compose
        base = compose(
            [o for o in overrides if key_of(o) != key and not key_of(o).startswith(key + ".")]
        )
        node = OmegaConf.select(base, parent) if parent else base
        keys = list(node.keys()) if isinstance(node, DictConfig) else []
        if leaf in keys:  # the key exists: the override itself is what cannot work
            return f"{key}: {text}"
        where = parent or "the config"
        rest = next(
            (key_of(o)[len(key) :] for o in overrides if key_of(o).startswith(key + ".")), ""
        )
        near = closest(leaf, keys)
        if rest:  # a dotted typo: only the candidates under which the rest of the key exists
            near = [c for c in near if OmegaConf.select(base, f"{parent}.{c}{rest}".lstrip("."))
                    is not None] or near  # fmt: skip
        hint = (
            f"did you mean {' or '.join((f'{parent}.' if parent else '') + c + rest for c in near)}?"
            if near
            else ""
        )
        given = next(
            (o for o in overrides if key_of(o) == key or key_of(o).startswith(key + ".")), key
        )
        typed = parent.split(".")[0] in TYPED
        if not hint and not typed:  # a new key that the user's own code reads takes a +
            keys_shown = ", ".join(map(str, keys[:12]))
            hint = f"bprun --cfg job lists every setting ({keys_shown}); a new key that your own code reads takes a +: +{given.lstrip('+~')}"
        return f"{key} is not a setting of {where}: " + (
            hint or f"bprun --cfg job lists every setting ({', '.join(map(str, keys[:12]))})"
        )
    if key:
        value = next((o.split("=", 1)[1] for o in overrides if key_of(o) == key), "?")
        return f"{key}={value}: {text}"
    return _first_line(e)
