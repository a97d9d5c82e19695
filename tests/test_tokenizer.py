"""SentencePiece tokenizer: special ids, round trips, determinism, state, save/load and the model cache."""

from __future__ import annotations

import io
import logging

import pytest
import sentencepiece as spm
import torch
from data_fixtures import data_cfg, toy_pairs

from nmt.data import tokenizer as tokenizer_module
from nmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer


@pytest.fixture(scope="module")
def corpus():
    return toy_pairs(200)


@pytest.fixture(scope="module")
def joint(corpus, tmp_path_factory):
    return Tokenizer.train(*corpus, data_cfg(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def count_trainings(monkeypatch):
    calls = []
    real = tokenizer_module._run_trainer

    def counting(sentences, cfg):
        calls.append(len(sentences))
        return real(sentences, cfg)

    monkeypatch.setattr(tokenizer_module, "_run_trainer", counting)
    return calls


def test_special_ids_in_every_model(joint, corpus, tmp_path):
    separate = Tokenizer.train(*corpus, data_cfg(tmp_path, joint_vocab=False))
    assert "tgt_model" not in joint.state_dict()
    for tok in (joint, separate):
        for key in ("src_model", "tgt_model"):
            data = tok.state_dict().get(key, tok.state_dict()["src_model"])
            sp = spm.SentencePieceProcessor(model_proto=data)
            assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)


def test_source_ends_in_eos_target_has_no_specials(joint, corpus):
    src_ids = joint.encode_src(corpus[0][:20])
    tgt_ids = joint.encode_tgt(corpus[1][:20])
    assert all(ids[-1] == EOS_ID and EOS_ID not in ids[:-1] for ids in src_ids)
    assert all(not {PAD_ID, BOS_ID, EOS_ID} & set(ids) and ids for ids in tgt_ids)
    assert joint.encode_src([""]) == [[EOS_ID]] and joint.encode_tgt([""]) == [[]]


def test_round_trip(joint, corpus):
    src, tgt = corpus[0][:30], corpus[1][:30]
    assert joint.decode_src(joint.encode_src(src)) == src
    assert joint.decode_tgt(joint.encode_tgt(tgt)) == tgt
    assert joint.decode_tgt([]) == []


def test_decode_stops_at_eos_and_drops_pad_and_bos(joint, corpus):
    ids = joint.encode_tgt([corpus[1][0]])[0]
    noisy = [BOS_ID, *ids, EOS_ID, *ids, PAD_ID, PAD_ID]
    assert joint.decode_tgt([noisy, [BOS_ID, *ids, PAD_ID]]) == [corpus[1][0], corpus[1][0]]
    assert joint.decode_tgt([[EOS_ID, *ids]]) == [""]
    assert joint.decode_tgt(torch.tensor([ids])) == [corpus[1][0]]  # tensors are fine too


def test_training_is_deterministic(joint, corpus, tmp_path):
    again = Tokenizer.train(*corpus, data_cfg(tmp_path))
    assert again.state_dict() == joint.state_dict()


def test_separate_vocabularies(corpus, tmp_path):
    tok = Tokenizer.train(*corpus, data_cfg(tmp_path, joint_vocab=False))
    assert not tok.joint
    state = tok.state_dict()
    assert state["src_model"] != state["tgt_model"]
    assert tok.decode_src(tok.encode_src(corpus[0][:5])) == corpus[0][:5]
    assert tok.decode_tgt(tok.encode_tgt(corpus[1][:5])) == corpus[1][:5]
    # each model learned its own language's words only
    assert tok.src_pieces("woman") == ["▁woman"] and tok.tgt_pieces("woman") != ["▁woman"]
    assert tok.tgt_pieces("frau") == ["▁frau"] and tok.src_pieces("frau") != ["▁frau"]


def test_config_settings_reach_sentencepiece(corpus, tmp_path):
    tok = Tokenizer.train(*corpus, data_cfg(tmp_path, spm_model_type="bpe", vocab_size=120))
    sp = spm.SentencePieceProcessor(model_proto=tok.state_dict()["src_model"])
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.state_dict()["src_model"])
    assert proto.trainer_spec.model_type == model_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.num_threads == 2 and proto.trainer_spec.character_coverage == 1.0
    assert sp.get_piece_size() <= 120


def test_state_dict_is_plain_and_survives_weights_only_load(joint, corpus, tmp_path):
    state = joint.state_dict()
    separate = Tokenizer.train(*corpus, data_cfg(tmp_path, joint_vocab=False))
    for tok in (joint, separate):
        state = tok.state_dict()
        assert all(isinstance(v, bytes | bool | int | str) for v in state.values())
        buffer = io.BytesIO()
        torch.save({"tokenizer": state}, buffer)
        buffer.seek(0)
        restored = Tokenizer.from_state(torch.load(buffer, weights_only=True)["tokenizer"])
        assert restored.joint == tok.joint and restored.tgt_vocab_size == tok.tgt_vocab_size
        assert restored.encode_src(corpus[0][:10]) == tok.encode_src(corpus[0][:10])
        assert restored.encode_tgt(corpus[1][:10]) == tok.encode_tgt(corpus[1][:10])


def test_save_and_load_folder(corpus, tmp_path):
    for joint_vocab in (True, False):
        tok = Tokenizer.train(*corpus, data_cfg(tmp_path, joint_vocab=joint_vocab))
        folder = tok.save(tmp_path / f"run-{joint_vocab}")
        assert (folder / "tokenizer.json").is_file()
        loaded = Tokenizer.load(folder)
        assert loaded.state_dict() == tok.state_dict()
        assert (folder / "spm.model").exists() == joint_vocab


def test_cache_reuses_model_for_same_data_and_settings(corpus, tmp_path, count_trainings):
    cfg = data_cfg(tmp_path)
    first = Tokenizer.load_or_train(*corpus, cfg, tmp_path / "cache")
    assert len(count_trainings) >= 1
    count_trainings.clear()
    second = Tokenizer.load_or_train(*corpus, cfg, tmp_path / "cache")
    assert count_trainings == [] and second.fingerprint() == first.fingerprint()
    assert len(list((tmp_path / "cache").glob("tokenizer-*"))) == 1


def test_cache_retrains_when_data_or_settings_change(corpus, tmp_path, count_trainings):
    cfg = data_cfg(tmp_path)
    Tokenizer.load_or_train(*corpus, cfg, tmp_path / "cache")
    count_trainings.clear()
    src, tgt = corpus
    Tokenizer.load_or_train([*src[:-1], src[-1] + " dog"], tgt, cfg, tmp_path / "cache")
    assert count_trainings
    count_trainings.clear()
    Tokenizer.load_or_train(src, tgt, data_cfg(tmp_path, spm_model_type="bpe"), tmp_path / "cache")
    assert count_trainings
    assert len(list((tmp_path / "cache").glob("tokenizer-*"))) == 3


def test_too_large_vocabulary_gives_a_smaller_one_with_a_warning(corpus, tmp_path, caplog, count_trainings):
    with caplog.at_level(logging.WARNING, logger="nmt.data.tokenizer"):
        tok = Tokenizer.train(*corpus, data_cfg(tmp_path, vocab_size=5000))
    assert 4 < tok.src_vocab_size < 5000
    assert (
        f"too small for data.vocab_size=5000: the vocabulary has {tok.src_vocab_size:,} pieces" in caplog.text
    )
    assert count_trainings == [400]  # trained once (a hard limit failed at the end, and trained again)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_a_vocabulary_the_corpus_supports_is_what_a_hard_limit_gives(corpus, tmp_path, caplog, model_type):
    """Trained with a soft limit (once, whatever the corpus), a vocabulary the corpus supports has the
    pieces and scores SentencePiece gives with a hard limit."""
    import io

    import sentencepiece as spm

    cfg = data_cfg(tmp_path, vocab_size=120, spm_model_type=model_type)
    with caplog.at_level(logging.WARNING, logger="nmt.data.tokenizer"):
        soft = spm.SentencePieceProcessor(model_proto=Tokenizer.train(*corpus, cfg).state_dict()["src_model"])
    assert "too small" not in caplog.text
    hard = io.BytesIO()
    spm.set_random_generator_seed(tokenizer_module.TRAIN_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in [*corpus[0], *corpus[1]] if t]),
        model_writer=hard,
        vocab_size=120,
        model_type=model_type,
        character_coverage=cfg.character_coverage,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        num_threads=tokenizer_module.TRAIN_THREADS,
        input_sentence_size=tokenizer_module.MAX_TRAIN_SENTENCES,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    hard = spm.SentencePieceProcessor(model_proto=hard.getvalue())
    pieces = lambda sp: [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]  # noqa: E731
    assert len(pieces(soft)) == 120 and pieces(soft) == pieces(hard)


def test_empty_lines_are_not_training_sentences(tmp_path, count_trainings):
    src, tgt = toy_pairs(50)
    Tokenizer.train([*src, "", ""], [*tgt, "", ""], data_cfg(tmp_path))
    assert count_trainings[0] == 100
    with pytest.raises(ValueError, match="no non-empty sentences"):
        Tokenizer.train(["", ""], ["", ""], data_cfg(tmp_path))


def test_from_state_rejects_unknown_version(joint):
    with pytest.raises(ValueError, match="version"):
        Tokenizer.from_state({**joint.state_dict(), "version": 99})


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_a_vocabulary_smaller_than_the_alphabet_is_a_clear_error(tmp_path, model_type):
    from nmt.data.sources import DataError

    letters = [chr(c) for c in range(0x3B1, 0x3C9)] + [chr(c) for c in range(0x430, 0x44F)]  # Greek, Cyrillic
    alphabet = " ".join(letters + [c.upper() for c in letters] + list("abcdefghijklmnopqrstuvwxyz"))
    src = [alphabet] * 20
    with pytest.raises(DataError) as failed:
        Tokenizer.train(src, src, data_cfg(tmp_path, vocab_size=100, spm_model_type=model_type))
    assert str(failed.value).startswith("data.vocab_size=100 is smaller than the ") and str(
        failed.value
    ).endswith("raise data.vocab_size or lower data.character_coverage."), failed.value


def test_a_corpus_of_lines_too_long_for_sentencepiece_is_a_clear_error(tmp_path):
    from nmt.data.sources import DataError

    # SentencePiece skips lines of over 4,192 bytes; with none left it failed with an internal check.
    long_lines = [" ".join(["word"] * 1000) + f" {i}" for i in range(20)]
    with pytest.raises(DataError, match=r"no line of the joint corpus is short enough for SentencePiece"):
        Tokenizer.train(long_lines, long_lines, data_cfg(tmp_path, vocab_size=100))
