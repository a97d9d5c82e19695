"""Batched greedy and beam search over ``model.encode`` / ``model.decode`` with the KV cache.

Both searches decode a whole batch of sentences in lock step and drop a sentence from the
batch as soon as it is finished, so long sentences do not keep paying for short ones.

Rows. Greedy search keeps one target row per sentence. Beam search keeps one row of encoder
output (and of source mask and cross-attention cache) per sentence and ``beam`` target rows per
sentence, which the model's ``decode`` accepts (``memory`` may have fewer rows than ``tgt_in``,
each serving consecutive target rows), so the encoder output is never repeated ``beam`` times nor
reordered when beams change origin: only the self-attention cache follows the beam origins
(``cache.reorder_targets``), and memory rows move only when sentences leave the batch
(``cache.select_memory``). The first step decodes one row per sentence (all beams would start
from the same BOS prefix) and the top ``beam`` continuations then fill the beam.

Moving rows. The best continuation of each hypothesis stays in that hypothesis' row
(:func:`stable_slots`), and a sentence that leaves the batch makes room for one from its end
(:func:`fill_holes`). Then no row that changes is read by another move, and the cache copies only
the rows that change, in place (``nmt.model.cache.RowMoves``): about a quarter of the rows per step
on Multi30k, instead of every row.

Lengths. A hypothesis holds at most ``max_len = floor(max_len_a * src_len + max_len_b)``
tokens (``src_len`` counts the real source tokens of that sentence, EOS included, padding
excluded), then EOS is forced. EOS is forbidden before ``min_len`` tokens (unless it is forced
at the same step). PAD and BOS are never generated.

Scores. A hypothesis' ``log_prob`` sums the log-probabilities of its tokens and of its EOS,
normalised over the whole vocabulary (before the constraints above remove tokens). Beam search
ranks finished hypotheses by the GNMT-normalised
``score = log_prob / ((5 + length) / 6) ** len_penalty`` where ``length`` counts EOS too, so
``len_penalty = 0`` ranks by raw log-probability (favouring short outputs) and larger values
favour longer ones. Greedy search needs no probabilities: it takes the arg-max of the logits.

Stopping rule of beam search (the one fairseq uses): at each step the ``2 * beam`` best
continuations of a sentence are found; those among the first ``beam`` that end in EOS become
finished hypotheses, and the first ``beam`` that do not end in EOS stay alive. A sentence is
done once it has collected ``beam`` finished hypotheses (or reached its maximum length). This
is not an exact bound: with ``len_penalty > 0`` a live hypothesis could in principle still
overtake a finished one later, but it is the standard, well-understood behaviour and it stops
early.
"""

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
    logits and the memory from ``encode`` in place. The cache needs ``reorder`` (target and memory
    rows together), ``reorder_targets`` and ``select_memory``, each given a
    :class:`nmt.model.cache.RowMoves` (see nmt.model.cache.KVCache).
    """

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor: ...

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, cache=None) -> Tensor: ...

    def new_cache(self, capacity: int): ...


@dataclass
class Hypothesis:
    tokens: list[int]  # without BOS and EOS
    score: float  # log_prob / length penalty: what n-best lists are sorted by
    log_prob: float  # sum of the token log-probabilities, EOS included

    @property
    def length(self) -> int:
        return len(self.tokens)


# ---- lengths and penalties -------------------------------------------------------------------


def max_output_lengths(src_mask: Tensor, max_len_a: float, max_len_b: int, cap: int | None = None) -> Tensor:
    """Per-sentence token budget ``floor(a * src_len + b)``, clipped to ``[0, cap]``. Returns (B,) long."""
    src_len = src_mask.sum(dim=1).double()
    max_len = torch.floor(max_len_a * src_len + max_len_b).long()
    return max_len.clamp(min=0, max=cap)


def length_penalty(length: int, alpha: float) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha; ``length`` counts EOS."""
    return ((5.0 + length) / 6.0) ** alpha


def make_hypothesis(tokens: list[int], log_prob: float, alpha: float) -> Hypothesis:
    return Hypothesis(tokens, log_prob / length_penalty(len(tokens) + 1, alpha), log_prob)


# ---- constraints: scores in, scores out, in place (rows of the active batch) ---------------------
# They act on logits; a forbidden token gets -inf. Log-probabilities are normalised before this.


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
        self.target_rows = 0  # rows of the last step

    def logits(self, prefix: Tensor) -> Tensor:
        """Next-token logits (R, V) in float32 for prefixes (R, t) that start with BOS."""
        self.target_rows = prefix.size(0)
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
        moves = RowMoves(rows, self.memory.size(0))
        self.select_memory(moves)
        self.reorder_targets(moves)

    def reorder_targets(self, rows: Tensor | RowMoves) -> None:
        """Target row ``i`` continues from old target row ``rows[i]`` (rows may repeat or disappear)."""
        if self.cache is not None:
            self.cache.reorder_targets(as_moves(rows, self.target_rows))

    def select_memory(self, sentences: Tensor | RowMoves) -> None:
        """Keep memory rows ``sentences`` (the sentences still being decoded)."""
        moves = as_moves(sentences, self.memory.size(0))
        self.memory = moves.apply(self.memory)
        self.src_mask = moves.apply(self.src_mask)
        if self.cache is not None:
            self.cache.select_memory(moves)


def _bos(rows: int, device: torch.device) -> Tensor:
    return torch.full((rows, 1), BOS_ID, dtype=torch.long, device=device)  # (R, 1)


# ---- selection over the vocabulary ------------------------------------------------------------
# torch.topk over a whole (R, V) row is slow on the CPU (a scalar loop per row, several times the
# cost of the vectorised torch.amax). row_top_k looks only at the blocks of the row that can hold
# the answer and returns exactly what topk returns (up to the order of ties).


def _block_width(vocab: int, k: int) -> int | None:
    """A divisor of ``vocab`` near sqrt(vocab) that leaves at least ``4 * k`` blocks, or None."""
    if vocab < 1024:
        return None  # small rows: the plain operation is fast enough
    widths = [w for w in range(16, vocab // (4 * k) + 1) if vocab % w == 0]
    return min(widths, key=lambda w: abs(w * w - vocab), default=None)


def _blocks(x: Tensor, width: int) -> Tensor:
    rows, vocab = x.shape
    return x.reshape(rows, vocab // width, width)  # (R, V/w, w)


def _pick_blocks(blocks: Tensor, chosen: Tensor) -> Tensor:
    """Blocks ``chosen`` (R, k) of each row of ``blocks`` (R, nb, w) -> (R, k * w)."""
    rows, num_blocks, width = blocks.shape
    flat = (torch.arange(rows, device=blocks.device)[:, None] * num_blocks + chosen).view(-1)  # (R*k,)
    return blocks.reshape(rows * num_blocks, width).index_select(0, flat).view(rows, -1)


def row_top_k(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=1)`` of (R, V) ``x``: values and indices (R, k), largest first.

    The ``k`` largest entries of a row lie in the ``k`` blocks with the largest maxima (an entry
    of any other block has ``k`` larger block maxima above it), so only those are searched.
    """
    width = _block_width(x.size(1), k)
    if width is None:
        return x.topk(k, dim=1)
    best_blocks = _blocks(x, width).amax(dim=2).topk(k, dim=1).indices  # (R, k)
    values, position = _pick_blocks(_blocks(x, width), best_blocks).topk(k, dim=1)  # (R, k) of (R, k*w)
    block = best_blocks.gather(1, torch.div(position, width, rounding_mode="floor"))
    return values, block * width + position % width


# ---- greedy ----------------------------------------------------------------------------------


@torch.inference_mode()
def greedy_search(
    model: DecodingModel,
    src: Tensor,
    src_mask: Tensor,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    max_len_cap: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Most probable token at every step. ``src``/``src_mask`` are (B, S); returns B token lists.

    ``max_len_cap`` bounds every output length (e.g. by the model's number of positions).
    """
    if src.size(0) == 0:
        return []
    limits = LengthLimits(max_output_lengths(src_mask, max_len_a, max_len_b, max_len_cap))
    memory = model.encode(src, src_mask)
    decoder = IncrementalDecoder(model, memory, src_mask, use_cache, capacity=limits.steps)
    outputs: list[list[int]] = [[] for _ in range(src.size(0))]
    sentence = list(range(src.size(0)))  # original index of each active row
    prefix = _bos(src.size(0), src.device)  # (R, 1 + t)
    for step in range(limits.steps):
        logits = apply_constraints(decoder.logits(prefix), step, min_len, limits.at_max(step))
        next_token = logits.argmax(dim=-1)  # (R,)
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
        ended = (next_token == EOS_ID).tolist()
        if not any(ended):
            continue
        for row, tokens in zip(_where(ended), prefix[_where(ended), 1:-1].tolist(), strict=True):
            outputs[sentence[row]] = tokens
        keep = _where(ended, False)
        if not keep:
            break
        order = fill_holes(keep)
        rows = torch.tensor(order, device=src.device)
        sentence = [sentence[i] for i in order]
        prefix = prefix[rows]
        limits.keep(order, rows)
        decoder.select(rows)
    return outputs


def _where(flags: list[bool], value: bool = True) -> list[int]:
    return [i for i, flag in enumerate(flags) if flag == value]


def fill_holes(keep: list[int]) -> list[int]:
    """New order of the active sentences when only ``keep`` (ascending positions) go on: a sentence
    that stays keeps its position, and each place left empty is taken by one from the end. Only the
    rows of those few move, and no row is read after it is overwritten (see RowMoves)."""
    stay, size = set(keep), len(keep)
    from_end = iter(s for s in keep if s >= size)
    return [p if p in stay else next(from_end) for p in range(size)]


# ---- beam ------------------------------------------------------------------------------------


def top_candidates(scores: Tensor, log_probs: Tensor, beam: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best ``2 * beam`` continuations per sentence.

    ``scores`` (N, K) are the live hypotheses' log-probs (K = 1 at the first step, else ``beam``),
    ``log_probs`` (N*K, V) their next-token log-probs. Returns candidate scores, hypothesis of
    origin (in [0, K)) and token, each (N, 2 * beam), best first. Twice the beam guarantees
    ``beam`` candidates that do not end in EOS (each hypothesis offers only one EOS).

    All continuations of one hypothesis share its score, so only its own ``2 * beam`` best tokens
    can be among the sentence's best: those are found per row first, and only they are added to
    the scores, instead of all N*K*V.
    """
    n, live = scores.shape
    per_row = min(2 * beam, log_probs.size(1))
    if live * (per_row - 1) < beam:
        raise ValueError(f"beam={beam} needs a target vocabulary of more than {beam} tokens")
    top_log_probs, top_tokens = row_top_k(log_probs, per_row)  # (N*K, P)
    total = (scores.reshape(-1, 1) + top_log_probs).view(n, live * per_row)  # (N, K*P)
    cand_scores, flat = total.topk(min(2 * beam, live * per_row), dim=1)  # (N, 2B)
    cand_token = top_tokens.view(n, live * per_row).gather(1, flat)
    return cand_scores, torch.div(flat, per_row, rounding_mode="floor"), cand_token


def next_beams(cand_scores: Tensor, cand_beam: Tensor, cand_token: Tensor, beam: int):
    """The ``beam`` best candidates that do not end in EOS, in rank order: each (N, K)."""
    # A stable sort on "is EOS" moves non-EOS candidates to the front without changing their order.
    order = torch.sort((cand_token == EOS_ID).to(torch.uint8), dim=1, stable=True).indices[:, :beam]
    return cand_scores.gather(1, order), cand_beam.gather(1, order), cand_token.gather(1, order)


def finish_hypotheses(
    cand_scores: Tensor, cand_beam: Tensor, cand_token: Tensor, prefix: Tensor, beam: int, alpha: float
) -> list[tuple[int, Hypothesis]]:
    """Candidates among the first ``beam`` that end in EOS, as (active sentence, Hypothesis).

    ``prefix`` (N*K, 1 + t) holds the live hypotheses the candidates continue.
    """
    top = slice(0, beam)
    ends = (cand_token[:, top] == EOS_ID) & torch.isfinite(cand_scores[:, top])  # (N, beam)
    if not bool(ends.any()):
        return []
    live = prefix.size(0) // cand_scores.size(0)
    sent, rank = ends.nonzero(as_tuple=True)
    rows = sent * live + cand_beam[sent, rank]
    tokens = prefix[rows, 1:].tolist()
    log_probs = cand_scores[sent, rank].tolist()
    return [
        (s, make_hypothesis(t, lp, alpha)) for s, t, lp in zip(sent.tolist(), tokens, log_probs, strict=True)
    ]


def score_step(decoder: IncrementalDecoder, prefix: Tensor, scores: Tensor, step: int, beam: int, **limits):
    """Top candidates (see :func:`top_candidates`) of the live hypotheses ``prefix`` at ``step``."""
    log_probs = decoder.log_probs(prefix)  # (N*K, V), normalised before the constraints
    log_probs = apply_constraints(log_probs, step, limits["min_len"], limits["at_max"])
    return top_candidates(scores, log_probs, beam)


@torch.inference_mode()
def beam_search(
    model: DecodingModel,
    src: Tensor,
    src_mask: Tensor,
    beam: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    nbest: int = 1,
    max_len_cap: int | None = None,
    use_cache: bool = True,
) -> list[list[Hypothesis]]:
    """Beam search; returns for each of the B sentences its ``nbest`` best hypotheses, best first."""
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest={nbest} must be between 1 and beam={beam}.")
    if src.size(0) == 0:
        return []
    batch, device = src.size(0), src.device
    limits = LengthLimits(max_output_lengths(src_mask, max_len_a, max_len_b, max_len_cap))
    memory = model.encode(src, src_mask)  # (N, S, D): one row per sentence, shared by its beams
    decoder = IncrementalDecoder(model, memory, src_mask, use_cache, capacity=limits.steps)
    scores = torch.zeros(batch, 1, device=device)  # (N, K): one live hypothesis (BOS) per sentence
    prefix = _bos(batch, device)  # (N*K, 1 + t)
    sentence = list(range(batch))  # original index of each active sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    for step in range(limits.steps):
        at_max = limits.at_max(step, scores.size(1))
        cand = score_step(decoder, prefix, scores, step, beam, min_len=min_len, at_max=at_max)
        for s, hyp in finish_hypotheses(*cand, prefix, beam, len_penalty):
            finished[sentence[s]].append(hyp)
        keep = [s for s, orig in enumerate(sentence) if len(finished[orig]) < beam and step < limits.host[s]]
        if not keep:
            break
        order = fill_holes(keep)
        live_scores, rows, live_token = _advance(
            next_beams(*cand, beam), order, len(sentence), scores.size(1)
        )
        if len(order) < len(sentence):
            kept = torch.tensor(order, device=device)
            decoder.select_memory(kept)
            limits.keep(order, kept)
        prefix = torch.cat([prefix[rows], live_token.view(-1, 1)], dim=1)  # (N'*K, 1 + t + 1)
        scores, sentence = live_scores, [sentence[s] for s in order]
        decoder.reorder_targets(rows)
    return [_best(hyps, nbest) for hyps in finished]


def _advance(live: tuple[Tensor, Tensor, Tensor], order: list[int], active: int, width: int):
    """The next beams of the sentences ``order`` (of ``active``): scores (N', K), the old row each new
    row continues (N'*K,) for a beam that was ``width`` rows per sentence, and new tokens (N', K).
    Once the beam is full, each hypothesis' best continuation stays in its row (:func:`stable_slots`)."""
    live_scores, live_beam, live_token = live  # (N, K) each, in rank order
    if live_beam.size(1) == width:
        slot = stable_slots(live_beam)
        live_scores, live_beam, live_token = (torch.empty_like(x).scatter_(1, slot, x) for x in live)
    if len(order) < active:
        kept = torch.tensor(order, device=live_beam.device)
        live_scores, live_beam, live_token = live_scores[kept], live_beam[kept], live_token[kept]
    else:
        kept = torch.arange(active, device=live_beam.device)
    rows = (kept[:, None] * width + live_beam).view(-1)  # (N'*K,)
    return live_scores, rows, live_token


def stable_slots(origin: Tensor) -> Tensor:
    """Slot (N, K) of each next hypothesis, given the slots of their hypotheses of origin (N, K), in
    rank order: the best continuation of a hypothesis takes its slot, the others take, in rank order,
    the slots of hypotheses that did not continue. So a row of the cache is copied only when its
    hypothesis gives way to another's second continuation (about a quarter of the rows per step),
    not at every step."""
    width = origin.size(1)
    one_hot = torch.nn.functional.one_hot(origin, width)  # (N, K, K): [n, j, s] = j continues slot s
    first = (one_hot.cumsum(dim=1) * one_hot).sum(dim=2) == 1  # (N, K): best continuation of its slot
    continued = one_hot.any(dim=1)  # (N, K) slots
    free = torch.sort(continued.to(torch.uint8), dim=1, stable=True).indices  # free slots first, ascending
    nth_other = ((~first).cumsum(dim=1) - 1).clamp(min=0)  # (N, K): rank among the other continuations
    return torch.where(first, origin, free.gather(1, nth_other))


def _best(hyps: list[Hypothesis], nbest: int) -> list[Hypothesis]:
    if not hyps:  # only when every continuation was forbidden, e.g. a vocabulary of specials alone
        return [Hypothesis([], -math.inf, -math.inf)]
    return sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest]
