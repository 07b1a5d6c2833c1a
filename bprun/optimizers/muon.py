"""Muon for the hidden weight matrices, AdamW for everything else, as one optimizer.

Muon (Jordan et al. 2024; torch.optim.Muon) orthogonalises each 2-D update by
Newton-Schulz iterations; it is meant for hidden matrices only. Embeddings, the input
layer, the output head, norms and biases train with AdamW. The split is chosen from the
model and printed.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bprun.errors import BprunError

log = logging.getLogger("bprun")

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def hidden_matrices(model: nn.Module) -> set[int]:
    """ids of the 2-D weights Muon should train: every 2-D parameter except embeddings, the
    first weight layer (it reads the input) and the last Linear (the head)."""
    layers = [m for m in model.modules() if isinstance(m, WEIGHT_LAYERS)]
    outer = {id(layers[0]), id(layers[-1])} if layers else set()
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    if linears:
        outer.add(id(linears[-1]))
    hidden = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding) or id(module) in outer:
            continue
        for p in module.parameters(recurse=False):
            if p.ndim == 2:
                hidden.add(id(p))
    return hidden


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer (one state_dict, one set of param_groups for schedulers) stepping
    torch.optim.Muon's groups and torch.optim.AdamW's groups. Each group's `algorithm`
    says which; a scheduler scales both learning rates alike."""

    def __init__(
        self,
        params,
        model: nn.Module,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.01,
        adjust_lr_fn: str | None = "match_rms_adamw",
        adamw_lr: float = 0.003,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        adamw_weight_decay: float = 0.01,
    ):
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        hidden = hidden_matrices(model)
        names = {id(p): n for n, p in model.named_parameters()}
        muon_groups, adamw_groups = [], []
        for group in groups:
            mult = group.get("lr_mult", 1.0)
            rest = {k: v for k, v in group.items() if k not in ("params", "lr")}
            ps = list(group["params"])
            mu = [p for p in ps if id(p) in hidden]
            ad = [p for p in ps if id(p) not in hidden]
            if mu:
                muon_groups.append({**rest, "params": mu, "lr": lr * mult, "algorithm": "muon"})
            if ad:
                adamw_groups.append(
                    {**rest, "params": ad, "lr": adamw_lr * mult, "algorithm": "adamw"}
                )
        if not muon_groups:
            raise BprunError(
                f"optim=muon trains 2-D hidden weight matrices, and {type(model).__name__} has "
                "none (only its input layer, head, embeddings, convolutions, norms and biases): "
                "use optim=adamw"
            )
        try:
            self._muon = torch.optim.Muon(
                muon_groups,
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                ns_steps=ns_steps,
                weight_decay=weight_decay,
                adjust_lr_fn=adjust_lr_fn,
            )
            self._adamw = torch.optim.AdamW(
                adamw_groups or [{"params": [], "algorithm": "adamw"}],
                lr=adamw_lr,
                betas=tuple(adamw_betas),
                eps=adamw_eps,
                weight_decay=adamw_weight_decay,
                foreach=False,
            )
        except ValueError as e:
            raise BprunError(f"optim=muon: {e}") from None
        chosen = [self._muon.param_groups, self._adamw.param_groups if adamw_groups else []]
        super().__init__([g for part in chosen for g in part], {})
        muon_names = [names.get(id(p), "?") for g in muon_groups for p in g["params"]]
        adamw_names = [names.get(id(p), "?") for g in adamw_groups for p in g["params"]]
        log.info(f"Muon trains {len(muon_names)} hidden matrices: {', '.join(muon_names)}")
        log.info(f"AdamW trains the other {len(adamw_names)}: {', '.join(adamw_names)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The inner optimizers step this optimizer's groups and state (replaced on load).
        for inner, algorithm in ((self._muon, "muon"), (self._adamw, "adamw")):
            inner.param_groups = [g for g in self.param_groups if g["algorithm"] == algorithm]
            inner.state = self.state
            if inner.param_groups:
                inner.step()
        return loss
