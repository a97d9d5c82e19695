"""Translator: a real checkpoint (tiny random Transformer + toy SentencePiece), length-sorted
batching that keeps the input order, empty and over-long inputs, n-best lists."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from nmt.checkpoint import CheckpointError, save_checkpoint
from nmt.config import Config, ConfigError, DataConfig, DecodeConfig, ModelConfig
from nmt.data.tokenizer import EOS_ID, Tokenizer
from nmt.model import Transformer
from nmt.translator import Translator
from tests.conftest import toy_pairs

MAX_POSITIONS = 48
SENTENCES = [
    "a man runs in the park",
    "the dog",
    "a big red ball sees the small blue house and the cat eats",
    "woman sits",
    "the cat eats a ball",
    "dog runs street",
    "a small house",
]


def make_checkpoint(path: Path, seed: int = 0) -> Path:
    """A checkpoint as training writes it (config, tokenizer, model), of an untrained tiny model."""
    pairs = toy_pairs(200)
    tok = Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], DataConfig(vocab_size=100))
    model_cfg = ModelConfig(
        d_model=32, n_heads=4, enc_layers=1, dec_layers=1, ffn_dim=64, max_positions=MAX_POSITIONS
    )
    cfg = Config(
        model=model_cfg, decode=DecodeConfig(beam=3, max_len_a=1.0, max_len_b=5, batch_size=3, max_tokens=40)
    )
    torch.manual_seed(seed)
    model = Transformer(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size)
    with torch.no_grad():  # peakier than at initialisation, so outputs differ between inputs
        model.output.weight.mul_(4.0)
    return save_checkpoint(
        {"config": cfg.to_dict(), "tokenizer": tok.state_dict(), "model": model.state_dict()}, path
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


@pytest.fixture(scope="module")
def translator(checkpoint) -> Translator:
    return Translator.from_checkpoint(checkpoint, device="cpu")


class CopyModel(nn.Module):
    """Predicts the source token at the same position: a perfect "translator" into the source
    language, so with a joint vocabulary every output must equal its own input."""

    def __init__(self, vocab_size: int, max_positions: int) -> None:
        super().__init__()
        self.cfg = ModelConfig(max_positions=max_positions)
        self.vocab_size = vocab_size
        self.unused = nn.Parameter(torch.zeros(1))  # gives the module a device

    def encode(self, src, src_mask):
        return nn.functional.one_hot(src, self.vocab_size).float()  # (B, S, V)

    def decode(self, tgt_in, memory, src_mask, cache=None):
        start = 0 if cache is None else cache.length
        positions = torch.arange(start, start + tgt_in.size(1))
        assert positions.max() < self.cfg.max_positions, "decoded past the model's positions"
        if cache is not None:
            cache.length += tgt_in.size(1)
        # Beam search passes one memory row per sentence for its `beam` target rows.
        memory = memory.repeat_interleave(tgt_in.size(0) // memory.size(0), dim=0)  # (B, S, V)
        past_end = nn.functional.one_hot(torch.tensor(EOS_ID), self.vocab_size).float()
        padded = torch.cat([memory, past_end.expand(memory.size(0), positions.max() + 1, -1)], dim=1)
        return 10.0 * padded[:, positions]  # (B, T, V)

    def new_cache(self, capacity: int):
        ignore = lambda indices: None  # noqa: E731 - the copy needs no state beyond the length
        return SimpleNamespace(length=0, reorder=ignore, reorder_targets=ignore, select_memory=ignore)


@pytest.fixture(scope="module")
def joint_tokenizer() -> Tokenizer:
    pairs = toy_pairs(200)
    return Tokenizer.train([s for s, _ in pairs], [t for _, t in pairs], DataConfig(vocab_size=100))


def copy_translator(tok: Tokenizer, max_positions: int = 64) -> Translator:
    model = CopyModel(tok.tgt_vocab_size, max_positions)
    return Translator(
        model, tok, DecodeConfig(max_len_a=1.0, max_len_b=5, batch_size=3, max_tokens=40), "cpu"
    )


def test_batches_are_length_sorted_capped_and_cover_every_sentence(joint_tokenizer):
    translator = copy_translator(joint_tokenizer)
    lengths = {i: n for i, n in enumerate([5, 17, 3, 9, 9, 1, 12, 4, 30, 2])}
    batches = translator.batches(lengths)
    assert sorted(i for b in batches for i in b) == list(lengths)
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)
    for b in batches:
        assert len(b) <= translator.decode_cfg.batch_size
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= translator.decode_cfg.max_tokens


@pytest.mark.parametrize("beam", [1, 3])
def test_every_output_lands_at_its_input_position(joint_tokenizer, beam):
    translator = copy_translator(joint_tokenizer)
    sentences = SENTENCES + SENTENCES[::-1] + ["the dog runs", "a cat"]  # several batches, sorted by length
    assert translator.translate(sentences, beam=beam) == sentences


def test_empty_lines_give_empty_outputs_and_keep_positions(joint_tokenizer):
    translator = copy_translator(joint_tokenizer)
    sentences = ["", SENTENCES[0], "   ", SENTENCES[1], ""]
    assert translator.translate(sentences) == ["", SENTENCES[0], "", SENTENCES[1], ""]
    assert translator.translate([]) == []
    assert translator.translate(["", " "]) == ["", ""]
    assert [
        n[0].text for n in translator.translate_nbest(sentences, nbest=2, beam=2)
    ] == translator.translate(sentences)


def test_overlong_input_is_truncated_with_a_warning(joint_tokenizer, caplog):
    translator = copy_translator(joint_tokenizer, max_positions=12)
    long_line = " ".join(["the big red dog"] * 10)
    ids = joint_tokenizer.encode_src([long_line])[0]
    assert len(ids) > 12
    with caplog.at_level(logging.WARNING, logger="nmt.translator"):
        out = translator.translate([SENTENCES[1], long_line, SENTENCES[3]])
    # The first 11 pieces (the 12th position holds EOS), and no decoding past the positions.
    assert out == [SENTENCES[1], joint_tokenizer.decode_src([ids[:11]])[0], SENTENCES[3]]
    assert any("source line 2 has" in r.getMessage() for r in caplog.records)  # 1-based
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nmt.translator"):
        assert translator.translate([long_line], beam=3, first_line=1001) == out[1:2]
    assert any("source line 1001 has" in r.getMessage() for r in caplog.records)


def test_a_sentence_without_pieces_gets_an_empty_translation_without_search(joint_tokenizer, monkeypatch):
    """A lone zero-width space or control character encodes to EOS alone; the model is not asked to
    translate nothing (training drops such pairs), and the line still gets its (empty) output."""
    translator = copy_translator(joint_tokenizer)
    nothing = ["\u200b", "\ufeff", "\x01"]
    assert all(ids == [EOS_ID] for ids in joint_tokenizer.encode_src(nothing))
    searched: list[list[int]] = []
    collate = translator.collate
    monkeypatch.setattr(translator, "collate", lambda source: searched.extend(source) or collate(source))
    sentences = [nothing[0], SENTENCES[0], *nothing[1:]]
    assert translator.translate(sentences) == ["", SENTENCES[0], "", ""]
    assert [n[0].text for n in translator.translate_nbest(sentences, nbest=2, beam=2)] == [
        "",
        SENTENCES[0],
        "",
        "",
    ]
    assert [EOS_ID] not in searched and len(searched) == 2


def test_bad_arguments_are_errors_not_defaults(joint_tokenizer):
    translator = copy_translator(joint_tokenizer)
    with pytest.raises(TypeError, match="list of sentences"):
        translator.translate(SENTENCES[0])
    with pytest.raises(ConfigError, match="decode.beam=0"):
        translator.translate(SENTENCES[:1], beam=0)
    with pytest.raises(ConfigError, match=r"nbest=0 must be in \[1, beam=5\]"):
        translator.translate_nbest(SENTENCES[:1], nbest=0)


def test_real_model_batched_equals_one_at_a_time_and_survives_overlong_input(translator):
    together = translator.translate(SENTENCES)
    assert together == [translator.translate([s])[0] for s in SENTENCES]
    long_line = " ".join(["the big red dog"] * 40)  # far more than MAX_POSITIONS tokens
    with pytest.raises(ValueError):  # what would happen without truncation
        translator.model.encode(torch.ones(1, MAX_POSITIONS + 1, dtype=torch.long), None)
    for beam in (1, 3):  # outputs also stay within the decoder's positions
        assert len(translator.translate([SENTENCES[0], long_line], beam=beam)) == 2


def test_greedy_equals_beam_one_and_nbest_is_sorted(translator):
    greedy = translator.translate(SENTENCES, beam=1)
    beam_one = translator.translate_nbest(SENTENCES, nbest=1, beam=1)
    assert greedy == [n[0].text for n in beam_one]
    nbest = translator.translate_nbest(SENTENCES, nbest=3, beam=3)
    assert [n[0].text for n in nbest] == translator.translate(SENTENCES, beam=3)
    for hyps in nbest:
        assert 1 <= len(hyps) <= 3
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)


def test_training_mode_restored_and_dropout_off_while_decoding(checkpoint):
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    first = translator.translate(SENTENCES)
    translator.model.train()  # dropout 0.1 would change outputs if it stayed on
    assert translator.translate(SENTENCES) == first
    assert translator.model.training


def test_from_checkpoint_dtypes_and_errors(checkpoint, tmp_path):
    bf16 = Translator.from_checkpoint(checkpoint, device="cpu", dtype="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert len(bf16.translate(SENTENCES[:3])) == 3
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Translator.from_checkpoint(checkpoint, device="cpu", dtype="fp16")
    with pytest.raises(CheckpointError, match="does not exist"):
        Translator.from_checkpoint(tmp_path / "missing.pt", device="cpu")


def test_progress_counts_every_sentence(translator):
    seen = []
    translator.translate(["", *SENTENCES, ""], progress=seen.append)
    assert sum(seen) == len(SENTENCES) + 2


def test_translator_on_cuda_keeps_sdpa_off_cudnn(joint_tokenizer, cudnn_attention_restored):
    """cuDNN's SDPA builds a kernel per shape, and beam search grows the key length every step.
    A Translator on CUDA switches it off (checked here without a GPU: only the flag is read)."""
    torch.backends.cuda.enable_cudnn_sdp(True)
    model = CopyModel(joint_tokenizer.tgt_vocab_size, 64)
    Translator(model, joint_tokenizer, DecodeConfig(), "cpu")
    assert torch.backends.cuda.cudnn_sdp_enabled()  # CPU: left alone
    Translator(model, joint_tokenizer, DecodeConfig(), "cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_workers_follow_config_threads_batches_and_device(translator, torch_threads):
    auto = Translator(
        translator.model, translator.tokenizer, replace(translator.decode_cfg, workers=0), "cpu"
    )
    assert [auto.workers(n) for n in (1, 2, 3, 4, 10)] == [1, 2, 3, 4, 4]  # one per thread, per batch
    two = Translator(translator.model, translator.tokenizer, replace(translator.decode_cfg, workers=2), "cpu")
    assert two.workers(10) == 2
    many = Translator(
        translator.model, translator.tokenizer, replace(translator.decode_cfg, workers=16), "cpu"
    )
    assert many.workers(10) == 4  # never more than the threads
    torch.set_num_threads(16)
    assert auto.workers(20) == 8  # the automatic value stops at AUTO_MAX_WORKERS
    assert many.workers(20) == 16  # an explicit one does not
    with torch.autocast("cpu", dtype=torch.bfloat16):  # worker threads would not inherit autocast
        assert auto.workers(10) == 1
    compiled = nn.Module()
    compiled._orig_mod = translator.model  # what torch.compile's wrapper looks like from outside
    assert Translator(compiled, translator.tokenizer, auto.decode_cfg, "cpu").workers(10) == 1
    auto.device = torch.device("cuda")  # only the device type is read
    assert auto.workers(10) == 1


def test_parallel_batches_share_the_threads_and_keep_every_output(checkpoint, torch_threads):
    """With 2 workers on 4 threads, batches run on 2 threads of 2 torch threads each; the output
    equals one batch at a time (each batch's result does not depend on the others), in input
    order, and the thread setting is restored afterwards."""
    serial = Translator.from_checkpoint(checkpoint, device="cpu")
    serial.decode_cfg = replace(serial.decode_cfg, workers=1)
    parallel = Translator.from_checkpoint(checkpoint, device="cpu")
    parallel.decode_cfg = replace(parallel.decode_cfg, workers=2)
    sentences = ["", *SENTENCES, "", *reversed(SENTENCES)]  # 14 sentences, batches of 3 at most
    assert len(parallel.batches({i: 1 for i in range(14)})) == 5

    seen: list[tuple[str, int]] = []
    search = parallel._search

    def recording_search(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.05)  # long enough for the other worker to take a batch meanwhile
        return search(*args, **kwargs)

    parallel._search = recording_search
    torch.set_num_threads(2)  # serial: each batch on 2 threads, as in the parallel run
    expected = [serial.translate(sentences, beam=b) for b in (1, 3)]
    nbest = serial.translate_nbest(sentences, nbest=2, beam=3)
    torch.set_num_threads(4)
    assert [parallel.translate(sentences, beam=b) for b in (1, 3)] == expected
    assert [[t.text for t in n] for n in parallel.translate_nbest(sentences, nbest=2, beam=3)] == [
        [t.text for t in n] for n in nbest
    ]
    assert torch.get_num_threads() == 4
    assert {threads for _, threads in seen} == {2}
    assert len({name for name, _ in seen}) == 2 and all(name.startswith("nmt-decode") for name, _ in seen)


def test_an_error_in_a_worker_reaches_the_caller_and_restores_the_threads(checkpoint, torch_threads):
    parallel = Translator.from_checkpoint(checkpoint, device="cpu")
    calls: list[int] = []

    def failing_search(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # the caller sees the first failure while the others still run
        raise RuntimeError("out of memory in a worker")

    parallel._search = failing_search
    with pytest.raises(RuntimeError, match="out of memory in a worker"):
        parallel.translate(SENTENCES * 8)  # 19 batches on 4 workers
    assert torch.get_num_threads() == 4
    assert len(calls) < 19  # queued batches were cancelled, not all decoded after the error


def test_an_error_in_the_caller_cancels_queued_batches_and_restores_the_threads(checkpoint, torch_threads):
    """An exception raised while results are consumed (here by the progress callback, as Ctrl-C
    would be) leaves the batches not yet started unstarted and the thread setting as it was."""
    parallel = Translator.from_checkpoint(checkpoint, device="cpu")
    calls: list[int] = []
    search = parallel._search

    def slow_search(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)
        return search(*args, **kwargs)

    def interrupting_progress(n: int) -> None:
        raise KeyboardInterrupt

    parallel._search = slow_search
    with pytest.raises(KeyboardInterrupt):
        parallel.translate(SENTENCES * 8, progress=interrupting_progress)  # 19 batches on 4 workers
    assert torch.get_num_threads() == 4
    assert len(calls) < 19
