"""Key/value cache for incremental decoding.

One :class:`LayerCache` per decoder layer holds two things with different lifetimes:

* self-attention keys/values of the target tokens decoded so far, appended at every step;
* cross-attention keys/values of the encoder output, computed at the first step and reused.

Beam search calls :meth:`KVCache.reorder` after each step so that row ``i`` continues the
hypothesis that was in row ``indices[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class SelfAttentionCache:
    """Keys/values of the decoded prefix, in a buffer that doubles when full.

    Doubling keeps appends amortised O(1) instead of a ``torch.cat`` copy of the whole prefix
    at every step; only ``[:, :, :length]`` of the buffers holds data.
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
        if self.k is not None:
            self.k = self.k.index_select(0, indices.to(self.k.device))
            self.v = self.v.index_select(0, indices.to(self.v.device))


@dataclass
class CrossAttentionCache:
    """Keys/values of the encoder output: computed once, at the first decoding step."""

    k: Tensor | None = None  # (B, H, S, Dh)
    v: Tensor | None = None  # (B, H, S, Dh)

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
    def empty(cls, num_layers: int) -> KVCache:
        return cls(layers=[LayerCache() for _ in range(num_layers)])

    @property
    def length(self) -> int:
        """Number of target positions decoded so far (the position of the next token)."""
        return self.layers[0].self_attn.length if self.layers else 0

    def reorder(self, indices: torch.LongTensor) -> None:
        """Keep row ``indices[i]`` as new row ``i`` (rows may repeat or disappear)."""
        for layer in self.layers:
            layer.reorder(indices)
