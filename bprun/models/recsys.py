"""Recommenders over user and item indices: matrix factorisation and neural collaborative
filtering (He et al., 2017, "Neural Collaborative Filtering": GMF and an MLP, fused).

Input: a long tensor (B, 1 + C), the user's index then C candidate items; output (B, C)
scores. A user alone (B, 1) is scored against every item, (B, num_classes), in one batched
product for MF and in chunks of users for NCF. The embeddings take sparse gradients when the
optimizer asks for them (`optim=sparse_adam` sets `nn.Embedding.sparse`).
"""

from __future__ import annotations

import torch
from torch import nn


class Recommender(nn.Module):
    """Splits the input into users and candidate items; subclasses score (users, items) pairs."""

    reads = "interactions"  # (user, item) ids in (what bprun.build checks before building)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        users = x[:, 0].long()
        if x.shape[1] == 1:
            return self.score_all(users)
        items = x[:, 1:].long()
        return self.score(users.view(-1, 1).expand_as(items), items)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        items = torch.arange(self.num_items, device=users.device)
        rows = []
        for lo in range(0, len(users), self.all_chunk):  # bounded memory: chunk x items pairs
            u = users[lo : lo + self.all_chunk]
            rows.append(
                self.score(u.view(-1, 1).expand(-1, self.num_items), items.expand(len(u), -1))
            )
        return torch.cat(rows) if rows else items.new_zeros((0, self.num_items), dtype=torch.float)

    all_chunk = 256


class MF(Recommender):
    """score(u, i) = <p_u, q_i> + b_u + b_i + b: matrix factorisation with biases."""

    def __init__(
        self,
        input_shape=None,
        num_classes: int = 0,
        num_users: int = 0,
        dim: int = 32,
        init_std: float = 0.01,
    ):
        super().__init__()
        self.num_items = num_classes
        self.user = nn.Embedding(num_users, dim)
        self.item = nn.Embedding(num_classes, dim)
        self.user_bias = nn.Embedding(num_users, 1)
        self.item_bias = nn.Embedding(num_classes, 1)
        self.bias = nn.Parameter(torch.zeros(()))
        for e in (self.user, self.item):
            nn.init.normal_(e.weight, std=init_std)
        for e in (self.user_bias, self.item_bias):
            nn.init.zeros_(e.weight)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        dot = (self.user(users) * self.item(items)).sum(-1)
        return (
            dot + self.user_bias(users).squeeze(-1) + self.item_bias(items).squeeze(-1) + self.bias
        )

    def score_all(self, users: torch.Tensor) -> torch.Tensor:
        # one (B, dim) x (dim, items) product: every item for every user at once
        return (
            self.user(users) @ self.item.weight.T
            + self.user_bias(users)
            + self.item_bias.weight.T
            + self.bias
        )


class NCF(Recommender):
    """NeuMF: a GMF branch (the element-wise product of `gmf_dim` embeddings) and an MLP branch
    (`mlp_dim` user and item embeddings, concatenated, through `layers` with ReLU), their last
    layers concatenated into one linear score. Each branch has its own embeddings."""

    def __init__(
        self,
        input_shape=None,
        num_classes: int = 0,
        num_users: int = 0,
        gmf_dim: int = 16,
        mlp_dim: int = 16,
        layers: list[int] = (32, 16, 8),
        dropout: float = 0.0,
        init_std: float = 0.01,
    ):
        super().__init__()
        self.num_items = num_classes
        self.gmf_user = nn.Embedding(num_users, gmf_dim)
        self.gmf_item = nn.Embedding(num_classes, gmf_dim)
        self.mlp_user = nn.Embedding(num_users, mlp_dim)
        self.mlp_item = nn.Embedding(num_classes, mlp_dim)
        blocks, width = [], 2 * mlp_dim
        for size in layers:
            blocks += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                blocks.append(nn.Dropout(dropout))
            width = size
        self.mlp = nn.Sequential(*blocks)
        self.out = nn.Linear(gmf_dim + width, 1)
        for e in (self.gmf_user, self.gmf_item, self.mlp_user, self.mlp_item):
            nn.init.normal_(e.weight, std=init_std)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = self.gmf_user(users) * self.gmf_item(items)
        mlp = self.mlp(torch.cat([self.mlp_user(users), self.mlp_item(items)], -1))
        return self.out(torch.cat([gmf, mlp], -1)).squeeze(-1)
