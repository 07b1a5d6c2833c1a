"""Model-agnostic meta-learning (Finn, Abbeel & Levine 2017), in plain autograd.

For a batch of tasks, each with a support set S_i and a query set Q_i:

    theta_i = theta - alpha * grad L(theta; S_i)          inner step(s), one copy per task
    theta  <- theta - beta * grad sum_i L(theta_i; Q_i)    outer step, through the inner ones

The outer gradient runs through the inner step: d theta_i / d theta = I - alpha * H_i, with
H_i the Hessian of the support loss, which autograd gets by differentiating the inner
gradient itself (`create_graph=True`). First-order MAML (FOMAML) drops that term and uses
the query gradient at theta_i as it is.

The network runs on weights held in a dict (`torch.func.functional_call`), one slice per
task: the model's parameters expanded to (tasks, *shape) without a copy, and the tasks
evaluated side by side with `torch.func.vmap`. The gradient of the sum of the tasks' losses
with respect to that stack is every task's own gradient.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

Params = dict[str, torch.Tensor]


def task_params(model: nn.Module, n_tasks: int) -> Params:
    """The trainable parameters, one (shared, uncopied) slice per task: (n_tasks, *shape)."""
    return {
        name: p.expand(n_tasks, *p.shape) for name, p in model.named_parameters() if p.requires_grad
    }


def task_losses(
    model: nn.Module, loss_fn: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """(tasks,) losses: task i's weights `params[..][i]` on its points x[i], y[i]."""

    def loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    return vmap(loss, randomness="different")(params, x, y)


def adapt(
    model: nn.Module,
    loss_fn: nn.Module,
    params: Params,
    support: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
    create_graph: bool,
) -> Params:
    """`steps` gradient steps of each task's weights on its support set. With `create_graph`
    the result stays differentiable through the gradients themselves (second order)."""
    x, y = support
    for _ in range(steps):
        loss = task_losses(model, loss_fn, params, x, y).sum()  # sum: each task's own gradient
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)
        params = {name: p - lr * g for (name, p), g in zip(params.items(), grads, strict=True)}
    return params


def meta_loss(
    model: nn.Module,
    loss_fn: nn.Module,
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
    first_order: bool = False,
) -> torch.Tensor:
    """The mean query loss of the adapted weights; its backward gives the meta-gradient in the
    model's `.grad` (FOMAML's with `first_order`)."""
    params = task_params(model, len(support[0]))
    adapted = adapt(model, loss_fn, params, support, steps, lr, create_graph=not first_order)
    return task_losses(model, loss_fn, adapted, *query).mean()


def adaptation_losses(
    model: nn.Module,
    loss_fn: nn.Module,
    support: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    lr: float,
) -> torch.Tensor:
    """(steps + 1, tasks): each task's query loss after 0, 1, ..., `steps` inner steps on its
    support set, from the model's weights (which stay as they are)."""
    params = {
        k: p.detach().requires_grad_() for k, p in task_params(model, len(support[0])).items()
    }
    losses = []
    for step in range(steps + 1):
        with torch.no_grad():
            losses.append(task_losses(model, loss_fn, params, *query))
        if step < steps:
            params = adapt(model, loss_fn, params, support, 1, lr, create_graph=False)
            params = {k: p.detach().requires_grad_() for k, p in params.items()}
    return torch.stack(losses)
