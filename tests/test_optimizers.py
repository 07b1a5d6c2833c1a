"""K-FAC, Muon, Adafactor, Shampoo, SOAP and schedule-free AdamW: the maths, the split, resume, errors."""

from __future__ import annotations

import json
import math
import signal
import sys

import pytest
import torch
from test_checkpoint import model_state, resumed_at, saved_update, start, wait_for_update
from test_optim_impl import node
from torch import nn

from bprun.build import build_optimizer
from bprun.errors import BprunError
from bprun.optimizers.kfac import KFAC


def explicit_natural_gradient(a, g, grad, damping):
    """(A (x) G + damping, factored) ^-1 vec(grad), from a full Kronecker product and a solve."""
    A, G = a.T @ a / len(a), g.T @ g / len(g)
    gamma = math.sqrt(damping)
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]))
    fisher = torch.kron(
        G + gamma / pi * torch.eye(G.shape[0], dtype=G.dtype),
        A + pi * gamma * torch.eye(A.shape[0], dtype=A.dtype),
    )
    return torch.linalg.solve(fisher, grad.flatten()).view_as(grad)


def test_kfac_step_is_the_explicit_kronecker_factored_natural_gradient():
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float64)
    try:
        first, second = nn.Linear(4, 6), nn.Linear(6, 3)
        model = nn.Sequential(first, nn.Tanh(), second)
        damping = 0.05
        opt = KFAC(
            model.parameters(), model, lr=0.0, momentum=0.0, damping=damping,
            factor_decay=0.0, inverse_every=1, kl_clip=None,
        )  # fmt: skip
        x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        h_in = x
        s1 = first(h_in)
        h = torch.tanh(s1)
        s2 = second(h)
        for s in (s1, s2):
            s.retain_grad()
        nn.functional.cross_entropy(s2, y).backward()
        explicit = []
        for layer, inputs, s in ((first, h_in, s1), (second, h, s2)):
            a = torch.cat([inputs.detach(), torch.ones(len(inputs), 1)], dim=1)
            grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
            explicit.append(explicit_natural_gradient(a, s.grad * len(x), grad, damping))
            undamped = explicit_natural_gradient(a, s.grad * len(x), grad, 1e-12)
            assert not torch.allclose(explicit[-1], undamped, rtol=1e-3)  # damping matters here
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # through the optimizer's hooks
        opt.step()  # lr 0: the parameters stay, their .grad holds the preconditioned gradient
        for layer, want in zip((first, second), explicit, strict=True):
            got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    finally:
        torch.set_default_dtype(torch.float32)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def _global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def _ddp_rank(rank: int, world: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        net = _net()
        ddp = DistributedDataParallel(net)
        x, y = _global_batch()
        share = slice(rank * 8, (rank + 1) * 8)  # each rank half of the global batch
        kfac = _kfac_steps_on(ddp, net, x[share], y[share])
        torch.save(kfac, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _kfac_steps_on(wrapped, net, x, y, steps=4):
    opt = KFAC(net.parameters(), net, lr=0.1, momentum=0.9, inverse_every=2)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(wrapped(x), y).backward()  # DDP averages the gradients
        opt.step()
    factors = {k: v for k, v in opt.state[net[0].weight].items() if k.startswith("kfac_")}
    return factors, net.state_dict()


@pytest.mark.slow
def test_kfac_under_ddp_holds_one_set_of_factors_and_trains_like_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    x, y = _global_batch()
    net = _net()
    one_factors, one_weights = _kfac_steps_on(net, net, x, y)
    assert set(ranks[0][0]) == {"kfac_A", "kfac_G", "kfac_A_inv", "kfac_G_inv"}
    for name, value in ranks[0][0].items():
        # all-reduced: the ranks' factors and inverses are the same tensors, bit for bit,
        # and those of the whole global batch in one process
        assert torch.equal(value, ranks[1][0][name]), name
        torch.testing.assert_close(value, one_factors[name], rtol=1e-5, atol=1e-6)
    for name, value in one_weights.items():
        assert torch.equal(ranks[0][1][name], ranks[1][1][name]), name
        torch.testing.assert_close(ranks[0][1][name], value, rtol=1e-5, atol=1e-6)


def test_kfac_lists_the_layers_it_leaves_to_sgd(caplog):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with caplog.at_level("INFO", logger="bprun"):
        opt = KFAC(model.parameters(), model)
    assert list(opt.layers) == ["0", "2"]
    assert "plain SGD for 1 (LayerNorm)" in caplog.text


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    from bprun.models import Transformer

    model = Transformer(input_shape=(1, 40), num_classes=10)
    opt = build_optimizer(node("muon"), model)
    names = {id(p): n for n, p in model.named_parameters()}
    by = {g["algorithm"]: {names[id(p)] for p in g["params"]} for g in opt.param_groups}
    assert "encoder.layers.0.self_attn.q.weight" in by["muon"]
    assert "encoder.layers.1.linear2.weight" in by["muon"]
    assert {"embed.weight", "head.weight", "head.bias", "norm.weight", "pos"} <= by["adamw"]
    assert all(
        p.ndim == 2 for g in opt.param_groups if g["algorithm"] == "muon" for p in g["params"]
    )


@pytest.mark.parametrize(
    "optim, model, message",
    [
        ("kfac", nn.Sequential(nn.BatchNorm1d(4)), "optim=kfac preconditions Linear, Conv1d"),
        ("muon", nn.Sequential(nn.Linear(4, 2)), "optim=muon trains 2-D hidden weight matrices"),
    ],
)
def test_an_optimizer_without_layers_it_can_train_is_an_error(optim, model, message):
    with pytest.raises(BprunError, match=message):
        build_optimizer(node(optim), model)


@pytest.mark.parametrize("damping", ["0", "-0.1"])
def test_kfac_damping_must_be_positive(damping):
    with pytest.raises(BprunError, match=r"optim.damping must be > 0, got"):
        build_optimizer(node("kfac", f"optim.damping={damping}"), nn.Linear(3, 2))


@pytest.mark.parametrize(
    "optim, library",
    [("soap", "pytorch_optimizer"), ("adamw_schedulefree", "pytorch_optimizer"),
     ("shampoo", "heavyball")],
)  # fmt: skip
def test_a_missing_library_names_the_extra_to_install(optim, library, monkeypatch):
    monkeypatch.setitem(sys.modules, library, None)  # import fails as if absent
    with pytest.raises(BprunError, match=r"pip install 'bprun\[optim\]'"):
        build_optimizer(node(optim), nn.Linear(3, 2))


def test_shampoo_state_loads_as_weights_only_and_carries_no_pickle(tmp_path):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = build_optimizer(node("shampoo"), model)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 6)).square().mean().backward()
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert "precond_schedule" not in saved["heavyball"]  # heavyball would unpickle it
    assert saved["state"], "the Kronecker factors are in the state"
    again = build_optimizer(node("shampoo"), model)
    again.load_state_dict(saved)
    assert again.precond_schedule == opt.precond_schedule == 1 / 2  # rebuilt from the config


def test_bad_optimizer_input_on_the_command_line_is_one_error_line(bprun):
    result = bprun("model=logreg", "optim=muon", check=False)
    assert result.returncode != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "optim=muon trains 2-D hidden weight matrices" in errors[0]
    assert not result.run_dir.exists()


# Each new optimizer, killed mid-run and resumed, ends on the uninterrupted run's weights:
# K-FAC's factors and inverses (refreshed every 3 updates, so the kill lands between two),
# Muon's and AdamW's moments, Adafactor's factored moments, Shampoo's factors and eigenbases, SOAP's eigenbases, and
# schedule-free's averaged weights (checkpoints hold them; resume swaps back).
NEW_OPTIMIZERS = {
    "kfac": ["optim.inverse_every=3", "optim.factor_every=2"],
    "muon": [],
    "adafactor": [],
    "shampoo": ["optim.precondition_frequency=3"],
    "soap": ["optim.precondition_frequency=3"],
    "adamw_schedulefree": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("optim", list(NEW_OPTIMIZERS))
def test_sigkill_then_resume_is_exact(optim, bprun, data_dir, tmp_path):
    args = [
        "model=mlp",
        "model.hidden=[32,32]",
        f"optim={optim}",
        *NEW_OPTIMIZERS[optim],
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=8",
        "trainer.checkpoint.every_n_updates=1",
    ]
    reference = bprun(*args, f"hydra.run.dir={tmp_path}/ref")
    run_dir = tmp_path / "killed"
    last = run_dir / "checkpoints" / "last.pt"
    proc = start(args, data_dir, run_dir)
    wait_for_update(proc, last, 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed_from = saved_update(last)
    assert resumed_from < 16, "the run finished before it was killed"
    proc = start([f"trainer.resume={run_dir}"], data_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert resumed_at(resumed_from, out), out
    expected, got = model_state(reference.run_dir), model_state(run_dir)
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{optim}: {k} differs after the resume"
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["test"] == reference.metrics["test"]


def test_the_bench_counts_updates_to_the_target_on_the_char_gpt(capsys):
    from bprun.bench.optimizers import main

    # a target every run meets at its first validation (update 2), one no run can meet
    main(["--models=gpt", "--optims=adamw", "--seeds=1", "--updates=4", "--val-every=2",
          "--target=10"])  # fmt: skip
    main(["--models=gpt", "--optims=muon", "--seeds=1", "--updates=2", "--val-every=2",
          "--target=0.01"])  # fmt: skip
    out = capsys.readouterr().out
    assert "gpt on the embedded corpus (chars): target val/loss 10.0, 4 updates" in out
    assert "| adamw | 1/1 | 2 ± 0 |" in out
    assert "| muon | 0/1 | - | - |" in out
