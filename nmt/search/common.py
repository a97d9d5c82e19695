"""What greedy and beam search share: hypotheses, lengths, constraints, and the decoder state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from nmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt.model.cache import RowMoves, as_moves

NEVER_GENERATED = (PAD_ID, BOS_ID)


class DecodingModel(Protocol):
    """What search needs from a model (nmt.model.Transformer provides it).

    ``decode`` must accept ``memory``/``src_mask`` with N rows for ``tgt_in`` with N * G rows (row
    ``n`` serving target rows ``n * G`` to ``n * G + G - 1``); search may modify the returned
    logits and the memory from ``encode`` in place. The cache needs ``reorder_targets`` (target rows)
    and ``select_memory`` (memory rows), each given a :class:`nmt.model.cache.RowMoves` (see
    nmt.model.cache.KVCache).
    """

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor: ...

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, cache=None) -> Tensor: ...

    def new_cache(self, capacity: int): ...


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # log_prob / length penalty: what n-best lists are sorted by
    log_prob: float  # sum of the token log-probabilities, EOS included


# ---- lengths and penalties -------------------------------------------------------------------


def max_output_lengths(src_mask: Tensor, max_len_a: float, max_len_b: int, cap: int | None = None) -> Tensor:
    """Per-sentence token budget ``floor(a * src_len + b)``, clipped to ``[0, cap]``. Returns (B,) long."""
    src_len = src_mask.sum(dim=1).double()
    max_len = torch.floor(max_len_a * src_len + max_len_b).long()
    return max_len.clamp(min=0, max=cap)


def position_cap(model: DecodingModel, cap: int | None) -> int | None:
    """``cap``, or where it is None the longest output the model's positions allow: the decoder reads
    BOS and every generated token, so ``cfg.max_positions - 1`` (None for a model without a config)."""
    if cap is not None:
        return cap
    positions = getattr(getattr(model, "cfg", None), "max_positions", None)
    return None if positions is None else positions - 1


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha; ``length`` counts EOS."""
    return ((5.0 + length) / 6.0) ** alpha


def make_hypothesis(tokens: list[int], log_prob: float, alpha: float) -> Hypothesis:
    return Hypothesis(tokens, log_prob / length_penalty(len(tokens) + 1, alpha), log_prob)


# ---- constraints: scores in, scores out, in place (rows of the active batch) ---------------------
# They act on a step's scores: logits in greedy search, log-probabilities (normalised before the
# constraints) in beam search. A forbidden token gets -inf.


def forbid_tokens(logits: Tensor, token_ids: tuple[int, ...]) -> Tensor:
    for token in token_ids:
        logits[:, token] = -math.inf
    return logits


def forbid_eos(logits: Tensor, rows: Tensor | None) -> Tensor:
    """Rows (bool (R,), None = all) that are shorter than the minimum length may not end."""
    if rows is None:
        logits[:, EOS_ID] = -math.inf
    else:
        logits[:, EOS_ID].masked_fill_(rows, -math.inf)
    return logits


def force_eos(logits: Tensor, rows: Tensor) -> Tensor:
    """Rows (bool (R,)) that reached their maximum length must end; EOS keeps its own score."""
    eos = logits[:, EOS_ID].clone()
    logits.masked_fill_(rows[:, None], -math.inf)
    logits[:, EOS_ID] = eos
    return logits


def apply_constraints(logits: Tensor, step: int, min_len: int, at_max: Tensor | None) -> Tensor:
    """All constraints at decoding step ``step`` (= tokens generated so far).

    ``at_max``: bool (R,), the rows at their maximum length, or None when no row is (known on the
    host, so the common case costs no pass over the (R, V) logits).
    """
    logits = forbid_tokens(logits, NEVER_GENERATED)
    if step < min_len:
        logits = forbid_eos(logits, None if at_max is None else ~at_max)
    return logits if at_max is None else force_eos(logits, at_max)


class LengthLimits:
    """Each active sentence's maximum output length, on the device and on the host."""

    def __init__(self, max_lens: Tensor) -> None:
        self.max_lens = max_lens  # (N,)
        self.host = max_lens.tolist()

    @property
    def steps(self) -> int:
        """Decoder calls the longest sentence may need: its tokens plus EOS."""
        return max(self.host) + 1

    def at_max(self, step: int, rows_per_sentence: int = 1) -> Tensor | None:
        """bool (N * rows_per_sentence,) rows that must end at ``step``, or None if none must."""
        if step < min(self.host):
            return None  # known on the host: no device work
        return (self.max_lens <= step).repeat_interleave(rows_per_sentence)

    def keep(self, sentences: list[int], index: Tensor) -> None:
        """Keep the sentences at positions ``sentences`` (``index``: the same on the device)."""
        self.max_lens = self.max_lens[index]
        self.host = [self.host[s] for s in sentences]


# ---- the model side: one object follows the rows of the batch ---------------------------------


class IncrementalDecoder:
    """Encoder output, source mask and KV cache of the active rows; scores one step.

    With ``use_cache=False`` each step re-runs the decoder over the whole prefix: slow, but it is
    the reference that the cached path must agree with. ``capacity``: target positions the cache
    allocates at once.
    """

    def __init__(
        self,
        model: DecodingModel,
        memory: Tensor,
        src_mask: Tensor,
        use_cache: bool = True,
        capacity: int = 32,
    ):
        self.model = model
        self.memory = memory  # (N, S, D), one row per sentence; rows are moved in place
        self.src_mask = src_mask.clone()  # (N, S); a copy, as its rows are moved in place
        self.cache = model.new_cache(capacity) if use_cache else None
        self.workspace: Tensor | None = None  # (>= R, V) log-probabilities of the last step

    def logits(self, prefix: Tensor) -> Tensor:
        """Next-token logits (R, V) in float32 for prefixes (R, t) that start with BOS."""
        tgt_in = prefix[:, -1:] if self.cache is not None else prefix
        logits = self.model.decode(tgt_in, self.memory, self.src_mask, self.cache)[:, -1]  # (R, V)
        # bf16/fp16 logits lose too much precision for summed log-probs. (A no-op in float32.)
        return logits.float()

    def log_probs(self, prefix: Tensor) -> Tensor:
        """Next-token log-probabilities (R, V), written into a buffer that the next call reuses."""
        logits = self.logits(prefix)
        rows, vocab = logits.shape
        if self.workspace is None or self.workspace.size(0) < rows or self.workspace.size(1) != vocab:
            self.workspace = torch.empty_like(logits)  # (R, V)
        # A fresh (R, V) tensor per step costs page faults that are as slow as the softmax itself.
        return torch.log_softmax(logits, dim=-1, out=self.workspace[:rows])

    def select(self, rows: Tensor) -> None:
        """One target row per memory row: row ``i`` continues from old row ``rows[i]``."""
        moves = as_moves(rows, self.memory)
        self.select_memory(moves)
        self.reorder_targets(moves)

    def reorder_targets(self, moves: RowMoves) -> None:
        """Target row ``i`` continues from old target row ``moves.indices[i]`` (rows may repeat or
        disappear)."""
        if self.cache is not None:
            self.cache.reorder_targets(moves)

    def select_memory(self, sentences: Tensor | RowMoves) -> None:
        """Keep memory rows ``sentences`` (the sentences still being decoded)."""
        moves = as_moves(sentences, self.memory)
        self.memory = moves.apply(self.memory)
        self.src_mask = moves.apply(self.src_mask)
        if self.cache is not None:
            self.cache.select_memory(moves)


def bos_prefix(rows: int, device: torch.device) -> Tensor:
    return torch.full((rows, 1), BOS_ID, dtype=torch.long, device=device)  # (R, 1)


def fill_holes(keep: list[int]) -> list[int]:
    """New order of the active sentences when only ``keep`` (ascending positions) go on: a sentence
    that stays keeps its position, and each place left empty is taken by one from the end. Only the
    rows of those few move, and no row is read after it is overwritten (see RowMoves)."""
    stay, size = set(keep), len(keep)
    from_end = iter(s for s in keep if s >= size)
    return [p if p in stay else next(from_end) for p in range(size)]
