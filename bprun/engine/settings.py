"""Typed settings of the training loop.

Plain dataclasses: the engine reads them, and `bprun.config` registers them as
the Hydra schema of the `trainer` group, so a misspelt key or a wrong type
fails when the config is composed.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GradClip:
    algorithm: str = "norm"  # norm | value
    max: float | None = None  # None: no clipping


@dataclass
class EarlyStopping:
    """Lightning's EarlyStopping semantics; off while `patience` is None."""

    monitor: str = "val/loss"
    mode: str = "min"  # min | max
    patience: int | None = None  # validation checks without improvement before stopping
    min_delta: float = 0.0
    check_finite: bool = True
    stopping_threshold: float | None = None  # stop once the metric is at least this good
    divergence_threshold: float | None = None  # stop once the metric is this bad


@dataclass
class Checkpointing:
    enabled: bool = True
    monitor: str = "val/loss"
    mode: str = "min"
    save_top_k: int = 1  # best checkpoints kept by `monitor`; 0 keeps none, -1 keeps all
    every_n_updates: int | None = None  # also write last.pt every N updates


@dataclass
class GradWatch:
    """Warn when per-layer gradient norms stay below/above a threshold for `patience` updates."""

    vanish_below: float | None = None
    explode_above: float | None = None
    patience: int = 5  # consecutive updates before a warning


@dataclass
class TrainerSettings:
    max_epochs: int = 20
    max_updates: int | None = None  # stop after this many optimizer updates
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    monitor: str = "val/loss"  # the metric the run reports to sweepers
    mode: str = "min"
    log_every_n_updates: int = 50
    progress: bool = True  # tqdm bars (only when stdout is a terminal)
    accumulate: int = 1  # micro-batches per optimizer update
    grad_clip: GradClip = field(default_factory=GradClip)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    checkpoint: Checkpointing = field(default_factory=Checkpointing)
    resume: str | None = None  # run folder or .pt file to continue from
    nonfinite: str = "stop"  # stop | skip: what a non-finite loss does
    max_consecutive_skips: int = 10
    fast_dev_run: bool = False  # a few batches of train, val and test; no checkpoints
    limit_train_batches: float | None = None  # <= 1.0: fraction of batches, > 1: count
    limit_val_batches: float | None = None
    overfit_batches: float | None = None  # train and validate on the same few batches
    detect_anomaly: bool = False  # name the layer whose backward produced NaN/inf
    # Instruments: all off by default, and free when off.
    log_grad_norms: bool = False  # per-layer gradient norms and update/weight ratios
    log_histograms_every_n_epochs: int | None = None  # weight and gradient histograms
    log_graph: bool = False  # the model graph in TensorBoard
    grad_flow_every_n_epochs: int | None = None  # gradient-flow chart (PNG + TensorBoard)
    dead_units: bool = False  # share of never-active units per ReLU-family layer
    grad_watch: GradWatch = field(default_factory=GradWatch)
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
