"""Greedy and beam search: scripted toy models whose best output is known by hand, and a tiny
random Transformer on which independent paths (beam 1 / greedy, cached / uncached, batched /
one sentence at a time) must agree."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from nmt.config import ModelConfig
from nmt.model.cache import RowMoves
from nmt.search import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    beam_search,
    fill_holes,
    greedy_search,
    length_penalty,
    max_output_lengths,
    row_top_k,
    stable_slots,
)

A, B, C, D = 4, 5, 6, 7  # ordinary tokens of the toy vocabulary
VOCAB = 8


class ScriptedCache:
    """Remembers each row's prefix, so a cached decode step sees the same history as an uncached one."""

    def __init__(self) -> None:
        self.prefix: torch.Tensor | None = None  # (R, t)

    @property
    def length(self) -> int:
        return 0 if self.prefix is None else self.prefix.size(1)

    def reorder_targets(self, moves: RowMoves) -> None:
        self.prefix = moves.apply(self.prefix)

    def select_memory(self, moves: RowMoves) -> None:
        pass  # the script is read from the memory rows that search passes to decode


class ScriptedModel:
    """Next-token distributions written by hand.

    ``scripts[first source token][prefix after BOS]`` maps tokens to probabilities; the rest of the
    probability mass is spread over the other tokens (specials included, so PAD/BOS must be blocked
    by the search), slightly more to higher ids so that no two tokens tie.
    """

    def __init__(self, scripts: dict[int, dict[tuple[int, ...], dict[int, float]]]) -> None:
        self.scripts = scripts
        self.decode_calls = 0

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        return src.float()[:, :, None]  # (B, S, 1): row r remembers its script in memory[r, 0, 0]

    def new_cache(self, capacity: int) -> ScriptedCache:
        return ScriptedCache()

    def decode(self, tgt_in, memory, src_mask, cache=None):
        self.decode_calls += 1
        full = tgt_in
        if cache is not None:
            full = tgt_in if cache.prefix is None else torch.cat([cache.prefix, tgt_in], dim=1)
            cache.prefix = full
        group = full.size(0) // memory.size(0)  # target rows served by each memory row (beams)
        assert group * memory.size(0) == full.size(0) == group * src_mask.size(0)
        rows = [self._log_probs(int(memory[r // group, 0, 0]), full[r].tolist()) for r in range(full.size(0))]
        # Search reads only the last position; every position gets the same row to keep this short.
        return torch.stack(rows)[:, None, :].expand(-1, tgt_in.size(1), -1)  # (R, T, V)

    def _log_probs(self, script: int, prefix: list[int]) -> torch.Tensor:
        # A finished hypothesis is never continued. (With beam > allowed tokens, impossible
        # hypotheses of score -inf may fill the spare beam slots; they never finish.)
        assert prefix[0] == BOS_ID and EOS_ID not in prefix
        given = self.scripts[script].get(tuple(prefix[1:]), {})
        weights = torch.tensor(
            [0.0 if t in given else 1.0 + 0.01 * t for t in range(VOCAB)], dtype=torch.float64
        )
        probs = weights / weights.sum() * (1.0 - sum(given.values()))
        for token, p in given.items():
            probs[token] = p
        return probs.log().float()


def toy_batch(*scripts: int, lengths: tuple[int, ...] | None = None):
    """Sources whose first token picks the script; padded to the longest."""
    lengths = lengths or (3,) * len(scripts)
    src = torch.full((len(scripts), max(lengths)), PAD_ID)
    for i, (s, n) in enumerate(zip(scripts, lengths, strict=True)):
        src[i, :n] = s
        src[i, n - 1] = EOS_ID if n > 1 else s
    return src, src != PAD_ID


# Greedy takes A (0.6) but every continuation of A is poor; B (0.4) then EOS (0.9) is better overall.
GARDEN_PATH = {(): {A: 0.6, B: 0.4}, (A,): {EOS_ID: 0.34, C: 0.33, D: 0.3}, (B,): {EOS_ID: 0.9}}
# Short "A" (0.45 * 0.95 = 0.4275) beats long "B C D" (0.5 * 0.95 * 0.95 * 0.9 = 0.406) on raw
# probability; GNMT normalisation with alpha = 1 divides by 7/6 and 9/6 and prefers the long one.
SHORT_OR_LONG = {
    (): {A: 0.45, B: 0.5},
    (A,): {EOS_ID: 0.95},
    (B,): {C: 0.95},
    (B, C): {D: 0.95},
    (B, C, D): {EOS_ID: 0.9},
}
# EOS is the favourite at every step, A the runner-up.
EAGER_TO_END = {(A,) * k: {EOS_ID: 0.9, A: 0.08} for k in range(6)}
NEVER_ENDS = {(A,) * k: {A: 0.9} for k in range(6)}


def test_beam_finds_the_better_total_that_greedy_misses():
    model = ScriptedModel({1: GARDEN_PATH})
    src, mask = toy_batch(1)
    assert greedy_search(model, src, mask) == [[A]]
    best = beam_search(model, src, mask, beam=2, len_penalty=0.0)[0][0]
    assert best.tokens == [B]
    assert best.log_prob == pytest.approx(math.log(0.4 * 0.9), abs=1e-5)


def test_length_penalty_alpha_zero_prefers_short_larger_alpha_long():
    model = ScriptedModel({1: SHORT_OR_LONG})
    src, mask = toy_batch(1)
    short_lp, long_lp = math.log(0.45 * 0.95), math.log(0.5 * 0.95 * 0.95 * 0.9)
    raw = beam_search(model, src, mask, beam=2, len_penalty=0.0, nbest=2)[0]
    assert [h.tokens for h in raw] == [[A], [B, C, D]]
    normalised = beam_search(model, src, mask, beam=2, len_penalty=1.0, nbest=2)[0]
    assert [h.tokens for h in normalised] == [[B, C, D], [A]]
    assert normalised[0].score == pytest.approx(long_lp / length_penalty(4, 1.0), abs=1e-5)
    assert normalised[1].score == pytest.approx(short_lp / (7 / 6), abs=1e-5)
    assert normalised[1].log_prob == pytest.approx(short_lp, abs=1e-5)


@pytest.mark.parametrize("min_len", [0, 1, 2, 3])
def test_min_len_forbids_early_eos(min_len):
    model = ScriptedModel({1: EAGER_TO_END})
    src, mask = toy_batch(1)
    assert greedy_search(model, src, mask, min_len=min_len) == [[A] * min_len]
    hyps = beam_search(model, src, mask, beam=3, min_len=min_len, nbest=3)[0]
    assert hyps[0].tokens == [A] * min_len
    assert all(len(h.tokens) >= min_len for h in hyps)


def test_max_len_forces_eos_per_sentence():
    # Two sentences with source lengths 2 and 4 (EOS included): budgets 0.5 * len + 1 = 2 and 3.
    model = ScriptedModel({1: NEVER_ENDS})
    src, mask = toy_batch(1, 1, lengths=(2, 4))
    assert max_output_lengths(mask, 0.5, 1).tolist() == [2, 3]
    assert greedy_search(model, src, mask, max_len_a=0.5, max_len_b=1) == [[A, A], [A, A, A]]
    hyps = beam_search(model, src, mask, beam=2, max_len_a=0.5, max_len_b=1, len_penalty=0.0)
    assert [h[0].tokens for h in hyps] == [[A, A], [A, A, A]]
    assert greedy_search(model, src, mask, max_len_a=0.5, max_len_b=1, max_len_cap=1) == [[A], [A]]


def test_specials_are_never_generated():
    # PAD and BOS get most of the probability mass; search must skip them.
    model = ScriptedModel({1: {(): {PAD_ID: 0.5, BOS_ID: 0.3, C: 0.15}, (C,): {PAD_ID: 0.8, EOS_ID: 0.15}}})
    src, mask = toy_batch(1)
    assert greedy_search(model, src, mask) == [[C]]
    assert beam_search(model, src, mask, beam=3)[0][0].tokens == [C]


def test_nbest_sorted_by_score_and_unique():
    model = ScriptedModel({1: GARDEN_PATH, 2: SHORT_OR_LONG})
    src, mask = toy_batch(1, 2)
    for alpha in (0.0, 1.0):
        for hyps in beam_search(model, src, mask, beam=4, nbest=4, len_penalty=alpha):
            assert len(hyps) == 4
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
            assert len({tuple(h.tokens) for h in hyps}) == 4


def test_scripted_batch_equals_one_sentence_at_a_time():
    # Sentences finish at different steps, so rows drop out of the batch and the survivors'
    # bookkeeping (sentence index, prefix, cache row) must stay aligned.
    scripts = {1: GARDEN_PATH, 2: SHORT_OR_LONG, 3: EAGER_TO_END, 4: NEVER_ENDS}
    model = ScriptedModel(scripts)
    src, mask = toy_batch(4, 1, 3, 2, 4, lengths=(5, 3, 2, 4, 3))
    greedy_batch = greedy_search(model, src, mask, min_len=0)
    beam_batch = beam_search(model, src, mask, beam=3, nbest=3, min_len=0)
    for i in range(src.size(0)):
        one_src, one_mask = src[i : i + 1, : int(mask[i].sum())], mask[i : i + 1, : int(mask[i].sum())]
        assert greedy_search(model, one_src, one_mask, min_len=0) == [greedy_batch[i]]
        alone = beam_search(model, one_src, one_mask, beam=3, nbest=3, min_len=0)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in beam_batch[i]]


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_one_equals_greedy_on_scripted_model(use_cache):
    model = ScriptedModel({1: GARDEN_PATH, 2: SHORT_OR_LONG, 3: EAGER_TO_END, 4: NEVER_ENDS})
    src, mask = toy_batch(1, 2, 3, 4, lengths=(3, 2, 4, 3))
    greedy = greedy_search(model, src, mask, use_cache=use_cache)
    beam = beam_search(model, src, mask, beam=1, use_cache=use_cache)
    assert [h[0].tokens for h in beam] == greedy


def count_rows(model: ScriptedModel) -> list[int]:
    """Records the number of rows of every decoder call."""
    rows_seen: list[int] = []
    decode = model.decode
    model.decode = lambda tgt_in, *args: rows_seen.append(tgt_in.size(0)) or decode(tgt_in, *args)
    return rows_seen


def test_finished_sentences_stop_costing_decoder_work():
    # The first sentence is done after step 0 (greedy) or step 1 (beam 2 needs two finished
    # hypotheses); the second runs to its 20-token limit. From then on only its rows are decoded.
    scripts = {1: {(): {EOS_ID: 0.99}}, 2: {(A,) * k: {A: 0.9} for k in range(21)}}
    src, mask = toy_batch(1, 2)
    model = ScriptedModel(scripts)
    rows_seen = count_rows(model)
    assert greedy_search(model, src, mask, max_len_a=0, max_len_b=20, min_len=0) == [[], [A] * 20]
    assert rows_seen == [2] + [1] * 20
    model = ScriptedModel(
        {1: {(): {EOS_ID: 0.99}, **{(t,): {EOS_ID: 0.99} for t in range(VOCAB)}}, 2: scripts[2]}
    )
    rows_seen = count_rows(model)
    hyps = beam_search(model, src, mask, beam=2, max_len_a=0, max_len_b=20, min_len=0)
    assert hyps[0][0].tokens == [] and hyps[1][0].tokens == [A] * 20
    # The first step decodes one row per sentence (every beam would start from the same BOS).
    assert rows_seen == [2, 4] + [2] * 19


# ---- a tiny random Transformer ---------------------------------------------------------------


def tiny_transformer(seed: int = 0, vocab: int = 40):
    from nmt.model import Transformer

    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, dropout=0.0, max_positions=64
    )
    model = Transformer(cfg, vocab, vocab).eval()
    with torch.no_grad():  # sharper distributions than at initialisation, so outputs vary in length
        model.output.weight.mul_(4.0)
    return model


def random_batch(seed: int = 0, vocab: int = 40, lengths=(7, 3, 9, 1, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD_ID)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=g)
        src[i, n - 1] = EOS_ID
    return src, src != PAD_ID


def test_transformer_beam_one_equals_greedy():
    model, (src, mask) = tiny_transformer(), random_batch()
    greedy = greedy_search(model, src, mask, max_len_a=1.0, max_len_b=5)
    beam = beam_search(model, src, mask, beam=1, max_len_a=1.0, max_len_b=5)
    assert [h[0].tokens for h in beam] == greedy
    assert len({len(t) for t in greedy}) > 1  # the test means something only if lengths differ


def test_transformer_cached_equals_uncached():
    model, (src, mask) = tiny_transformer(1), random_batch(1)
    kwargs = dict(max_len_a=1.0, max_len_b=5)
    assert greedy_search(model, src, mask, **kwargs) == greedy_search(
        model, src, mask, use_cache=False, **kwargs
    )
    cached = beam_search(model, src, mask, beam=4, nbest=4, **kwargs)
    uncached = beam_search(model, src, mask, beam=4, nbest=4, use_cache=False, **kwargs)
    for a, b in zip(cached, uncached, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_transformer_batch_equals_one_sentence_at_a_time_and_nbest_sorted():
    model, (src, mask) = tiny_transformer(2), random_batch(2)
    batch = beam_search(model, src, mask, beam=5, nbest=5, len_penalty=1.0, max_len_a=1.0, max_len_b=5)
    for i, hyps in enumerate(batch):
        n = int(mask[i].sum())
        alone = beam_search(
            model, src[i : i + 1, :n], mask[i : i + 1, :n], beam=5, nbest=5, max_len_a=1.0, max_len_b=5
        )
        assert [h.tokens for h in alone[0]] == [h.tokens for h in hyps]
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True) and len(hyps) == 5
        for h in hyps:  # the score is the length-normalised log-probability
            assert h.score == pytest.approx(h.log_prob / length_penalty(len(h.tokens) + 1, 1.0))
            assert len(h.tokens) <= int(1.0 * n + 5)


def test_transformer_log_prob_matches_teacher_forcing():
    # The score beam search reports equals the log-probability of its output under forward().
    model, (src, mask) = tiny_transformer(3), random_batch(3, lengths=(6,))
    hyp = beam_search(model, src, mask, beam=3, max_len_a=1.0, max_len_b=5)[0][0]
    tgt = torch.tensor([[BOS_ID] + hyp.tokens + [EOS_ID]])
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src, tgt[:, :-1]).float(), dim=-1)[0]  # (T, V)
    expected = log_probs.gather(1, tgt[0, 1:, None]).sum().item()
    assert hyp.log_prob == pytest.approx(expected, abs=1e-4)


def test_output_lengths_are_capped_by_the_model_positions_by_default():
    from nmt.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=32, max_positions=8)
    model = Transformer(cfg, 20, 20).eval()
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 11, EOS_ID]])
    # max_len 26 tokens, but BOS + 7 fill the 8 positions; min_len forbids EOS until it is forced.
    kwargs = dict(max_len_a=2.0, max_len_b=10, min_len=100)
    assert len(greedy_search(model, src, src != PAD_ID, **kwargs)[0]) == 7
    hyps = beam_search(model, src, src != PAD_ID, beam=3, nbest=3, **kwargs)[0]
    assert [len(h.tokens) for h in hyps] == [7, 7, 7]


# ---- against a plain reference: one sentence, one hypothesis at a time, no cache, float64 --------


@torch.no_grad()
def reference_log_probs(model, src_ids: tuple[int, ...], prefix: tuple[int, ...]) -> torch.Tensor:
    src = torch.tensor([src_ids])
    logits = model.decode(torch.tensor([[BOS_ID, *prefix]]), encoded(model, src_ids), src != PAD_ID)
    return torch.log_softmax(logits[0, -1].double(), dim=-1)


@functools.cache
def encoded(model, src_ids: tuple[int, ...]) -> torch.Tensor:
    src = torch.tensor([src_ids])
    return model.encode(src, src != PAD_ID)


def constrained(log_probs: torch.Tensor, step: int, max_len: int, min_len: int) -> torch.Tensor:
    """The rules of nmt.search's docstring, written out for one hypothesis."""
    log_probs[[PAD_ID, BOS_ID]] = -math.inf
    if step == max_len:  # EOS is forced, with its own score
        eos = log_probs[EOS_ID].item()
        log_probs[:] = -math.inf
        log_probs[EOS_ID] = eos
    elif step < min_len:
        log_probs[EOS_ID] = -math.inf
    return log_probs


def reference_greedy(model, src_ids, max_len, min_len) -> list[int]:
    tokens: tuple[int, ...] = ()
    for step in range(max_len + 1):
        best = int(constrained(reference_log_probs(model, src_ids, tokens), step, max_len, min_len).argmax())
        if best == EOS_ID:
            return list(tokens)
        tokens += (best,)
    raise AssertionError("EOS is forced at max_len")


def reference_beam(model, src_ids, beam, alpha, max_len, min_len) -> list[tuple[list[int], float]]:
    """(tokens, score) of every finished hypothesis, best first."""
    live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    finished = []
    for step in range(max_len + 1):
        candidates = []  # (total log-probability, prefix, next token)
        for tokens, total in live:
            log_probs = constrained(reference_log_probs(model, src_ids, tokens), step, max_len, min_len)
            values, ids = log_probs.topk(2 * beam)
            candidates += [(total + v, tokens, t) for v, t in zip(values.tolist(), ids.tolist(), strict=True)]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam]
        for total, tokens, token in candidates[:beam]:
            if token == EOS_ID and total > -math.inf:
                finished.append((list(tokens), total / length_penalty(len(tokens) + 1, alpha)))
        if len(finished) >= beam or step == max_len:
            return sorted(finished, key=lambda h: -h[1])
        live = [(tokens + (token,), total) for total, tokens, token in candidates if token != EOS_ID][:beam]
    raise AssertionError("unreachable")


def eos_prone_transformer(seed: int, eos_bonus: float):
    """A random float64 Transformer whose hypotheses end at many different lengths."""
    from nmt.model import Transformer

    class EosProne(Transformer):
        def decode(self, *args, **kwargs):
            logits = super().decode(*args, **kwargs)
            logits[..., EOS_ID] += eos_bonus
            return logits

    torch.manual_seed(seed)
    cfg = ModelConfig(
        d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, dropout=0.0, max_positions=64
    )
    return EosProne(cfg, 40, 40).double().eval()


@pytest.mark.parametrize(
    "seed, eos_bonus, beam, nbest, alpha, min_len",
    [
        (1, 3, 1, 1, 0.0, 0),
        (2, 2, 3, 2, 1.0, 1),
        (3, 2, 5, 5, 0.0, 3),
        (4, 3, 4, 1, 2.0, 0),
        (0, 2, 6, 3, 0.6, 2),
    ],
)
def test_batched_search_equals_a_plain_reference(seed, eos_bonus, beam, nbest, alpha, min_len):
    model = eos_prone_transformer(seed, eos_bonus)
    src, mask = random_batch(seed)
    max_len_a, max_len_b = 1.0, 3
    got = beam_search(
        model, src, mask, beam=beam, nbest=nbest, len_penalty=alpha, min_len=min_len,
        max_len_a=max_len_a, max_len_b=max_len_b,
    )  # fmt: skip
    greedy = greedy_search(model, src, mask, min_len=min_len, max_len_a=max_len_a, max_len_b=max_len_b)
    lengths, ended_early = set(), False
    for i, hyps in enumerate(got):
        src_ids = tuple(src[i, : int(mask[i].sum())].tolist())
        max_len = int(max_len_a * len(src_ids) + max_len_b)
        expected = reference_beam(model, src_ids, beam, alpha, max_len, min_len)[:nbest]
        assert [h.tokens for h in hyps] == [tokens for tokens, _ in expected]
        assert [h.score for h in hyps] == pytest.approx([score for _, score in expected], abs=1e-4)
        assert greedy[i] == reference_greedy(model, src_ids, max_len, min_len)
        lengths.update(len(h.tokens) for h in hyps)
        ended_early |= any(len(h.tokens) < max_len for h in hyps) or len(greedy[i]) < max_len
    # Hypotheses ended by EOS at different steps, so finishing and dropping rows were exercised.
    assert len(lengths) > 2 and ended_early


# ---- selection over the vocabulary -----------------------------------------------------------


@pytest.mark.parametrize("vocab", [1024, 4000, 8000, 1031])  # 1031 is prime: the plain path
def test_row_top_k_equals_torch_topk(vocab):
    g = torch.Generator().manual_seed(vocab)
    x = torch.randn(33, vocab, generator=g)
    x[0] = -math.inf  # a row with nothing allowed
    x[1, :] = -math.inf
    x[1, EOS_ID] = 0.0  # a row forced to end
    x[2, vocab - 1] = 100.0  # the maximum in the last block
    x[3, :] = 1.0  # all tied: the first index wins
    for k in (1, 2, 10):
        values, tokens = row_top_k(x, k)
        expected_values, expected_tokens = x.topk(k, dim=1)
        torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
        assert torch.equal(tokens[4:], expected_tokens[4:])  # rows without ties
        assert torch.equal(x.gather(1, tokens), values)


@pytest.mark.parametrize("seed", range(5))
def test_stable_slots_keep_each_hypothesis_best_continuation_in_its_row(seed):
    g = torch.Generator().manual_seed(seed)
    beam = 5
    origin = torch.randint(0, beam, (50, beam), generator=g)  # (N, K): slot each next hypothesis continues
    slot = stable_slots(origin)
    for o, s in zip(origin.tolist(), slot.tolist(), strict=True):
        assert sorted(s) == list(range(beam))  # a permutation: every slot is used once
        firsts = [j for j in range(beam) if o[j] not in o[:j]]
        assert all(s[j] == o[j] for j in firsts)  # the best continuation stays in its hypothesis' row
        others = [s[j] for j in range(beam) if j not in firsts]
        assert others == sorted(set(range(beam)) - set(o))  # the rest fill the free rows, in rank order
    rows = torch.empty_like(origin).scatter_(1, slot, origin) + torch.arange(50)[:, None] * beam
    assert RowMoves(rows.view(-1), old_rows=50 * beam).in_place  # the cache copies only replaced rows


@pytest.mark.parametrize("keep", [[0, 1, 2, 3], [1, 2, 3], [0, 2], [3], [0, 4, 5, 7], []])
def test_fill_holes_moves_only_sentences_from_the_end(keep):
    order = fill_holes(keep)
    assert sorted(order) == keep
    assert all(p == s for p, s in enumerate(order) if s < len(keep))  # the others stay where they were
    if keep:
        assert RowMoves(torch.tensor(order), old_rows=8).in_place
