"""`task=gradcheck`: autograd against finite differences on one small batch of the
configured data, model and loss; writes gradcheck.json (see `bprun.diagnostics.gradcheck`)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bprun.build import build_data, build_loss, build_model, build_problem
from bprun.diagnostics.gradcheck import check_gradients, table
from bprun.diagnostics.settings import GradcheckSettings
from bprun.errors import BprunError
from bprun.io import write_json
from bprun.tasks.setup import seed_everything, setup_device, trainer_settings

log = logging.getLogger("bprun")


def run(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> float:
    """Build the configured data, model and loss, check one small batch, write gradcheck.json;
    a BprunError naming the failing parameters when any fails."""
    s: GradcheckSettings = OmegaConf.to_object(cfg.gradcheck)
    device = setup_device(trainer_settings(cfg))
    if device.type == "mps":
        device = torch.device("cpu")  # no float64 on MPS
    data = build_data(cfg.dataset, device, cfg.seed)
    seed_everything(cfg.seed)
    problem = build_problem(cfg.get("problem"), data.dataset, cfg.get("metrics"))
    model = build_model(cfg.model, data.dataset, problem).to(device)
    loss_fn = problem.criterion(build_loss(cfg.loss, problem, data))
    x, y = next(data.train.batches(0))
    x, y = x[: s.batch_size], y[: s.batch_size]
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    how = "every coordinate" if n_params < s.full_below else f"{s.max_coords} coordinates/tensor"
    log.info(
        f"gradient check of {type(model).__name__} ({n_params:,} parameters, {how}) with "
        f"{type(loss_fn).__name__} on {len(x)} samples, float64, eps={s.eps:g}"
    )
    results = check_gradients(model, loss_fn, x, y, s)
    failed = [r for r in results if not r.passed]
    path = write_json(
        {
            "passed": not failed,
            "threshold": s.threshold,
            "eps": s.eps,
            "floor": s.floor,
            "batch_size": len(x),
            "parameters": [asdict(r) for r in results],
        },
        Path(run_dir) / "gradcheck.json",
    )
    log.info("\n" + table(results))
    worst = max(r.max_rel_error for r in results)
    if failed:
        names = ", ".join(f"{r.name} ({r.max_rel_error:.2e})" for r in failed)
        raise BprunError(
            f"gradient check failed for {names}: autograd disagrees with finite differences "
            f"beyond gradcheck.threshold={s.threshold:g}; fix the backward of the layers that "
            f"own them (details in {path})"
        )
    kinks = sum(r.kinks for r in results)
    log.info(
        f"gradient check passed: max relative error {worst:.2e} <= {s.threshold:g}"
        + (f" ({kinks} coordinates at kinks left out)" if kinks else "")
        + f"; wrote {path}"
    )
    return worst
