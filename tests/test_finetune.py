"""Transfer learning: torchvision and timm architectures, weights files, freezing, lr multipliers.

Weights that normally download are written by the tests (a fresh model's state
dict under torch hub's cache name); runs are a few updates on 8x8 digits.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision
from hydra import compose, initialize_config_module
from safetensors.torch import save_file
from test_tensorboard import events

from bprun.config import register_configs
from bprun.errors import BprunError
from bprun.models.weights import cached_file
from bprun.tasks.setup import build_trainer, trainer_settings
from bprun.tasks.train import run as train

BUILDERS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16", "convnext_tiny"]
BASE = [
    "dataset=digits",
    "trainer.threads=1",
    "trainer.progress=false",
    "trainer.max_epochs=1",
    "trainer.checkpoint.enabled=false",
    "dataset.batch_size=16",
    "dataset.eval_batch_size=128",
]


def make(tmp_path, *overrides):
    """(trainer, data) for the digits config with these overrides, as `bprun` builds them."""
    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, *overrides])
    tmp_path.mkdir(parents=True, exist_ok=True)
    return build_trainer(cfg, tmp_path, trainer_settings(cfg))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def first_conv(module: torch.nn.Module) -> torch.nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, torch.nn.Conv2d))


@pytest.mark.parametrize("name", BUILDERS)
def test_torchvision_builder_trains_on_small_images(name, tmp_path):
    """Digits upsampled to 32 px (a ViT-B/16 then sees 2x2 patches): head and stem fit, it learns."""
    trainer, data = make(
        tmp_path, "model=torchvision", f"model.name={name}", "model.preprocess.resize=32",
        "trainer.max_updates=2",
    )  # fmt: skip
    model = trainer.module
    assert first_conv(model).in_channels == 1
    before = snapshot(model)
    trainer.fit(data.train, None)
    assert trainer.update == 2
    x, _ = next(data.test.batches())
    out = model.eval()(x[:3])
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    head = [k for k in before if k.endswith("weight")][-1]  # the classifier comes last
    assert model.state_dict()[head].shape[0] == 10
    assert not torch.equal(model.state_dict()[head], before[head])
    stem = next(k for k in before if before[k].dim() == 4)
    assert not torch.equal(model.state_dict()[stem], before[stem])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A torchvision resnet18 trained a few updates on the ten digits, and its state dict."""
    trainer, data = make(
        tmp_path_factory.mktemp("trained"), "model=torchvision", "trainer.max_updates=3"
    )
    trainer.fit(data.train, None)
    return trainer.module.state_dict()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file_into_another_number_of_classes(trained, suffix, tmp_path):
    """Everything but the head loads; the head is new, trainable, and the frozen rest stays put."""
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(trained, path)
    else:
        save_file({k: v.contiguous() for k, v in trained.items()}, path)
    trainer, data = make(
        tmp_path / "run", "model=torchvision", f"model.weights={path}", "dataset.classes=[5,6,7]",
        "trainer.freeze=['*','!fc.*','!layer4.*']", "trainer.max_updates=3",
    )  # fmt: skip
    model = trainer.module
    (report,) = model.weights_reports
    assert sorted(report.mismatched) == ["fc.bias (10,)->(3,)", "fc.weight (10, 512)->(3, 512)"]
    assert report.missing == [] and report.unexpected == [] and report.adapted == []
    assert report.loaded == len(trained) - 2
    loaded = snapshot(model)
    for k, v in trained.items():
        if not k.startswith("fc."):
            assert torch.equal(loaded[k], v), k
    assert model.fc.weight.requires_grad and model.fc.weight.shape == (3, 512)
    assert not model.layer1[0].conv1.weight.requires_grad
    trainer.fit(data.train, None)
    after = model.state_dict()
    for k in after:
        if k.startswith(("fc.", "layer4.")):
            if not k.endswith("num_batches_tracked"):
                assert not torch.equal(after[k], loaded[k]), f"{k} should train"
        else:  # frozen weights, and the running statistics of their BatchNorm (eval mode)
            assert torch.equal(after[k], loaded[k]), f"{k} should stay frozen"
    assert not model.bn1.training and model.layer4[0].bn1.training


def test_unfreezing_after_n_epochs(tmp_path):
    """Frozen through epoch 1; from epoch 2 on they train, and BatchNorm is back in train mode."""
    trainer, data = make(
        tmp_path, "model=torchvision", "trainer.freeze=[layer1,bn1]",
        "trainer.unfreeze_at_epoch=1", "trainer.limit_train_batches=2",
    )  # fmt: skip
    model = trainer.module
    start = snapshot(model)
    trainer.fit(data.train, None)  # epoch 1
    after_1 = snapshot(model)
    frozen = [k for k in start if k.startswith(("layer1.", "bn1."))]
    assert frozen and all(torch.equal(after_1[k], start[k]) for k in frozen)
    assert not torch.equal(after_1["layer2.0.conv1.weight"], start["layer2.0.conv1.weight"])
    assert model.layer1[0].conv1.weight.requires_grad and model.bn1.training
    trainer.settings.max_epochs, trainer.stop_reason = 2, None  # carry on to epoch 2
    trainer.fit(data.train, None)  # epoch 2
    after_2 = snapshot(model)
    for k in frozen:
        if not k.endswith("num_batches_tracked"):
            assert not torch.equal(after_2[k], after_1[k]), f"{k} should train after unfreezing"


def test_lr_multipliers_keep_the_weight_decay_split(tmp_path):
    trainer, _ = make(
        tmp_path, "model=torchvision", "optim=adamw", "optim.lr=0.01",
        "optim.no_decay_norm_bias=true", "optim.lr_mult={layer4.*: 0.1, fc: 2}",
    )  # fmt: skip
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert list(groups) == [
        "default", "default/no_decay", "layer4.*", "layer4.*/no_decay", "fc", "fc/no_decay",
    ]  # fmt: skip
    expected = {"default": 0.01, "layer4.*": 0.001, "fc": 0.02}
    for name, g in groups.items():
        base = name.split("/")[0]
        assert g["lr"] == pytest.approx(expected[base]) and g["lr_mult"] in (1.0, 0.1, 2)
        assert g["weight_decay"] == (0.0 if name.endswith("/no_decay") else 0.01)
    names = {id(p): n for n, p in trainer.module.named_parameters()}
    assert {names[id(p)] for p in groups["fc"]["params"]} == {"fc.weight"}
    assert all(names[id(p)].startswith("layer4.") for p in groups["layer4.*/no_decay"]["params"])
    listed = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert sorted(listed) == sorted(names)  # every parameter exactly once


# ---------------------------------------------------------------- DEFAULT weights, preprocessing
def test_default_weights_come_from_torch_hubs_cache_with_their_preprocessing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    path = cached_file(weights)
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, path)
    trainer, _ = make(tmp_path / "run", "model=torchvision", "model.weights=DEFAULT")
    model = trainer.module
    (report,) = model.weights_reports
    assert report.source == "ResNet18_Weights.IMAGENET1K_V1"
    assert report.adapted == ["conv1.weight 3->1 input channels"]
    assert report.mismatched == ["fc.weight (1000, 512)->(10, 512)", "fc.bias (1000,)->(10,)"]
    # grey stem = the sum of the RGB filters
    assert torch.allclose(model.conv1.weight, imagenet["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer3[1].conv2.weight, imagenet["layer3.1.conv2.weight"])
    spec = model.preprocess_spec
    assert (spec.resize, spec.crop) == (256, 224)
    assert spec.mean == pytest.approx((0.485, 0.456, 0.406))
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.eval()(torch.full((2, 1, 8, 8), 0.5))
    grey = (0.5 - sum(spec.mean) / 3) / (sum(spec.std) / 3)
    assert seen[0].shape == (2, 1, 224, 224)
    assert torch.allclose(seen[0], torch.full_like(seen[0], grey), atol=1e-5)


def test_default_weights_without_network_name_the_file_to_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise OSError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    with pytest.raises(BprunError, match=f"place it at {expected}"):
        make(tmp_path / "run", "model=torchvision", "model.name=mobilenet_v3_small",
             "model.weights=DEFAULT")  # fmt: skip


def test_preprocessing_overridden_and_undone_dataset_normalisation():
    from types import SimpleNamespace

    from bprun.models.preprocess import Preprocess

    spec = Preprocess.resolve({"resize": 16, "crop": None}, {"resize": 256, "crop": 224,
                              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})  # fmt: skip
    assert (spec.resize, spec.crop, spec.mean) == (16, None, (0.5, 0.5, 0.5))
    # uint8 data normalised by the dataset (mean 0.1, std 0.3) is first put back in [0, 1]
    model = torch.nn.Identity()
    uint8 = SimpleNamespace(x_train=torch.zeros(1, dtype=torch.uint8), mean=(0.1,), std=(0.3,))
    spec.attach(model, uint8)
    x01 = torch.rand(2, 1, 8, 8)
    out = model((x01 - 0.1) / 0.3)
    assert out.shape == (2, 1, 16, 16)
    up = torch.nn.functional.interpolate(x01, size=(16, 16), mode="bilinear", antialias=True)
    assert torch.allclose(out, (up - 0.5) / 0.25, atol=1e-5)


# ---------------------------------------------------------------- timm (optional extra)
def test_timm_model_trains_and_loads_a_weights_file(tmp_path):
    timm = pytest.importorskip("timm")
    other = timm.create_model("resnet18", num_classes=7, in_chans=3)
    torch.save(other.state_dict(), tmp_path / "timm.pth")
    trainer, data = make(
        tmp_path / "run", "model=timm", f"model.weights={tmp_path / 'timm.pth'}",
        "trainer.max_updates=2",
    )  # fmt: skip
    (report,) = trainer.module.weights_reports
    assert report.adapted == ["conv1.weight 3->1 input channels"]
    assert report.mismatched == ["fc.weight (7, 512)->(10, 512)", "fc.bias (7,)->(10,)"]
    before = snapshot(trainer.module)
    trainer.fit(data.train, None)
    assert not torch.equal(trainer.module.state_dict()["fc.weight"], before["fc.weight"])


def test_timm_absent_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(BprunError, match=r"pip install 'bprun\[timm\]'"):
        make(tmp_path, "model=timm")


def test_timm_default_weights_offline_say_what_to_do(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return create(name, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(BprunError, match=r"from timm/resnet18.a1_in1k \(OSError\); without "
                       r"network, download its model.safetensors"):  # fmt: skip
        make(tmp_path, "model=timm", "model.weights=DEFAULT")


# ---------------------------------------------------------------- bad input
class Payload:
    def __reduce__(self):
        return (print, ("this ran",))


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"model.weights=.*nope.pth: no such file"),
        ("corrupt", r"nope.pth: the file is truncated or corrupted"),
        ("corrupt_safetensors", r"not a valid .safetensors file"),
        ("pickled_code", r"refused to load .*: it holds Python objects"),
        (
            "other_architecture",
            r"does not fit ResNet: only 0 of 122 tensors match \(missing: "
            r"conv1.weight, .*; unexpected: features.0.0.weight, ",
        ),  # fmt: skip
    ],
)
def test_bad_weights_files(case, message, tmp_path):
    path = tmp_path / "nope.pth"
    if case == "corrupt":  # a download cut short
        torch.save(torchvision.models.resnet18().state_dict(), path)
        path.write_bytes(path.read_bytes()[:100_000])
    elif case == "corrupt_safetensors":
        path = tmp_path / "w.safetensors"
        path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    elif case == "pickled_code":
        torch.save({"fc.weight": Payload()}, path)
    elif case == "other_architecture":
        torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(BprunError, match=message):
        make(tmp_path / "run", "model=torchvision", f"model.weights={path}")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.name=resnet19"], r"no classification model 'resnet19' \(close names: resnet18"),
        (
            ["trainer.freeze=[backbone.*]"],
            r"trainer.freeze pattern 'backbone.\*' matches no "
            r"parameter of ResNet: its top-level modules are conv1, bn1, relu",
        ),  # fmt: skip
        (["optim.lr_mult={head: 0.1}"], r"optim.lr_mult pattern 'head' matches no parameter"),
        (["trainer.unfreeze_at_epoch=2"], r"needs trainer.freeze=\[<patterns>\]"),
        (["model.weights=RESNET_NONE"], r"ResNet18_Weights has DEFAULT, IMAGENET1K_V1"),
    ],
)
def test_bad_names_and_patterns(overrides, message, tmp_path):
    with pytest.raises(BprunError, match=message):
        make(tmp_path, "model=torchvision", *overrides)


def test_bad_input_on_the_command_line_is_one_line(bprun):
    r = bprun("dataset=digits", "model=torchvision", "model.name=convnext_tinny", check=False)
    assert r.returncode == 1 and "Traceback" not in r.output
    assert "no classification model 'convnext_tinny' (close names: convnext_tiny" in r.output


# ---------------------------------------------------------------- end to end
def run(tmp_path, *overrides) -> dict:
    """One training run in-process, as the command runs it; its metrics.json."""
    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        cfg = compose("config", overrides=[*BASE, *overrides])
    train(cfg, tmp_path)
    return json.loads((tmp_path / "metrics.json").read_text())


def test_finetuning_reaches_the_accuracy_in_fewer_updates_than_from_scratch(tmp_path):
    """Pretrain on digits 0-4, then learn 5-8: from those weights it takes fewer updates."""
    common = [
        "model=cnn",
        "dataset.batch_size=32",
        "optim.lr=0.003",
        "trainer.checkpoint.enabled=true",
    ]
    run(tmp_path / "pretrain", *common, "dataset.classes=[0,1,2,3,4]", "trainer.max_epochs=2")
    until = [
        "dataset.classes=[5,6,7,8]", "trainer.max_epochs=10", "trainer.monitor=val/acc",
        "trainer.mode=max", "trainer.early_stopping.monitor=val/acc",
        "trainer.early_stopping.mode=max", "trainer.early_stopping.patience=100",
        "trainer.early_stopping.stopping_threshold=0.95",
    ]  # fmt: skip
    scratch = run(tmp_path / "scratch", *common, *until)
    tuned = run(tmp_path / "tuned", *common, *until, f"model.init_from={tmp_path / 'pretrain'}")
    (report,) = tuned["weights"]
    assert report["source"].startswith(str(tmp_path / "pretrain" / "checkpoints" / "epoch="))
    assert sorted(report["mismatched"]) == [
        "head.bias (5,)->(4,)",
        "head.weight (5, 128)->(4, 128)",
    ]
    assert report["missing"] == report["unexpected"] == []
    for m in (tuned, scratch):
        assert m["stop_reason"].startswith("early stopping: stopping threshold reached")
    assert tuned["updates"] < scratch["updates"], (tuned["updates"], scratch["updates"])


def test_experiment_finetune_resnet18_digits(bprun, tmp_path, monkeypatch):
    """The shipped experiment on stand-in ImageNet weights: a frozen epoch, then per-group lrs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = cached_file(torchvision.models.ResNet18_Weights.DEFAULT)
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    r = bprun("+experiment=finetune_resnet18_digits", "trainer.max_epochs=2",
              "trainer.limit_train_batches=2", "trainer.log_every_n_updates=1")  # fmt: skip
    assert "(5,130 trainable)" in r.output  # the head alone: 512 x 10 + 10
    assert "unfroze 11,170,240 parameters after epoch 1" in r.output
    m = r.metrics
    assert m["weights"][0]["adapted"] == ["conv1.weight 3->1 input channels"]
    assert m["frozen"]["still_frozen"] is False
    lrs = {g["name"]: g["lr"] for g in m["param_groups"]}
    assert lrs == pytest.approx(
        {"default": 3e-4, "default/no_decay": 3e-4, "fc": 3e-3, "fc/no_decay": 3e-3}
    )
    ea = events(r.run_dir)
    index = [g["name"] for g in m["param_groups"]].index("fc")
    head, backbone = ea.Scalars(f"lr/group{index}"), ea.Scalars("lr/group0")
    assert len(head) >= 4 and [h.step for h in head] == [b.step for b in backbone]
    assert all(h.value == pytest.approx(10 * b.value) for h, b in zip(head, backbone, strict=True))
    assert json.loads((r.run_dir / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_finetuning_on_cuda_with_bf16_channels_last_and_compile(compiled, tmp_path, monkeypatch):
    """The preprocessing hook, frozen BatchNorm and unfreezing under autocast and torch.compile."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = cached_file(torchvision.models.ResNet18_Weights.DEFAULT)
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    trainer, data = make(
        tmp_path / "run", "model=torchvision", "model.weights=DEFAULT",
        "model.preprocess.resize=32", "model.preprocess.crop=32", "trainer.device=cuda",
        "trainer.precision=bf16-mixed", "trainer.channels_last=true",
        f"trainer.compile={str(compiled).lower()}", "trainer.freeze=['*','!fc.*']",
        "trainer.unfreeze_at_epoch=1", "optim=adamw", "optim.lr=0.0003", "optim.lr_mult={fc: 10}",
    )  # fmt: skip
    start = snapshot(trainer.module)
    trainer.fit(data.train, data.val)
    after_1 = snapshot(trainer.module)
    backbone = [k for k in start if not k.startswith("fc.")]
    assert all(torch.equal(after_1[k], start[k]) for k in backbone)
    assert not torch.equal(after_1["fc.weight"], start["fc.weight"])
    trainer.settings.max_epochs, trainer.stop_reason = 3, None
    trainer.fit(data.train, data.val)
    after_3 = snapshot(trainer.module)
    assert not torch.equal(after_3["layer1.0.conv1.weight"], after_1["layer1.0.conv1.weight"])
    assert trainer.history[-1]["val/acc"] > 0.5
