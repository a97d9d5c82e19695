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
whole sentences leave the batch (greedy search, whose memory and target rows are one to one, calls
both with the same moves).

Every move takes a :class:`RowMoves`: new row ``i`` holds old row ``indices[i]``. When the rows that
change are never read by another move (search arranges its rows so: a beam continues in its own
row, a finished sentence's rows are filled from the end of the batch), only those rows are copied,
in place; any other mapping gathers every row into a spare buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


class RowMoves:
    """New row ``i`` holds old row ``indices[i]`` (rows may repeat, disappear or move).

    Planned once and applied to every buffer of the cache (and to search's own tensors). The plan
    is *in place* when the new rows are no more than the old ones and no row that changes is the
    source of another: then copying the changed rows over the old buffer, in any order, gives the
    result, and the rows that keep their content are not touched. Planning reads the indices on
    the host (search reads its finished rows on the host at every step anyway).
    """

    def __init__(self, indices: Tensor, old_rows: int) -> None:
        self.indices = indices  # (R',) long
        self.rows = indices.size(0)
        same = torch.arange(self.rows, device=indices.device)
        changed = (indices != same).nonzero().squeeze(1)  # (M,)
        sources = indices.index_select(0, changed)
        self.in_place = self.rows <= old_rows and not bool(torch.isin(sources, changed).any())
        self.changed, self.sources = changed, sources

    def apply(self, buffer: Tensor, out: Tensor | None = None) -> Tensor:
        """``buffer[indices]`` along dim 0: written over ``buffer`` when the plan is in place (the
        leading rows are returned), else gathered into ``out`` (or a new tensor)."""
        if not self.in_place:
            return torch.index_select(buffer, 0, self.indices, out=out)
        if self.changed.numel():
            buffer.index_copy_(0, self.changed, buffer.index_select(0, self.sources))
        return buffer[: self.rows]


def as_moves(indices: Tensor | RowMoves, buffer: Tensor) -> RowMoves:
    """``indices`` as a plan for moving the rows of ``buffer`` (a plan is passed through as it is)."""
    if isinstance(indices, RowMoves):
        return indices
    return RowMoves(indices.to(buffer.device), buffer.size(0))


@dataclass
class SelfAttentionCache:
    """Keys/values of the decoded prefix, in buffers written in place.

    Only ``[:, :, :length]`` of the buffers holds data. ``initial_capacity`` positions are
    allocated at the first append (search passes the longest output it allows, so the buffers
    never grow); past that the capacity doubles, which keeps appends amortised O(1) instead of a
    ``torch.cat`` copy of the whole prefix at every step.

    :meth:`reorder` copies the rows that change in place when it can (see :class:`RowMoves`),
    else gathers the rows into a second pair of buffers and swaps the two, so beam search
    allocates nothing per step. Either way the views :meth:`append` returned are stale after a
    reorder.
    """

    k: Tensor | None = None  # (B, H, capacity, Dh)
    v: Tensor | None = None  # (B, H, capacity, Dh)
    length: int = 0
    initial_capacity: int = 32
    spare_k: Tensor | None = field(default=None, repr=False)  # (>= B, H, capacity, Dh), no data
    spare_v: Tensor | None = field(default=None, repr=False)

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
        self.spare_k = self.spare_v = None

    def reorder(self, indices: Tensor | RowMoves) -> None:
        """Row ``i`` continues from old row ``indices[i]``; copies the filled positions only."""
        if self.k is None:
            return
        moves = as_moves(indices, self.k)
        filled = slice(0, self.length)  # the empty tail is not copied
        if moves.in_place:
            moves.apply(self.k[:, :, filled])
            moves.apply(self.v[:, :, filled])
            self.k, self.v = self.k[: moves.rows], self.v[: moves.rows]
            return
        rows = moves.rows
        if self.spare_k is None or self.spare_k.size(0) < rows:
            self.spare_k = self.k.new_empty(rows, *self.k.shape[1:])  # (B', H, capacity, Dh)
            self.spare_v = self.v.new_empty(rows, *self.v.shape[1:])
        k, v = self.spare_k[:rows], self.spare_v[:rows]  # leading rows of a buffer: still contiguous
        moves.apply(self.k[:, :, filled], out=k[:, :, filled])
        moves.apply(self.v[:, :, filled], out=v[:, :, filled])
        self.spare_k, self.spare_v, self.k, self.v = self.k, self.v, k, v


@dataclass
class CrossAttentionCache:
    """Keys/values of the encoder output: computed once, at the first decoding step."""

    k: Tensor | None = None  # (N, H, S, Dh), one row per memory row
    v: Tensor | None = None  # (N, H, S, Dh)

    def reorder(self, indices: Tensor | RowMoves) -> None:
        if self.k is not None:
            moves = as_moves(indices, self.k)
            self.k, self.v = moves.apply(self.k), moves.apply(self.v)


@dataclass
class LayerCache:
    """Everything one decoder layer remembers between decoding steps."""

    self_attn: SelfAttentionCache = field(default_factory=SelfAttentionCache)
    cross_attn: CrossAttentionCache = field(default_factory=CrossAttentionCache)


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

    def reorder_targets(self, indices: Tensor | RowMoves) -> None:
        """Self-attention only: target row ``i`` continues from old target row ``indices[i]``."""
        moves = self._plan(indices, lambda layer: layer.self_attn.k)
        for layer in self.layers:
            layer.self_attn.reorder(moves)

    def select_memory(self, indices: Tensor | RowMoves) -> None:
        """Cross-attention only: keep memory row ``indices[i]`` as memory row ``i``."""
        moves = self._plan(indices, lambda layer: layer.cross_attn.k)
        for layer in self.layers:
            layer.cross_attn.reorder(moves)

    def _plan(
        self, indices: Tensor | RowMoves, buffer_of: Callable[[LayerCache], Tensor | None]
    ) -> Tensor | RowMoves:
        """One plan for every layer, made on the first layer's buffer (planning reads the indices on
        the host)."""
        filled = buffer_of(self.layers[0]) if self.layers else None
        return indices if filled is None else as_moves(indices, filled)
