"""Config nodes -> objects. Each builder takes plain config values, never Hydra internals.

Keys that bprun itself interprets (a dataset's batch size, a scheduler's
interval, ...) are taken out of a node before the rest goes to
`hydra.utils.instantiate`, so `_target_` classes only see their own arguments.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bprun.data import Dataset, InMemoryLoader, split_validation
from bprun.data.augment import make_transforms, parse_augment
from bprun.data.choice import (
    LoaderOptions,
    choose_path,
    source_extras,
    source_params,
    worker_augment,
)
from bprun.data.sampler import SeededSampler
from bprun.data.stream import StreamLoader, TensorRows
from bprun.engine.checkpoint import load_checkpoint, resolve_checkpoint
from bprun.errors import BprunError
from bprun.models import init_weights
from bprun.models.checkpointing import enable_activation_checkpointing
from bprun.models.weights import KeyReport, load_matching, read_state_dict
from bprun.optim import DEFAULT_IMPL, choose_impl, impl_kwargs, param_groups

Loader = InMemoryLoader | StreamLoader

DATA_KEYS = {
    "batch_size": 100,
    "eval_batch_size": 1000,
    "val_fraction": 0.1,
    "val_seed": 0,
    "augment": None,
    # How batches reach the model (see bprun/data/choice.py): auto | memory | stream
    "loader": "auto",
    "memory_budget": "8GiB",
    "num_workers": 2,
    "pin_memory": None,  # null: when training on CUDA
    "persistent_workers": True,
    "prefetch_factor": 2,
}


def _split(node: DictConfig | dict | None, defaults: dict) -> tuple[dict, dict]:
    """(arguments for instantiate, bprun's own settings) from one config node."""
    if node is None:
        return {}, dict(defaults)
    args = (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )
    own = {k: args.pop(k, v) for k, v in defaults.items()}
    return args, own


def _instantiate(args: dict, group: str, **kwargs):
    if not args.get("_target_"):
        raise BprunError(f"{group} has no _target_: pick an option with {group}=<name>")
    # Plain lists and dicts, never ListConfig: they end up in optimizer and scheduler
    # state, which must load with torch.load(weights_only=True).
    args.setdefault("_convert_", "all")
    _check_lists(args, group)
    try:
        return instantiate(args, **kwargs)
    except Exception as e:  # bad class path or bad arguments: name the group and the cause
        cause = e.__cause__ or e
        if isinstance(cause, BprunError):  # the source's own message already says what to do
            raise cause from None
        raise BprunError(f"cannot build {group} ({args['_target_']}): {cause}") from None


def _check_lists(args: dict, group: str) -> None:
    """A scalar given where the target takes a list (`model.hidden=128`): say how to write it."""
    import inspect

    from hydra.utils import get_object

    try:
        target = get_object(args["_target_"])
        params = inspect.signature(target).parameters
    except Exception:  # unresolvable targets fail in instantiate with their own message
        return
    for key, value in args.items():
        p = params.get(key)
        if p is None or isinstance(value, (list, tuple, dict)) or value is None:
            continue
        annotation = p.annotation if isinstance(p.annotation, str) else str(p.annotation)
        outer = re.sub(r"\[[^\[\]]*\]", "", re.sub(r"\[[^\[\]]*\]", "", annotation))
        takes_scalar = re.search(r"\b(int|float|str|bool|Tensor)\b", outer)  # list[float] | float
        if outer.startswith(("list", "tuple", "Sequence", "typing.List", "typing.Sequence")) and (
            not takes_scalar
        ):
            raise BprunError(
                f"{group}.{key} takes a list, got {value!r}: write {group}.{key}=[{value}]"
            )


@dataclass
class Data:
    dataset: Dataset
    train: Loader
    val: Loader | None
    test: Loader
    path: str = "memory"  # memory | stream: what dataset.loader chose
    augment: dict | None = None  # the checked dataset.augment node (parse_augment)


def build_data(
    node: DictConfig,
    device: torch.device,
    seed: int,
    limit_train: float | None = None,
    limit_val: float | None = None,
    overfit: float | None = None,
    fast_dev_run: bool = False,
    state: dict | None = None,
) -> Data:
    """Loaders for the dataset node: over tensors on `device` (inputs in their stored dtype, uint8
    for images, made float by the loaders' transforms), or streaming through DataLoader workers
    when `dataset.loader` says so. `state`: what the source fitted, from a checkpoint."""
    args, own = _split(node, DATA_KEYS)
    for key in ("batch_size", "eval_batch_size"):
        if not isinstance(own[key], int) or own[key] < 1:
            raise BprunError(f"dataset.{key} must be a whole number of at least 1, got {own[key]}")
    if not 0 <= own["val_fraction"] < 1:
        raise BprunError(f"dataset.val_fraction must be in [0, 1), got {own['val_fraction']}")
    args.pop("defaults", None)  # a dataset file read without Hydra: its loading keys default
    dataset: Dataset = _instantiate(args, "dataset", **source_extras(args, own, state))
    if not isinstance(dataset, Dataset):
        raise BprunError(
            f"dataset={args['_target_']} gives {type(dataset).__name__}, not a dataset of "
            "examples: "
            + (
                "it is a distribution of tasks, for task=meta (e.g. bprun experiment=maml_sine)"
                if callable(getattr(dataset, "sample", None))
                else "its _target_ must return a bprun.data.Dataset"
            )
        )
    if dataset.x_val is not None or "val_fraction" in source_params(args):
        x_tr, y_tr = dataset.x_train, dataset.y_train  # the source carved validation itself
        x_val, y_val = dataset.x_val, dataset.y_val
        if x_val is None:
            x_val, y_val = x_tr[torch.arange(0)], y_tr[:0]
    else:
        try:
            x_tr, y_tr, x_val, y_val = split_validation(
                dataset.x_train,
                dataset.y_train,
                own["val_fraction"],
                own["val_seed"],
                dataset.split_gap,
            )
        except ValueError as e:
            raise BprunError(str(e)) from None
    if len(x_tr) == 0:
        raise BprunError(
            f"dataset.val_fraction={own['val_fraction']} leaves no training examples: lower it"
        )
    opts = LoaderOptions.from_settings(own, device)
    path = choose_path(opts, [x_tr, x_val, dataset.x_test])
    lazy = not isinstance(x_tr, torch.Tensor)
    if path == "memory" and lazy:  # decode once, in the workers, then keep as tensors
        x_tr, x_val, x_test = (
            part.load(opts.num_workers) for part in (x_tr, x_val, dataset.x_test)
        )
    else:
        x_test = dataset.x_test
    augment_in_workers = path == "stream" and lazy
    train_tf, eval_tf = make_transforms(
        x_tr, dataset.mean, dataset.std, own["augment"], device, not augment_in_workers
    )
    augment_settings = parse_augment(own["augment"], x_tr)
    augment = worker_augment(augment_settings) if augment_in_workers else None

    def loader(x, y, batch_size, shuffle, transform, max_batches, training=False):
        if path == "memory":
            return InMemoryLoader(
                x.to(device), y.to(device), batch_size, shuffle, seed, transform, max_batches
            )
        sampler = SeededSampler(len(x), batch_size, shuffle, seed, max_batches=max_batches)
        source = x if lazy else TensorRows(x, y)
        if training and augment is not None:  # the workers crop and flip training batches only
            source = copy.copy(source)
            source.augment, source.seed = augment, seed
        return StreamLoader(source, sampler, device, transform, **opts.dataloader_kwargs())

    bs, ebs = own["batch_size"], own["eval_batch_size"]
    n_train = -(-len(x_tr) // bs)
    few = 2 if fast_dev_run else None
    if overfit is not None:  # train and validate on the same first batches, in order
        k = _count(overfit, n_train)
        train = loader(x_tr, y_tr, bs, False, train_tf, k, training=True)
        val = loader(x_tr, y_tr, bs, False, eval_tf, k)
    else:
        limit = few or _count(limit_train, n_train)
        train = loader(x_tr, y_tr, bs, True, train_tf, limit, training=True)
        val = None
        if len(x_val):
            n_val = -(-len(x_val) // ebs)
            val = loader(x_val, y_val, ebs, False, eval_tf, few or _count(limit_val, n_val))
    test = loader(x_test, dataset.y_test, ebs, False, eval_tf, few)
    return Data(dataset, train, val, test, path, augment_settings)


def _count(limit: float | None, total: int) -> int | None:
    """Lightning's convention: a float up to 1.0 is a fraction of the batches, above it a count."""
    if limit is None:
        return None
    return max(1, math.ceil(limit * total)) if limit <= 1.0 else int(limit)


def build_tasks(node: DictConfig):
    """The distribution of tasks named by the dataset node, for `task=meta`: a class with a
    `sample(n_tasks, shots, query, generator)` method (see `bprun.meta.sine.SineTasks`)."""
    from hydra.utils import get_object

    args, _ = _split(node, {})
    try:
        target = get_object(args.get("_target_") or "")
    except Exception:  # a bad target: instantiate names it
        target = None
    if target is not None and not callable(getattr(target, "sample", None)):
        raise BprunError(
            f"task=meta learns from a distribution of tasks, and dataset={args['_target_']} "
            "is one dataset: use dataset=sine_tasks (e.g. bprun experiment=maml_sine)"
        )
    return _instantiate(args, "dataset")


def problem_hint(data_node: DictConfig, problem_node: DictConfig | None) -> DictConfig:
    """The dataset node, told the problem the command line names: a source that reads its
    targets either way (`dataset.task` of table and arrays) reads them as that problem needs,
    unless the dataset node says otherwise."""
    kind = (problem_node or {}).get("kind", "auto")
    if kind not in ("classification", "regression") or data_node.get("task", "absent") is not None:
        return data_node
    node = copy.deepcopy(data_node)
    node.task = kind
    return node


def build_problem(node: DictConfig | None, dataset: Dataset, metrics=None):
    """The problem of the run: `problem=<kind>` (a `_target_`), or with `problem=auto` the kind
    the data source names (`Dataset.problem`). `metrics`: the subset to compute (None: the
    problem's default set). The problem checks the data's targets once, here."""
    from bprun.problems import KINDS, problem_class

    args, own = _split(node, {"kind": "auto"})
    target = args.pop("_target_", None)
    if target is not None:  # a problem of the user's own
        from hydra.utils import get_object

        cls = get_object(target)
        kind = getattr(cls, "kind", None) or target
    else:
        kind = dataset.problem if own["kind"] == "auto" else own["kind"]
        if kind not in KINDS:
            raise BprunError(
                f"problem={kind} is not a problem bprun knows: choose one of {', '.join(KINDS)}"
            )
        cls = problem_class(kind)
    if dataset.problem != kind and (dataset.problem, kind) not in CONVERTIBLE:
        raise BprunError(
            f"problem={kind} cannot score this data, whose source poses a {dataset.problem} "
            f"problem: use problem=auto or problem={dataset.problem}"
        )
    settings = {k: v for k, v in args.items() if v is not None}
    takes = _parameters(cls.__init__) - {"self", "num_classes", "metrics", "classes"}
    for key, value in list(settings.items()):
        if key in takes:
            continue
        if value == SHARED_PROBLEM_KEYS.get(key):  # a shipped default that this kind ignores
            settings.pop(key)
            continue
        raise BprunError(
            f"problem.{key}={value} does not apply to a {kind} problem: drop it ({kind} takes "
            f"{', '.join(f'problem.{k}' for k in sorted(takes)) or 'no settings'})"
        )
    try:
        problem = cls.from_data(dataset, metrics=metrics, **settings)
    except BprunError:
        raise
    except (TypeError, ValueError) as e:
        raise BprunError(f"problem={kind} could not be built: {e}") from None
    problem.check_data(dataset)
    return problem


# (what the source poses, the problem asked for) pairs whose targets the problem checks itself:
# 0/1 columns read as numbers are labels of a multilabel problem, and multilabel on class
# labels is refused by Multilabel.check_data with the fix.
CONVERTIBLE = {("regression", "multilabel"), ("classification", "multilabel")}


def _parameters(fn) -> set[str]:
    import inspect

    return set(inspect.signature(fn).parameters)


# Keys that `problem=auto` carries for whichever kind the data picks, with their defaults.
SHARED_PROBLEM_KEYS = {"threshold": 0.5}


def build_model(node: DictConfig, dataset: Dataset, problem=None) -> nn.Module:
    """The model for `dataset` and `problem` (whose `output_size` is the model's output width),
    then `model.init` or `model.init_from` (another run's weights).

    Pretrained builders (`bprun.models.pretrained`) leave `weights_reports` (what their
    weights file filled in) and `preprocess_spec` (the weights' input pipeline) on the model.
    """
    args, own = _split(
        node, {"init": "default", "init_from": None, "activation_checkpointing": False}
    )
    outputs = problem.output_size if problem is not None else dataset.num_classes
    model = _instantiate(args, "model", input_shape=dataset.input_shape, num_classes=outputs)
    reports = list(getattr(model, "weights_reports", []))
    if reports and own["init"] != "default":
        raise BprunError(
            f"model.init={own['init']} would overwrite the weights of model.weights: "
            "keep model.init=default"
        )
    try:
        model = init_weights(model, own["init"])
    except ValueError as e:
        raise BprunError(str(e)) from None
    if own["init_from"]:  # before any wrapping, so the names are the architecture's own
        reports.append(init_from(model, own["init_from"]))
    if own["activation_checkpointing"]:
        enable_activation_checkpointing(model)
    for report in reports:
        report.log()
    model.weights_reports = reports
    spec = getattr(model, "preprocess_spec", None)
    if spec is not None:
        spec.attach(model, dataset)
    return model


def build_loss(node: DictConfig, problem) -> nn.Module:
    """The loss node; `loss=auto` is the problem's own loss. A loss made for other targets
    (a classification loss on a regression problem, say) is an error naming the ones that fit."""
    args, _ = _split(node, {})
    if args.get("_target_") in ("bprun.losses.auto", "bprun.losses.for_task"):
        args["_target_"] = "bprun.losses.auto"
        loss = _instantiate(args, "loss", problem=problem)
    else:
        loss = _instantiate(args, "loss")
    problem.check_loss(loss)
    return loss


# Keys of an optim node that bprun interprets itself, with their defaults.
OPTIM_KEYS = {"no_decay_norm_bias": False, "lr_mult": None, "impl": DEFAULT_IMPL}


def build_optimizer(node: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The `_partial_` optimizer node applied to the trainable parameters.

    `no_decay_norm_bias: true` (bprun's own key) splits them into two groups:
    weight_decay from the node for weights, 0 for biases and normalisation
    parameters; `lr_mult: {pattern: factor}` gives the parameters a pattern
    names a learning rate of factor x lr (see `bprun.optim.param_groups`).

    `impl` (bprun's own key: auto, fused, foreach, single) picks torch's kernel; auto is the
    fastest the optimizer has for the parameters' device (see `bprun.optim.choose_impl`).
    The choice is in the optimizer's param_groups (`bprun.optim.impl_of` reads it back).
    """
    args, own = _split(node, OPTIM_KEYS)
    for key in ("fused", "foreach"):
        if args.get(key) is not None:
            raise BprunError(
                f"optim.{key} is set by bprun: use optim.impl=auto|fused|foreach|single instead"
            )
        args.pop(key, None)
    make = _instantiate(args, "optim")
    if _is_lbfgs(make):
        for key, value in (("no_decay_norm_bias", "false"), ("lr_mult", "{}")):
            if own[key]:
                raise BprunError(
                    f"optim.{key} needs parameter groups, which torch.optim.LBFGS "
                    f"does not support: set optim.{key}={value}"
                )
    params = param_groups(
        model, args.get("lr"), args.get("weight_decay"), own["no_decay_norm_bias"], own["lr_mult"]
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    impl = choose_impl(make, trainable, own["impl"])
    try:
        return make(params=params, **impl_kwargs(make, impl))
    except (TypeError, ValueError) as e:
        raise BprunError(f"cannot build optim ({args['_target_']}): {e}") from None


def _is_lbfgs(make) -> bool:
    func = getattr(make, "func", make)
    return isinstance(func, type) and issubclass(func, torch.optim.LBFGS)


# Scheduler arguments that mean "the length of the run" and are filled in when null.
LENGTH_KEYS = ("T_max", "total_steps", "total_iters", "total_updates")


def build_scheduler(
    node: DictConfig | None,
    optimizer,
    updates_per_epoch: int,
    epochs: int,
    max_updates: int | None = None,
):
    """(scheduler or None, interval). Lengths left null are the run's length in scheduler steps."""
    args, own = _split(node, {"interval": "epoch"})
    if not args.get("_target_"):
        return None, own["interval"]
    if own["interval"] not in ("step", "epoch"):
        raise BprunError(f"sched.interval must be step or epoch, got '{own['interval']}'")
    if args["_target_"].endswith("ReduceLROnPlateau") and own["interval"] != "epoch":
        raise BprunError(
            "sched=plateau reads the validation metric, which exists once per epoch: "
            "set sched.interval=epoch"
        )
    steps = epochs if own["interval"] == "epoch" else updates_per_epoch * epochs
    if own["interval"] == "step" and max_updates is not None:
        steps = min(steps, max_updates)
    for key in LENGTH_KEYS:
        if key in args and args[key] is None:
            args[key] = max(1, steps)
    _check_schedule(args)
    make = _instantiate(args, "sched")
    try:
        return make(optimizer=optimizer), own["interval"]
    except (TypeError, ValueError) as e:
        raise BprunError(f"cannot build sched ({args['_target_']}): {e}") from None


def _check_schedule(args: dict) -> None:
    """Values torch's schedulers take without a word and then follow into a nonsense schedule
    (a negative length, a factor of 0 or below, which zero or flip the learning rate)."""
    for key in (*LENGTH_KEYS, "step_size"):
        value = args.get(key)
        if key in args and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            blank = " (or null: the run's length)" if key in LENGTH_KEYS else ""
            raise BprunError(
                f"sched.{key}={value} is a number of scheduler steps: give a whole number of at "
                f"least 1{blank}"
            )
    gamma = args.get("gamma")
    if "gamma" in args and (
        isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma
    ):
        raise BprunError(
            f"sched.gamma={gamma} multiplies the learning rate: give a factor above 0 "
            "(below 1 to decay it)"
        )


def init_from(model: nn.Module, source: str) -> KeyReport:
    """`model.init_from=<run folder or file>`: another run's weights, nothing else of its state.

    A run folder gives its best checkpoint (by the run's checkpoint monitor),
    else its last one. The optimizer, schedule and counters start afresh.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = resolve_checkpoint(path, "model.init_from")
        entries = (load_checkpoint(path).get("topk") or {}).get("entries") or []
        if entries and (path.parent / entries[0][1]).is_file():
            path = path.parent / entries[0][1]
    elif not path.exists():
        raise BprunError(
            f"model.init_from={path}: no such file or folder; give a bprun run folder or a .pt file"
        )
    state = read_state_dict(path, "model.init_from")
    return load_matching(model, state, str(path), "model.init_from")
