"""Key/value cache for incremental decoding.

One :class:`LayerCache` per decoder layer holds two things with different lifetimes:

* self-attention keys/values of the target tokens decoded so far, one row per target row (a
  hypothesis), written in place into a preallocated buffer at every step;
* cross-attention keys/values of the encoder output, one row per memory row (a source sentence),
  computed at the first step and reused.

The two can have different numbers of rows: beam search keeps one memory row per sentence and
``beam`` target rows per sentence (see :class:`nmt.model.attention.MultiHeadAttention`). So
there are two ways to move rows: :meth:`KVCache.reorder_targets` after each beam step (row ``i``
continues the hypothesis that was in row ``indices[i]``) and :meth:`KVCache.select_memory` when
whole sentences leave the batch. :meth:`KVCache.reorder` does both with the same indices, for
callers whose memory and target rows are one to one (greedy search, tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SelfAttentionCache:
    """Keys/values of the decoded prefix, in buffers written in place.

    Only ``[:, :, :length]`` of the buffers holds data. ``initial_capacity`` positions are
    allocated at the first append (search passes the longest output it allows, so the buffers
    never grow); past that the capacity doubles, which keeps appends amortised O(1) instead of a
    ``torch.cat`` copy of the whole prefix at every step.
    """

    k: Tensor | None = None  # (B, H, capacity, Dh)
    v: Tensor | None = None  # (B, H, capacity, Dh)
    length: int = 0
    initial_capacity: int = 32

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k``/``v`` of shape (B, H, T, Dh); return keys/values of the whole prefix."""
        end = self.length + k.size(2)
        if self.k is None or end > self.k.size(2):
            self._grow(k, end)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, H, length, Dh) views

    def _grow(self, like: Tensor, needed: int) -> None:
        capacity = max(self.initial_capacity, needed, 2 * (0 if self.k is None else self.k.size(2)))
        batch, heads, _, head_dim = like.shape
        k = like.new_empty(batch, heads, capacity, head_dim)  # (B, H, capacity, Dh)
        v = like.new_empty(batch, heads, capacity, head_dim)
        if self.k is not None:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

    def reorder(self, indices: Tensor) -> None:
        """Row ``i`` continues from old row ``indices[i]``; copies the filled positions only."""
        if self.k is not None:
            self.k = _select_filled(self.k, indices, self.length)
            self.v = _select_filled(self.v, indices, self.length)


def _select_filled(buffer: Tensor, indices: Tensor, length: int) -> Tensor:
    """Rows ``indices`` of ``buffer`` (B, H, capacity, Dh) in a new buffer of the same capacity."""
    indices = indices.to(buffer.device)
    out = buffer.new_empty(indices.size(0), *buffer.shape[1:])  # (B', H, capacity, Dh)
    # The empty tail is not copied: most of the buffer at the first steps.
    torch.index_select(buffer[:, :, :length], 0, indices, out=out[:, :, :length])
    return out


@dataclass
class CrossAttentionCache:
    """Keys/values of the encoder output: computed once, at the first decoding step."""

    k: Tensor | None = None  # (N, H, S, Dh), one row per memory row
    v: Tensor | None = None  # (N, H, S, Dh)

    def reorder(self, indices: Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, indices.to(self.k.device))
            self.v = self.v.index_select(0, indices.to(self.v.device))


@dataclass
class LayerCache:
    """Everything one decoder layer remembers between decoding steps."""

    self_attn: SelfAttentionCache = field(default_factory=SelfAttentionCache)
    cross_attn: CrossAttentionCache = field(default_factory=CrossAttentionCache)

    def reorder(self, indices: Tensor) -> None:
        self.self_attn.reorder(indices)
        self.cross_attn.reorder(indices)


@dataclass
class KVCache:
    """The decoder's cache: one :class:`LayerCache` per layer. Create with ``Transformer.new_cache()``."""

    layers: list[LayerCache]

    @classmethod
    def empty(cls, num_layers: int, capacity: int = 32) -> KVCache:
        """``capacity``: target positions allocated at the first step (the buffers double past it)."""
        if capacity < 1:
            raise ValueError(f"cache capacity={capacity} must be at least 1")
        return cls(
            layers=[LayerCache(SelfAttentionCache(initial_capacity=capacity)) for _ in range(num_layers)]
        )

    @property
    def length(self) -> int:
        """Number of target positions decoded so far (the position of the next token)."""
        return self.layers[0].self_attn.length if self.layers else 0

    def reorder(self, indices: torch.LongTensor) -> None:
        """Keep row ``indices[i]`` as new row ``i`` (rows may repeat or disappear), target and memory
        rows alike: for callers whose memory rows and target rows are one to one."""
        for layer in self.layers:
            layer.reorder(indices)

    def reorder_targets(self, indices: torch.LongTensor) -> None:
        """Self-attention only: target row ``i`` continues from old target row ``indices[i]``."""
        for layer in self.layers:
            layer.self_attn.reorder(indices)

    def select_memory(self, indices: torch.LongTensor) -> None:
        """Cross-attention only: keep memory row ``indices[i]`` as memory row ``i``."""
        for layer in self.layers:
            layer.cross_attn.reorder(indices)
