"""K-FAC: Kronecker-factored approximate natural gradient (Martens & Grosse 2015; Grosse &
Martens 2016 for convolutions), written on autograd hooks.

For each supported layer (Linear, Conv1d, Conv2d, not grouped) the Fisher block of its
weight (and bias, as one extra input column) is approximated by A (x) G, with

    A = E[a a^T]   a: the layer's inputs (conv: unfolded patches), 1 appended for the bias
    G = E[g g^T]   g: the gradient of the loss w.r.t. the layer's outputs, times the batch size

taken from the training loss's own backward pass (the empirical Fisher, as kfac-pytorch does
by default: no second backward). The gradient matrix dW (out x in[+1]) becomes

    V = (G + gamma/pi I)^-1 dW (A + pi gamma I)^-1,   gamma = sqrt(damping)

(factored Tikhonov damping, pi = sqrt((tr A / dim A) / (tr G / dim G))). All V are then
scaled by nu = min(1, sqrt(kl_clip / (lr^2 sum <V, dW>))) (KL clipping) and SGD with
momentum steps with them. Parameters of other layers (norms, embeddings, attention's
fused projections) keep their plain gradients and take the same SGD step.

Factors are running averages (`factor_decay`) updated every `factor_every` updates; the
damped inverses are recomputed every `inverse_every` updates. Both live in the optimizer
state, keyed by the layer's weight, so checkpoints hold them and resume is exact.
Under DDP each rank's new factors are all-reduced to their mean before they enter the
running average: every rank holds the same factors and inverses.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import nn

from bprun.errors import BprunError

log = logging.getLogger("bprun")

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class KFAC(torch.optim.SGD):
    """SGD with momentum on K-FAC-preconditioned gradients for `model`'s Linear and conv layers.

    `params`: the parameters (or groups) to train, all of `model`'s. The damping starts at
    `damping` and is multiplied by `damping_decay` every `damping_decay_every` updates, down
    to `damping_min`.
    """

    def __init__(
        self,
        params,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        damping: float = 0.1,
        damping_decay: float = 1.0,
        damping_decay_every: int = 100,
        damping_min: float = 1e-4,
        factor_decay: float = 0.95,
        factor_every: int = 1,
        inverse_every: int = 10,
        kl_clip: float | None = 1e-3,
    ):
        if not damping > 0:
            raise BprunError(f"optim.damping must be > 0, got {damping}: try 1e-3 to 1e-1")
        if not damping_min > 0:
            raise BprunError(f"optim.damping_min must be > 0, got {damping_min}")
        if not 0 < damping_decay <= 1:
            raise BprunError(f"optim.damping_decay must be in (0, 1], got {damping_decay}")
        if not 0 <= factor_decay < 1:
            raise BprunError(f"optim.factor_decay must be in [0, 1), got {factor_decay}")
        for key, value in (
            ("factor_every", factor_every),
            ("inverse_every", inverse_every),
            ("damping_decay_every", damping_decay_every),
        ):
            if not isinstance(value, int) or value < 1:
                raise BprunError(f"optim.{key} must be a whole number >= 1, got {value}")
        if kl_clip is not None and not kl_clip > 0:
            raise BprunError(f"optim.kl_clip must be > 0 or null (no clipping), got {kl_clip}")
        super().__init__(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
        )
        self.damping, self.damping_decay = damping, damping_decay
        self.damping_decay_every, self.damping_min = damping_decay_every, damping_min
        self.factor_decay, self.factor_every = factor_decay, factor_every
        self.inverse_every, self.kl_clip = inverse_every, kl_clip
        trained = {id(p) for g in self.param_groups for p in g["params"]}
        self.layers: dict[str, nn.Module] = {}
        left: list[str] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if id(p) in trained]
            if not own:
                continue
            if _supported(module, model):
                self.layers[name or "(model)"] = module
            else:
                left.append(f"{name or '(model)'} ({type(module).__name__})")
        if not self.layers:
            raise BprunError(
                f"optim=kfac preconditions Linear, Conv1d and Conv2d layers, and "
                f"{type(model).__name__} has none with trainable weights: pick another optim "
                "(e.g. optim=adamw)"
            )
        self.left_to_sgd = left
        log.info(
            f"K-FAC preconditions {len(self.layers)} layers ({', '.join(self.layers)})"
            + (f"; plain SGD for {', '.join(left)}" if left else "")
        )
        self._stats: dict[nn.Module, list] = {}  # module -> [sum aa^T, sum gg^T, batches]
        self._capture = True  # collect statistics in the coming backward passes
        self._handles = [m.register_forward_hook(self._watch) for m in self.layers.values()]

    # ------------------------------------------------------------------ hooks
    def _watch(self, module, args, output) -> None:
        """Forward of a training batch: keep the input, catch the output's gradient."""
        if self._capture and module.training and output.requires_grad:
            a = args[0].detach()
            output.register_hook(lambda g: self._accumulate(module, a, g))

    def _accumulate(self, module, a: torch.Tensor, g: torch.Tensor) -> None:
        batch = g.shape[0]
        dtype = module.weight.dtype  # autocast's half-precision activations, in full
        a = _patches(module, a.to(dtype))
        g = (
            _output_rows(module, g.detach()).to(dtype) * batch
        )  # undo the loss's mean over the batch
        aa = a.T @ a / a.shape[0]
        gg = g.T @ g / g.shape[0]
        stats = self._stats.get(module)
        if stats is None:
            self._stats[module] = [aa, gg, 1]
        else:
            stats[0] += aa
            stats[1] += gg
            stats[2] += 1

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._capture = self._updates() % self.factor_every == 0
        self._stats.clear()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    # ------------------------------------------------------------------ step
    def current_damping(self) -> float:
        updates = self._updates()
        decayed = self.damping * self.damping_decay ** (updates // self.damping_decay_every)
        return max(self.damping_min, decayed) if self.damping_decay < 1 else self.damping

    def _updates(self) -> int:
        return int(self.param_groups[0].get("kfac_updates", 0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updates = self._updates()
        if self._stats:
            self._update_factors()
        if updates % self.inverse_every == 0:
            self._update_inverses()
        self._precondition()
        for group in self.param_groups:
            group["kfac_updates"] = updates + 1
        super().step()
        self._capture = (updates + 1) % self.factor_every == 0
        return loss

    def _update_factors(self) -> None:
        world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
        for module, (aa, gg, n) in self._stats.items():
            aa, gg = aa / n, gg / n
            if world > 1:  # every rank holds the mean of the ranks' factors
                both = torch.cat([aa.flatten(), gg.flatten()])
                torch_dist.all_reduce(both)
                both /= world
                aa, gg = both[: aa.numel()].view_as(aa), both[aa.numel() :].view_as(gg)
            state = self.state[module.weight]
            if "kfac_A" not in state:
                state["kfac_A"], state["kfac_G"] = aa, gg
            else:
                state["kfac_A"].lerp_(aa, 1 - self.factor_decay)
                state["kfac_G"].lerp_(gg, 1 - self.factor_decay)
        self._stats.clear()

    def _update_inverses(self) -> None:
        gamma = math.sqrt(self.current_damping())
        for module in self.layers.values():
            state = self.state[module.weight]
            if "kfac_A" in state:
                state["kfac_A_inv"], state["kfac_G_inv"] = damped_inverses(
                    state["kfac_A"], state["kfac_G"], gamma
                )

    def _precondition(self) -> None:
        done = []
        for module in self.layers.values():
            state = self.state[module.weight]
            if "kfac_A_inv" not in state or module.weight.grad is None:
                continue
            grad = _grad_matrix(module)
            v = state["kfac_G_inv"] @ grad @ state["kfac_A_inv"]
            done.append((module, grad, v))
        if not done:
            return
        nu = 1.0
        if self.kl_clip is not None:
            lr = self.param_groups[0]["lr"]
            vg = sum((v * grad).sum() for _, grad, v in done) * lr**2
            nu = torch.clamp(torch.sqrt(self.kl_clip / vg.clamp_min(1e-30)), max=1.0)
        for module, _, v in done:
            v = v * nu
            weight = module.weight
            if module.bias is not None and module.bias.grad is not None:
                module.bias.grad.copy_(v[:, -1])
                v = v[:, :-1]
            weight.grad.copy_(v.reshape(weight.shape))

    def preconditioned(self) -> dict[str, torch.Tensor]:
        """Each layer's preconditioned gradient matrix (out x in[+1]) for the gradients now in
        `.grad`, before KL clipping and the SGD step: for tests and inspection."""
        out = {}
        for name, module in self.layers.items():
            state = self.state[module.weight]
            if "kfac_A_inv" in state and module.weight.grad is not None:
                out[name] = state["kfac_G_inv"] @ _grad_matrix(module) @ state["kfac_A_inv"]
        return out


def damped_inverses(A: torch.Tensor, G: torch.Tensor, gamma: float):
    """((A + pi gamma I)^-1, (G + gamma/pi I)^-1): factored Tikhonov damping, pi balancing the
    two factors' mean eigenvalues."""
    pi = torch.sqrt((A.trace() / A.shape[0]) / (G.trace() / G.shape[0]).clamp_min(1e-30))
    pi = pi.clamp(1e-6, 1e6)
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.inv(A + pi * gamma * eye_a), torch.linalg.inv(G + gamma / pi * eye_g)


def _supported(module: nn.Module, model: nn.Module) -> bool:
    if not isinstance(module, SUPPORTED):
        return False
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        return False
    # MultiheadAttention uses its out_proj's weight directly: the module's hooks never fire.
    return not any(
        isinstance(m, nn.MultiheadAttention) and module is m.out_proj for m in model.modules()
    )


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows (conv: one row per output position), 1 appended for a bias."""
    if isinstance(module, nn.Linear):
        a = x.reshape(-1, x.shape[-1])
    else:
        if isinstance(module.padding, str):
            raise BprunError(
                f"optim=kfac cannot unfold {type(module).__name__} with padding="
                f"'{module.padding}': give the padding as a number"
            )
        k, s, p, d = module.kernel_size, module.stride, module.padding, module.dilation
        if isinstance(module, nn.Conv1d):  # a Conv2d of height 1
            x = x.unsqueeze(2)
            k, s, p, d = (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0])
        a = F.unfold(x, k, dilation=d, padding=p, stride=s)  # (N, C*k, L)
        a = a.transpose(1, 2).reshape(-1, a.shape[1])
    if module.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return a


def _output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as rows: one per example (Linear: per position too), conv per position."""
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1])
    return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])


def _grad_matrix(module: nn.Module) -> torch.Tensor:
    grad = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        bias = module.bias.grad
        if bias is None:
            bias = torch.zeros_like(module.bias)
        grad = torch.cat([grad, bias.unsqueeze(1)], dim=1)
    return grad
