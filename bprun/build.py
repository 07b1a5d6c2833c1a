"""Config nodes -> objects. Each builder takes plain config values, never Hydra internals.

Keys that bprun itself interprets (a dataset's batch size, a scheduler's
interval, ...) are taken out of a node before the rest goes to
`hydra.utils.instantiate`, so `_target_` classes only see their own arguments.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bprun.data import Dataset, InMemoryLoader, memo, split_validation
from bprun.data.augment import make_transforms, parse_augment
from bprun.data.choice import (
    LoaderOptions,
    choose_path,
    source_extras,
    source_params,
    worker_augment,
)
from bprun.data.sampler import BalancedSampler, SeededSampler
from bprun.data.stream import StreamLoader, TensorRows
from bprun.engine.checkpoint import load_checkpoint, resolve_checkpoint, upgraded
from bprun.engine.sharded_checkpoint import is_sharded
from bprun.errors import BprunError
from bprun.losses import class_weights
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
    # The training order: random (a seeded permutation per epoch) | balanced (classes drawn
    # equally often, with replacement; see bprun/data/sampler.py)
    "sampler": "random",
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
    train_labels: torch.Tensor | None = None  # the training split's targets (CPU), for weights


def build_data(
    node: DictConfig,
    device: torch.device,
    seed: int,
    limit_train: float | None = None,
    limit_val: float | None = None,
    overfit: float | None = None,
    fast_dev_run: bool = False,
    state: dict | None = None,
    val_batches: int | None = None,
) -> Data:
    """Loaders for the dataset node: over tensors on `device` (inputs in their stored dtype, uint8
    for images, made float by the loaders' transforms), or streaming through DataLoader workers
    when `dataset.loader` says so; for token streams (`dataset=text`), windows read from the
    memory-mapped stream (`window_data`). `state`: what the source fitted, from a checkpoint.
    `val_batches` (trainer.val_batches): validate on that many batches, the same every time."""
    args, own = _split(node, DATA_KEYS)
    for key in ("batch_size", "eval_batch_size"):
        if not isinstance(own[key], int) or own[key] < 1:
            raise BprunError(f"dataset.{key} must be a whole number of at least 1, got {own[key]}")
    if not 0 <= own["val_fraction"] < 1:
        raise BprunError(f"dataset.val_fraction must be in [0, 1), got {own['val_fraction']}")
    if own["sampler"] not in ("random", "balanced"):
        raise BprunError(f"dataset.sampler must be random or balanced, got '{own['sampler']}'")
    args.pop("defaults", None)  # a dataset file read without Hydra: its loading keys default
    extras = source_extras(args, own, state)
    dataset: Dataset = memo.dataset(args, extras, lambda: _instantiate(args, "dataset", **extras))
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
    if dataset.streams is not None:
        return window_data(
            dataset, own, device, seed, limit_train, limit_val, overfit, fast_dev_run, val_batches
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
    balanced = own["sampler"] == "balanced"
    if balanced and (y_tr.is_floating_point() or y_tr.dim() != 1):
        raise BprunError(
            "dataset.sampler=balanced draws classes equally often, but this dataset's targets "
            f"are {y_tr.dtype} of shape {tuple(y_tr.shape[1:])}, not class labels: "
            "use dataset.sampler=random"
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

    if dataset.epoch_inputs is not None and path != "memory":
        raise BprunError(
            "this dataset remakes its training inputs each epoch (sampled negatives), which "
            "the in-memory loader does: set dataset.loader=memory (or auto)"
        )

    def loader(x, y, batch_size, shuffle, transform, max_batches, training=False):
        if training and shuffle and balanced:
            sampler = BalancedSampler.for_labels(y, batch_size, seed, max_batches=max_batches)
        else:
            sampler = SeededSampler(len(x), batch_size, shuffle, seed, max_batches=max_batches)
        if path == "memory":
            remake = dataset.epoch_inputs if training else None
            return InMemoryLoader(
                x.to(device),
                y.to(device),
                batch_size,
                transform=transform,
                sampler=sampler,
                epoch_inputs=remake,
            )
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
    if val is not None and val_batches is not None:
        val = loader(x_val, y_val, ebs, False, eval_tf, few or val_batches)
    test = loader(x_test, dataset.y_test, ebs, False, eval_tf, few)
    return Data(dataset, train, val, test, path, augment_settings, y_tr)


def window_data(
    dataset: Dataset,
    own: dict,
    device: torch.device,
    seed: int,
    limit_train: float | None,
    limit_val: float | None,
    overfit: float | None,
    fast_dev_run: bool,
    val_batches: int | None,
) -> Data:
    """Loaders of token windows (`bprun.data.windows`). An epoch is as many batches as hold
    the training split's tokens once; runs are usually measured in trainer.max_updates.
    Validation reads `val_batches` batches of fixed random windows, or (null) the whole split
    in consecutive windows; the test split always the whole of it."""
    from bprun.data.windows import WindowLoader

    streams, block = dataset.streams, dataset.streams.block_size
    train_tokens, val_tokens = streams.tokens["train"], streams.tokens["val"]
    bs, ebs = own["batch_size"], own["eval_batch_size"]
    n_train = max(1, len(train_tokens) // (bs * block))
    few = 2 if fast_dev_run else None

    def windows(tokens, batch_size, mode, seed, count):
        return WindowLoader(tokens, block, batch_size, device, mode, seed, count)

    if overfit is not None:  # the same first batches to train and to validate on
        k = _count(overfit, n_train)
        train = windows(train_tokens, bs, "fixed", seed, k)
        val = windows(train_tokens, bs, "fixed", seed, k)
    else:
        train = windows(
            train_tokens, bs, "random", seed, few or _count(limit_train, n_train) or n_train
        )
        val = None
        if len(val_tokens) > block:
            if val_batches is not None:
                val = windows(val_tokens, ebs, "fixed", own["val_seed"], few or val_batches)
            else:
                n_val = -(-((len(val_tokens) - 1) // block) // ebs)
                val = windows(val_tokens, ebs, "sequential", 0, few or _count(limit_val, n_val))
    test = windows(streams.tokens["test"], ebs, "sequential", 0, few)
    return Data(dataset, train, val, test, "stream")


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
    # Problem settings that shape the data's evaluation rows (a ranking problem's candidates).
    shared = {
        k: problem_node[k]
        for k in PROBLEM_DATA_KEYS
        if k in (problem_node or {}) and k in source_params(dict(data_node)) and k not in data_node
    }
    if shared:
        data_node = copy.deepcopy(data_node)
        with open_dict(data_node):
            data_node.update(shared)
    if kind not in ("classification", "regression") or data_node.get("task", "absent") is not None:
        return data_node
    node = copy.deepcopy(data_node)
    node.task = kind
    return node


# Keys of the problem node that a data source taking them is handed: a ranking problem's
# eval_negatives decides the candidates each validation and test row holds.
PROBLEM_DATA_KEYS = ("eval_negatives",)


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
SHARED_PROBLEM_KEYS = {"threshold": 0.5, "k": 10, "eval_negatives": 99}


def build_model(node: DictConfig, dataset: Dataset, problem=None) -> nn.Module:
    """The model for `dataset` and `problem` (whose `output_size` is the model's output width),
    then `model.init` or `model.init_from` (another run's weights).

    Pretrained builders (`bprun.models.pretrained`) leave `weights_reports` (what their
    weights file filled in) and `preprocess_spec` (the weights' input pipeline) on the model.
    """
    args, own = _split(
        node,
        {
            "init": "default",
            "init_from": None,
            "activation_checkpointing": False,
            "shard_units": None,
        },
    )
    outputs = problem.output_size if problem is not None else dataset.num_classes
    check_inputs(args, dataset, problem)
    extra = {}
    if getattr(dataset, "vocab_size", None) is not None:  # token ids in, for models taking them
        params = source_params(args)
        extra = {k: getattr(dataset, k) for k in ("vocab_size", "pad_id") if k in params}
        if not extra:
            raise BprunError(
                f"model={args.get('_target_')} does not read token ids: use model=gpt with "
                "dataset=text_classification"
            )
    if problem is not None and (wanted := problem.model_arguments()):
        takes = source_params(args)  # what the problem tells models that ask (a horizon, ...)
        if problem.requires_model_arguments and not wanted.keys() <= takes:
            raise BprunError(
                f"model={args.get('_target_')} does not take {', '.join(wanted)}, which a "
                f"{problem.describe_kind()} problem's model is built with: use "
                f"{problem.models_hint()}"
            )
        extra.update({k: v for k, v in wanted.items() if k in takes and k not in args})
    shape = dataset.input_shape
    ids = getattr(problem, "id_embedding", None)  # (series, width): a global forecaster
    if ids:
        from bprun.models.forecast import SeriesEmbedding

        shape = SeriesEmbedding.inner_shape(shape, ids[1])
    model = _instantiate(args, "model", input_shape=shape, num_classes=outputs, **extra)
    if ids:
        model = SeriesEmbedding(model, *ids)
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
    if own["shard_units"]:  # trainer.strategy=fsdp: the modules sharded as units (patterns)
        model.shard_units = list(own["shard_units"])
    spec = getattr(model, "preprocess_spec", None)
    if spec is not None:
        spec.attach(model, dataset)
    return model


def check_inputs(args: dict, dataset: Dataset, problem) -> None:
    """A model that reads token ids or (user, item) ids (its class's `reads`) on data that holds
    something else: one line naming the data it takes, before it is built."""
    from hydra.utils import get_object

    try:
        reads = getattr(get_object(args.get("_target_") or ""), "reads", None)
    except Exception:  # an unresolvable target: instantiate names it
        return
    name = args.get("_target_", "").rsplit(".", 1)[-1].lower()
    inputs = getattr(dataset, "x_train", None)  # none: task=meta's tasks, generate's stand-in
    tokens = getattr(inputs, "dtype", None) in (torch.int64, torch.int32)
    if reads == "tokens" and inputs is not None and not tokens:
        raise BprunError(
            f"model={name} reads token ids, and this data holds other inputs: use it with "
            "dataset=text or dataset=text_classification"
        )
    if reads != "tokens" and getattr(problem, "kind", None) == "lm":
        raise BprunError(
            f"model={name} does not read token ids, which a language model's data holds: use "
            "model=gpt"
        )
    if reads == "interactions" and getattr(problem, "kind", None) != "ranking":
        raise BprunError(
            f"model={name} scores users and items, and this data holds no interactions: use it "
            "with dataset=interactions (or dataset=interactions_demo)"
        )


def build_loss(node: DictConfig, problem, data: Data | None = None) -> nn.Module:
    """The loss node; `loss=auto` is the problem's own loss. A loss made for other targets
    (a classification loss on a regression problem, say) is an error naming the ones that fit.

    `class_weights` (bprun's own key: balanced or a list) becomes the loss's per-class
    `weight` buffer; `balanced` counts `data`'s training-split labels (see
    `bprun.losses.class_weights`). Move the loss to the training device with `.to(device)`.
    """
    args, own = _split(node, {"class_weights": None})
    auto = args.get("_target_") in ("bprun.losses.auto", "bprun.losses.for_task")
    extra = {"problem": problem} if auto else {}
    if auto:
        args["_target_"] = "bprun.losses.auto"
    if own["class_weights"] is not None:
        if "weight" not in source_params(args):
            raise BprunError(
                f"loss.class_weights weights classes, and {args.get('_target_')} takes no "
                "per-class weight: use loss=cross_entropy, nll, bce_with_logits or focal"
            )
        if data is None:
            raise BprunError("loss.class_weights needs the training data to count its classes")
        extra["weight"] = class_weights(
            own["class_weights"], data.train_labels, data.dataset.num_classes
        ).float()
    loss = _instantiate(args, "loss", **extra)
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
    if _accepts_model(make):  # K-FAC hooks the model's layers, Muon reads its structure
        make = functools.partial(make, model=model)
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


def _accepts_model(make) -> bool:
    import inspect

    try:
        return "model" in inspect.signature(getattr(make, "func", make)).parameters
    except (TypeError, ValueError):
        return False


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
        entries = (load_checkpoint(path, weights=False).get("topk") or {}).get("entries") or []
        if entries and (path.parent / entries[0][1]).exists():
            path = path.parent / entries[0][1]
    elif not path.exists():
        raise BprunError(
            f"model.init_from={path}: no such file or folder; give a bprun run folder or a .pt file"
        )
    if is_sharded(path):  # a sharded checkpoint's folder: its model, gathered here
        state = load_checkpoint(path)["model"]
    else:
        state = read_state_dict(path, "model.init_from")
    state = upgraded(model, state)
    return load_matching(model, state, str(path), "model.init_from")
