"""`optim.impl`: the fastest kernel torch has, the same results, the same kernel after a resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from bprun.build import build_optimizer
from bprun.config import register_configs
from bprun.errors import BprunError
from bprun.optim import impl_of

CONF = Path(__file__).resolve().parents[1] / "conf"


def node(optim: str, *overrides: str):
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=[f"optim={optim}", *overrides]).optim


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 38, 10), nn.LayerNorm(10)
    )


def train(model: nn.Module, optim_node, updates: int = 30) -> nn.Module:
    opt = build_optimizer(optim_node, model)
    g = torch.Generator().manual_seed(1)
    for _ in range(updates):
        x, y = torch.randn(16, 1, 40, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize(
    "optim, auto",
    [("adam", "fused"), ("adamw", "fused"), ("momentum", "fused"), ("rmsprop", "single")],
)
def test_auto_picks_torchs_fastest_cpu_kernel(optim, auto):
    # On the CPU torch has fused kernels for Adam, AdamW, SGD and Adagrad, foreach kernels for none.
    opt = build_optimizer(node(optim), small_net())
    assert impl_of(opt.param_groups) == auto


@pytest.mark.parametrize("optim", ["adam", "adamw", "nesterov", "adagrad", "rmsprop", "nadam"])
def test_every_implementation_trains_to_the_single_tensor_result(optim):
    start = small_net()
    single = train(copy.deepcopy(start), node(optim, "optim.impl=single"))
    for impl in ("auto", "foreach") + (
        ("fused",) if optim in ("adam", "adamw", "nesterov") else ()
    ):
        other = train(copy.deepcopy(start), node(optim, f"optim.impl={impl}"))
        for (name, a), b in zip(single.named_parameters(), other.parameters(), strict=True):
            assert not torch.equal(a, start.state_dict()[name])  # it did train
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"{optim} {impl} {name}")


@pytest.mark.parametrize(
    "optim, impl, message",
    [
        ("rmsprop", "fused", "optim.impl=fused: RMSprop has no fused kernel: use optim.impl=auto"),
        ("lbfgs", "foreach", "LBFGS has no foreach implementation: use optim.impl=auto"),
        ("adam", "fast", "optim.impl='fast' is not known: choose one of auto, fused"),
    ],
)
def test_impossible_choices_are_one_line_errors(optim, impl, message):
    with pytest.raises(BprunError, match=message):
        build_optimizer(node(optim, f"optim.impl={impl}"), small_net())


def test_fused_on_a_device_without_kernels_is_refused(monkeypatch):
    import torch.utils._foreach_utils as fu

    monkeypatch.setattr(fu, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    with pytest.raises(BprunError, match="Adam has no fused kernel on {'cpu'}"):
        build_optimizer(node("adam", "optim.impl=fused"), small_net())
    opt = build_optimizer(node("adam", "optim.impl=auto"), small_net())
    assert impl_of(opt.param_groups) == "single"  # auto falls back instead


def test_setting_torchs_own_flag_points_at_impl():
    with pytest.raises(BprunError, match=r"optim.fused is set by bprun: use optim.impl="):
        build_optimizer(node("adam", "+optim.fused=true"), small_net())


def test_choice_is_printed_recorded_and_kept_on_resume(bprun, tmp_path):
    first = bprun("trainer.max_epochs=2", "optim.impl=foreach")
    assert "optimizer Adam, foreach implementation (optim.impl=foreach)" in first.output
    metrics = json.loads((first.run_dir / "metrics.json").read_text())
    assert metrics["optimizer"] == {"name": "Adam", "impl": "foreach"}
    saved = torch.load(first.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert impl_of(saved["optimizer"]["param_groups"]) == "foreach"

    # the run's own command line resumes with its kernel; another kernel is refused
    again = bprun(f"trainer.resume={first.run_dir}", "trainer.max_epochs=3")
    assert "foreach implementation" in again.output
    refused = bprun(
        f"trainer.resume={first.run_dir}", "trainer.max_epochs=4", "optim.impl=fused", check=False
    )
    assert refused.returncode != 0 and "Traceback" not in refused.output
    assert "was trained with optim.impl=foreach, this run would step with fused" in refused.output
