"""Typed settings of the training loop.

Plain dataclasses: the engine reads them, and `bprun.config` registers them as
the Hydra schema of the `trainer` group, so a misspelt key or a wrong type
fails when the config is composed. Values are checked once, when the settings
are built (`validate()`, run by `__post_init__`), in the manner of Lightning's
configuration validator: every check of a setting lives here. No torch import:
the command line validates settings before it loads torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bprun.errors import BprunError

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


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
    # At an epoch's end, write last.pt only when this many seconds passed since the last
    # write (0 or null: every epoch). It is always written when training ends and on signals.
    last_every_n_seconds: float | None = 10.0
    # dcp: a folder per checkpoint, each rank writing its own shards (torch.distributed.checkpoint;
    # resumes on any number of ranks); full: one .pt file of the whole state, written by rank 0.
    # auto: dcp under trainer.strategy=fsdp, else full.
    format: str = "auto"


@dataclass
class FSDP:
    """`trainer.strategy=fsdp`: how FSDP2 (`fully_shard`) shards the model over the ranks."""

    # Free each unit's gathered parameters after its forward (less memory, one more all-gather
    # in the backward); false keeps them until the backward.
    reshard_after_forward: bool = True
    cpu_offload: bool = False  # parameters, gradients and optimizer state live on the CPU


@dataclass
class GradWatch:
    """Warn when per-layer gradient norms stay below/above a threshold for `patience` updates."""

    vanish_below: float | None = None
    explode_above: float | None = None
    patience: int = 5  # consecutive updates before a warning


@dataclass
class EMA:
    """An exponential moving average of the weights (and float buffers); off while `decay` is
    None. Validated each epoch as `val_ema/*`; the test and `task=eval` use it when on."""

    decay: float | None = None  # e.g. 0.999: average <- decay * average + (1 - decay) * weights
    warmup: bool = False  # decay min(decay, (1 + n) / (10 + n)) over the first n updates
    every_n_updates: int = 1  # average every N optimizer updates
    device: str | None = None  # None: beside the weights; cpu: in host memory


@dataclass
class SWA:
    """Stochastic weight averaging (torch.optim.swa_utils); off while `start_epoch` is None.
    Validated each epoch as `val_swa/*`; BatchNorm statistics are recomputed before the test."""

    start_epoch: int | None = None  # first epoch (1-based) run at the SWA lr and averaged
    lr: float | None = None  # the SWA learning rate; None keeps the schedule's
    anneal_epochs: int = 1  # epochs over which the lr moves to swa.lr
    anneal_strategy: str = "cos"  # cos | linear


@dataclass
class Attack:
    """An adversarial attack on the inputs (`attack=fgsm|pgd` for task=eval): each step moves
    the input by `alpha` in the sign of the loss's gradient, kept within `eps` of the clean
    input (L-infinity) and, for images, within the pixel range [0, 1].

    `eps` and `alpha` are in pixel units for images (8/255: eight grey levels), scaled per
    channel by the dataset's std into the normalised units the model sees; in input units
    otherwise (tables, signals), where there is no range to keep to.
    """

    method: str = "none"  # none | fgsm | pgd
    eps: float = 8 / 255  # the largest change of any input value
    alpha: float | None = None  # step size; None: eps for fgsm, 2.5 * eps / steps for pgd
    steps: int = 10  # pgd's steps (fgsm takes one)
    random_start: bool | None = None  # start at a uniform point of the eps-ball; None: pgd only

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "attack") -> None:
        _one_of(f"{prefix}.method", self.method, ("none", "fgsm", "pgd"))
        if not self.eps >= 0:
            raise BprunError(f"{prefix}.eps must be >= 0 (e.g. 0.0314 for 8/255), got {self.eps}")
        if self.alpha is not None and not self.alpha > 0:
            raise BprunError(
                f"{prefix}.alpha must be positive (or null: from eps and steps), got {self.alpha}"
            )
        if self.method == "pgd":
            _at_least(f"{prefix}.steps", self.steps, 1, "(pgd's gradient steps)")

    @property
    def step_size(self) -> float:
        if self.alpha is not None:
            return self.alpha
        return self.eps if self.method == "fgsm" else 2.5 * self.eps / self.steps

    @property
    def num_steps(self) -> int:
        return 1 if self.method == "fgsm" else self.steps

    @property
    def starts_at_random(self) -> bool:
        return self.method == "pgd" if self.random_start is None else self.random_start


@dataclass
class Adversarial(Attack):
    """Adversarial training (Goodfellow et al. 2015; Madry et al. 2018): a `share` of each
    training batch is replaced by adversarial examples of the current model."""

    share: float = 1.0  # the fraction of each batch replaced, in [0, 1]
    # Also validate under the attack each epoch (val_<method>/*, which trainer.monitor and
    # checkpoint ranking can name: robust accuracy peaks before clean accuracy does).
    validate_under_attack: bool = False

    def validate(self, prefix: str = "trainer.adversarial") -> None:
        super().validate(prefix)
        if not 0 <= self.share <= 1:
            raise BprunError(f"{prefix}.share must lie in [0, 1], got {self.share}")


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
    # Validate every N optimizer updates (and when training ends) instead of at epoch ends:
    # for runs measured in updates (trainer.max_updates), such as language models.
    val_every_n_updates: int | None = None
    # Validate on this many batches, the same ones at every check (for token streams, a fixed
    # seeded set of random windows); null: the whole validation split.
    val_batches: int | None = None
    overfit_batches: float | None = None  # train and validate on the same few batches
    detect_anomaly: bool = False  # name the layer whose backward produced NaN/inf
    # Instruments: all off by default, and free when off.
    log_grad_norms: bool = False  # per-layer gradient norms and update/weight ratios
    log_histograms_every_n_epochs: int | None = None  # weight and gradient histograms
    log_graph: bool = False  # the model graph in TensorBoard
    grad_flow_every_n_epochs: int | None = None  # gradient-flow chart (PNG + TensorBoard)
    dead_units: bool = False  # share of never-active units per ReLU-family layer
    grad_watch: GradWatch = field(default_factory=GradWatch)
    # Fine-tuning: parameter-name patterns to freeze (bprun.engine.freeze), and the number of
    # epochs after which they train too (gradual unfreezing); None keeps them frozen.
    freeze: list[str] = field(default_factory=list)
    unfreeze_at_epoch: int | None = None
    channels_last: bool = False
    compile: bool = False  # torch.compile the model
    ema: EMA = field(default_factory=EMA)
    swa: SWA = field(default_factory=SWA)
    adversarial: Adversarial = field(default_factory=Adversarial)
    # Data parallelism: N processes on this machine (DistributedDataParallel; gloo on the
    # CPU, NCCL with one GPU per rank). dataset.batch_size is per rank.
    devices: int = 1
    sync_batchnorm: bool = False  # BatchNorm statistics over all ranks (CUDA only)
    # How the ranks share the model: ddp (each holds all of it), fsdp (FSDP2: parameters,
    # gradients and optimizer state sharded, each repeated block its own unit; see fsdp), or
    # fsdp_tp (each layer split over groups of `tp` ranks, FSDP2 across the groups; see
    # tensor_parallel).
    strategy: str = "ddp"
    fsdp: FSDP = field(default_factory=FSDP)
    tp: int = 1  # tensor-parallel ranks per group (trainer.strategy=fsdp_tp)

    def __post_init__(self) -> None:
        self.validate()

    def _check_tp(self) -> None:
        """tp > 1 runs under fsdp_tp alone (refused, not mapped, with ddp or fsdp: the
        strategy says how the ranks share the model), on a number of ranks it divides."""
        if self.tp > 1 and self.strategy != "fsdp_tp":
            raise BprunError(
                f"trainer.tp={self.tp} splits each layer over {self.tp} ranks, which "
                f"trainer.strategy={self.strategy} does not do: set trainer.strategy=fsdp_tp"
            )
        if self.strategy != "fsdp_tp":
            return
        if self.tp < 2:
            raise BprunError(
                "trainer.strategy=fsdp_tp splits layers over trainer.tp ranks: set trainer.tp=2 "
                "or more, or use trainer.strategy=fsdp"
            )
        if self.devices % self.tp or self.devices < 2:
            raise BprunError(
                f"trainer.tp={self.tp} does not divide trainer.devices={self.devices}: the ranks "
                f"form groups of {self.tp}, so set trainer.devices to a multiple of it "
                f"(e.g. trainer.devices={self.tp})"
            )

    def _check_fsdp(self) -> None:
        """What FSDP2 cannot combine with, said before anything runs."""
        if self.devices < 2:
            raise BprunError(
                "trainer.strategy=fsdp shards the model over ranks: set trainer.devices=2 or more"
            )
        for on, key, fix in (
            (
                self.ema.decay is not None and self.ema.device == "cpu",
                "trainer.ema.device=cpu",
                "null (the average is sharded with the model)",
            ),
            (self.swa.start_epoch is not None, "trainer.swa.start_epoch", "null"),
            (self.sync_batchnorm, "trainer.sync_batchnorm", "false"),
            (self.precision == "16-mixed", "trainer.precision=16-mixed", "bf16-mixed"),
        ):
            if on:
                raise BprunError(
                    f"{key} is not supported with trainer.strategy={self.strategy}: set it to "
                    f"{fix}, or "
                    "use trainer.strategy=ddp"
                )

    def validate(self) -> None:
        """Raise BprunError naming the first setting whose value cannot work, and its fix."""
        _one_of("trainer.precision", str(self.precision), PRECISIONS)
        self.precision = str(self.precision)
        _one_of("trainer.mode", self.mode, ("min", "max"))
        _one_of("trainer.checkpoint.mode", self.checkpoint.mode, ("min", "max"))
        _one_of("trainer.early_stopping.mode", self.early_stopping.mode, ("min", "max"))
        _one_of("trainer.nonfinite", self.nonfinite, ("stop", "skip"))
        _one_of("trainer.grad_clip.algorithm", self.grad_clip.algorithm, ("norm", "value"))
        _at_least("trainer.max_epochs", self.max_epochs, 1)
        _at_least("trainer.accumulate", self.accumulate, 1)
        _at_least("trainer.log_every_n_updates", self.log_every_n_updates, 1)
        _at_least("trainer.max_consecutive_skips", self.max_consecutive_skips, 0)
        _at_least("trainer.checkpoint.save_top_k", self.checkpoint.save_top_k, -1)
        _at_least("trainer.grad_watch.patience", self.grad_watch.patience, 1)
        _at_least("trainer.devices", self.devices, 1)
        _one_of("trainer.strategy", self.strategy, ("ddp", "fsdp", "fsdp_tp"))
        _one_of("trainer.checkpoint.format", self.checkpoint.format, ("auto", "dcp", "full"))
        _at_least("trainer.tp", self.tp, 1)
        self._check_tp()
        if self.strategy in ("fsdp", "fsdp_tp"):
            self._check_fsdp()
        for key, value in (
            ("trainer.max_updates", self.max_updates),
            ("trainer.threads", self.threads),
            ("trainer.checkpoint.every_n_updates", self.checkpoint.every_n_updates),
            ("trainer.val_every_n_updates", self.val_every_n_updates),
            ("trainer.val_batches", self.val_batches),
            ("trainer.log_histograms_every_n_epochs", self.log_histograms_every_n_epochs),
            ("trainer.grad_flow_every_n_epochs", self.grad_flow_every_n_epochs),
        ):
            if value is not None:
                _at_least(key, value, 1, "(or null: off)")
        if self.early_stopping.patience is not None:
            _at_least("trainer.early_stopping.patience", self.early_stopping.patience, 0)
        for key, value in (
            ("trainer.grad_clip.max", self.grad_clip.max),
            ("trainer.limit_train_batches", self.limit_train_batches),
            ("trainer.limit_val_batches", self.limit_val_batches),
            ("trainer.overfit_batches", self.overfit_batches),
            ("trainer.grad_watch.vanish_below", self.grad_watch.vanish_below),
            ("trainer.grad_watch.explode_above", self.grad_watch.explode_above),
        ):
            if value is not None and not value > 0:
                raise BprunError(f"{key} must be positive (or null: off), got {value}")
        self._validate_averaging()
        self.adversarial.validate()
        every = self.checkpoint.last_every_n_seconds
        if every is not None and not every >= 0:
            raise BprunError(
                f"trainer.checkpoint.last_every_n_seconds must be >= 0 (0 or null: every epoch), "
                f"got {every}"
            )
        if self.unfreeze_at_epoch is not None:
            if not self.freeze:
                raise BprunError(
                    "trainer.unfreeze_at_epoch needs trainer.freeze=[<patterns>] to freeze first"
                )
            _at_least("trainer.unfreeze_at_epoch", self.unfreeze_at_epoch, 1, "(epochs frozen)")
        w = self.grad_watch
        if w.vanish_below is not None and w.explode_above is not None:
            if w.vanish_below >= w.explode_above:
                raise BprunError(
                    f"trainer.grad_watch.vanish_below={w.vanish_below} must be below "
                    f"trainer.grad_watch.explode_above={w.explode_above}"
                )

    def _validate_averaging(self) -> None:
        ema, swa = self.ema, self.swa
        if ema.decay is not None and not 0 < ema.decay < 1:
            raise BprunError(
                f"trainer.ema.decay must be between 0 and 1 (e.g. 0.999), got {ema.decay}"
            )
        _at_least("trainer.ema.every_n_updates", ema.every_n_updates, 1)
        if ema.device not in (None, "cpu"):
            raise BprunError(
                f"trainer.ema.device='{ema.device}' is not known: use cpu, or null for the "
                "device of the weights"
            )
        _at_least("trainer.swa.anneal_epochs", swa.anneal_epochs, 1)
        _one_of("trainer.swa.anneal_strategy", swa.anneal_strategy, ("cos", "linear"))
        if swa.lr is not None and not swa.lr > 0:
            raise BprunError(
                f"trainer.swa.lr must be positive (or null: the schedule's), got {swa.lr}"
            )
        if swa.start_epoch is None:
            return
        if ema.decay is not None:
            raise BprunError(
                "trainer.ema.decay and trainer.swa.start_epoch are both set: average the weights "
                "one way, set the other to null"
            )
        if not 1 <= swa.start_epoch <= self.max_epochs:
            raise BprunError(
                f"trainer.swa.start_epoch={swa.start_epoch} must lie in 1..trainer.max_epochs"
                f"={self.max_epochs}, or be null: off"
            )


def _one_of(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise BprunError(f"{key}='{value}' is not known: choose one of {', '.join(choices)}")


def _at_least(key: str, value: int, low: int, note: str = "") -> None:
    if value < low:
        raise BprunError(f"{key} must be at least {low}{' ' + note if note else ''}, got {value}")
