"""The KV cache and grouped cross-attention that search relies on: each fast path must agree with
the plain one (concatenated keys/values, memory repeated once per beam)."""

from __future__ import annotations

import pytest
import torch

from nmt.config import ModelConfig
from nmt.data.tokenizer import EOS_ID, PAD_ID
from nmt.model import MultiHeadAttention, Transformer
from nmt.model.cache import KVCache, RowMoves, SelfAttentionCache


def random_source(lengths: list[int], vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD_ID)
    for i, n in enumerate(lengths):
        src[i, : n - 1] = torch.randint(4, vocab, (n - 1,), generator=g)
        src[i, n - 1] = EOS_ID
    return src


def small_model(seed: int = 0, vocab: int = 30) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=16, n_heads=2, enc_layers=1, dec_layers=2, ffn_dim=32, dropout=0.0)
    return Transformer(cfg, vocab, vocab).double().eval()


@pytest.mark.parametrize("capacity", [1, 3, 32])
def test_preallocated_cache_equals_concatenation_through_reorders(capacity):
    # Random appends and reorders (rows repeated, dropped, added) against a plain torch.cat copy.
    g = torch.Generator().manual_seed(capacity)
    cache, ref_k, ref_v = SelfAttentionCache(initial_capacity=capacity), None, None
    rows = 4
    for step in range(12):
        k, v = (
            torch.randn(rows, 2, 1 + step % 2, 3, generator=g),
            torch.randn(rows, 2, 1 + step % 2, 3, generator=g),
        )
        ref_k = k if ref_k is None else torch.cat([ref_k, k], dim=2)
        ref_v = v if ref_v is None else torch.cat([ref_v, v], dim=2)
        got_k, got_v = cache.append(k, v)
        torch.testing.assert_close(got_k, ref_k, rtol=0, atol=0)
        torch.testing.assert_close(got_v, ref_v, rtol=0, atol=0)
        new_rows = [3, 5, 2, 4][step % 4]
        order = torch.randint(0, rows, (new_rows,), generator=g)
        cache.reorder(order)
        ref_k, ref_v, rows = ref_k[order], ref_v[order], new_rows
    assert cache.length == ref_k.size(2)


def test_row_moves_copy_only_the_rows_that_change_when_that_is_safe():
    buffer = torch.arange(6.0)[:, None].repeat(1, 3)  # (6, 3), row r filled with r
    ref = buffer.clone()
    # Rows 0 and 4 keep their content, 1 and 3 take copies of 0 and 4, 2 takes 5; rows 5 go away.
    moves = RowMoves(torch.tensor([0, 0, 5, 4, 4]), old_rows=6)
    assert moves.in_place and moves.changed.tolist() == [1, 2, 3]
    got = moves.apply(buffer)
    assert got.data_ptr() == buffer.data_ptr()  # written over the old rows, nothing allocated
    torch.testing.assert_close(got, ref[[0, 0, 5, 4, 4]], rtol=0, atol=0)


@pytest.mark.parametrize("indices", [[1, 0], [2, 0, 1], [0, 1, 2, 2]])
def test_row_moves_gather_when_a_changed_row_is_also_read(indices):
    # A swap or a cycle would read a row after overwriting it; more rows than before cannot be in place.
    buffer = torch.randn(3, 4)
    ref = buffer.clone()
    moves = RowMoves(torch.tensor(indices), old_rows=3)
    assert not moves.in_place
    torch.testing.assert_close(moves.apply(buffer), ref[indices], rtol=0, atol=0)
    torch.testing.assert_close(buffer, ref, rtol=0, atol=0)  # the source is left as it was


def test_cache_capacity_is_allocated_once():
    cache = KVCache.empty(2, capacity=5)
    layer = cache.layers[0].self_attn
    layer.append(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    buffer = layer.k.data_ptr()
    for _ in range(4):
        layer.append(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    assert layer.k.size(2) == 5 and layer.k.data_ptr() == buffer
    with pytest.raises(ValueError, match="capacity"):
        KVCache.empty(2, capacity=0)


def test_grouped_cross_attention_equals_repeated_memory():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4).double().eval()
    memory = torch.randn(3, 5, 16, dtype=torch.float64)  # (N, S, D)
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(3 * 4, 2, 16, dtype=torch.float64)  # 4 query rows per memory row, 2 positions each
    repeated = attn(
        x, memory=memory.repeat_interleave(4, 0), mask=key_mask.repeat_interleave(4, 0)[:, None, None]
    )
    grouped = attn(x, memory=memory, mask=key_mask[:, None, None])
    torch.testing.assert_close(grouped, repeated, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="memory rows"):
        attn(x[:10], memory=memory, mask=key_mask[:, None, None])


def test_beam_layout_decoding_equals_repeated_memory_decoding():
    # Beam search's layout: one memory row (and cross-attention cache row) per sentence, `beam`
    # target rows per sentence reordered by beam origin, sentences dropped now and then.
    model, beam = small_model(), 3
    src = random_source([6, 4, 5], vocab=30, seed=1)
    src_mask = src != PAD_ID
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        grouped, plain = model.new_cache(capacity=2), model.new_cache()
        sentences, tokens = torch.arange(3), torch.randint(4, 30, (9, 1), generator=g)
        for step in range(6):
            rows = sentences.repeat_interleave(beam)
            expected = model.decode(tokens, memory[rows], src_mask[rows], plain)
            got = model.decode(tokens, memory[sentences], src_mask[sentences], grouped)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
            if step == 2:  # the second sentence is done
                sentences = sentences[[0, 2]]
                keep = torch.tensor([0, 1, 2, 6, 7, 8])
                grouped.select_memory(torch.tensor([0, 2]))
                grouped.reorder_targets(keep)
                plain.select_memory(keep)
                plain.reorder_targets(keep)
            origin = torch.randint(0, beam, (len(sentences), beam), generator=g)
            order = (torch.arange(len(sentences))[:, None] * beam + origin).view(-1)  # (N*K,)
            grouped.reorder_targets(order)
            plain.select_memory(order)
            plain.reorder_targets(order)
            tokens = torch.randint(4, 30, (len(order), 1), generator=g)
