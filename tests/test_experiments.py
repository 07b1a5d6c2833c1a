"""The MNIST-1D paper experiments: their settings, their architectures, and that they run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bprun.config import register_configs

CONF = Path(__file__).resolve().parents[1] / "conf"

# experiment: (model class, parameters of the paper's architecture on (1, 40) -> 10)
PAPER = {
    "mnist1d_paper_logreg": ("LinearModel", 40 * 10 + 10),
    "mnist1d_paper_mlp": ("MLP", (40 * 100 + 100) + (100 * 100 + 100) + (100 * 10 + 10)),
    # conv 1->25 k5, 25->25 k3, 25->25 k3 (lengths 40 -> 19 -> 10 -> 5), linear 125 -> 10
    "mnist1d_paper_cnn": ("CNN", (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)),
    # bidirectional GRU, hidden 6, input 1: 2 x 3 gates x (6 + 36 + 6 + 6); linear 2*6*40 -> 10
    "mnist1d_paper_gru": ("GRU", 2 * 3 * (6 + 36 + 6 + 6) + (480 * 10 + 10)),
}


def compose_experiment(name: str, *overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose("config", overrides=[f"+experiment={name}", *overrides])


def test_every_experiment_file_is_a_paper_experiment():
    papers = [p.stem for p in (CONF / "experiment").glob("mnist1d_paper_*.yaml")]
    assert sorted(papers) == sorted(PAPER)
    for path in (CONF / "experiment").glob("*.yaml"):
        assert path.read_text().startswith("# @package _global_\n"), path


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_settings(name):
    cfg = compose_experiment(name)
    assert cfg.dataset._target_.endswith("load_mnist1d")
    assert cfg.optim._target_ == "torch.optim.Adam" and cfg.optim.lr == 0.01
    assert cfg.optim.weight_decay == 0.0 and cfg.sched._target_ is None
    assert cfg.dataset.batch_size == 100
    assert cfg.trainer.max_updates == 6000
    train_samples = round(4000 * (1 - cfg.dataset.val_fraction))
    updates_per_epoch = -(-train_samples // cfg.dataset.batch_size)
    assert cfg.trainer.max_epochs * updates_per_epoch >= 6000, "max_epochs ends the run early"


def paper_model(name: str):
    args = OmegaConf.to_container(compose_experiment(name).model, resolve=True)
    assert args.pop("init") == "default"  # bprun applies model.init itself
    assert args.pop("activation_checkpointing") is False  # and this one
    assert args.pop("init_from") is None  # and this one
    return instantiate(args, input_shape=(1, 40), num_classes=10)  # MNIST-1D's shape


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_architecture_and_parameter_count(name):
    cls, count = PAPER[name]
    model = paper_model(name)
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == count


# The sizes the paper quotes: linear 410, MLP ~15k, CNN ~5.2k, GRU ~5.1k.
PAPER_SIZES = {
    "mnist1d_paper_logreg": (410, 410),
    "mnist1d_paper_mlp": (15_000, 15_500),
    "mnist1d_paper_cnn": (5_150, 5_250),
    "mnist1d_paper_gru": (5_050, 5_150),
}


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_models_have_the_sizes_the_paper_quotes(name):
    low, high = PAPER_SIZES[name]
    assert low <= sum(p.numel() for p in paper_model(name).parameters()) <= high


def test_every_experiment_runs_from_the_command_line(bprun, tmp_path):
    r = bprun(f"+experiment={','.join(sorted(PAPER))}", "trainer.max_updates=20", "-m")
    runs = {}
    for overrides in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml"):
        experiment = next(o for o in OmegaConf.load(overrides) if o.startswith("+experiment="))
        runs[experiment.split("=")[1]] = json.loads(
            (overrides.parents[1] / "metrics.json").read_text()
        )
    assert sorted(runs) == sorted(PAPER), r.output[-2000:]
    for name, m in runs.items():
        assert m["status"] == "completed" and m["updates"] == 20, name
        assert m["stop_reason"] == "max_updates=20 reached"
