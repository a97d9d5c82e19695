"""scripts/benchmark.py: the JSON a short run writes, and the model-FLOPs formula against a hand count
and against PyTorch's FLOP counter on the real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from script_loader import load_script
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nmt.config import ModelConfig
from nmt.loss import label_smoothed_nll
from nmt.model import Transformer

benchmark = load_script("benchmark")

# A model of a few thousand parameters on a few hundred synthetic pairs: each step takes milliseconds.
TINY_RUN = [
    "--model", "tiny", "--d-model", "32", "--ffn-dim", "64", "--enc-layers", "1", "--dec-layers", "1",
    "--data", "synthetic", "--vocab-size", "120", "--synthetic-pairs", "300", "--mean-len", "12",
    "--max-len", "40", "--max-tokens", "200", "--warmup", "1", "--steps", "3", "--threads", "1",
    "--device", "cpu",
]  # fmt: skip
SIDE_FIELDS = {
    "num_params", "step_time_ms_median", "tgt_tokens_per_sec", "src_tgt_tokens_per_sec",
    "model_flops_per_step_mean", "achieved_tflops", "mfu", "breakdown_ms_median", "peak_memory_bytes",
    "loss_first", "loss_last",
}  # fmt: skip


def test_main_writes_json_with_positive_throughput(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.main([*TINY_RUN, "--json", str(out)])
    result = json.loads(out.read_text())
    ours = result["ours"]
    assert SIDE_FIELDS <= set(ours)
    assert ours["steps"] == 3
    assert ours["tgt_tokens_per_sec"] > 0 and ours["src_tgt_tokens_per_sec"] > ours["tgt_tokens_per_sec"]
    assert ours["model_flops_per_step_mean"] > 0 and ours["achieved_tflops"] > 0
    assert ours["mfu"] is None  # CPU without --peak-tflops
    assert set(ours["breakdown_ms_median"]) == {"data", "forward", "backward", "optimizer"}
    assert all(ms > 0 for ms in ours["breakdown_ms_median"].values())
    assert ours["peak_memory_bytes"] > 0
    assert np.isfinite(ours["loss_last"])
    assert result["meta"]["tgt_vocab"] == 120 and result["meta"]["model_config"]["d_model"] == 32
    assert result["meta"]["malloc"] != "default"  # on CPU the allocator is set up as the trainer does


def test_mfu_uses_the_given_peak(tmp_path):
    result = benchmark.main([*TINY_RUN, "--peak-tflops", "2.0"])
    ours = result["ours"]
    assert ours["mfu"] == pytest.approx(ours["achieved_tflops"] / 2.0)


def test_read_every_step_reads_back_before_every_update(monkeypatch):
    """--read-every-step adds one read from the device to every step (warm-up and timed), and the run
    says so; without it, steps read nothing until the end."""
    reads, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.numel()) or tolist(self))
    benchmark.main(TINY_RUN)
    without, reads[:] = list(reads), []
    result = benchmark.main([*TINY_RUN, "--read-every-step"])
    assert result["meta"]["read_every_step"]
    extra = list(reads)
    for n in without:
        extra.remove(n)
    assert extra == [2] * 4  # loss and gradient norm, in 1 warm-up + 3 timed steps


def test_compiled_run_reports_the_graphs_it_compiled(traced_graphs, capsys):
    result = benchmark.main([*TINY_RUN, "--compile", "--warmup", "2", "--steps", "4"])
    ours = result["ours"]
    # Batches of four shapes, one graph per layer class: compiled in the first warm-up step, none after.
    assert (ours["compiled_graphs_warmup"], ours["compiled_graphs_timed"]) == (2, 0)
    assert "graphs compiled: warm-up, timed" in capsys.readouterr().out
    assert np.isfinite(ours["loss_last"]) and len(traced_graphs) == 2


def test_compiled_run_from_logits_compiles_the_loss_once(traced_graphs):
    # In bf16 the loss is computed from logits, as on a GPU: compiled as well, one graph for all shapes.
    result = benchmark.main([*TINY_RUN, "--precision", "bf16", "--compile", "--warmup", "2", "--steps", "4"])
    ours = result["ours"]
    assert (ours["compiled_graphs_warmup"], ours["compiled_graphs_timed"]) == (3, 0)
    assert np.isfinite(ours["loss_last"])


def test_flops_formula_matches_a_hand_count():
    cfg = ModelConfig(d_model=8, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=16)
    # Per source token: encoder 4*8*8 + 2*8*16 = 512, cross-attention K/V 2*8*8 = 128 -> 640.
    # Per target token: decoder 6*8*8 + 2*8*16 = 640, output projection 8*10 = 80 -> 720.
    # Two sentences, source lengths 3 and 1 (4 tokens), target lengths 2 and 4 (6 tokens):
    # dense = 6 * (640*4 + 720*6) = 41280
    # attention = 12*8 * (enc 3^2 + 1^2 + dec self 2^2 + 4^2 + cross 2*3 + 4*1) = 96 * (10 + 20 + 10) = 3840
    assert benchmark.training_flops(cfg, 10, np.array([3, 1]), np.array([2, 4])) == 41280 + 3840


def test_flops_formula_matches_pytorch_flop_counter():
    """Forward + backward of the real model, counted op by op (SDPA's math path shows its matmuls)."""
    cfg = ModelConfig(
        d_model=16, n_heads=2, enc_layers=2, dec_layers=1, ffn_dim=24, dropout=0.0, max_positions=32
    )
    vocab, batch, src_len, tgt_len = 30, 3, 5, 4
    torch.manual_seed(0)
    model = Transformer(cfg, vocab, vocab)
    src = torch.randint(4, vocab, (batch, src_len))  # no padding: every position is a real token
    tgt_in, tgt_out = torch.randint(4, vocab, (2, batch, tgt_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss, _ = label_smoothed_nll(model(src, tgt_in), tgt_out, 0.1, 0)
        loss.backward()
    expected = benchmark.training_flops(cfg, vocab, np.full(batch, src_len), np.full(batch, tgt_len))
    assert counter.get_total_flops() == expected


def test_synthetic_lengths_have_the_stated_mean():
    args = benchmark.parse_args(["--synthetic-pairs", "20000", "--vocab-size", "100"])
    pairs = benchmark.synthetic_pairs(args)
    source_pieces = pairs.src_lengths - 1  # without EOS
    assert source_pieces.mean() == pytest.approx(30.0, rel=0.03)
    assert source_pieces.min() >= 1 and source_pieces.max() <= args.max_len
    assert pairs.src_values.min() >= 3 and pairs.src_values.max() < 100  # EOS or a piece, never PAD/BOS/UNK
    assert pairs.tgt_values.min() >= benchmark.FIRST_PIECE_ID


def test_trainer_style_collate_gives_the_same_batches():
    args = benchmark.parse_args([*TINY_RUN, "--collate", "lists"])
    data = benchmark.load_data(args)
    for indices in data.batches:
        by_rows, packed = data.collate(indices), data.pairs.collate(indices)
        for name in ("src", "tgt_in", "tgt_out", "indices"):
            assert torch.equal(getattr(by_rows, name), getattr(packed, name)), name
        assert by_rows.num_tgt_tokens == packed.num_tgt_tokens == data.pairs.tgt_lengths[indices].sum()


def test_compare_hf_trains_marian_of_the_same_shape(tmp_path):
    pytest.importorskip("transformers")
    # Post-norm has no final LayerNorms, so both models then have exactly the same parameters.
    result = benchmark.main([*TINY_RUN, "--compare-hf", "-o", "norm_first=false", "--interleave"])
    ours, hf = result["ours"], result["hf"]
    assert hf["num_params"] == ours["num_params"]
    assert hf["tgt_tokens_per_step_mean"] == ours["tgt_tokens_per_step_mean"]  # the same batches
    assert hf["attention"] in ("sdpa", "eager")
    assert hf["tgt_tokens_per_sec"] > 0 and np.isfinite(hf["loss_last"])
    assert result["ratio"]["tgt_tokens_per_sec"] == pytest.approx(
        ours["tgt_tokens_per_sec"] / hf["tgt_tokens_per_sec"]
    )
    per_step = sorted(h / o for o, h in zip(ours["step_times_ms"], hf["step_times_ms"], strict=True))
    assert result["ratio"]["step_speed_paired"] in per_step  # the median of an odd number of steps
