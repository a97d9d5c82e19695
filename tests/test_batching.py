"""Collation, token-budget length buckets, per-epoch shuffling, DDP sharding and mid-epoch resume."""

from __future__ import annotations

import itertools

import datasets
import numpy as np
import pytest
import torch

from nmt.data.batching import (
    Batch,
    BatchLoader,
    PackedPairs,
    TokenBatchSampler,
    collate,
    make_loader,
    padding_efficiency,
)
from nmt.data.corpus import ENCODED_FEATURES
from nmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID


def random_ids(count: int, seed: int = 0, max_len: int = 40) -> tuple[list[list[int]], list[list[int]]]:
    """Encoded-looking pairs: sources end in EOS, targets are pieces only (possibly empty)."""
    rng = np.random.default_rng(seed)
    src = [[*rng.integers(4, 50, rng.integers(0, max_len)).tolist(), EOS_ID] for _ in range(count)]
    tgt = [rng.integers(4, 50, rng.integers(0, max_len)).tolist() for _ in range(count)]
    return src, tgt


def sampler_for(pairs: PackedPairs, max_tokens: int = 200, **kwargs) -> TokenBatchSampler:
    return TokenBatchSampler(pairs.src_lengths, pairs.tgt_lengths, max_tokens, **kwargs)


@pytest.fixture(scope="module")
def pairs() -> PackedPairs:
    return PackedPairs.from_lists(*random_ids(500))


def epoch_batches(sampler: TokenBatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


# ---- collation ------------------------------------------------------------------------------------


def test_collate_by_hand():
    batch = collate([[5, 6, EOS_ID], [7, EOS_ID]], [[8, 9], [10]], [4, 1])
    assert batch.src.tolist() == [[5, 6, EOS_ID], [7, EOS_ID, PAD_ID]]
    assert batch.tgt_in.tolist() == [[BOS_ID, 8, 9], [BOS_ID, 10, PAD_ID]]
    assert batch.tgt_out.tolist() == [[8, 9, EOS_ID], [10, EOS_ID, PAD_ID]]
    assert batch.src_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.indices.tolist() == [4, 1] and batch.size == 2
    assert (batch.num_src_tokens, batch.num_tgt_tokens) == (5, 5)
    assert all(t.dtype == torch.long for t in (batch.src, batch.tgt_in, batch.tgt_out, batch.indices))


def assert_same_batch(a: Batch, b: Batch) -> None:
    for name in ("src", "tgt_in", "tgt_out", "indices"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.num_src_tokens, a.num_tgt_tokens) == (b.num_src_tokens, b.num_tgt_tokens)


def test_packed_collate_matches_list_collate():
    src, tgt = random_ids(60, seed=3)
    tgt[5] = []  # an empty target still gets BOS in and EOS out
    packed = PackedPairs.from_lists(src, tgt)
    for rows in ([5], [0, 1, 2], list(range(59, 30, -3)), list(range(60))):
        expected = collate([src[i] for i in rows], [tgt[i] for i in rows], rows)
        assert_same_batch(packed.collate(rows), expected)


def test_packed_pairs_from_a_selected_dataset_keep_its_row_order():
    src, tgt = random_ids(40, seed=4)
    columns = {"src_ids": src, "tgt_ids": tgt, "index": list(range(40))}
    full = datasets.Dataset.from_dict(columns, features=ENCODED_FEATURES)
    rows = [39, 3, 17, 17, 0, 25]
    for ds in (
        full.select(rows),
        full.select(range(10, 16)).flatten_indices(),
        full.train_test_split(0.5, seed=0)["test"],
    ):
        packed = PackedPairs.from_dataset(ds)
        order = list(range(len(ds)))
        expected = collate(ds["src_ids"][:], ds["tgt_ids"][:], order)
        assert_same_batch(packed.collate(order), expected)


def test_batch_to_and_pin_memory_keep_contents():
    batch = collate([[5, EOS_ID]], [[6, 7]], [0])
    moved = batch.to("cpu", non_blocking=True)
    assert_same_batch(moved, batch)
    assert_same_batch(batch.pin_memory(), batch)


# ---- token budget and bucketing ---------------------------------------------------------------------


def test_every_example_once_and_budget_respected(pairs):
    sampler = sampler_for(pairs, max_tokens=200)
    for epoch in range(3):
        batches = epoch_batches(sampler, epoch)
        assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(pairs)))
        for batch in batches:
            width = max(pairs.src_lengths[batch].max(), pairs.tgt_lengths[batch].max())
            assert len(batch) * width <= 200


def test_collated_batches_fit_the_budget(pairs):
    loader = BatchLoader(pairs, sampler_for(pairs, max_tokens=150))
    for batch in loader:
        assert batch.size * max(batch.src.size(1), batch.tgt_in.size(1)) <= 150


def test_example_over_budget_gets_its_own_batch(caplog):
    sampler = TokenBatchSampler([5, 50, 5, 5], [5, 5, 5, 5], max_tokens=20)
    batches = list(sampler)
    assert [1] in batches and sorted(itertools.chain.from_iterable(batches)) == [0, 1, 2, 3]
    assert "longer than max_tokens=20" in caplog.text


def test_bucketing_keeps_padding_low():
    rng = np.random.default_rng(0)
    src = rng.integers(2, 60, 5000)
    tgt = np.clip(src + rng.integers(-5, 6, 5000), 1, None)
    sampler = TokenBatchSampler(src, tgt, max_tokens=2048)
    bucketed = padding_efficiency(list(sampler), src, tgt)
    sizes = [len(b) for b in sampler.rank_batches()]
    unsorted = np.array_split(rng.permutation(5000), np.cumsum(sizes)[:-1])
    assert bucketed > 0.9 > padding_efficiency(unsorted, src, tgt) + 0.2


def test_padding_efficiency_by_hand():
    src, tgt = np.array([2, 4, 3]), np.array([3, 1, 3])
    assert padding_efficiency([[0, 1]], src, tgt) == pytest.approx(10 / 14)
    assert padding_efficiency([[0, 1], [2]], src, tgt) == pytest.approx(16 / 20)


# ---- shuffling --------------------------------------------------------------------------------------


def test_shuffle_is_deterministic_per_seed_and_epoch(pairs):
    a, b = sampler_for(pairs, seed=7), sampler_for(pairs, seed=7)
    assert epoch_batches(a, 3) == epoch_batches(b, 3)
    assert epoch_batches(a, 4) != epoch_batches(a, 3)
    assert epoch_batches(sampler_for(pairs, seed=8), 3) != epoch_batches(b, 3)
    # more than the batch order changes: the groupings of equal-length examples differ too
    assert {tuple(sorted(x)) for x in epoch_batches(a, 4)} != {tuple(sorted(x)) for x in epoch_batches(a, 3)}
    # and the batch order is shuffled, not shortest-first
    widths = [int(np.maximum(pairs.src_lengths[b], pairs.tgt_lengths[b]).max()) for b in epoch_batches(a, 3)]
    assert widths != sorted(widths)


def test_without_shuffle_order_is_fixed_and_sorted(pairs):
    sampler = sampler_for(pairs, shuffle=False)
    first = epoch_batches(sampler, 0)
    assert epoch_batches(sampler, 5) == first
    widths = np.maximum(pairs.src_lengths, pairs.tgt_lengths)
    flat = list(itertools.chain.from_iterable(first))
    assert list(widths[flat]) == sorted(widths[flat])


# ---- distributed sharding -----------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [2, 3, 4, 7])
def test_ranks_get_equal_counts_disjoint_batches_covering_the_data(pairs, world_size):
    for epoch in (0, 1):
        per_rank = [
            epoch_batches(sampler_for(pairs, rank=r, world_size=world_size), epoch) for r in range(world_size)
        ]
        assert len({len(batches) for batches in per_rank}) == 1
        seen = [set(itertools.chain.from_iterable(batches)) for batches in per_rank]
        assert sum(len(s) for s in seen) == len(pairs)  # disjoint ...
        assert set().union(*seen) == set(range(len(pairs)))  # ... and complete
        single = epoch_batches(sampler_for(pairs), epoch)
        assert len(per_rank[0]) * world_size in range(len(single), len(single) + world_size)


def test_fewer_examples_than_ranks_still_gives_every_rank_a_batch(caplog):
    ranks = [list(TokenBatchSampler([3, 4], [3, 4], 100, rank=r, world_size=3)) for r in range(3)]
    assert [len(batches) for batches in ranks] == [1, 1, 1]
    assert set(itertools.chain.from_iterable(itertools.chain.from_iterable(ranks))) == {0, 1}
    assert "2 examples for 3 ranks: some are seen up to 2 times" in caplog.text


def test_single_example_batches_that_do_not_divide_among_ranks_repeat_and_say_so(caplog):
    """Three pairs that fit one per batch, two ranks: one pair is trained twice, and the warning says
    why (it is not that there are fewer examples than ranks)."""
    samplers = [TokenBatchSampler([40] * 3, [40] * 3, 66, rank=r, world_size=2) for r in range(2)]
    ranks = [list(sampler) for sampler in samplers]
    assert [len(batches) for batches in ranks] == [2, 2]
    seen = [int(i) for batches in ranks for batch in batches for i in batch]
    assert sorted(set(seen)) == [0, 1, 2] and len(seen) == 4
    assert "every batch holds one example and 3 batches do not divide among 2 ranks" in caplog.text


def test_invalid_rank():
    with pytest.raises(ValueError, match="rank=2"):
        TokenBatchSampler([1], [1], 10, rank=2, world_size=2)


# ---- mid-epoch resume -------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(pairs, world_size):
    sampler = sampler_for(pairs, rank=world_size - 1, world_size=world_size, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(3)  # leave the epoch and come back: the state must still say where we were
    sampler.set_epoch(2)
    taken = list(itertools.islice(iter(sampler), 5))
    state = sampler.state_dict()
    assert taken == full[:5] and state["epoch"] == 2 and state["position"] == 5

    resumed = sampler_for(pairs, rank=world_size - 1, world_size=world_size, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop calls this at the top of each epoch; it must keep the position
    assert list(resumed) == full[5:]
    assert resumed.state_dict()["position"] == len(full)
    # the next pass over the same epoch (without a new state) starts from the beginning again
    assert list(resumed) == full
    resumed.set_epoch(3)
    assert list(resumed) == epoch_batches(
        sampler_for(pairs, rank=world_size - 1, world_size=world_size, seed=3), 3
    )


def test_loader_resume_gives_the_same_batches(pairs):
    loader = BatchLoader(pairs, sampler_for(pairs, seed=5))
    loader.set_epoch(1)
    full = [b.indices.tolist() for b in loader]
    loader.set_epoch(2)
    loader.set_epoch(1)
    iterator = iter(loader)
    first = [next(iterator).indices.tolist() for _ in range(3)]
    state = loader.state_dict()
    again = BatchLoader(pairs, sampler_for(pairs, seed=5))
    again.load_state_dict(state)
    assert first + [b.indices.tolist() for b in again] == full


def test_state_from_other_settings_says_so_and_clamps(pairs):
    sampler = sampler_for(pairs, max_tokens=200)
    assert sampler.load_state_dict(sampler.state_dict()) is None  # nothing changed: nothing to say
    changed = sampler.load_state_dict({"epoch": 1, "position": 10_000, "num_batches": 3, "seed": 1})
    assert (
        list(sampler) == []
        and "max_tokens" in changed
        and f"batch {len(sampler)} of {len(sampler)}" in changed
    )


@pytest.mark.parametrize(
    "parts",
    [
        [(1, 5), (8, None)],
        [(2, 3), (1, None)],
        [(3, 1), (2, 4), (8, None)],
        [(1, 0), (4, None)],
        [(4, 9), (2, None)],
    ],
)
def test_an_epoch_on_changing_world_sizes_sees_every_example_once(pairs, parts):
    """Resumed on other numbers of processes mid-epoch ((world size, batches per rank taken) each part;
    the last runs to the end), the ranks of each part take what the earlier ones left: every example
    is trained exactly once in the epoch, whatever was taken before."""
    seen: list[int] = []
    state = None
    for world_size, taken in parts:
        samplers = [
            sampler_for(pairs, max_tokens=205, seed=4, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        for sampler in samplers:
            if state is not None:
                assert sampler.load_state_dict(state) is None  # same data and order: nothing to warn about
            sampler.set_epoch(2)
            seen += [i for batch in itertools.islice(iter(sampler), taken) for i in batch]
        state = samplers[0].state_dict()  # every rank saves the same position
    assert sorted(seen) == list(range(len(pairs)))


def test_a_changed_order_after_a_change_of_world_size_goes_on_at_the_share_of_the_epoch_done(pairs):
    """One process took most of the epoch, two processes a little more; resumed with another seed
    (a new order), the epoch goes on with about as many examples left as there were, not restarted."""
    one = sampler_for(pairs, max_tokens=205, seed=4)
    one.set_epoch(2)
    seen = [i for batch in itertools.islice(iter(one), 60) for i in batch]
    two = [sampler_for(pairs, max_tokens=205, seed=4, rank=r, world_size=2) for r in range(2)]
    for sampler in two:
        sampler.load_state_dict(one.state_dict())
        seen += [i for batch in itertools.islice(iter(sampler), 1) for i in batch]
    reseeded = [sampler_for(pairs, max_tokens=205, seed=5, rank=r, world_size=2) for r in range(2)]
    for sampler in reseeded:
        assert "same share of its examples" in sampler.load_state_dict(two[0].state_dict())
    left = sum(len(batch) for sampler in reseeded for batch in sampler)
    largest = max(len(batch) for batch in sampler_for(pairs, max_tokens=205, seed=5).global_batches(2))
    assert abs(left - (len(pairs) - len(seen))) <= 2 * largest, (left, len(pairs) - len(seen))


def test_resuming_on_another_world_size_does_not_repeat_the_old_ranks_warnings(caplog):
    two = [TokenBatchSampler([40] * 3, [40] * 3, 66, rank=r, world_size=2) for r in range(2)]
    for sampler in two:
        list(itertools.islice(iter(sampler), 1))
    assert "seen twice" in caplog.text  # one example twice, for two ranks
    caplog.clear()
    one = TokenBatchSampler([40] * 3, [40] * 3, 66)
    assert one.load_state_dict(two[0].state_dict()) is None
    assert len(list(one)) == 2 and "seen twice" not in caplog.text


def test_a_new_world_size_keeps_the_global_order_of_the_batches_left(pairs):
    """One process took 5 batches; four go on with batches 5, 6, 7, 8 of the same order, and so on."""
    one = sampler_for(pairs, max_tokens=230, seed=4)
    one.set_epoch(2)
    order = list(one)
    assert len(order) % 4 == 1  # 5 taken leave a multiple of 4: nothing is split to even them out
    one.set_epoch(2)
    list(itertools.islice(iter(one), 5))
    four = [sampler_for(pairs, max_tokens=230, seed=4, rank=r, world_size=4) for r in range(4)]
    for sampler in four:
        sampler.load_state_dict(one.state_dict())
    rest = [list(sampler) for sampler in four]
    assert [batch for step in zip(*rest, strict=True) for batch in step] == order[5:]


# ---- loader over a Dataset --------------------------------------------------------------------------


def test_make_loader_over_a_dataset(caplog):
    src, tgt = random_ids(120, seed=9)
    ds = datasets.Dataset.from_dict(
        {"src_ids": src, "tgt_ids": tgt, "index": list(range(120))}, features=ENCODED_FEATURES
    )
    with caplog.at_level("INFO", logger="nmt.data.batching"):
        loader = make_loader(ds, max_tokens=300, seed=2)
    assert "padding efficiency" in caplog.text
    seen = []
    for batch in loader:
        for row, i in enumerate(batch.indices.tolist()):
            seen.append(i)
            assert batch.src[row][: len(src[i])].tolist() == src[i]
            assert batch.tgt_out[row][: len(tgt[i]) + 1].tolist() == [*tgt[i], EOS_ID]
    assert sorted(seen) == list(range(120))
    assert 0.5 < loader.padding_efficiency() <= 1.0
