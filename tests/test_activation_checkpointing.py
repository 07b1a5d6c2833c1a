"""Activation checkpointing: what autograd keeps drops, gradients and BatchNorm do not change."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from bprun.build import build_model
from bprun.errors import BprunError
from bprun.models import CNN, GRU, MLP
from bprun.models.checkpointing import enable_activation_checkpointing, saved_tensor_bytes
from bprun.models.resnet import resnet
from bprun.models.transformer import Transformer

MODELS = {
    # a deep MLP with the usual block: Linear -> LayerNorm -> GELU -> dropout
    "deep mlp": (
        lambda: MLP((64,), 10, hidden=[128] * 8, activation="gelu", norm="layer", dropout=0.1),
        (32, 64),
    ),
    "resnet18": (lambda: resnet((3, 16, 16), 10), (4, 3, 16, 16)),
    "cnn": (lambda: CNN((1, 16, 16), 10, channels=[8, 16, 16], dropout=0.1), (8, 1, 16, 16)),
    "transformer": (lambda: Transformer((1, 16, 16), 10, depth=3, dropout=0.1), (4, 1, 16, 16)),
}


def step(model, x, y, seed=1):
    """One forward and backward (dropout masks drawn from `seed`); the gradients."""
    model.train()
    torch.manual_seed(seed)
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpointing_halves_saved_activations_with_the_same_gradients(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    plain = make()
    ckpt = copy.deepcopy(plain)
    assert enable_activation_checkpointing(ckpt) >= 3
    assert list(ckpt.state_dict()) == list(plain.state_dict())  # checkpoints load either way
    x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
    before = saved_tensor_bytes(plain, nn.functional.cross_entropy, x, y)
    after = saved_tensor_bytes(ckpt, nn.functional.cross_entropy, x, y)
    assert after <= 0.5 * before, f"{name}: {after} of {before} bytes kept"
    for g_plain, g_ckpt in zip(step(plain, x, y), step(ckpt, x, y), strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-5, atol=1e-6)
    # BatchNorm statistics move once per step, not again in the recomputation
    for (k, b_plain), b_ckpt in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.equal(b_ckpt, b_plain), k
    with torch.no_grad():  # evaluation does not recompute anything
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x))


def test_the_model_key_switches_it_on_and_training_follows_the_same_path():
    data = SimpleNamespace(input_shape=(12,), num_classes=3)
    node = {"_target_": "bprun.models.MLP", "hidden": [16, 16], "norm": "batch"}
    models = []
    for on in (False, True):
        torch.manual_seed(0)
        models.append(build_model(OmegaConf.create({**node, "activation_checkpointing": on}), data))
    x, y = torch.randn(20, 12), torch.randint(0, 3, (20,))
    for m in models:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for i in range(3):
            step(m, x, y, seed=i)
            opt.step()
            opt.zero_grad()
    plain, ckpt = (m.state_dict() for m in models)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6)
    assert saved_tensor_bytes(models[1], nn.functional.cross_entropy, x, y) < (
        saved_tensor_bytes(models[0], nn.functional.cross_entropy, x, y)
    )


def test_a_model_without_blocks_is_a_clear_error():
    with pytest.raises(BprunError, match="GRU has no blocks to checkpoint"):
        enable_activation_checkpointing(GRU((1, 10), 3))


def test_the_command_line_error_is_one_line(bprun):
    r = bprun("model=gru", "model.activation_checkpointing=true", check=False)
    assert r.returncode != 0 and "Traceback" not in r.output
    assert "has no blocks to checkpoint" in r.output
