"""Benchmark: what a rank holds under DDP, FSDP2 and FSDP2 with tensor parallelism (tp=2),
at 1, 2 and 4 ranks.

    python -m bprun.bench --fsdp [--ranks 1,2,4] [--model "gpt model.n_layer=12"]

Each configuration starts its ranks (gloo on the CPU, one thread each), builds the model as
`bprun` does (`model.<name>`: a model that reads token ids, the GPT, on windows of BLOCK
tokens from GPT-2's vocabulary; any other on MNIST-1D's shape), applies DDP or `fully_shard`
to each repeated block and the root (fsdp_tp: each layer split over 2 ranks first, then
`fully_shard` over the dp groups), takes one AdamW step and reports, per rank, the bytes of
parameters, gradients and optimizer state the rank holds. FSDP at N ranks must hold at most
1.1/N of DDP's. With CUDA, peak device memory per rank is reported too.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp
from torch import nn

TP = 2  # the tensor-parallel group of the fsdp_tp rows
VOCAB, BLOCK = 50304, 256  # the GPT's data: GPT-2's vocabulary padded to 64, its windows


def _strategies(world: int) -> tuple[str, ...]:
    return ("ddp", "fsdp", "fsdp_tp") if world % TP == 0 else ("ddp", "fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(spec: str) -> nn.Module:
    """`spec`: a model option and its overrides, e.g. `transformer model.dim=256`."""
    from hydra import compose, initialize_config_module
    from hydra.utils import get_object

    from bprun.build import build_model
    from bprun.config import register_configs

    register_configs()
    with initialize_config_module("bprun.conf", version_base="1.3"):
        name, *overrides = spec.split()
        cfg = compose("config", overrides=[f"model={name}", *overrides])
    if _reads_tokens(get_object(cfg.model._target_)):
        data = type("Shape", (), {"input_shape": (BLOCK,), "num_classes": VOCAB})()
    else:
        data = type("Shape", (), {"input_shape": (1, 40), "num_classes": 10})()
    torch.manual_seed(0)
    return build_model(cfg.model, data)


def _reads_tokens(model_class: type) -> bool:
    return getattr(model_class, "reads", None) == "tokens"  # what bprun.build checks too


def _batch(model: nn.Module) -> torch.Tensor:
    if _reads_tokens(type(model)):
        return torch.randint(0, VOCAB, (2, BLOCK))
    return torch.randn(8, 1, 40)


def _rank(rank: int, world: int, port: int, strategy: str, name: str, out) -> None:
    import torch.distributed as dist

    from bprun.engine import fsdp, tensor_parallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(name)
        if strategy in ("fsdp", "fsdp_tp"):
            from bprun.engine.settings import FSDP

            mesh = None
            if strategy == "fsdp_tp":
                mesh = tensor_parallel.device_mesh("cpu", world, TP)
                tensor_parallel.parallelize(model, mesh["tp"])
            model = fsdp.shard(model, FSDP(), "32", torch.device("cpu"), mesh and mesh["dp"])
            net = model
        else:
            net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        net(_batch(model)).square().mean().backward()
        optimizer.step()
        out[(strategy, world, rank)] = fsdp.state_bytes(model, optimizer)
    finally:
        dist.destroy_process_group()


def main(args) -> dict:
    ranks = [int(r) for r in str(args.ranks).split(",")]
    results = mp.get_context("spawn").Manager().dict()
    for world in ranks:
        for strategy in _strategies(world):
            port = _free_port()
            ctx = mp.get_context("spawn")
            procs = [
                ctx.Process(target=_rank, args=(r, world, port, strategy, args.model, results))
                for r in range(world)
            ]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
                if p.exitcode:
                    raise SystemExit(f"{strategy} at {world} ranks failed (exit {p.exitcode})")
    print(f"model={args.model}: bytes one rank holds after one AdamW step (rank 0)")
    print(f"{'ranks':>5} {'strategy':>8} {'params':>10} {'grads':>10} {'optim':>10} {'total':>10}"
          f" {'vs ddp':>8} {'bound':>7}")  # fmt: skip
    table = {}
    for world in ranks:
        ddp_total = sum(results[("ddp", world, 0)].values())
        for strategy in _strategies(world):
            b = results[(strategy, world, 0)]
            total = sum(b.values())
            ratio = total / ddp_total
            # fsdp_tp has no such bound: its embeddings stay whole within a tp group
            bound = {"ddp": "1.000", "fsdp": f"{1.1 / world:.3f}"}.get(strategy, "-")
            table[(strategy, world)] = {**b, "total": total, "ratio": ratio}
            print(
                f"{world:>5} {strategy:>8} {b['parameters']:>10,} {b['gradients']:>10,} "
                f"{b['optimizer']:>10,} {total:>10,} {ratio:>8.3f} {bound:>7}"
            )
    return table
