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
early. Nor is beam search's best always at least greedy search's output by its own score: the
greedy prefix can fall out of the beam at some step when ``beam`` others score higher there.
Lengths are capped by the model's positions unless ``max_len_cap`` says otherwise.
"""

from nmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt.search.beam import beam_search, next_beams, stable_slots, top_candidates
from nmt.search.common import (
    DecodingModel,
    Hypothesis,
    IncrementalDecoder,
    LengthLimits,
    fill_holes,
    length_penalty,
    max_output_lengths,
    position_cap,
)
from nmt.search.greedy import greedy_search
from nmt.search.topk import row_top_k

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "PAD_ID",
    "DecodingModel",
    "Hypothesis",
    "IncrementalDecoder",
    "LengthLimits",
    "beam_search",
    "fill_holes",
    "greedy_search",
    "length_penalty",
    "max_output_lengths",
    "position_cap",
    "next_beams",
    "row_top_k",
    "stable_slots",
    "top_candidates",
]
