"""The one run set-up every task uses: threads, device, seeding, and the Trainer."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bprun.build import (
    build_data,
    build_loss,
    build_model,
    build_optimizer,
    build_problem,
    build_scheduler,
    problem_hint,
)
from bprun.data.augment import pixel_bounds
from bprun.data.mixing import mixing_callbacks
from bprun.diagnostics import diagnostic_callbacks
from bprun.engine import fsdp, tensor_parallel
from bprun.engine.adversarial import adversarial_callbacks
from bprun.engine.averaging import averaging_callbacks
from bprun.engine.distributed import SINGLE, DistContext, current
from bprun.engine.freeze import finetune_callbacks
from bprun.engine.precision import check_precision, resolve_device
from bprun.engine.settings import TrainerSettings
from bprun.engine.trainer import Trainer
from bprun.errors import BprunError
from bprun.optim import use_sparse_gradients
from bprun.tasks.guard import building, dry_run
from bprun.tracking.callbacks import tensorboard_callbacks

log = logging.getLogger("bprun")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    """The validated `trainer` node; fast_dev_run means one short epoch."""
    s: TrainerSettings = OmegaConf.to_object(cfg.trainer)
    if s.fast_dev_run:
        s.max_epochs, s.max_updates = 1, None
    return s


def setup_device(s: TrainerSettings, dist: DistContext = SINGLE) -> torch.device:
    """Threads first (torch reads them once), then the device the run asked for; under
    DDP a CUDA run uses the GPU of the rank's local index."""
    if s.threads:
        torch.set_num_threads(s.threads)
    device = resolve_device(s.device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def build_trainer(
    cfg: DictConfig,
    run_dir: Path | None,
    s: TrainerSettings,
    *,
    tracker=None,
    extra_state: dict | None = None,
    callbacks: list | tuple = (),
    dist: DistContext | None = None,
    data_state: dict | None = None,
    rehearse: bool = True,
):
    """(Trainer, data) for one config: data, model, loss, optimizer, scheduler and the
    callbacks of the instruments switched on (on rank 0 only: they write files).
    `data_state`: what the dataset source fitted in the run a checkpoint comes from (table
    encodings, image statistics), reused as it is; the data's state goes into
    `extra_state["data"]` for the next checkpoint. Each part is built inside
    `guard.building` and, with `rehearse`, one update is rehearsed (`guard.dry_run`, which
    leaves the run as it was): whatever they raise is one `error:` line naming the group."""
    dist = dist or current()
    device = setup_device(s, dist)
    check_precision(s.precision, device)  # what the device cannot run fails before the data loads
    if s.sync_batchnorm and dist.enabled and device.type != "cuda":
        raise BprunError(
            "trainer.sync_batchnorm=true needs CUDA (SyncBatchNorm runs on GPUs only): "
            "drop it on the CPU, where each rank keeps its own BatchNorm statistics"
        )
    warn_own_data_ignored(cfg)
    with building("dataset", cfg.dataset):
        data = build_data(
            problem_hint(cfg.dataset, cfg.get("problem")),
            device,
            cfg.seed,
            s.limit_train_batches,
            s.limit_val_batches,
            s.overfit_batches,
            s.fast_dev_run,
            data_state,
            s.val_batches,
        )
    tp = s.tp if dist.enabled else 1  # the ranks of a tensor-parallel group read one batch
    for loader in (data.train, data.val, data.test):
        if loader is not None:
            loader.shard(*tensor_parallel.data_shard(dist.rank, dist.world_size, tp))
    if data.dataset.state:
        extra_state = {**(extra_state or {}), "data": data.dataset.state}
    with building("problem", cfg.get("problem")):
        problem = build_problem(cfg.get("problem"), data.dataset, cfg.get("metrics"))
        problem.use_loss(cfg.get("loss"))  # before the model: quantiles widen its output
    seed_everything(cfg.seed)  # after the data, whose generators may reseed global RNGs
    with building("model", cfg.model):
        model = build_model(cfg.model, data.dataset, problem)
        if s.sync_batchnorm and dist.enabled:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(device)
    warn_slow_precision(s, model, device)
    sharded = s.strategy in ("fsdp", "fsdp_tp") and dist.enabled
    if sharded:  # before the optimizer: it steps
        with building("trainer", cfg.trainer):  # on the shards
            mesh = None
            if s.strategy == "fsdp_tp":
                mesh = tensor_parallel.device_mesh(device.type, dist.world_size, tp)
                model = tensor_parallel.parallelize(model, mesh["tp"])
            model = fsdp.shard(model, s.fsdp, s.precision, device, mesh and mesh["dp"])
    with building("optim", cfg.optim):
        optimizer = build_optimizer(cfg.optim, model)
    if use_sparse_gradients(model, optimizer):
        log.info("embeddings give sparse gradients (optim=sparse_adam updates the rows used)")
    with building("trainer", cfg.trainer):
        finetune = finetune_callbacks(model, s)  # after the optimizer: see finetune_callbacks
    updates_per_epoch = -(-len(data.train) // s.accumulate)
    with building("sched", cfg.sched):
        scheduler, interval = build_scheduler(
            cfg.sched, optimizer, updates_per_epoch, s.max_epochs, s.max_updates
        )
    with building("loss", cfg.loss):
        loss = build_loss(cfg.loss, problem, data).to(device)  # class weights are buffers
    with building("trainer", cfg.trainer):
        trainer = Trainer(
            s,
            model,
            problem.criterion(loss),
            optimizer,
            scheduler,
            scheduler_interval=interval,
            device=device,
            problem=problem,
            run_dir=run_dir,
            tracker=tracker,
            extra_state=extra_state,
            callbacks=[
                *(tensorboard_callbacks(s, run_dir) if dist.is_main else ()),
                *(diagnostic_callbacks(s, run_dir) if dist.is_main else ()),
                # every rank's under sharding: a sample's forward passes gather the shards
                *(problem.callbacks(data.dataset, s, run_dir) if dist.is_main or sharded else ()),
                *averaging_callbacks(s, model),
                *finetune,
                # batch hooks, in this order: mix the batch, then attack the mixed batch
                *mixing_callbacks(data.augment or {}, data.dataset, loss),
                *adversarial_callbacks(s.adversarial, input_bounds(data, device)),
                *callbacks,
            ],
            dist=dist,
        )
    if rehearse:  # what only a forward pass, the loss or a scheduler step rejects, before training
        trainer.rehearsal_seconds = dry_run(trainer, data.train, cfg)
    return trainer, data


def input_bounds(data, device: torch.device):
    """The pixel range and unit of the data's inputs, in the units the model sees (or None)."""
    ds = data.dataset
    return pixel_bounds(ds.x_train, ds.mean, ds.std, ds.value_range, device)


def data_state(checkpoint: dict | None) -> dict | None:
    """What the dataset source fitted, as a checkpoint's extra state holds it."""
    return ((checkpoint or {}).get("extra") or {}).get("data")


def warn_slow_precision(s: TrainerSettings, model: torch.nn.Module, device: torch.device) -> None:
    """bf16 autocast on the CPU runs convolutions far slower than float32 (the MNIST-1D CNN:
    3.9 updates/s against 75 on 2 cores, torch 2.14): say so before a run takes 19x longer."""
    if s.precision != "bf16-mixed" or device.type != "cpu":
        return
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    if any(isinstance(m, convs) for m in model.modules()):
        log.warning(
            "trainer.precision=bf16-mixed on the CPU: convolutions run about 19x slower than in "
            "float32 here (3.9 against 75 updates/s on the MNIST-1D CNN); use trainer.precision=32 "
            "unless memory is what you need"
        )


USER_DATA = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".csv", ".parquet", ".npz", ".npy"}


def warn_own_data_ignored(cfg: DictConfig) -> None:
    """`paths.data_dir=<a folder of the user's files>` with a shipped dataset trains on that
    dataset, not on the files: say so, and where its cache goes."""
    data_dir = cfg.dataset.get("data_dir")
    if not data_dir or not Path(data_dir).is_dir():
        return
    root = Path(data_dir)
    found = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in USER_DATA]
    for sub in (p for p in root.iterdir() if p.is_dir()):
        found += [p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in USER_DATA][:1]
    if found:
        target = cfg.dataset.get("_target_", "?").rsplit(".", 1)[-1]
        shown = ", ".join(str(p.relative_to(root)) for p in found[:3])
        log.warning(
            f"paths.data_dir={data_dir} holds files of your own ({shown}, ...), but the dataset "
            f"is {target}, which reads and caches its own data in a sub-folder there. To train "
            "on your files use dataset=image_folder dataset.root=<folder>, dataset=table "
            "dataset.path=<file> or dataset=arrays dataset.path=<file>"
        )
