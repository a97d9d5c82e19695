"""Token-budget batches of similar-length pairs, sharded across ranks, resumable mid-epoch.

* :class:`TokenBatchSampler` yields lists of example indices. A batch holds at most ``max_tokens`` padded
  tokens on its longer side: ``len(batch) * max(longest source, longest decoder input) <= max_tokens``
  (a single example longer than the budget still gets a batch of its own: nothing is dropped).
* :class:`PackedPairs` holds the encoded columns as flat numpy arrays (Arrow offsets + values), so
  turning indices into padded tensors is a few vectorised numpy operations, not per-row Python work.
* :class:`BatchLoader` joins the two and yields :class:`Batch` objects.

Lengths given to the sampler are the collated lengths: source ids with EOS, target with BOS
(``len(tgt_ids) + 1``); :class:`PackedPairs` computes them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import torch

from nmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

log = logging.getLogger(__name__)


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) long: pieces + EOS, PAD after
    tgt_in: torch.Tensor  # (B, T) long: BOS + pieces
    tgt_out: torch.Tensor  # (B, T) long: pieces + EOS
    indices: torch.Tensor  # (B,) long: row of each pair in the dataset
    # Non-pad token counts, counted on the CPU at collate time so that no device sync is needed later.
    num_src_tokens: int
    num_tgt_tokens: int

    @property
    def src_mask(self) -> torch.Tensor:
        """(B, S) bool, True = real token."""
        return self.src != PAD_ID

    @property
    def size(self) -> int:
        return self.src.size(0)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(
            move(self.src), move(self.tgt_in), move(self.tgt_out), move(self.indices),
            self.num_src_tokens, self.num_tgt_tokens,
        )  # fmt: skip

    def pin_memory(self) -> Batch:
        """Page-locked copies for faster asynchronous host-to-GPU copies; unchanged without CUDA."""
        if not torch.cuda.is_available():
            return self
        return Batch(
            self.src.pin_memory(), self.tgt_in.pin_memory(), self.tgt_out.pin_memory(),
            self.indices.pin_memory(), self.num_src_tokens, self.num_tgt_tokens,
        )  # fmt: skip


def collate(
    src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], indices: Sequence[int]
) -> Batch:
    """Pad a batch given as lists: ``src_ids`` already end in EOS, ``tgt_ids`` are pieces only."""
    batch = len(src_ids)
    src = torch.full((batch, max(len(s) for s in src_ids)), PAD_ID, dtype=torch.long)
    width = max(len(t) for t in tgt_ids) + 1  # room for BOS (input) / EOS (output)
    tgt_in = torch.full((batch, width), PAD_ID, dtype=torch.long)
    tgt_out = torch.full((batch, width), PAD_ID, dtype=torch.long)
    for row, (s, t) in enumerate(zip(src_ids, tgt_ids, strict=True)):
        src[row, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        tgt_in[row, : len(t) + 1] = torch.as_tensor([BOS_ID, *t], dtype=torch.long)
        tgt_out[row, : len(t) + 1] = torch.as_tensor([*t, EOS_ID], dtype=torch.long)
    return Batch(
        src=src,
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        indices=torch.as_tensor(list(indices), dtype=torch.long),
        num_src_tokens=sum(len(s) for s in src_ids),
        num_tgt_tokens=sum(len(t) + 1 for t in tgt_ids),
    )


class PackedPairs:
    """Encoded pairs as flat arrays: pair i's source is ``src_values[src_offsets[i]:src_offsets[i + 1]]``."""

    def __init__(
        self, src_values: np.ndarray, src_offsets: np.ndarray, tgt_values: np.ndarray, tgt_offsets: np.ndarray
    ):
        self.src_values, self.src_offsets = src_values, src_offsets.astype(np.int64)
        self.tgt_values, self.tgt_offsets = tgt_values, tgt_offsets.astype(np.int64)
        self.src_lengths = np.diff(self.src_offsets)  # with EOS: the collated source length
        self.tgt_lengths = np.diff(self.tgt_offsets) + 1  # pieces + BOS: the collated target length

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset) -> PackedPairs:
        """Zero-copy views of the ``src_ids``/``tgt_ids`` Arrow columns, rows in the dataset's order."""
        table = dataset.with_format("arrow")[:]
        return cls(*_list_column(table, "src_ids"), *_list_column(table, "tgt_ids"))

    @classmethod
    def from_lists(cls, src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]]) -> PackedPairs:
        return cls(*_flatten(src_ids), *_flatten(tgt_ids))

    def __len__(self) -> int:
        return len(self.src_lengths)

    def collate(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Same result as :func:`collate` on the same rows, built with vectorised numpy."""
        idx = np.asarray(indices, dtype=np.int64)
        src, src_lens = _gather(self.src_values, self.src_offsets, idx)  # (B, S)
        pieces, piece_lens = _gather(self.tgt_values, self.tgt_offsets, idx)  # (B, T - 1)
        rows, width = len(idx), pieces.shape[1] + 1
        tgt_in = np.full((rows, width), PAD_ID, dtype=np.int64)
        tgt_in[:, 0] = BOS_ID
        tgt_in[:, 1:] = pieces
        tgt_out = np.full((rows, width), PAD_ID, dtype=np.int64)
        tgt_out[:, :-1] = pieces
        tgt_out[np.arange(rows), piece_lens] = EOS_ID
        return Batch(
            src=torch.from_numpy(src),
            tgt_in=torch.from_numpy(tgt_in),
            tgt_out=torch.from_numpy(tgt_out),
            indices=torch.from_numpy(idx.copy()),
            num_src_tokens=int(src_lens.sum()),
            num_tgt_tokens=int(piece_lens.sum()) + rows,
        )


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    column = table.column(name).combine_chunks()
    # For a sliced array, offsets index into the unsliced values buffer: use both unsliced.
    return column.values.to_numpy(zero_copy_only=False), column.offsets.to_numpy(zero_copy_only=False)


def _flatten(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    values = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(offsets[-1]))
    return values, offsets


def _gather(values: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``idx`` of a flat list column as a PAD-padded (B, L) int64 array, and their lengths."""
    starts = offsets[idx]
    lengths = offsets[idx + 1] - starts
    width = int(lengths.max()) if len(idx) else 0
    columns = np.arange(width)
    real = columns[None, :] < lengths[:, None]  # (B, L)
    out = np.full((len(idx), width), PAD_ID, dtype=np.int64)
    out[real] = values[(starts[:, None] + columns[None, :])[real]]
    return out, lengths


class TokenBatchSampler:
    """Length-bucketed token-budget batches, reshuffled per epoch from (seed, epoch), sharded by rank.

    Per epoch: shuffle the examples, stable-sort them by (longer side, source, target length), so equal
    lengths are in random order, cut the sorted list greedily into batches within the token budget, and
    shuffle the batch order. For world size W > 1 the global batch count is brought to a multiple of W by
    splitting the largest batches in two (ranks stay disjoint and together cover every example; only
    when every batch already holds a single example, which a tiny data set or a budget that fits one
    sentence at a time gives, are a few batches repeated), then rank r takes batches r, r + W, ...
    Every rank thus sees the same number of batches. The batches depend only on the lengths, max_tokens,
    seed, epoch and world size (and, in an epoch resumed on another world size, on what its earlier
    parts took: :meth:`load_state_dict`), so all ranks agree without communicating.
    """

    def __init__(
        self,
        src_lengths: Sequence[int] | np.ndarray,
        tgt_lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.src_lengths = np.asarray(src_lengths, dtype=np.int64)
        self.tgt_lengths = np.asarray(tgt_lengths, dtype=np.int64)
        if self.src_lengths.shape != self.tgt_lengths.shape or len(self.src_lengths) == 0:
            raise ValueError("src_lengths and tgt_lengths must be non-empty and of equal length.")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size}).")
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._start = 0  # where the next iteration begins (set by load_state_dict)
        self._position = 0  # batches of the current epoch handed out so far
        # Earlier parts of the current epoch that ran on other world sizes (a resume on another number
        # of processes): (world size, global batches taken) each; this epoch's batches are what they left.
        self._earlier: list[tuple[int, int]] = []
        self._cached: tuple[tuple, list[np.ndarray], list[np.ndarray]] | None = None
        oversized = int((np.maximum(self.src_lengths, self.tgt_lengths) > max_tokens).sum())
        if oversized:
            log.warning(
                "%d examples are longer than max_tokens=%d; each gets a batch of its own",
                oversized,
                max_tokens,
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. The same epoch keeps a resumed position; a new one starts at 0."""
        if epoch != self.epoch:
            self.epoch, self._start, self._position, self._earlier = epoch, 0, 0, []

    def __len__(self) -> int:
        return len(self.rank_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        start, self._start = self._start, 0
        self._position = start
        for batch in batches[start:]:
            self._position += 1  # counted before handing out: the consumer owns it from here on
            yield batch.tolist()

    @property
    def position(self) -> int:
        """Batches of the current epoch handed out to this rank so far."""
        return self._position

    def state_dict(self) -> dict[str, Any]:
        everyone = self._epoch_batches()[0]
        left = sum(len(batch) for batch in everyone[self._position * self.world_size :])  # (only at a save)
        return {
            "epoch": self.epoch,
            "position": self._position,
            "num_batches": len(self),
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "world_size": self.world_size,
            "earlier": [list(part) for part in self._earlier],
            "done": max(0.0, 1.0 - left / len(self.src_lengths)),  # the share of the epoch's examples taken
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Continue ``state``'s epoch right after its last handed-out batch.

        Saved with another world size (and the same data, max_tokens and seed), the ranks go on with the
        epoch's batches the saved ranks had not taken, evened out over this world size: every example
        is still seen once in the epoch. Saved with other data, max_tokens or seed, the epoch goes on in
        the new order at the same share of its examples (``done``). Returns what changed in the order,
        to be told, or None.
        """
        self.epoch = int(state["epoch"])
        saved_world_size = int(state.get("world_size", self.world_size))
        earlier = [(int(size), int(taken)) for size, taken in state.get("earlier", [])]
        position, saved_batches = int(state["position"]), state.get("num_batches")
        saved_order = self._batches(self.epoch, earlier, saved_world_size, quiet=True)
        same_order = (
            state.get("seed", self.seed) == self.seed
            and state.get("max_tokens", self.max_tokens) == self.max_tokens
            and (saved_batches is None or len(saved_order) == saved_batches * saved_world_size)
        )
        changed = None
        if same_order and saved_world_size == self.world_size:
            self._earlier = earlier
        elif same_order:  # the rest of the saved ranks' batches, dealt out anew
            self._earlier, position = [*earlier, (saved_world_size, position * saved_world_size)], 0
        else:
            self._earlier = []
            if "done" in state:
                position = round(float(state["done"]) * len(self))
            elif saved_batches and saved_batches != len(self):  # saved before "done" was
                position = round(position * len(self) / saved_batches)
            changed = (
                f"the data order was saved with {saved_batches} batches per rank, seed {state.get('seed')} and "
                f"max_tokens {state.get('max_tokens', '?')}, now {len(self)}, {self.seed} and {self.max_tokens} "
                f"(data, max_tokens or seed changed): epoch {self.epoch} goes on at the same share of its "
                f"examples, batch {min(position, len(self))} of {len(self)}"
            )
        self._start = self._position = min(position, len(self))
        return changed

    def rank_batches(self) -> list[np.ndarray]:
        """This rank's batches (index arrays) for the current epoch, in order."""
        return self._epoch_batches()[1]

    def _epoch_batches(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The current epoch's batches: all ranks' (:meth:`global_batches`) and this rank's."""
        key = (self.epoch, tuple(self._earlier))
        if self._cached is None or self._cached[0] != key:
            everyone = self.global_batches(self.epoch)
            self._cached = (key, everyone, everyone[self.rank :: self.world_size])
        return self._cached[1], self._cached[2]

    def global_batches(self, epoch: int) -> list[np.ndarray]:
        """All ranks' batches for ``epoch``: a multiple of world_size of them, ranks interleaved."""
        return self._batches(epoch, self._earlier if epoch == self.epoch else [], self.world_size)

    def _batches(
        self, epoch: int, earlier: list[tuple[int, int]], world_size: int, quiet: bool = False
    ) -> list[np.ndarray]:
        """The epoch's batches for ``world_size`` ranks, after ``earlier`` parts of it took theirs
        (``quiet``: without warning of repeated examples, for the order of a run that was)."""
        rng = np.random.default_rng([self.seed, epoch])
        count = len(self.src_lengths)
        order = rng.permutation(count) if self.shuffle else np.arange(count)
        widths = np.maximum(self.src_lengths, self.tgt_lengths)
        # The budget is spent on the longer side, so sort by it first; lexsort is stable: ties stay random.
        order = order[np.lexsort((self.tgt_lengths[order], self.src_lengths[order], widths[order]))]
        batches = _pack(order, widths[order], self.max_tokens)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        for size, taken in earlier:
            batches = _even_out(batches, size, quiet=True)[taken:]  # warned about when that part ran
        return _even_out(batches, world_size, quiet)


def _pack(order: np.ndarray, widths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut ``order`` (sorted by length) greedily into batches with count * max width <= max_tokens."""
    bounds = [0]
    longest = 0
    for position, width in enumerate(widths.tolist()):
        longest = max(longest, width)
        if position > bounds[-1] and (position - bounds[-1] + 1) * longest > max_tokens:
            bounds.append(position)
            longest = width
    bounds.append(len(order))
    return [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=False)]


def _even_out(batches: list[np.ndarray], world_size: int, quiet: bool = False) -> list[np.ndarray]:
    """Bring the batch count to a multiple of world_size: split the largest batches, else repeat some."""
    while len(batches) % world_size:
        largest = max(range(len(batches)), key=lambda i: len(batches[i]))
        if len(batches[largest]) < 2:
            shortfall = world_size - len(batches) % world_size
            if not quiet and len(batches) < world_size:  # no max_tokens helps: too few examples for the ranks
                log.warning(
                    "%d examples for %d ranks: some are seen up to %d times this epoch",
                    len(batches), world_size, -(-world_size // len(batches)),
                )  # fmt: skip
            elif not quiet:
                log.warning(
                    "every batch holds one example and %d batches do not divide among %d ranks: %d examples "
                    "are seen twice this epoch (raise data.max_tokens to avoid it)",
                    len(batches), world_size, shortfall,
                )  # fmt: skip
            return batches + [batches[i % len(batches)] for i in range(shortfall)]
        half = len(batches[largest]) // 2
        batches[largest : largest + 1] = [batches[largest][:half], batches[largest][half:]]
    return batches


def padding_efficiency(
    batches: Sequence[Sequence[int]], src_lengths: np.ndarray, tgt_lengths: np.ndarray
) -> float:
    """Real tokens / padded tokens over source and target of ``batches`` (1.0 = no padding at all)."""
    src_lengths, tgt_lengths = np.asarray(src_lengths), np.asarray(tgt_lengths)
    real = padded = 0
    for batch in batches:
        idx = np.asarray(batch, dtype=np.int64)
        src, tgt = src_lengths[idx], tgt_lengths[idx]
        real += int(src.sum() + tgt.sum())
        padded += len(idx) * int(src.max() + tgt.max())
    return real / padded if padded else 1.0


class BatchLoader:
    """Iterates a :class:`TokenBatchSampler` over :class:`PackedPairs`, yielding :class:`Batch` objects.

    Collation happens lazily in the consuming thread, so the sampler's position is exactly the number
    of batches the consumer has received: ``state_dict()`` taken after batch k resumes at batch k + 1.
    """

    def __init__(self, pairs: PackedPairs, sampler: TokenBatchSampler, pin_memory: bool = False) -> None:
        if len(pairs) != len(sampler.src_lengths):
            raise ValueError(
                f"sampler covers {len(sampler.src_lengths)} examples, the data has {len(pairs)}."
            )
        self.pairs, self.sampler, self.pin_memory = pairs, sampler, pin_memory

    def __iter__(self) -> Iterator[Batch]:
        for indices in self.sampler:
            batch = self.pairs.collate(indices)
            yield batch.pin_memory() if self.pin_memory else batch

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        return self.sampler.load_state_dict(state)

    def padding_efficiency(self) -> float:
        """Of this rank's batches in the current epoch."""
        batches = self.sampler.rank_batches()
        return padding_efficiency(batches, self.pairs.src_lengths, self.pairs.tgt_lengths)


def make_loader(
    dataset: datasets.Dataset,
    max_tokens: int,
    shuffle: bool = True,
    seed: int = 1,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> BatchLoader:
    """Loader over an encoded dataset (columns ``src_ids``, ``tgt_ids``); logs batch count and padding."""
    pairs = PackedPairs.from_dataset(dataset)
    sampler = TokenBatchSampler(
        pairs.src_lengths, pairs.tgt_lengths, max_tokens, shuffle, seed, rank, world_size
    )
    loader = BatchLoader(pairs, sampler, pin_memory)
    log.info(
        "%s batches per rank (%s pairs, max_tokens=%d, world size %d), padding efficiency %.1f%%",
        f"{len(loader):,}", f"{len(pairs):,}", max_tokens, world_size, 100 * loader.padding_efficiency(),
    )  # fmt: skip
    return loader
