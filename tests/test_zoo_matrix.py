"""Every model on every dataset it applies to, through the real build path and Trainer.

Runs in-process (compose + run.train) with `trainer.fast_dev_run=true`, on the
embedded datasets and on tiny files in the MNIST and CIFAR formats. A model that
does not apply to a dataset's input must say so in one line, not crash.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from test_data import write_cifar, write_mnist

from bprun.config import register_configs
from bprun.errors import BprunError
from bprun.tasks.train import run as train

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
# input rank of each dataset: 1 = vectors (d,), 2 = sequences (C, L), 3 = images (C, H, W)
DATASETS = {
    "mnist1d": 2,
    "timeseries": 2,
    "regression": 1,
    "digits": 3,
    "mnist": 3,
    "fashion_mnist": 3,
    "kmnist": 3,
    "cifar10": 3,
    "cifar100": 3,
}
ONLY_IMAGES, ONLY_FLAT = {"resnet", "torchvision", "timm"}, {"logreg", "mlp"}
# The pretrained-architecture groups at their smallest: the matrix checks the fit to each
# dataset's shapes, tests/test_finetune.py the builders themselves.
SMALL = {
    "torchvision": ["model.name=mobilenet_v3_small"],
    "timm": ["model.name=mobilenetv3_small_050"],
}


# Models that read ids, not features: token ids (dataset=text) and (user, item) pairs.
READS_IDS = {"gpt", "mf", "ncf"}


def applies(model: str, rank: int) -> bool:
    if model in READS_IDS:
        return False
    if model == "linear_forecast":  # series windows (channels, steps) only
        return rank == 2
    if rank == 1:
        return model in ONLY_FLAT
    return model not in ONLY_IMAGES or rank == 3


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zoo-data")
    for folder in ("MNIST", "FashionMNIST", "KMNIST"):
        write_mnist(root, folder, n_train=60, n_test=20, gz=folder == "KMNIST")
    write_cifar(root, per_file=12)
    write_cifar(root, hundred=True, per_file=40)
    return root


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("model", MODELS)
def test_model_on_dataset(model, dataset, files, tmp_path):
    register_configs()
    regression = dataset in ("regression", "timeseries")
    overrides = [
        f"model={model}",
        f"dataset={dataset}",
        f"paths.data_dir={files}",
        "loss=mse" if regression else "loss=cross_entropy",
        "trainer.fast_dev_run=true",
        "trainer.progress=false",
        "trainer.threads=1",
        "dataset.batch_size=8",
        "dataset.eval_batch_size=8",
        *SMALL.get(model, []),
    ]
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    if not applies(model, DATASETS[dataset]):
        says = r"reads token ids|scores users and items" if model in READS_IDS else "build"
        with pytest.raises(BprunError, match=says):
            train(cfg, tmp_path)
        return
    train(cfg, tmp_path)
    import json

    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["status"] == "completed" and m["updates"] == 2
    assert math.isfinite(m["test"]["test/loss"])
    assert ("test/rmse" in m["test"]) == regression and ("test/acc" in m["test"]) != regression
