"""Recurrent nets (GRU, LSTM) over sequences (C, L) and images read row by row (C, H, W)."""

from __future__ import annotations

import torch
from torch import nn

from bprun.models.layers import dropout as make_dropout
from bprun.models.layers import sequence_dims, to_sequence

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
READOUTS = ("last", "mean", "flatten")


class RecurrentNet(nn.Module):
    """A stacked (optionally bidirectional) GRU or LSTM and a linear head.

    `readout` picks what the head sees:
      mean     the top layer's outputs averaged over time
      last     the final hidden state of the top layer (both directions if bidirectional)
      flatten  every time step's output side by side (the MNIST-1D paper's GRU;
               needs a fixed sequence length, which the input shape gives)
    `dropout` acts between stacked layers and on the features the head reads.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        cell: str = "gru",
        hidden_size: int = 64,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
        readout: str = "mean",
    ):
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown model.cell '{cell}': choose one of {', '.join(CELLS)}")
        steps, features = sequence_dims(input_shape, cell)
        if readout not in READOUTS:
            raise ValueError(
                f"unknown model.readout '{readout}': choose one of {', '.join(READOUTS)}"
            )
        if hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"model.hidden_size and model.num_layers must be at least 1, "
                f"got {hidden_size} and {num_layers}"
            )
        self.readout = readout
        self.dropout = make_dropout(dropout)
        self.rnn = CELLS[cell](
            features,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        directions = 2 if bidirectional else 1
        width = hidden_size * directions * (steps if readout == "flatten" else 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs, state = self.rnn(to_sequence(x))
        if self.readout == "flatten":
            features = outputs.flatten(1)
        elif self.readout == "mean":
            features = outputs.mean(1)
        else:
            final = state[0] if isinstance(state, tuple) else state  # LSTM: (h_n, c_n)
            directions = 2 if self.rnn.bidirectional else 1
            features = final[-directions:].transpose(0, 1).flatten(1)
        return self.head(self.dropout(features))


class GRU(RecurrentNet):
    """`model=gru`: a RecurrentNet with GRU cells."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, **kwargs):
        super().__init__(input_shape, num_classes, cell="gru", **kwargs)


class LSTM(RecurrentNet):
    """`model=lstm`: a RecurrentNet with LSTM cells."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, **kwargs):
        super().__init__(input_shape, num_classes, cell="lstm", **kwargs)
