"""prepare_data end to end: filtering rules and counts, unfiltered validation, and the caches."""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
from data_fixtures import data_cfg, multi30k_dir, multi30k_missing, toy_pairs, write_corpus, write_lines

from nmt.config import DataConfig
from nmt.data import corpus
from nmt.data import tokenizer as tokenizer_module
from nmt.data.corpus import FilterStats, filter_mask, prepare_data
from nmt.data.sources import DataError
from nmt.data.tokenizer import EOS_ID, Tokenizer


@pytest.fixture
def count_work(monkeypatch):
    """Counts SentencePiece trainings and encode calls."""
    calls = {"train": 0, "encode": 0}
    real_train = tokenizer_module._run_trainer
    real_src, real_tgt = Tokenizer.encode_src, Tokenizer.encode_tgt

    def train(*args, **kwargs):
        calls["train"] += 1
        return real_train(*args, **kwargs)

    def encoder(real):
        def encode(self, texts):
            calls["encode"] += 1
            return real(self, texts)

        return encode

    monkeypatch.setattr(tokenizer_module, "_run_trainer", train)
    monkeypatch.setattr(Tokenizer, "encode_src", encoder(real_src))
    monkeypatch.setattr(Tokenizer, "encode_tgt", encoder(real_tgt))
    return calls


# ---- filtering ------------------------------------------------------------------------------------


def test_filter_rules_by_hand():
    pairs = [
        (3, 4),
        (0, 5),
        (5, 0),
        (0, 0),
        (33, 4),
        (4, 33),
        (1, 6),
        (1, 16),
        (6, 18),
        (6, 19),
        (32, 32),
        (0, 40),
    ]
    src, tgt = np.array(pairs).T
    keep, stats = filter_mask(src, tgt, max_len=32, max_len_ratio=3.0)
    # (1, 6): 6 <= 3 * max(1, RATIO_FLOOR=5) is kept; (1, 16) is not; (6, 19): 19 > 3 * 6.
    assert keep.tolist() == [True, False, False, False, False, False, True, False, True, False, True, False]
    assert stats == FilterStats(total=12, empty=4, too_long=2, bad_ratio=2)
    assert stats.kept == 4 == keep.sum()
    assert stats.format() == "kept 4 of 12 pairs: 4 empty, 2 too long, 2 bad ratio"


def filtered_corpus(folder):
    """Toy train split plus 3 blank pairs, 1 one-sided pair, 2 too long and 2 bad-ratio pairs."""
    src, tgt = toy_pairs(200)
    long_en, long_de = " ".join(["the big dog"] * 15), " ".join(["der große hund"] * 15)
    extra = [("", ""), ("A dog.", ""), ("", ""), (long_en, long_de), ("Dog.", long_de[:80]), ("", ""),
             ("A cat.", "Eine katze sitzt in dem haus mit dem hund."),
             ("Dog.", "Ein hund."), (long_en, "Ein hund.")]  # fmt: skip
    positions = [3, 10, 50, 60, 70, 80, 90, 100, 110]
    for position, (s, t) in zip(positions, extra, strict=True):
        src.insert(position, s)
        tgt.insert(position, t)
    write_lines(folder / "train.en", src)
    write_lines(folder / "train.de", tgt)
    write_lines(folder / "val.en", ["A dog.", "", "Dog."])
    write_lines(folder / "val.de", ["Ein hund.", "", long_de])
    return src, tgt


def test_prepare_filters_training_split_only(tmp_path, caplog):
    src, tgt = filtered_corpus(tmp_path)
    with caplog.at_level(logging.INFO, logger="nmt.data.corpus"):
        data = prepare_data(data_cfg(tmp_path, max_len=32, max_len_ratio=3.0))
    assert data.train_stats == FilterStats(total=209, empty=4, too_long=2, bad_ratio=2)
    assert "train: kept 201 of 209 pairs: 4 empty, 2 too long, 2 bad ratio" in caplog.text
    dropped = {3, 10, 50, 60, 70, 80, 90, 110}  # line 100 ("Dog." / "Ein hund.") is short, not a bad ratio
    assert data.train["index"][:] == [i for i in range(209) if i not in dropped]
    tok = data.tokenizer
    assert data.train["src_ids"][:] == tok.encode_src([src[i] for i in data.train["index"]])
    # validation: nothing dropped, blank and long pairs included, in order
    assert data.valid_src == ["A dog.", "", "Dog."] and data.valid_ref[1] == ""
    assert len(data.valid) == 3 and data.valid["index"][:] == [0, 1, 2]
    assert data.valid["src_ids"][1] == [EOS_ID] and data.valid["tgt_ids"][1] == []
    assert len(data.valid["tgt_ids"][2]) > 32


def test_block_encoding_equals_one_call(tmp_path, monkeypatch):
    src, tgt = toy_pairs(50)
    tok = Tokenizer.train(src, tgt, data_cfg(tmp_path))
    whole, _ = corpus.encode_split(tok, src, tgt, data_cfg(tmp_path))
    monkeypatch.setattr(corpus, "ENCODE_BLOCK", 7)
    blocks, _ = corpus.encode_split(tok, src, tgt, data_cfg(tmp_path))
    assert blocks["src_ids"][:] == whole["src_ids"][:] == tok.encode_src(src)
    assert blocks["tgt_ids"][:] == whole["tgt_ids"][:] == tok.encode_tgt(tgt)


def test_nothing_left_after_filtering(tmp_path):
    write_lines(tmp_path / "train.en", ["", "a"])
    write_lines(tmp_path / "train.de", ["b", ""])
    write_corpus(tmp_path, sizes={"val": 3})
    with pytest.raises(DataError, match="no training pairs left after filtering"):
        prepare_data(data_cfg(tmp_path))


def test_a_test_split_that_cannot_be_read_is_named_before_training(tmp_path, caplog):
    """It is scored only after training: a malformed or missing one is said at once, not hours later."""
    write_corpus(tmp_path)
    write_lines(tmp_path / "test.de", ["nur eine Zeile"])
    with caplog.at_level(logging.WARNING, logger="nmt.data.corpus"):
        prepare_data(data_cfg(tmp_path))
    assert re.search(r"test split: .*test\.en has \d+ lines but .*test\.de has 1;", caplog.text), caplog.text
    assert "scoring the test split will fail" in caplog.text
    caplog.clear()
    (tmp_path / "test.de").unlink()
    with caplog.at_level(logging.WARNING, logger="nmt.data.corpus"):
        prepare_data(data_cfg(tmp_path))
    assert "test split: missing text file" in caplog.text


def test_split_keys_follow_the_data_not_the_cache(tmp_path):
    written = write_corpus(tmp_path)
    first = prepare_data(data_cfg(tmp_path))
    # Rebuilt from scratch, or with a filter setting that keeps the same pairs: the same data.
    assert prepare_data(data_cfg(tmp_path, cache_dir=str(tmp_path / "other"))).split_keys == first.split_keys
    assert prepare_data(data_cfg(tmp_path, max_len=40)).split_keys == first.split_keys
    assert prepare_data(data_cfg(tmp_path, train_limit=299)).split_keys["train"] != first.split_keys["train"]
    # References that differ only in characters the tokenizer does not know encode alike, but BLEU
    # scores them differently: the validation key changes.
    src, ref = written["val"]
    keys, ids = [], []
    for mark in ("★", "☆"):
        write_lines(tmp_path / "val.de", [ref[0] + " " + mark, *ref[1:]])
        data = prepare_data(data_cfg(tmp_path))
        keys.append(data.split_keys["valid"])
        ids.append(data.valid["tgt_ids"][0])
    assert ids[0] == ids[1] and keys[0] != keys[1]


def test_split_keys_stay_what_checkpoints_recorded(tmp_path):
    """A resumed run compares its data's keys with the checkpoint's: a new version of the code must give
    the same keys for the same data, or every resume would warn that the data changed. (The values are
    those of earlier versions on this corpus.)"""
    write_corpus(tmp_path)
    assert prepare_data(data_cfg(tmp_path)).split_keys == {
        "train": "5b66fcdc8be508a3",
        "valid": "8f6a21c4c1851ff8",
    }


def test_limits(tmp_path):
    write_corpus(tmp_path)
    data = prepare_data(data_cfg(tmp_path, train_limit=50, valid_limit=5))
    assert len(data.train) == 50 and len(data.valid) == 5 and len(data.valid_src) == 5


# ---- formats and language pairs -------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "src_lang", "tgt_lang"), [("jsonl", "de", "en"), ("tsv", "en", "fr")])
def test_prepare_other_formats_and_pairs(tmp_path, fmt, src_lang, tgt_lang):
    written = write_corpus(tmp_path, fmt, src_lang=src_lang, tgt_lang=tgt_lang)
    data = prepare_data(data_cfg(tmp_path, format=fmt, src_lang=src_lang, tgt_lang=tgt_lang))
    assert (data.valid_src, data.valid_ref) == written["val"]
    assert data.tokenizer.decode_tgt(data.valid["tgt_ids"][:]) == written["val"][1]
    assert data.tokenizer.decode_src(data.train["src_ids"][:3]) == written["train"][0][:3]


# ---- caches -------------------------------------------------------------------------------------------


def test_second_run_tokenizes_nothing(tmp_path, count_work):
    write_corpus(tmp_path)
    cfg = data_cfg(tmp_path)
    first = prepare_data(cfg)
    assert count_work["train"] >= 1 and count_work["encode"] == 4  # src + tgt of train and valid
    count_work.update(train=0, encode=0)
    second = prepare_data(cfg)
    assert count_work == {"train": 0, "encode": 0}
    assert second.train["src_ids"][:] == first.train["src_ids"][:]
    assert second.valid["tgt_ids"][:] == first.valid["tgt_ids"][:]
    assert second.train_stats == first.train_stats
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert second.cache_dir == tmp_path / "cache"
    # 64-bit offsets, also as read back from the cache: a side may hold more than 2**31 - 1 ids.
    for split in (first.train, second.train, second.valid):
        assert split.data.schema.field("src_ids").type == pa.large_list(pa.int32())


def test_changes_invalidate_only_what_they_affect(tmp_path, count_work):
    write_corpus(tmp_path)
    prepare_data(data_cfg(tmp_path))
    count_work.update(train=0, encode=0)
    prepare_data(data_cfg(tmp_path, max_len=20))  # new filter: re-encode train, same tokenizer and valid
    assert count_work == {"train": 0, "encode": 2}
    count_work.update(train=0, encode=0)
    src, tgt = toy_pairs(20, seed=1)
    write_lines(tmp_path / "val.de", [*tgt[:-1], "Ein anderer satz."])
    prepare_data(data_cfg(tmp_path, max_len=20))  # new validation text: re-encode valid only
    assert count_work == {"train": 0, "encode": 2}
    count_work.update(train=0, encode=0)
    write_lines(tmp_path / "train.en", toy_pairs(301)[0][1:])  # new training text: everything again
    prepare_data(data_cfg(tmp_path, max_len=20))
    assert count_work["train"] >= 1 and count_work["encode"] == 4


def test_run_dir_gets_the_tokenizer_and_resume_takes_the_checkpoints(tmp_path, count_work):
    from nmt.checkpoint import save_checkpoint
    from nmt.config import Config

    write_corpus(tmp_path)
    run_dir = tmp_path / "run"
    first = prepare_data(data_cfg(tmp_path), run_dir=run_dir)
    assert Tokenizer.load(run_dir / "tokenizer").fingerprint() == first.tokenizer.fingerprint()
    # a fresh run in the same folder with other settings does not pick up the old tokenizer
    bpe = prepare_data(data_cfg(tmp_path, spm_model_type="bpe"), run_dir=run_dir)
    assert bpe.tokenizer.fingerprint() != first.tokenizer.fingerprint()
    assert Tokenizer.load(run_dir / "tokenizer").fingerprint() == bpe.tokenizer.fingerprint()
    checkpoint = save_checkpoint(
        {"config": Config().to_dict(), "tokenizer": first.tokenizer.state_dict(), "model": {}},
        tmp_path / "elsewhere" / "latest.pt",
    )
    count_work.update(train=0)
    resumed = prepare_data(data_cfg(tmp_path, spm_model_type="bpe"), run_dir=run_dir, resume_from=checkpoint)
    assert resumed.tokenizer.fingerprint() == first.tokenizer.fingerprint() and count_work["train"] == 0


FILE_SIZE_LIMIT = """
import sys
from nmt.data.corpus import prepare_data
from nmt.data.sources import DataError
from tests.data_fixtures import data_cfg
try:
    prepare_data(data_cfg(Path(sys.argv[1])), run_dir=sys.argv[2] or None)
except DataError as e:
    print(e)
"""


@pytest.mark.parametrize("what", ["tokenizer cache", "encoded data cache", "run's tokenizer"])
def test_a_full_disk_while_preparing_data_names_what_and_where_and_leaves_no_partial_files(tmp_path, what):
    """Real failed writes: the process may not grow any file, as on a full disk."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import REPO, files_limited_to

    write_corpus(tmp_path)
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    if what != "tokenizer cache":
        prepare_data(data_cfg(tmp_path))  # tokenizer and encodings cached
    if what == "encoded data cache":
        for folder in cache.glob("encoded-*"):
            shutil.rmtree(folder)
    before = sorted(p.name for p in cache.iterdir()) if cache.exists() else []
    script = "from pathlib import Path\n" + FILE_SIZE_LIMIT
    args = [sys.executable, "-c", script, str(tmp_path), str(run_dir) if what == "run's tokenizer" else ""]
    # No file may grow past 1 byte.
    proc = subprocess.run(
        args, capture_output=True, text=True, cwd=REPO, timeout=120, preexec_fn=files_limited_to(1)
    )
    assert proc.returncode == 0, proc.stderr
    expected = {
        "tokenizer cache": f"the tokenizer cache in {cache} (File too large); make room there or set data.cache_dir=PATH.",
        "encoded data cache": f"the encoded data cache in {cache} (File too large); make room there or set "
        "data.cache_dir=PATH.",
        "run's tokenizer": f"the tokenizer into {run_dir / 'tokenizer'} (File too large); make room there or set "
        "run_dir=PATH.",
    }[what]
    assert proc.stdout == f"could not write {expected}\n", proc.stdout
    assert sorted(p.name for p in cache.iterdir()) == before, "no partial cache folder is left"
    if what == "run's tokenizer":
        assert list((run_dir / "tokenizer").iterdir()) == []


@pytest.mark.parametrize("damage", ["an arrow file deleted", "stats.json deleted", "spm.model deleted"])
def test_a_cache_damaged_by_hand_is_one_sentence_naming_the_folder(tmp_path, damage):
    """The atomic saves never leave a cache folder incomplete; one damaged by hand is reported, not
    rebuilt in place: another process may be reading it."""
    write_corpus(tmp_path)
    prepare_data(data_cfg(tmp_path))
    cache = tmp_path / "cache"
    victim = {
        "an arrow file deleted": next(cache.glob("encoded-train-*/*.arrow")),
        "stats.json deleted": next(cache.glob("encoded-train-*/stats.json")),
        "spm.model deleted": next(cache.glob("tokenizer-*/spm.model")),
    }[damage]
    victim.unlink()
    with pytest.raises(DataError) as failed:
        prepare_data(data_cfg(tmp_path))
    message = str(failed.value)
    assert message.startswith(f"the cache {victim.parent} cannot be read (") and message.endswith(
        "delete that folder and run again (it is rebuilt from the corpus)."
    ), message
    import shutil

    shutil.rmtree(victim.parent)  # what the message says to do
    prepare_data(data_cfg(tmp_path))
    assert victim.exists()


def test_read_only_data_dir_caches_in_user_cache(tmp_path, monkeypatch):
    write_corpus(tmp_path / "data")
    real = corpus._writable
    monkeypatch.setattr(corpus, "_writable", lambda folder: "data" not in folder.parts and real(folder))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cfg = data_cfg(tmp_path / "data", cache_dir="")
    assert prepare_data(cfg).cache_dir == tmp_path / "xdg" / "nmt"
    with pytest.raises(DataError, match="not writable"):
        prepare_data(data_cfg(tmp_path / "data", cache_dir=str(tmp_path / "data" / "c")))


# ---- missing data and download -------------------------------------------------------------------------


def test_missing_multi30k_is_downloaded_or_explained(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = DataConfig(dir=str(tmp_path / "m30k"), cache_dir=str(tmp_path / "cache"))  # the defaults: Multi30k
    with pytest.raises(DataError, match=r"could not download Multi30k \(train\.en\.gz: offline\)"):
        prepare_data(cfg)
    no_download = DataConfig(dir=str(tmp_path / "m30k"), download="")
    with pytest.raises(DataError, match=r"missing text file .*train\.en.*data\.dir="):
        prepare_data(no_download)


def test_a_language_multi30k_lacks_fails_before_anything_is_downloaded(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: fetched.append(url) or 1 / 0)
    cfg = DataConfig(dir=str(tmp_path / "m30k"), src_lang="cs", tgt_lang="de", cache_dir=str(tmp_path / "c"))
    with pytest.raises(
        DataError, match=r"^Multi30k can be downloaded in de, en, fr, not 'cs'; put the cs files in "
    ):
        prepare_data(cfg)
    assert fetched == [], "nothing was downloaded"
    assert not (tmp_path / "m30k").exists() or not any((tmp_path / "m30k").iterdir())


def test_bad_validation_file_fails_before_tokenizer_training(tmp_path, count_work):
    write_corpus(tmp_path, sizes={"train": 100, "val": 5})
    write_lines(tmp_path / "val.de", ["nur eine zeile"])
    with pytest.raises(DataError, match=r"val\.en has 5 lines but .*val\.de has 1"):
        prepare_data(data_cfg(tmp_path))
    assert count_work["train"] == 0


def test_multi30k_subset(tmp_path):
    folder = multi30k_dir()
    if folder is None:
        pytest.skip(multi30k_missing())
    cfg = DataConfig(
        dir=str(folder), cache_dir=str(tmp_path), train_limit=2000, vocab_size=1000, download="", max_len=64
    )
    data = prepare_data(cfg)
    assert data.train_stats.total == 2000 and len(data.valid) == len(data.valid_src) == 1014
    assert data.valid_src[0] == "A group of men are loading cotton onto a truck"
    decoded = data.tokenizer.decode_tgt(data.valid["tgt_ids"][:])
    assert sum(d == r for d, r in zip(decoded, data.valid_ref, strict=True)) > 1000


def test_tokenizer_and_cache_get_the_modes_open_and_mkdir_give_under_the_umask(tmp_path):
    """A shared data folder's cache, and a run's tokenizer, must be readable by the group (umask 027)."""
    write_corpus(tmp_path / "corpus")
    cfg = data_cfg(tmp_path / "corpus")
    old = os.umask(0o027)
    try:
        prepare_data(cfg, run_dir=tmp_path / "run")
    finally:
        os.umask(old)
    written = [*(tmp_path / "corpus" / "cache").rglob("*"), *(tmp_path / "run").rglob("*")]
    assert any(p.name == "spm.model" for p in written) and any(p.name == "stats.json" for p in written)
    for path in written:
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path
