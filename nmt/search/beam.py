"""Batched beam search with the GNMT length penalty."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from nmt.data.tokenizer import EOS_ID
from nmt.model.cache import RowMoves
from nmt.search.common import (
    DecodingModel,
    Hypothesis,
    IncrementalDecoder,
    LengthLimits,
    apply_constraints,
    bos_prefix,
    fill_holes,
    make_hypothesis,
    max_output_lengths,
    position_cap,
)
from nmt.search.topk import row_top_k


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


def score_step(
    decoder: IncrementalDecoder,
    prefix: Tensor,
    scores: Tensor,
    step: int,
    beam: int,
    min_len: int,
    at_max: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top candidates (see :func:`top_candidates`) of the live hypotheses ``prefix`` at ``step``
    (``min_len``, ``at_max``: see :func:`nmt.search.common.apply_constraints`)."""
    log_probs = decoder.log_probs(prefix)  # (N*K, V), normalised before the constraints
    log_probs = apply_constraints(log_probs, step, min_len, at_max)
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
    """Beam search; returns for each of the B sentences its ``nbest`` best hypotheses, best first.

    ``max_len_cap`` bounds every output length; by default the model's positions do (``position_cap``).
    """
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest={nbest} must be between 1 and beam={beam}.")
    if src.size(0) == 0:
        return []
    batch, device = src.size(0), src.device
    cap = position_cap(model, max_len_cap)
    limits = LengthLimits(max_output_lengths(src_mask, max_len_a, max_len_b, cap))
    memory = model.encode(src, src_mask)  # (N, S, D): one row per sentence, shared by its beams
    decoder = IncrementalDecoder(model, memory, src_mask, use_cache, capacity=limits.steps)
    scores = torch.zeros(batch, 1, device=device)  # (N, K): one live hypothesis (BOS) per sentence
    prefix = bos_prefix(batch, device)  # (N*K, 1 + t)
    sentence = list(range(batch))  # original index of each active sentence
    finished: list[list[Hypothesis]] = [[] for _ in range(batch)]
    for step in range(limits.steps):
        at_max = limits.at_max(step, scores.size(1))
        cand = score_step(decoder, prefix, scores, step, beam, min_len, at_max)
        for s, hyp in finish_hypotheses(*cand, prefix, beam, len_penalty):
            finished[sentence[s]].append(hyp)
        keep = [s for s, orig in enumerate(sentence) if len(finished[orig]) < beam and step < limits.host[s]]
        if not keep:
            break
        order = fill_holes(keep)
        kept = torch.tensor(order, device=device) if len(order) < len(sentence) else None
        live_scores, rows, live_token = _advance(next_beams(*cand, beam), kept, len(sentence), scores.size(1))
        if kept is not None:
            decoder.select_memory(kept)
            limits.keep(order, kept)
        decoder.reorder_targets(RowMoves(rows, prefix.size(0)))
        prefix = torch.cat([prefix[rows], live_token.view(-1, 1)], dim=1)  # (N'*K, 1 + t + 1)
        scores, sentence = live_scores, [sentence[s] for s in order]
    return [_best(hyps, nbest) for hyps in finished]


def _advance(live: tuple[Tensor, Tensor, Tensor], kept: Tensor | None, active: int, width: int):
    """The next beams of the sentences ``kept`` (N',) of the ``active`` ones (None: all of them, in
    order): scores (N', K), the old row each new row continues (N'*K,) for a beam that was ``width``
    rows per sentence, and new tokens (N', K).
    Once the beam is full, each hypothesis' best continuation stays in its row (:func:`stable_slots`)."""
    live_scores, live_beam, live_token = live  # (N, K) each, in rank order
    if live_beam.size(1) == width:
        slot = stable_slots(live_beam)
        live_scores, live_beam, live_token = (torch.empty_like(x).scatter_(1, slot, x) for x in live)
    if kept is not None:
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
