"""What only a GPU shows: float16 with a GradScaler, clipping after unscale, resume on CUDA,
channels_last and torch.compile. Skipped where CUDA is not available."""

from __future__ import annotations

import signal
import subprocess

import pytest
import torch
from torch import nn

from bprun.data import InMemoryLoader
from bprun.engine import Trainer, TrainerSettings
from bprun.engine.settings import GradClip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def problem(n=512, d=32, classes=4):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :classes].argmax(1)).long()
    return x.cuda(), y.cuda()


def model(d=32, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, classes)).cuda()


def test_16_mixed_trains_with_a_grad_scaler():
    x, y = problem()
    m = model()
    s = TrainerSettings(progress=False, max_epochs=10, precision="16-mixed", device="cuda")
    t = Trainer(
        s,
        m,
        nn.CrossEntropyLoss(),
        torch.optim.Adam(m.parameters(), 1e-2),
        device="cuda",
        num_classes=4,
    )
    t.fit(InMemoryLoader(x, y, 64, shuffle=True), InMemoryLoader(x, y, 512))
    assert t.scaler is not None and t.scaler.get_scale() > 0
    assert t.history[-1]["val/acc"] > 0.9
    assert t.state_dict()["scaler"]["scale"] > 0


def test_clipping_sees_unscaled_gradients():
    x, y = problem()
    m = model()
    logged = {}

    class Tracker:
        def log(self, scalars, step):
            logged.update(scalars)

    before = [p.detach().clone() for p in m.parameters()]
    s = TrainerSettings(
        progress=False,
        max_updates=1,
        precision="16-mixed",
        device="cuda",
        grad_clip=GradClip("norm", 1e-3),
    )
    t = Trainer(
        s,
        m,
        nn.CrossEntropyLoss(),
        torch.optim.SGD(m.parameters(), lr=1.0),
        device="cuda",
        num_classes=4,
        tracker=Tracker(),
    )
    t.fit(InMemoryLoader(x, y, 64), None)
    # the same gradient in float32, without any scaling
    ref = model()
    nn.CrossEntropyLoss()(ref(x[:64]), y[:64]).backward()
    true_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
    assert logged["train/grad_norm"] == pytest.approx(true_norm, rel=2e-2)  # not x65536
    step = torch.cat([(p - b).flatten() for p, b in zip(m.parameters(), before, strict=True)])
    assert step.norm().item() <= 1e-3 * 1.01


def test_scheduler_does_not_step_when_the_scaler_skips():
    x, y = problem()
    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.99)
    s = TrainerSettings(progress=False, max_updates=40, precision="16-mixed", device="cuda")
    t = Trainer(
        s,
        m,
        nn.CrossEntropyLoss(),
        opt,
        sched,
        scheduler_interval="step",
        device="cuda",
        num_classes=4,
    )
    t.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)  # overflows at first
    skipped = []
    scale = [t.scaler.get_scale()]

    class Count:
        def on_update_end(self, trainer):
            now = trainer.scaler.get_scale()
            skipped.append(now < scale[-1])
            scale.append(now)

    t._on_update_end = [Count().on_update_end]
    t.fit(InMemoryLoader(x, y, 64, shuffle=True), None)
    assert sum(skipped) > 0
    assert sched.last_epoch == t.update - sum(skipped)


@pytest.mark.parametrize("extra", [["trainer.channels_last=true"], ["trainer.compile=true"]])
def test_channels_last_and_compile_train_a_2d_cnn(bprun, extra):
    r = bprun("dataset=digits", "model=cnn", "trainer.max_epochs=3", "trainer.device=cuda", *extra)
    assert r.metrics["test"]["test/acc"] > 0.8
    state = torch.load(r.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in state["model"])


def test_resume_on_cuda_with_16_mixed(bprun, data_dir, tmp_path):
    from test_checkpoint import model_state, start, wait_for_update

    args = [
        "model=cnn",
        "model.channels=[16,32]",
        "trainer.max_epochs=4",
        "trainer.device=cuda",
        "trainer.precision=16-mixed",
        "trainer.checkpoint.every_n_updates=1",
        "sched=cosine",
        "sched.interval=step",
        "optim=adamw",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    run_dir = tmp_path / "killed"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, run_dir / "checkpoints" / "last.pt", 50)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = bprun(f"trainer.resume={run_dir}")
    assert resumed.metrics["updates"] == reference.metrics["updates"]
    # What README.md claims for CUDA: close to the uninterrupted run, not bit for bit
    # (cuDNN and atomic-add kernels are not deterministic from run to run anyway).
    a, b = model_state(reference.run_dir), model_state(run_dir)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-2
    ref_acc, got_acc = reference.metrics["test"]["test/acc"], resumed.metrics["test"]["test/acc"]
    assert abs(ref_acc - got_acc) < 0.02


def test_nvidia_smi_sees_the_device():
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
    assert "GPU" in out


def test_activation_checkpointing_lowers_peak_cuda_memory_with_equal_gradients():
    """The peak of torch.cuda.max_memory_allocated over one forward and backward of a deep
    MLP drops by at least a third with model.activation_checkpointing, gradients equal."""
    import copy

    from bprun.models import MLP
    from bprun.models.checkpointing import enable_activation_checkpointing

    torch.manual_seed(0)
    # A batch large enough that activations, not the weights' gradients, make the peak.
    plain = MLP((1024,), 10, hidden=[1024] * 12, activation="gelu", norm="layer").cuda()
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    x = torch.randn(8192, 1024, device="cuda")
    y = torch.randint(0, 10, (8192,), device="cuda")
    peaks, grads = [], []
    for m in (plain, ckpt):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        nn.functional.cross_entropy(m(x), y).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append([p.grad.clone() for p in m.parameters()])
        m.zero_grad(set_to_none=True)
    print(
        f"peak over the step: plain {peaks[0] / 2**20:.1f} MiB, checkpointed "
        f"{peaks[1] / 2**20:.1f} MiB"
    )
    assert peaks[1] < 0.67 * peaks[0]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_ema_kept_on_the_cpu_equals_the_ema_kept_on_the_device():
    from bprun.engine.averaging import averaging_callbacks
    from bprun.engine.settings import EMA

    x, y = problem()
    averages = []
    for device in (None, "cpu"):
        m = model()
        s = TrainerSettings(
            progress=False, max_epochs=2, device="cuda", ema=EMA(0.9, device=device)
        )
        (avg,) = averaging_callbacks(s, m)
        t = Trainer(
            s,
            m,
            nn.CrossEntropyLoss(),
            torch.optim.SGD(m.parameters(), 0.1),
            device="cuda",
            num_classes=4,
            callbacks=[avg],
        )
        t.fit(InMemoryLoader(x, y, 64, shuffle=True), InMemoryLoader(x, y, 512))
        assert {v.device.type for v in avg.average.values()} == {
            "cuda" if device is None else "cpu"
        }
        assert "val_ema/loss" in t.history[-1]
        averages.append({k: v.cpu() for k, v in avg.average.items()})
    for k in averages[0]:
        torch.testing.assert_close(averages[1][k], averages[0][k])


@pytest.mark.parametrize("optim, auto", [("adam", "fused"), ("rmsprop", "foreach")])
def test_optim_impl_auto_on_cuda_is_torchs_fastest_and_matches_single(optim, auto):
    import copy

    from hydra import compose, initialize_config_module

    from bprun.build import build_optimizer
    from bprun.config import register_configs
    from bprun.optim import impl_of

    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        nodes = {
            impl: compose("config", overrides=[f"optim={optim}", f"optim.impl={impl}"]).optim
            for impl in ("auto", "single")
        }
    x, y = problem()
    start = model()
    trained = {}
    for impl, node in nodes.items():
        net = copy.deepcopy(start)
        opt = build_optimizer(node, net)
        trained[impl] = (net, impl_of(opt.param_groups))
        for _ in range(20):
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert trained["auto"][1] == auto
    for a, b in zip(
        trained["auto"][0].parameters(), trained["single"][0].parameters(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_nccl_data_parallel_on_the_gpus_there_are(bprun, tmp_path):
    """trainer.devices=N on CUDA: NCCL, one GPU per rank (with 1 GPU, world size 1 through
    torchrun's module, the path a multi-GPU run takes). Prints throughput against one process."""
    import sys

    n = min(2, torch.cuda.device_count())
    args = ["dataset=digits", "model.hidden=[64]", "trainer.max_epochs=3", "trainer.device=cuda"]
    one = bprun(*args, "dataset.batch_size=64", f"hydra.run.dir={tmp_path}/one")
    many_dir = tmp_path / "many"
    if n > 1:
        many = bprun(
            *args, f"trainer.devices={n}", "dataset.batch_size=32", f"hydra.run.dir={many_dir}"
        )
    else:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
             "--master-addr=127.0.0.1", "--master-port=29533", "-m", "bprun", *args,
             "dataset.batch_size=64", "trainer.progress=false", f"hydra.run.dir={many_dir}"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        many = type(one)(proc, many_dir)
    assert many.metrics["world_size"] == n
    assert many.metrics["test"]["test/acc"] > 0.8
    rate = lambda r: r.metrics["history"][-1]["throughput/samples_per_s"]  # noqa: E731
    print(f"NCCL, {n} rank(s): {rate(many):.0f} samples/s; one process {rate(one):.0f}")
    assert abs(many.metrics["test"]["test/acc"] - one.metrics["test"]["test/acc"]) < 0.05


def test_maml_on_cuda_matches_the_cpu_and_runs_end_to_end(bprun):
    from bprun.meta import maml
    from bprun.meta.sine import SineTasks

    batch = SineTasks().sample(25, 10, 10, torch.Generator().manual_seed(0))
    grads = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
        )
        net = net.double().to(device)
        on_device = batch.to(device)
        support = tuple(t.double() for t in on_device.support)
        query = tuple(t.double() for t in on_device.query)
        maml.meta_loss(net, nn.MSELoss(), support, query, 1, 0.01).backward()
        grads[device] = [p.grad.cpu() for p in net.parameters()]
    for cpu, cuda in zip(grads["cpu"], grads["cuda"], strict=True):
        assert torch.allclose(cpu, cuda, rtol=1e-9, atol=1e-12)
    r = bprun("experiment=maml_sine", "meta.iterations=20", "trainer.device=cuda")
    assert r.metrics["status"] == "completed" and "on cuda" in r.output


def test_adversarial_training_on_cuda_in_16_mixed_stays_in_range_and_resumes_exactly():
    """uint8 images normalised on the GPU; PGD's random starts draw from the CUDA generator,
    which the checkpoint holds; the examples keep to eps and to the pixel range."""
    from bprun.data.augment import make_transforms, pixel_bounds
    from bprun.engine.adversarial import adversarial_callbacks, perturb
    from bprun.engine.settings import Adversarial, Attack

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (96, 3, 8, 8), generator=g, dtype=torch.uint8).cuda()
    y = torch.randint(0, 4, (96,), generator=g).cuda()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    train_tf, _ = make_transforms(raw, mean, std, None, torch.device("cuda"))
    bounds = pixel_bounds(raw, mean, std, None, torch.device("cuda"))
    low, high, unit = bounds
    assert low.device.type == "cuda"

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
        ).cuda()  # fmt: skip

    x = train_tf(raw)
    adv = perturb(cnn(), nn.CrossEntropyLoss(), x, y, Attack("pgd", 8 / 255, steps=3), bounds)
    assert ((adv - x).abs() <= 8 / 255 * unit + 1e-5).all()
    assert (adv >= low - 1e-5).all() and (adv <= high + 1e-5).all()

    def fit(epochs, state=None):
        s = TrainerSettings(
            progress=False, max_epochs=epochs, device="cuda", precision="16-mixed",
            adversarial=Adversarial("pgd", 8 / 255, steps=2, share=0.5),
        )  # fmt: skip
        m = cnn()
        t = Trainer(
            s, m, nn.CrossEntropyLoss(), torch.optim.SGD(m.parameters(), 0.05), device="cuda",
            num_classes=4, callbacks=adversarial_callbacks(s.adversarial, bounds),
        )  # fmt: skip
        if state is not None:
            t.load_state_dict(state)
        t.fit(InMemoryLoader(x, y, 32, shuffle=True), None)
        return t

    straight = fit(2)
    torch.cuda.manual_seed(99)
    resumed = fit(2, state=fit(1).state_dict())
    for k, v in straight.module.state_dict().items():
        assert torch.equal(resumed.module.state_dict()[k], v), k


def test_mixup_and_cutmix_on_cuda_give_soft_labels_on_the_device():
    from bprun.data.mixing import MixBatches

    x = torch.rand(64, 3, 16, 16, device="cuda")
    y = torch.randint(0, 10, (64,), device="cuda")
    mix = MixBatches(0.4, 1.0, 10)
    for _ in range(4):
        mixed, soft = mix.on_train_batch(None, x, y)
        assert mixed.device.type == soft.device.type == "cuda" and soft.shape == (64, 10)
        torch.testing.assert_close(soft.sum(1), torch.ones(64, device="cuda"))
