"""LSTM models as ``nn.Sequential`` lists of blocks, one LSTM layer per block, so that a
model splits into groups by LSTM layers.

- ``lstm``: a sequence classifier (sequential Fashion-MNIST reads an image row by row): LSTM
  layers of 128 units, then the last step's output through a linear layer.
- ``lstm-lm``: a word-level language model (Zaremba et al., 2014, "medium": 650-unit
  embedding and two 650-unit LSTM layers, dropout 0.5), a linear decoder to the vocabulary at
  every step. Its LSTM layers carry their state from one window of a batch to the next
  (truncated backprop through time); ``reset_states`` starts afresh (epoch, evaluation).

Neuron groups (GN-DGL): an LSTM layer of H units becomes G independent LSTMs of H/G units;
a layer that mixes (the first of a layer group) gives each of them the full input, the others
only their own slice of it.
"""

from __future__ import annotations

import torch
from torch import nn


class LSTMLayer(nn.Module):
    """One LSTM layer (batch first) of ``hidden`` units as ``groups`` independent LSTMs;
    with ``stateful`` its final state starts the next call (rows matched by position, see
    ``reset_states``), detached."""

    def __init__(
        self,
        cin: int,
        hidden: int,
        *,
        groups: int = 1,
        mix: bool = True,
        stateful: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if hidden % groups or (not mix and cin % groups):
            raise ValueError(
                f"an LSTM layer of {cin} -> {hidden} units does not split into "
                f"{groups} neuron groups"
            )
        self.groups, self.mix, self.stateful = groups, mix, stateful
        self.cells = nn.ModuleList(
            nn.LSTM(cin if mix else cin // groups, hidden // groups, batch_first=True)
            for _ in range(groups)
        )
        self.dropout = nn.Dropout(dropout)
        self.hidden = hidden
        self.reset_state(None)

    def reset_state(self, rows: int | None) -> None:
        """Forget the carried state; the next calls cover ``rows`` rows in turn (a batch cut
        into micro-batches is called chunk by chunk, in order)."""
        self.rows, self.state, self.cursor = rows, None, 0

    def _initial(self, x: torch.Tensor):
        n = x.shape[0]
        rows = self.rows or n
        if self.state is None or self.state[0].shape[0] != rows:
            zeros = x.new_zeros(rows, self.hidden)
            self.state, self.cursor = (zeros, zeros), 0
        if self.cursor + n > rows:
            raise ValueError(f"a call of {n} rows does not fit the carried state of {rows}")
        return tuple(s[self.cursor : self.cursor + n] for s in self.state)

    def _carry(self, h: torch.Tensor, c: torch.Tensor) -> None:
        n, rows = h.shape[0], self.state[0].shape[0]
        a, b = self.cursor, self.cursor + n
        self.state = tuple(
            torch.cat([old[:a], new.detach(), old[b:]]) for old, new in zip(self.state, (h, c))
        )
        self.cursor = b % rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = [x] * self.groups if self.mix else list(x.chunk(self.groups, dim=-1))
        if self.stateful:
            h0, c0 = (s.chunk(self.groups, dim=-1) for s in self._initial(x))
        outs, hs, cs = [], [], []
        for g, (cell, inp) in enumerate(zip(self.cells, inputs)):
            state = (h0[g][None].contiguous(), c0[g][None].contiguous()) if self.stateful else None
            out, (h, c) = cell(inp, state)
            outs.append(out)
            hs.append(h[0])
            cs.append(c[0])
        if self.stateful:
            self._carry(torch.cat(hs, -1), torch.cat(cs, -1))
        return self.dropout(torch.cat(outs, -1))


def reset_states(module: nn.Module, rows: int | None) -> None:
    """Reset the carried state of every stateful LSTM layer in ``module``."""
    for m in module.modules():
        if isinstance(m, LSTMLayer):
            m.reset_state(rows)


class LastStep(nn.Module):
    """The last time step of (B, T, H) features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


def _mixes(index: int, mix_at) -> bool:
    return index == 0 or index in mix_at


def lstm(
    input_shape,
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at=(),
    layers: int = 2,
) -> nn.Sequential:
    """Sequence classifier: ``layers`` LSTM layers of 128 x width units over (T, F) inputs,
    then the last step through a linear layer."""
    if len(input_shape) != 2:
        raise ValueError(f"lstm needs (T, F) inputs, got {tuple(input_shape)}")
    hidden = neuron_groups * max(1, round(128 * width / neuron_groups))
    blocks, cin = [], input_shape[1]
    for i in range(layers):
        blocks.append(
            nn.Sequential(LSTMLayer(cin, hidden, groups=neuron_groups, mix=_mixes(i, mix_at)))
        )
        cin = hidden
    blocks.append(nn.Sequential(LastStep(), nn.Linear(hidden, num_classes)))
    return nn.Sequential(*blocks)


def lstm_lm(
    input_shape,
    num_classes: int,
    *,
    width: float = 1.0,
    neuron_groups: int = 1,
    mix_at=(),
    layers: int = 2,
    dropout: float = 0.5,
) -> nn.Sequential:
    """Word-level LSTM language model over windows of (T,) tokens; ``num_classes`` is the
    vocabulary (see the module doc)."""
    if len(input_shape) != 1:
        raise ValueError(f"lstm-lm needs (T,) token windows, got {tuple(input_shape)}")
    size = neuron_groups * max(1, round(650 * width / neuron_groups))
    blocks = [nn.Sequential(nn.Embedding(num_classes, size), nn.Dropout(dropout))]
    for i in range(layers):
        blocks.append(
            nn.Sequential(
                LSTMLayer(
                    size,
                    size,
                    groups=neuron_groups,
                    mix=_mixes(i + 1, mix_at),
                    stateful=True,
                    dropout=dropout,
                )
            )
        )
    blocks.append(nn.Sequential(nn.Linear(size, num_classes)))
    for block in blocks:
        for m in block.modules():
            if isinstance(m, (nn.Embedding, nn.Linear, nn.LSTM)):
                for p in m.parameters():
                    nn.init.uniform_(p, -0.05, 0.05)  # Zaremba et al.'s medium model
    return nn.Sequential(*blocks)
