"""Batched greedy and beam search over ``model.encode`` / ``model.decode`` with the KV cache.

Both searches decode a whole batch of sentences in lock step and drop a sentence from the
batch as soon as it is finished, so long sentences do not keep paying for short ones: the
rows of the encoder output, the source mask and the KV cache are selected with one index per
step (``cache.reorder``), the same operation that beam search needs anyway to follow beam
origins.

Lengths. A hypothesis holds at most ``max_len = floor(max_len_a * src_len + max_len_b)``
tokens (``src_len`` counts the real source tokens of that sentence, EOS included, padding
excluded), then EOS is forced. EOS is forbidden before ``min_len`` tokens (unless it is forced
at the same step). PAD and BOS are never generated.

Scores. A hypothesis' ``log_prob`` sums the log-probabilities of its tokens and of its EOS.
Beam search ranks finished hypotheses by the GNMT-normalised
``score = log_prob / ((5 + length) / 6) ** len_penalty`` where ``length`` counts EOS too, so
``len_penalty = 0`` ranks by raw log-probability (favouring short outputs) and larger values
favour longer ones.

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

NEVER_GENERATED = (PAD_ID, BOS_ID)


class DecodingModel(Protocol):
    """What search needs from a model (nmt.model.Transformer provides it)."""

    def encode(self, src: Tensor, src_mask: Tensor) -> Tensor: ...

    def decode(self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor, cache=None) -> Tensor: ...

    def new_cache(self): ...


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


# ---- constraints: log-probs in, log-probs out (rows of the active batch) -------------------------


def forbid_tokens(log_probs: Tensor, token_ids: tuple[int, ...]) -> Tensor:
    log_probs[:, list(token_ids)] = -math.inf
    return log_probs


def forbid_eos(log_probs: Tensor, rows: Tensor) -> Tensor:
    """Rows (bool (R,)) that are shorter than the minimum length may not end."""
    log_probs[:, EOS_ID].masked_fill_(rows, -math.inf)
    return log_probs


def force_eos(log_probs: Tensor, rows: Tensor) -> Tensor:
    """Rows (bool (R,)) that reached their maximum length must end; EOS keeps its own log-prob."""
    eos = log_probs[:, EOS_ID].clone()
    log_probs.masked_fill_(rows[:, None], -math.inf)
    log_probs[:, EOS_ID] = eos
    return log_probs


def apply_constraints(log_probs: Tensor, step: int, min_len: int, max_lens: Tensor) -> Tensor:
    """All constraints at decoding step ``step`` (= tokens generated so far); max_lens is (R,)."""
    at_max = max_lens <= step
    log_probs = forbid_tokens(log_probs, NEVER_GENERATED)
    if step < min_len:
        log_probs = forbid_eos(log_probs, ~at_max)
    return force_eos(log_probs, at_max)


# ---- the model side: one object follows the rows of the batch ---------------------------------


class IncrementalDecoder:
    """Encoder output, source mask and KV cache of the active rows; scores one step.

    With ``use_cache=False`` each step re-runs the decoder over the whole prefix: slow, but it is
    the reference that the cached path must agree with.
    """

    def __init__(self, model: DecodingModel, memory: Tensor, src_mask: Tensor, use_cache: bool = True):
        self.model = model
        self.memory = memory  # (R, S, D)
        self.src_mask = src_mask  # (R, S)
        self.cache = model.new_cache() if use_cache else None

    def log_probs(self, prefix: Tensor) -> Tensor:
        """Next-token log-probabilities (R, V) in float32 for prefixes (R, t) that start with BOS."""
        tgt_in = prefix[:, -1:] if self.cache is not None else prefix
        logits = self.model.decode(tgt_in, self.memory, self.src_mask, self.cache)[:, -1]  # (R, V)
        # bf16/fp16 logits lose too much precision for summed log-probs.
        return torch.log_softmax(logits.float(), dim=-1)

    def select(self, rows: Tensor) -> None:
        """Row ``i`` continues from old row ``rows[i]`` (rows may repeat or disappear)."""
        self.memory = self.memory.index_select(0, rows)
        self.src_mask = self.src_mask.index_select(0, rows)
        if self.cache is not None:
            self.cache.reorder(rows)


def _bos(rows: int, device: torch.device) -> Tensor:
    return torch.full((rows, 1), BOS_ID, dtype=torch.long, device=device)  # (R, 1)


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
    max_lens = max_output_lengths(src_mask, max_len_a, max_len_b, max_len_cap)
    decoder = IncrementalDecoder(model, model.encode(src, src_mask), src_mask, use_cache)
    outputs: list[list[int]] = [[] for _ in range(src.size(0))]
    sentence = list(range(src.size(0)))  # original index of each active row
    prefix = _bos(src.size(0), src.device)  # (R, 1 + t)
    for step in range(int(max_lens.max()) + 1):
        log_probs = apply_constraints(decoder.log_probs(prefix), step, min_len, max_lens)
        next_token = log_probs.argmax(dim=-1)  # (R,)
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
        ended = (next_token == EOS_ID).tolist()
        if not any(ended):
            continue
        done = [i for i, e in enumerate(ended) if e]
        for row, tokens in zip(done, prefix[done, 1:-1].tolist(), strict=True):
            outputs[sentence[row]] = tokens
        keep = [i for i, e in enumerate(ended) if not e]
        if not keep:
            break
        rows = torch.tensor(keep, device=src.device)
        sentence = [sentence[i] for i in keep]
        prefix, max_lens = prefix[rows], max_lens[rows]
        decoder.select(rows)
    return outputs


# ---- beam ------------------------------------------------------------------------------------


def top_candidates(scores: Tensor, log_probs: Tensor, beam: int) -> tuple[Tensor, Tensor, Tensor]:
    """Best ``2 * beam`` continuations per sentence.

    ``scores`` (N, K) are the live hypotheses' log-probs, ``log_probs`` (N*K, V) their next-token
    log-probs. Returns candidate scores, beam of origin and token, each (N, 2K), best first.
    Twice the beam guarantees ``beam`` candidates that do not end in EOS (each beam row offers
    only one EOS).
    """
    n, vocab = scores.size(0), log_probs.size(1)
    total = (scores.reshape(-1, 1) + log_probs).view(n, beam * vocab)  # (N, K*V)
    cand_scores, flat = total.topk(min(2 * beam, beam * vocab), dim=1)  # (N, 2K)
    return cand_scores, torch.div(flat, vocab, rounding_mode="floor"), flat % vocab


def next_beams(cand_scores: Tensor, cand_beam: Tensor, cand_token: Tensor, beam: int):
    """The ``beam`` best candidates that do not end in EOS, in rank order: each (N, K)."""
    # A stable sort on "is EOS" moves non-EOS candidates to the front without changing their order.
    order = torch.sort((cand_token == EOS_ID).to(torch.uint8), dim=1, stable=True).indices[:, :beam]
    return cand_scores.gather(1, order), cand_beam.gather(1, order), cand_token.gather(1, order)


def finish_hypotheses(
    cand_scores: Tensor, cand_beam: Tensor, cand_token: Tensor, prefix: Tensor, beam: int, alpha: float
) -> list[tuple[int, Hypothesis]]:
    """Candidates among the first ``beam`` that end in EOS, as (active sentence, Hypothesis)."""
    top = slice(0, beam)
    ends = (cand_token[:, top] == EOS_ID) & torch.isfinite(cand_scores[:, top])  # (N, K)
    if not bool(ends.any()):
        return []
    sent, rank = ends.nonzero(as_tuple=True)
    rows = sent * beam + cand_beam[sent, rank]
    tokens = prefix[rows, 1:].tolist()
    log_probs = cand_scores[sent, rank].tolist()
    return [
        (s, make_hypothesis(t, lp, alpha)) for s, t, lp in zip(sent.tolist(), tokens, log_probs, strict=True)
    ]


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
    max_lens = max_output_lengths(src_mask, max_len_a, max_len_b, max_len_cap)
    sentence_max = max_lens.tolist()
    memory = model.encode(src, src_mask).repeat_interleave(beam, dim=0)  # (B*K, S, D)
    decoder = IncrementalDecoder(model, memory, src_mask.repeat_interleave(beam, dim=0), use_cache)
    row_max = max_lens.repeat_interleave(beam)  # (B*K,)
    # At first all K rows are the same BOS prefix: only one may live, or the beam fills with copies.
    scores = torch.full((batch, beam), -math.inf, device=device)  # (N, K)
    scores[:, 0] = 0.0
    prefix = _bos(batch * beam, device)  # (N*K, 1 + t)
    sentence = list(range(batch))  # original index of each active sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    for step in range(max(sentence_max) + 1):
        log_probs = apply_constraints(decoder.log_probs(prefix), step, min_len, row_max)
        cand = top_candidates(scores, log_probs, beam)
        for s, hyp in finish_hypotheses(*cand, prefix, beam, len_penalty):
            finished[sentence[s]].append(hyp)
        live_scores, live_beam, live_token = next_beams(*cand, beam)
        keep = [
            s for s, orig in enumerate(sentence) if len(finished[orig]) < beam and step < sentence_max[orig]
        ]
        if not keep:
            break
        kept = torch.tensor(keep, device=device)
        rows = (kept[:, None] * beam + live_beam[kept]).view(-1)  # (N'*K,) old row of each new row
        prefix = torch.cat([prefix[rows], live_token[kept].view(-1, 1)], dim=1)
        scores, row_max = live_scores[kept], row_max[rows]
        sentence = [sentence[s] for s in keep]
        decoder.select(rows)
    return [_best(hyps, nbest) for hyps in finished]


def _best(hyps: list[Hypothesis], nbest: int) -> list[Hypothesis]:
    if not hyps:  # only when every continuation was forbidden, e.g. a vocabulary of specials alone
        return [Hypothesis([], -math.inf, -math.inf)]
    return sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest]
