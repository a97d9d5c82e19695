"""Token embeddings scaled by sqrt(d_model) plus sinusoidal or learned positions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from nmt.model.dropout import Dropout


def sinusoidal_table(num_positions: int, dim: int) -> Tensor:
    """(num_positions, dim) table of Vaswani et al. (2017): sin on even, cos on odd features."""
    position = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)  # (P, 1)
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = position * inv_freq  # (P, ceil(dim / 2))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Fixed positions. The table is a non-persistent buffer: rebuilt, never stored in checkpoints."""

    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.register_buffer("table", sinusoidal_table(max_positions, dim), persistent=False)

    def forward(self, start: int, length: int) -> Tensor:
        return self.table[start : start + length]  # (T, D)


class LearnedPositions(nn.Module):
    def __init__(self, max_positions: int, dim: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.embedding = nn.Embedding(max_positions, dim)

    def forward(self, start: int, length: int) -> Tensor:
        return self.embedding.weight[start : start + length]  # (T, D)


class Embedder(nn.Module):
    """ids (B, T) -> dropout(tokens(ids) * sqrt(D) + positions) (B, T, D).

    The scale puts token vectors (initialised with std D^-0.5) on the same footing as the
    positions, whose components are O(1). ``tokens`` may be shared with another Embedder
    and with the output projection.
    """

    def __init__(self, tokens: nn.Embedding, positions: nn.Module, dropout: float) -> None:
        super().__init__()
        self.tokens = tokens
        self.positions = positions
        self.scale = math.sqrt(tokens.embedding_dim)
        self.dropout = Dropout(dropout)

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        length = ids.size(1)
        if start + length > self.positions.max_positions:
            raise ValueError(
                f"sequence reaches position {start + length} but the model has max_positions="
                f"{self.positions.max_positions}; shorten the input or raise model.max_positions"
            )
        x = self.tokens(ids) * self.scale + self.positions(start, length)  # (B, T, D)
        return self.dropout(x)
