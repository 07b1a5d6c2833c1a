"""`trainer.strategy=fsdp_tp trainer.tp=K`: tensor parallelism inside groups of K ranks, FSDP2
across the groups, on a 2-D device mesh (dp = world / K, tp = K), as torchtitan's
`parallelize_llama` does it.

A model that can be split this way says how in `tensor_parallel_plan(tp)`: its module names
(fnmatch patterns such as `blocks.*.attn.q`) mapped to `colwise` or `rowwise`. Each block's
query, key, value and first MLP layer are split by output columns (each rank computes its own
heads and its slice of the hidden units, from the whole input) and the attention output and
second MLP layer by input rows (each rank's partial product, summed by one all-reduce). So a
block costs two all-reduces forward and two backward, and each rank holds 1/K of its
matrices. Everything else (embeddings, norms, the head) stays replicated in the tp group and
is sharded by FSDP across the dp groups only. The attention modules read their LOCAL head
count from the width of their query (n_head / K under TP).

The ranks of a tp group compute on the same batch: the data is split over the dp dimension.
"""

from __future__ import annotations

import logging

from torch import nn

from bprun.errors import BprunError

log = logging.getLogger("bprun")

DIMS = ("dp", "tp")


def device_mesh(device_type: str, world_size: int, tp: int):
    """The (dp, tp) mesh over every rank: rank r is tp index r % tp of dp group r // tp."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=DIMS)


def data_shard(rank: int, world_size: int, tp: int) -> tuple[int, int]:
    """(index, count) of the data shard a rank reads: one per dp group, as `device_mesh` lays
    the ranks out."""
    return rank // tp, world_size // tp


def check(model_cfg, tp: int) -> None:
    """Before any rank starts: the configured model class has a plan, and `tp` divides each
    size its plan splits (`tensor_parallel_sizes(settings)`: heads, widths)."""
    from hydra.utils import get_class

    target = model_cfg.get("_target_")
    cls = get_class(target) if target else None
    sizes = getattr(cls, "tensor_parallel_sizes", None)
    if sizes is None:
        _no_plan(tp, target.rsplit(".", 1)[-1] if target else "this model")
    for what, n in sizes(model_cfg).items():
        if n % tp:
            raise BprunError(
                f"trainer.tp={tp} does not divide {what}={n}: each rank computes an equal "
                f"share of it, so use a trainer.tp that divides {n}"
            )


def _no_plan(tp: int, name: str):
    raise BprunError(
        f"trainer.tp={tp}: {name} has no tensor-parallel plan (model=gpt and model=transformer "
        "have one): use trainer.tp=1 with trainer.strategy=fsdp"
    )


def plan(model: nn.Module, tp: int) -> dict[str, str]:
    """The model's plan for `tp` ranks; one `error:` line where it has none or `tp` does not
    divide its heads or its widths (the model's own check)."""
    make = getattr(model, "tensor_parallel_plan", None)
    try:
        if make is None:
            _no_plan(tp, type(model).__name__)
        return make(tp)
    except BprunError as e:
        e.every_rank = True  # every rank builds the same model: rank 0 says it
        raise


def parallelize(model: nn.Module, tp_mesh) -> nn.Module:
    """Split the model's layers over the tp mesh dimension (in place): parameters of the
    planned layers become DTensors sharded over it."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    layers = plan(model, tp_mesh.size())
    parallelize_module(model, tp_mesh, {name: styles[kind]() for name, kind in layers.items()})
    log.info(
        f"tensor parallel: {len(layers)} layer pattern(s) split over {tp_mesh.size()} ranks "
        f"({', '.join(f'{n}: {k}' for n, k in list(layers.items())[:4])}); the rest replicated"
    )
    return model
