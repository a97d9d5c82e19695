"""The Transformer against references that must agree: naive attention, unpadded inputs, full
vs cached decoding, hand-counted parameters; byte-mask dropout against its stated rate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.fx.experimental._config as fx_config
import torch.nn.functional as F
import yaml

from nmt.config import ConfigError, ModelConfig
from nmt.data.tokenizer import BOS_ID, PAD_ID
from nmt.loss import ProjectedLoss, label_smoothed_nll
from nmt.model import MultiHeadAttention, SelfAttentionCache, Transformer
from nmt.model import attention as attention_module
from nmt.model.dropout import Dropout
from nmt.runtime import compile_model

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
VOCAB = 23
FIRST_WORD_ID = 4  # ids below are special tokens

VARIANTS = {
    "pre_norm": {},
    "post_norm": {"norm_first": False},
    "learned_positions": {"positions": "learned"},
    "gelu": {"activation": "gelu"},
    "untied_unshared": {"tie_output": False, "share_embeddings": False},
}


def tiny_config(**overrides) -> ModelConfig:
    # Dropout is on, so every test that compares outputs also proves eval() turns it off.
    values = dict(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, max_positions=64)
    values.update(dropout=0.1, attn_dropout=0.1, act_dropout=0.1)
    return ModelConfig(**{**values, **overrides})


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """An eval-mode float64 model, so that agreeing paths agree to ~1e-12."""
    torch.manual_seed(seed)
    return Transformer(tiny_config(**overrides), VOCAB, VOCAB).double().eval()


def padded_batch(lengths: list[int], seed: int, extra_pad: int = 0) -> torch.Tensor:
    """(B, max(lengths) + extra_pad) random word ids, right-padded with PAD_ID."""
    gen = torch.Generator().manual_seed(seed)
    batch = torch.full((len(lengths), max(lengths) + extra_pad), PAD_ID)
    for row, length in enumerate(lengths):
        batch[row, :length] = torch.randint(FIRST_WORD_ID, VOCAB, (length,), generator=gen)
    return batch


def yaml_config(name: str) -> ModelConfig:
    return ModelConfig(**yaml.safe_load((MODEL_CONFIGS / f"{name}.yaml").read_text()))


# --- attention -----------------------------------------------------------------------------------


def naive_attention(attn: MultiHeadAttention, x, memory, allowed):
    """softmax(Q K^T / sqrt(Dh)) V written out, with an explicit (B, 1, T, Tk) mask (True = attend)."""
    d, heads, head_dim = attn.d_model, attn.n_heads, attn.head_dim
    weight, bias = attn.in_proj.weight, attn.in_proj.bias
    source = x if memory is None else memory
    q = x @ weight[:d].T + bias[:d]
    k = source @ weight[d : 2 * d].T + bias[d : 2 * d]
    v = source @ weight[2 * d :].T + bias[2 * d :]

    def heads_first(t):
        return t.view(t.size(0), t.size(1), heads, head_dim).transpose(1, 2)  # (B, H, T, Dh)

    q, k, v = heads_first(q), heads_first(k), heads_first(v)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)  # (B, H, T, Tk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dh)
    return attn.out_proj(out.transpose(1, 2).reshape(x.shape))


ATTENTION_CASES = {  # (cross, padded, causal); cross-attention is never causal
    "self": (False, False, False),
    "self_padded": (False, True, False),
    "self_causal": (False, False, True),
    "self_causal_padded": (False, True, True),
    "cross": (True, False, False),
    "cross_padded": (True, True, False),
}


@pytest.mark.parametrize("kernel", ["explicit", "sdpa"])
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=list(ATTENTION_CASES))
def test_attention_matches_naive_reference(case, kernel, monkeypatch):
    # On CPU short keys take the explicit matmul path; 0 sends every length to SDPA.
    if kernel == "sdpa":
        monkeypatch.setattr(attention_module, "CPU_EXPLICIT_MAX_KEYS", 0)
    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    cross, padded, causal = ATTENTION_CASES[case]
    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=16, n_heads=4).double().eval()
    batch, query_len = 3, 5
    key_len = 7 if cross else query_len
    x = torch.randn(batch, query_len, 16, dtype=torch.float64)
    memory = torch.randn(batch, key_len, 16, dtype=torch.float64) if cross else None
    key_lengths = torch.tensor([key_len, key_len - 2, 1])
    real_key = torch.arange(key_len) < key_lengths[:, None]  # (B, Tk)
    mask = real_key[:, None, None, :] if padded else None
    allowed = real_key[:, None, None, :] if padded else torch.ones(batch, 1, 1, key_len, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(query_len, key_len, dtype=torch.bool).tril()
    expected = naive_attention(attn, x, memory, allowed)
    actual = attn(x, memory=memory, mask=mask, causal=causal)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    assert len(sdpa_calls) == (kernel == "sdpa")


@pytest.mark.parametrize("training", [False, True])
def test_a_query_with_no_key_to_attend_gets_what_sdpa_gives_on_either_path(training, monkeypatch):
    """A source all padding (a cross-attention key mask all False) gives zeros from SDPA; the explicit
    path for short keys must give the same, not NaN, or one such row would turn a batch's loss into NaN."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=16, n_heads=4).double().train(training)
    x, memory = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [False] * 5])[:, None, None, :]  # (B, 1, 1, S): row 1 sees nothing
    explicit = attn(x, memory=memory, mask=mask)
    monkeypatch.setattr(attention_module, "CPU_EXPLICIT_MAX_KEYS", 0)  # every length to SDPA
    torch.testing.assert_close(explicit, attn(x, memory=memory, mask=mask), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit[1], attn.out_proj.bias.expand(3, 16))  # zeros through out_proj


def test_self_attention_cache_grows_and_reorders():
    cache = SelfAttentionCache(initial_capacity=2)
    chunks = [torch.randn(3, 2, length, 4) for length in (1, 3, 1, 4)]
    for i, chunk in enumerate(chunks):
        k, v = cache.append(chunk, -chunk)
        expected = torch.cat(chunks[: i + 1], dim=2)
        torch.testing.assert_close(k, expected)
        torch.testing.assert_close(v, -expected)
    assert cache.length == 9
    order = torch.tensor([2, 2, 0])
    cache.reorder(order)
    k, _ = cache.append(torch.zeros(3, 2, 1, 4), torch.zeros(3, 2, 1, 4))
    torch.testing.assert_close(k[:, :, :9], torch.cat(chunks, dim=2)[order])


# --- padding and causality -----------------------------------------------------------------------


def test_padding_changes_no_real_position():
    model = tiny_model()
    src_lengths, tgt_lengths = [6, 3, 1], [5, 2, 4]
    src = padded_batch(src_lengths, seed=1, extra_pad=2)
    tgt = padded_batch(tgt_lengths, seed=2, extra_pad=3)
    with torch.no_grad():
        memory = model.encode(src, src != PAD_ID)
        logits = model(src, tgt)
        for row, (s_len, t_len) in enumerate(zip(src_lengths, tgt_lengths, strict=True)):
            alone_src, alone_tgt = src[row : row + 1, :s_len], tgt[row : row + 1, :t_len]
            alone_memory = model.encode(alone_src, None)  # no padding at all: no mask
            torch.testing.assert_close(memory[row, :s_len], alone_memory[0], rtol=1e-9, atol=1e-9)
            alone_logits = model.decode(alone_tgt, alone_memory, None)
            torch.testing.assert_close(logits[row, :t_len], alone_logits[0], rtol=1e-9, atol=1e-9)


def test_future_target_tokens_do_not_change_earlier_logits():
    model = tiny_model()
    src, tgt = padded_batch([5, 4], seed=1), padded_batch([6, 6], seed=2)
    changed = tgt.clone()
    changed[:, 3] = FIRST_WORD_ID + (tgt[:, 3] - FIRST_WORD_ID + 1) % (VOCAB - FIRST_WORD_ID)
    with torch.no_grad():
        before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(before[:, :3], after[:, :3], rtol=1e-12, atol=1e-12)
    assert (before[:, 3:] - after[:, 3:]).abs().amax(dim=-1).min() > 1e-6  # later positions do see it


# --- incremental decoding ------------------------------------------------------------------------


def decode_in_chunks(model, tgt, memory, src_mask, cache, chunk_sizes):
    """Feed ``tgt`` through ``decode`` with a cache, ``chunk_sizes`` positions at a time."""
    outputs, start = [], 0
    for size in chunk_sizes:
        outputs.append(model.decode(tgt[:, start : start + size], memory, src_mask, cache))
        start += size
        assert cache.length == start
    return torch.cat(outputs, dim=1)  # (B, T, V)


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_cached_decoding_matches_full_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    src, tgt = padded_batch([7, 4, 2], seed=1), padded_batch([9, 9, 9], seed=2)
    src_mask = src != PAD_ID
    with torch.no_grad():
        full = model(src, tgt)
        memory = model.encode(src, src_mask)
        one_by_one = decode_in_chunks(model, tgt, memory, src_mask, model.new_cache(), [1] * 9)
        # Chunks of several tokens after a prefix exercise the bottom-right aligned causal mask.
        chunked = decode_in_chunks(model, tgt, memory, src_mask, model.new_cache(), [1, 3, 1, 4])
    torch.testing.assert_close(one_by_one, full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(chunked, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
def test_cached_decoding_after_reorder_matches_full_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    src, tgt = padded_batch([7, 4, 2], seed=1), padded_batch([8, 8, 8], seed=2)
    src_mask = src != PAD_ID
    order = torch.tensor([2, 0, 0, 1])  # a permutation with one row duplicated and none dropped
    with torch.no_grad():
        cache = model.new_cache()
        memory = model.encode(src, src_mask)
        decode_in_chunks(model, tgt[:, :3], memory, src_mask, cache, [1, 1, 1])
        cache.select_memory(order)
        cache.reorder_targets(order)
        # Memory is passed reordered as search would, though the cache already holds its keys/values.
        rest = [
            model.decode(tgt[order, t : t + 1], memory[order], src_mask[order], cache) for t in range(3, 8)
        ]
        expected = model(src[order], tgt[order])[:, 3:]
    torch.testing.assert_close(torch.cat(rest, dim=1), expected, rtol=1e-9, atol=1e-9)


def test_decoding_past_max_positions_is_a_clear_error():
    model = tiny_model(max_positions=8)
    src = padded_batch([3], seed=1)
    with torch.no_grad():
        memory = model.encode(src, None)
        with pytest.raises(ValueError, match="max_positions=8"):
            model.decode(padded_batch([9], seed=2), memory, None)


# --- parameters and initialisation --------------------------------------------------------------


def hand_count(cfg: ModelConfig, vocab: int) -> int:
    """Parameters of a model with one shared, tied embedding table, counted by hand."""
    d, ffn = cfg.d_model, cfg.ffn_dim
    attention = 4 * d * d + 4 * d  # Q, K, V, output projections with biases
    feed_forward = 2 * d * ffn + ffn + d
    norm = 2 * d
    encoder = cfg.enc_layers * (attention + feed_forward + 2 * norm) + norm
    decoder = cfg.dec_layers * (2 * attention + feed_forward + 3 * norm) + norm
    return vocab * d + encoder + decoder


@pytest.mark.parametrize(
    "name, vocab, paper_count, tolerance",
    # Vaswani et al. report 65M for base, but the architecture they describe with a 37k joint vocabulary
    # and shared, tied embeddings has 63.1M (2.9% fewer); 213M for big is matched to 0.6%.
    [("base", 37_000, 65e6, 0.03), ("big", 37_000, 213e6, 0.02)],
)
def test_preset_parameter_counts(name, vocab, paper_count, tolerance):
    cfg = yaml_config(name)
    count = meta_count(cfg, vocab)
    assert count == hand_count(cfg, vocab)
    assert abs(count - paper_count) / paper_count < tolerance


def test_small_preset_count():
    cfg = yaml_config("small")  # Multi30k with an 8k joint vocabulary
    assert meta_count(cfg, 8000) == hand_count(cfg, 8000)


def meta_count(cfg: ModelConfig, vocab: int) -> int:
    with torch.device("meta"):  # count without allocating or initialising 200M weights
        return Transformer(cfg, vocab, vocab).num_parameters()


def test_shared_and_tied_weights_are_one_tensor():
    model = tiny_model()
    tokens = model.decoder.embed.tokens.weight
    assert model.encoder.embed.tokens.weight is tokens
    assert model.output.weight is tokens
    assert model.num_parameters() == hand_count(model.cfg, VOCAB)

    separate = tiny_model(tie_output=False, share_embeddings=False)
    assert separate.encoder.embed.tokens.weight is not separate.decoder.embed.tokens.weight
    assert separate.output.weight is not separate.decoder.embed.tokens.weight
    assert separate.num_parameters() == hand_count(separate.cfg, VOCAB) + 2 * VOCAB * 32


def test_share_embeddings_needs_equal_vocab_sizes():
    with pytest.raises(ConfigError, match="joint vocabulary"):
        Transformer(tiny_config(), 100, 120)
    Transformer(tiny_config(share_embeddings=False), 100, 120)  # separate tables are fine


def test_initialisation():
    torch.manual_seed(0)
    cfg = tiny_config(share_embeddings=False, tie_output=False, positions="learned")
    model = Transformer(cfg, 1000, 900)
    for tokens in (model.encoder.embed.tokens.weight, model.decoder.embed.tokens.weight):
        assert torch.count_nonzero(tokens[PAD_ID]) == 0
        assert tokens[PAD_ID + 1 :].std().item() == pytest.approx(32**-0.5, rel=0.05)
    assert model.output.weight.std().item() == pytest.approx(32**-0.5, rel=0.05)
    attn = model.encoder.layers[0].self_attn
    ffn = model.decoder.layers[1].ffn
    for linear in (attn.in_proj, attn.out_proj, ffn.linear1, ffn.linear2):
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier uniform: U(-bound, bound), std bound/sqrt(3)
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.count_nonzero(linear.bias) == 0
    # Same seed, same weights: initialisation order does not depend on anything but the config.
    torch.manual_seed(0)
    again = Transformer(cfg, 1000, 900)
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


# --- training behaviour --------------------------------------------------------------------------


def test_bf16_autocast_on_cpu_is_finite():
    torch.manual_seed(0)
    model = Transformer(tiny_config(), VOCAB, VOCAB)
    src, tgt = padded_batch([7, 3], seed=1), padded_batch([6, 2], seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(src, tgt)
        loss, _ = label_smoothed_nll(logits, tgt, epsilon=0.1, pad_id=PAD_ID)
    assert logits.dtype == torch.bfloat16  # autocast really ran the matmuls in bf16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory = model.encode(src, src != PAD_ID)
        cache = model.new_cache()
        steps = [model.decode(tgt[:, t : t + 1], memory, src != PAD_ID, cache) for t in range(tgt.size(1))]
    assert torch.isfinite(torch.cat(steps, dim=1)).all()


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.0, attn_dropout=0.0, act_dropout=0.0)
    model = Transformer(cfg, VOCAB, VOCAB)
    src = padded_batch([8, 6, 7, 5, 8, 3, 6, 4], seed=1)
    tgt = padded_batch([8, 7, 6, 8, 4, 5, 7, 6], seed=2)
    tgt_in = F.pad(tgt, (1, 0), value=BOS_ID)[:, :-1]  # (B, T): BOS + target shifted right
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens = int((tgt != PAD_ID).sum())
    for _ in range(100):  # about 1 s on 2 CPU cores
        loss, nll = label_smoothed_nll(model(src, tgt_in), tgt, epsilon=0.0, pad_id=PAD_ID)
        optimizer.zero_grad()
        (loss / tokens).backward()
        optimizer.step()
    # Chance level is log(19) = 2.9 nats per token.
    assert nll.item() / tokens < 0.02, f"per-token loss {nll.item() / tokens:.3f} after 100 steps"


# --- dropout -------------------------------------------------------------------------------------


def drop_fraction_bound(rate: float, count: int) -> float:
    """Eight standard deviations of the fraction of drops in ``count`` independent draws. The tests
    are seeded, so they are deterministic; the bound says the seed was not picked to make them pass
    (a miss of 8 sigma has probability ~1e-15)."""
    return 8 * math.sqrt(rate * (1 - rate) / count)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_dropout_drops_at_its_rate_and_is_exact_in_expectation(p):
    torch.manual_seed(0)
    dropout = Dropout(p).train()
    assert abs(dropout.cpu_rate - p) <= 1 / 512  # p rounded to a multiple of 1/256
    x = torch.full((1000, 1024), 2.0)
    out = dropout(x)
    dropped = out == 0
    bound = drop_fraction_bound(dropout.cpu_rate, x.numel())
    assert abs(dropped.float().mean().item() - dropout.cpu_rate) < bound
    # Kept values are scaled by exactly 1 / P(keep) of the rounded rate ...
    assert torch.equal(out[~dropped], torch.full_like(out[~dropped], 2.0 / (1 - dropout.cpu_rate)))
    # ... so the mean stays the input's, up to the same sampling noise.
    assert abs(out.mean().item() - 2.0) < 2.0 / (1 - dropout.cpu_rate) * bound
    # Each of the eight bytes of a random word is uniform: no byte position is biased (e.g. a sign bit
    # that is never set would make every eighth element always dropped or always kept).
    by_position = dropped.view(-1, 8).float().mean(dim=0)  # (8,)
    position_bound = drop_fraction_bound(dropout.cpu_rate, x.numel() // 8)
    assert (by_position - dropout.cpu_rate).abs().max().item() < position_bound


@pytest.mark.parametrize("p", [0.001, 1.0])
def test_dropout_rates_that_round_to_0_or_1_are_exact(p):
    torch.manual_seed(0)
    dropout = Dropout(p).train()
    assert dropout.cpu_rate == p
    x = torch.ones(1000, 1000)
    fraction = (dropout(x) == 0).float().mean().item()
    assert abs(fraction - p) < drop_fraction_bound(p, x.numel()) + 1e-12


def test_dropout_gradient_is_the_mask():
    torch.manual_seed(0)
    x = torch.randn(64, 48, dtype=torch.float64, requires_grad=True)
    out = Dropout(0.3).train()(x)
    out.sum().backward()
    kept = out != 0
    scale = torch.tensor(256 / (256 - 77), dtype=torch.float64)
    torch.testing.assert_close(x.grad, torch.where(kept, scale, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(out, x.detach() * x.grad, rtol=0, atol=0)


def test_dropout_is_the_identity_in_eval_mode_and_at_p_0():
    x = torch.randn(8, 5, 16)
    state = torch.get_rng_state()
    assert Dropout(0.3).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # no random numbers drawn either
    assert not torch.equal(Dropout(0.3).train()(x), x)


def test_dropout_draws_from_the_global_generator():
    x = torch.ones(4, 7, 33)  # an element count that is not a multiple of 8
    dropout = Dropout(0.3).train()
    torch.manual_seed(5)
    first = dropout(x)
    state = torch.get_rng_state()
    second = dropout(x)
    torch.manual_seed(5)
    assert torch.equal(dropout(x), first)  # same seed, same mask
    torch.set_rng_state(state)
    assert torch.equal(dropout(x), second)  # a saved RNG state (as in a checkpoint) resumes the masks
    assert not torch.equal(first, second)


def test_dropout_on_other_devices_is_f_dropout(monkeypatch):
    calls = []
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append((p, training)) or x)
    x = torch.empty(3, 4, device="meta")
    Dropout(0.3).train()(x)
    assert calls == [(0.3, True)]


def test_model_uses_byte_mask_dropout_everywhere():
    cfg = tiny_config(dropout=0.2, act_dropout=0.3, attn_dropout=0.1)
    model = Transformer(cfg, VOCAB, VOCAB)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    rates = [m.p for m in model.modules() if isinstance(m, Dropout)]
    # Attention weights at 0.1 (1 per encoder layer, 2 per decoder layer); two embeddings and 2 + 3
    # residuals per encoder + decoder layer at 0.2; one FFN per layer at 0.3.
    attention = [0.1] * (cfg.enc_layers + 2 * cfg.dec_layers)
    assert sorted(rates) == attention + [0.2] * (2 + 2 * cfg.enc_layers + 3 * cfg.dec_layers) + [0.3] * 4


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_training_attention_drops_weights_with_byte_masks(causal):
    # SDPA's CPU math path would draw a Bernoulli number per weight; training on CPU uses the same
    # arithmetic with a byte mask instead. Reference: the same generator state, by hand.
    from nmt.model.dropout import byte_mask

    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, dropout=0.25).double().train()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    key_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])[:, None, None, :]
    torch.manual_seed(7)
    got = attn(x, mask=None if causal else key_mask, causal=causal)

    q, k, v = (t.view(3, 5, 4, 4).transpose(1, 2) for t in attn.in_proj(x).chunk(3, dim=-1))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril() if causal else key_mask
    weights = (q @ k.transpose(-2, -1) / 2.0).masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    torch.manual_seed(7)
    dropped = weights * byte_mask(weights, round(0.25 * 256))
    assert (dropped == 0).any() and (dropped > weights).any()  # some weights dropped, the rest scaled up
    ref = attn.out_proj((dropped @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(got, ref)
    got.sum().backward()  # and it trains
    assert attn.in_proj.weight.grad is not None and torch.isfinite(attn.in_proj.weight.grad).all()


@pytest.mark.parametrize("variant", ["pre_norm", "untied_unshared"])
def test_the_projected_loss_is_the_loss_of_the_logits(variant):
    # The CPU training path (ProjectedLoss: no logits tensor) against the logits path:
    # same loss, same gradient for every parameter, tied or not.
    model = tiny_model(**VARIANTS[variant])
    src = padded_batch([6, 3, 5], seed=1)
    tgt = padded_batch([5, 7, 2], seed=2)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    loss, nll = label_smoothed_nll(model(src, tgt_in), tgt_out, 0.1, PAD_ID)
    loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    fused_loss, fused_nll = ProjectedLoss(model)(src, tgt_in, tgt_out, 0.1)
    fused_loss.backward()
    torch.testing.assert_close(fused_loss, loss.detach())
    torch.testing.assert_close(fused_nll, nll)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_training_forward_compiles_without_graph_breaks():
    # torch.compile (train.compile=true) must see the model as one graph: a break, such as the
    # in-place random_ of the CPU byte-mask dropout, splits it and makes every layer recompile.
    torch.manual_seed(0)
    model = Transformer(tiny_config(), VOCAB, VOCAB).train()
    src, tgt = padded_batch([6, 3, 5], seed=1), padded_batch([5, 7, 2], seed=2)
    explanation = torch._dynamo.explain(model)(src, tgt)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compile_model_traces_once_for_every_batch_shape(traced_graphs):
    # One graph per layer class (encoder layer, decoder layer), shared by all layers of the class.
    # Token-budget batches change (B, S, T) every step. The first batch has equal source and target
    # lengths, which dynamo's duck sizing would bake in; the model's float attributes would make the
    # first trace restart; and on CPU without attention dropout the explicit attention path below 64
    # keys would add a branch on the key length. Any of them calls the backend more than twice.
    batches = [([6, 3, 6], [6, 2, 4]), ([5, 4, 2, 3], [7, 3, 3, 2]), ([70, 9], [3, 66])]
    # Start from dynamo's defaults, which compile_model changes, and restore them after.
    with torch._dynamo.config.patch(specialize_float=False), fx_config.patch(use_duck_shape=True):
        torch.manual_seed(0)
        model = Transformer(tiny_config(attn_dropout=0.0, max_positions=128), VOCAB, VOCAB).train()
        compiled = compile_model(model)
        for seed, (src_lens, tgt_lens) in enumerate(batches):
            src, tgt = padded_batch(src_lens, seed=2 * seed), padded_batch(tgt_lens, seed=2 * seed + 1)
            compiled(src, tgt).float().logsumexp(-1).mean().backward()
        assert len(traced_graphs) == 2
        # A view: the same parameters, now with gradients; the model itself stays eager.
        assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
        assert all(p.grad is not None for p in model.parameters())
        model.eval()(src, tgt)
        assert len(traced_graphs) == 2


def test_compile_model_needs_layers_to_compile():
    with pytest.raises(ValueError, match="no nn.ModuleList named 'layers'"):
        compile_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
