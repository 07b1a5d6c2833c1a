"""Hydra schemas and plugins: registered before compose, so it validates keys and types."""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from bprun.diagnostics.settings import GradcheckSettings, LrFindSettings
from bprun.engine.settings import Attack, TrainerSettings
from bprun.meta.settings import MetaSettings
from bprun.search.settings import SearchSettings

# top-level key -> its schema: what compose checks, and what a frozen config gets back
SCHEMAS = {
    "trainer": TrainerSettings,
    "gradcheck": GradcheckSettings,
    "lr_find": LrFindSettings,
    "meta": MetaSettings,
    "attack": Attack,
    "search": SearchSettings,
}


@dataclass
class Paths:
    data_dir: str = "data"  # datasets are read and cached here
    output_dir: str = "outputs"  # run folders go here


@dataclass
class Sweep:
    skip_done: bool = False


@dataclass
class Cv:
    """task=cv (bprun/tasks/cv.py)."""

    folds: int = 5
    group: str | None = None
    seed: int = 0


@dataclass
class Generate:
    """task=generate (bprun/tasks/generate.py)."""

    prompt: str = "\n"
    max_new_tokens: int = 500
    temperature: float = 0.8
    top_k: int | None = 200
    top_p: float | None = None
    num_samples: int = 1
    seed: int = 1337
    use_cache: bool = True


@dataclass
class Backtest:
    """task=backtest (bprun/tasks/backtest.py)."""

    folds: int = 3
    window: str = "expanding"
    refit: bool = True


@dataclass
class Export:
    """task=export (bprun/tasks/export.py)."""

    format: str = "pt"
    out: str | None = None


@dataclass
class Recommend:
    """task=recommend (bprun/tasks/recommend.py)."""

    users: list[Any] = field(default_factory=list)
    k: int = 10
    cold_start: str | None = None
    out: str | None = None


@dataclass
class TopLevel:
    """The top-level keys of conf/config.yaml, typed: `seed=abc` fails when the config is
    composed, like a `trainer.*` setting, before anything is built. (`metrics` is checked
    with its names by bprun.checks, which says how to write a list.)"""

    task: str = "train"
    seed: int = 0
    metrics: Any = None
    ckpt: str | None = None
    paths: Paths = field(default_factory=Paths)
    sweep: Sweep = field(default_factory=Sweep)
    cv: Cv = field(default_factory=Cv)
    generate: Generate = field(default_factory=Generate)
    backtest: Backtest = field(default_factory=Backtest)
    recommend: Recommend = field(default_factory=Recommend)
    export: Export = field(default_factory=Export)


def typed(cfg) -> None:
    """Give a config loaded from plain YAML (a frozen config) its schemas back, so the tasks
    read typed, validated settings as after compose."""
    for key, schema in SCHEMAS.items():
        if key in cfg:
            cfg[key] = OmegaConf.merge(OmegaConf.structured(schema), cfg[key])


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(group="trainer", name="trainer_schema", node=TrainerSettings)
    cs.store(group="gradcheck", name="gradcheck_schema", node=GradcheckSettings)
    cs.store(group="lr_find", name="lr_find_schema", node=LrFindSettings)
    cs.store(group="meta", name="meta_schema", node=MetaSettings)
    cs.store(group="attack", name="attack_schema", node=Attack)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)
    # The `search` node is always there (typed), so that `search=<name>` files and the
    # sweeper's `search.*` settings are checked when the config is composed.
    cs.store(name="search_schema", node={"search": SearchSettings})
    cs.store(name="top_schema", node=TopLevel)
    register_plugins()


def run_name(overrides: str) -> str:
    """`_model:cnn+optim:adamw` from Hydra's override_dirname ("" without overrides): the
    tail of a run folder's name, which TensorBoard shows. Only characters that make one
    folder and that the command line takes unquoted (`trainer.resume=<folder>`) are kept."""
    name = overrides.translate(_UNSAFE)
    if len(name) > 96:
        name = name[:96].rsplit("+", 1)[0] + "+..."
    return f"_{name}" if name else ""


_UNSAFE = str.maketrans(
    {
        "/": "_",
        "\\": "_",
        ",": ".",
        " ": "",
        "'": "",
        '"': "",
        "[": "",
        "]": "",
        "{": "",
        "}": "",
        "(": "",
        ")": "",
        "=": ":",
    }
)


def register_plugins() -> None:
    """Register bprun's Hydra plugins (their import stores their configs).

    An installed wheel puts them where Hydra's discovery lists the `hydra_plugins`
    namespace; an editable install maps that namespace through an import hook,
    which imports but cannot be listed, so discovery alone would miss them there.
    Registering a plugin that discovery found already changes nothing. bprun's submitit
    launchers replace the plugin's `submitit_slurm`/`submitit_local` configs, which
    discovery (the first `Plugins.instance()`) stores.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.bprun_optuna_sweeper.optuna_sweeper import OptunaSweeper
    from hydra_plugins.bprun_submitit import launcher as submitit_launcher
    from hydra_plugins.bprun_sweeper.sweeper import BprunSweeper

    Plugins.instance().register(BprunSweeper)
    Plugins.instance().register(OptunaSweeper)
    Plugins.instance().register(submitit_launcher.SlurmLauncher)
    Plugins.instance().register(submitit_launcher.LocalLauncher)
    submitit_launcher.store_configs()
