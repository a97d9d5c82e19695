"""Reading every corpus format, the errors bad input gives, and the Multi30k download checks."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import urllib.error
import urllib.request

import datasets
import numpy as np
import pytest
from data_fixtures import data_cfg, multi30k_dir, multi30k_missing, toy_pairs, write_corpus, write_lines

from nmt import files
from nmt.data import download
from nmt.data.sources import DataError, read_split

MULTI30K = multi30k_dir()


@pytest.mark.parametrize("gz", [False, True])
def test_text_plain_and_gzip(tmp_path, gz):
    written = write_corpus(tmp_path, "text", gz=gz)
    cfg = data_cfg(tmp_path)
    assert read_split(cfg, "train") == written["train"]
    assert read_split(cfg, "valid") == written["val"]
    assert read_split(cfg, "test") == written["test"]
    assert (tmp_path / "train.en.gz").exists() == gz


def test_plain_file_preferred_over_gzip(tmp_path):
    write_lines(tmp_path / "train.en", ["plain"])
    write_lines(tmp_path / "train.en", ["zipped"], gz=True)
    write_lines(tmp_path / "train.de", ["klar"])
    assert read_split(data_cfg(tmp_path), "train") == (["plain"], ["klar"])


def test_tsv(tmp_path):
    written = write_corpus(tmp_path, "tsv")
    cfg = data_cfg(tmp_path, format="tsv")
    assert read_split(cfg, "train") == written["train"]
    assert read_split(cfg, "valid") == written["val"]


@pytest.mark.parametrize("layout", ["translation", "flat"])
def test_jsonl_layouts(tmp_path, layout):
    written = write_corpus(tmp_path, "jsonl", layout=layout)
    assert read_split(data_cfg(tmp_path, format="jsonl"), "train") == written["train"]


@pytest.mark.parametrize("fmt", ["text", "tsv", "jsonl"])
def test_other_language_pair(tmp_path, fmt):
    """Nothing assumes en-de: an en-fr corpus reads the fr side, a de-en corpus swaps sides."""
    written = write_corpus(tmp_path, fmt, src_lang="en", tgt_lang="fr")
    src, tgt = read_split(data_cfg(tmp_path, format=fmt, src_lang="en", tgt_lang="fr"), "train")
    assert (src, tgt) == written["train"]
    assert "homme" in " ".join(tgt) or "femme" in " ".join(tgt)


def test_de_en_reads_sides_swapped(tmp_path):
    write_corpus(tmp_path, "jsonl")
    en, de = read_split(data_cfg(tmp_path, format="jsonl"), "train")
    assert read_split(data_cfg(tmp_path, format="jsonl", src_lang="de", tgt_lang="en"), "train") == (de, en)


@pytest.mark.parametrize("layout", ["translation", "columns"])
def test_hub_through_load_dataset(tmp_path, monkeypatch, layout):
    src, tgt = toy_pairs(5, "en", "fr")
    if layout == "translation":
        columns = {"translation": [{"en": s, "fr": t} for s, t in zip(src, tgt, strict=True)]}
    else:
        columns = {"en": src, "fr": tgt, "id": list(range(5))}
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict(columns)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = data_cfg(
        tmp_path, format="hub", hub_name="someone/corpus", hub_config="en-fr", tgt_lang="fr", valid="dev"
    )
    assert read_split(cfg, "valid") == (src, tgt)
    assert calls == [("someone/corpus", "en-fr", "dev")]


def test_hub_without_language_columns(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_dict({"text": ["x"]}))
    cfg = data_cfg(tmp_path, format="hub", hub_name="someone/corpus")
    with pytest.raises(DataError, match=r"columns \['text'\].*'translation' or 'en' and 'de'"):
        read_split(cfg, "train")


def test_limits_take_the_first_pairs(tmp_path):
    written = write_corpus(tmp_path, "text")
    cfg = data_cfg(tmp_path, train_limit=7, valid_limit=3)
    assert read_split(cfg, "train") == (written["train"][0][:7], written["train"][1][:7])
    assert read_split(cfg, "valid") == (written["val"][0][:3], written["val"][1][:3])
    assert len(read_split(cfg, "test")[0]) == 20  # no limit on the test split


# ---- bad input -------------------------------------------------------------------------------------


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    write_lines(tmp_path / "train.en", ["a", "b", "c"])
    write_lines(tmp_path / "train.de", ["x", "y"], gz=True)
    with pytest.raises(DataError) as e:
        read_split(data_cfg(tmp_path), "train")
    message = str(e.value)
    assert "train.en has 3 lines" in message and "train.de.gz has 2" in message


def test_missing_file_says_how_to_set_data_dir(tmp_path):
    write_lines(tmp_path / "train.en", ["a"])
    with pytest.raises(DataError) as e:
        read_split(data_cfg(tmp_path), "train")
    assert "train.de" in str(e.value) and "data.dir=" in str(e.value)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path, content):
    write_lines(tmp_path / "train.en", ["a", "b", "c"])
    (tmp_path / "train.de").write_bytes(content)
    with pytest.raises(DataError, match=r"train\.de is empty"):
        read_split(data_cfg(tmp_path), "train")


def test_a_file_with_carriage_returns_alone_for_line_ends_is_named(tmp_path):
    write_lines(tmp_path / "train.en", ["one", "two", "three"])
    for content in (b"eins\rzwei\rdrei\r", b"eins\rzwei\r", b"eins\rzwei\rdrei\r\n"):  # classic Mac OS
        (tmp_path / "train.de").write_bytes(content)
        with pytest.raises(DataError, match=r"train\.de ends its lines with a carriage return alone"):
            read_split(data_cfg(tmp_path), "train")
    (tmp_path / "train.de").write_bytes(b"eins\r\nzwei\r\ndrei\r\n")  # CRLF is fine
    assert read_split(data_cfg(tmp_path), "train")[1] == ["eins", "zwei", "drei"]
    # A one-line file with a stray CR inside its sentence is a sentence (and so is a one-line --ref).
    write_lines(tmp_path / "val.en", ["A man says hello."])
    (tmp_path / "val.de").write_bytes(b"Ein Mann\rsagt hallo.\n")
    assert read_split(data_cfg(tmp_path), "valid")[1] == ["Ein Mann\rsagt hallo."]


def test_invalid_utf8_names_file_and_line(tmp_path):
    write_lines(tmp_path / "train.en", ["one", "two", "three"])
    (tmp_path / "train.de").write_bytes(b"eins\nzwei\ndr\xe4i\n")  # latin-1 a-umlaut on line 3
    with pytest.raises(DataError, match=r"train\.de line 3: invalid UTF-8"):
        read_split(data_cfg(tmp_path), "train")


def test_invalid_utf8_after_a_byte_order_mark_names_its_own_line(tmp_path):
    write_lines(tmp_path / "train.en", ["one", "two", "three"])
    (tmp_path / "train.de").write_bytes(b"\xef\xbb\xbfeins\n\xdcber\ndrei\n")  # latin-1 capital U-umlaut
    with pytest.raises(DataError, match=r"train\.de line 2: invalid UTF-8"):
        read_split(data_cfg(tmp_path), "train")


def test_a_gzip_file_without_its_gz_name_is_not_taken_for_text_in_another_encoding(tmp_path):
    write_lines(tmp_path / "train.en", ["one"])
    (tmp_path / "train.de").write_bytes(gzip.compress(b"eins\n"))
    with pytest.raises(DataError, match=r"train\.de line 1: .*gzip-compressed: give it a \.gz name") as e:
        read_split(data_cfg(tmp_path), "train")
    assert "iconv" not in str(e.value)


@pytest.mark.parametrize(
    "encoding, text, codec",
    [
        ("utf-16", "eins\nzwei\n", "UTF-16"),
        ("utf-16-le", "eins\nzwei\n", "UTF-16LE"),
        # Few NULs (spaces, punctuation, line ends), all at odd offsets, high bytes 0x00 and 0x04.
        ("utf-16-le", "Привет, мир.\nКак дела?\n", "UTF-16LE"),
        ("utf-16-be", "Γειά σου, κόσμε.\nΤι κάνεις;\n", "UTF-16BE"),
    ],
    ids=["with-bom", "without-bom", "cyrillic-without-bom", "greek-big-endian"],
)
def test_a_utf16_file_is_named_as_such_with_its_byte_order(tmp_path, encoding, text, codec):
    """UTF-16 without its byte-order mark decodes as UTF-8 when its text is ASCII: it would train on
    text full of NULs (or fail on a line count doubled by the NULs) without the check. Without a mark,
    iconv must be told the byte order (it guesses one, differently on different systems)."""
    write_lines(tmp_path / "train.en", ["one", "two"])
    (tmp_path / "train.de").write_bytes(text.encode(encoding))
    # Its line feeds are not where the bytes 0x0A are: no line is named.
    advice = rf"UTF-16.*: convert it with iconv -f {codec} -t UTF-8"
    with pytest.raises(DataError, match=rf"train\.de(: | holds ).*{advice}"):
        read_split(data_cfg(tmp_path), "train")


STRAY = r"it is UTF-8 text with stray NUL bytes: delete them"
GENERAL = r"convert it with iconv -f ENCODING -t UTF-8"


@pytest.mark.parametrize(
    "content, advice",
    [
        (b"eins\nzwei\x00\ndrei\n", STRAY),  # one stray NUL
        (b"eins\x00\nzwei\x00\ndrei\x00\n", STRAY),  # NULs before the line ends: all at one parity
        (b"a tab\x00separated\x00line\x00and\x00more\n", STRAY),  # NUL as a field separator
        ("Спасибо\x00!\x00\n".encode(), STRAY),  # short, with its NULs at one parity
        (b"\x00" * 64, GENERAL),  # a zero-filled file
    ],
    ids=["stray", "before-line-ends", "separator", "short-cyrillic", "zero-filled"],
)
def test_nul_bytes_in_utf8_text_are_not_taken_for_utf16(tmp_path, content, advice):
    """Told it is UTF-16, a user would convert it from UTF-16 and garble it."""
    write_lines(tmp_path / "train.en", ["one", "two", "three"])
    (tmp_path / "train.de").write_bytes(content)
    with pytest.raises(DataError, match=rf"train\.de line \d+ holds a NUL byte.*; {advice}"):
        read_split(data_cfg(tmp_path), "train")


@pytest.mark.parametrize(
    "text, encoding",
    [("สวัสดี ช้าง ชม\nช่วย\n", "utf-16-le"), ("你好，世界。\n", "utf-16-le"), ("hello world\n", "utf-32")],
    ids=["thai-utf16", "chinese-utf16", "utf32"],
)
def test_text_in_another_encoding_is_never_told_to_delete_its_nuls(tmp_path, text, encoding):
    """Deleting the NULs of UTF-16 or UTF-32 text leaves garbage that may even read as text."""
    write_lines(tmp_path / "train.en", ["one", "two"])
    (tmp_path / "train.de").write_bytes(text.encode(encoding))
    with pytest.raises(DataError, match=r"convert it with iconv -f (UTF-16LE|ENCODING|UTF-32) -t UTF-8") as e:
        read_split(data_cfg(tmp_path), "train")
    assert "delete" not in str(e.value)


def test_random_stray_nuls_in_utf8_text_are_never_taken_for_utf16():
    from nmt.data.sources import utf16_codec

    text = "".join(f"Ein Mann mit Hut geht über die Straße, Nummer {i}.\n" for i in range(100)).encode()
    rng = np.random.default_rng(0)
    for count in (2, 3, 4, 5, 10):
        for _ in range(200):
            damaged = np.frombuffer(text, dtype=np.uint8).copy()
            damaged[rng.integers(0, len(damaged), count)] = 0
            assert utf16_codec(damaged.tobytes()) is None


def test_invalid_utf8_inside_gzip(tmp_path):
    write_lines(tmp_path / "train.en", ["one", "two"])
    with gzip.open(tmp_path / "train.de.gz", "wb") as f:
        f.write(b"ok\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"train\.de\.gz line 2: invalid UTF-8"):
        read_split(data_cfg(tmp_path), "train")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_gzip_is_a_data_error_naming_the_file(tmp_path, damage):
    write_lines(tmp_path / "train.en", ["one", "two"] * 200)
    packed = gzip.compress("".join(f"line {i}\n" for i in range(400)).encode())
    if damage == "truncated":
        packed = packed[:-20]  # no end-of-stream marker: EOFError inside gzip
    else:
        packed = packed[:12] + bytes(b ^ 0xFF for b in packed[12:40]) + packed[40:]  # zlib.error
    (tmp_path / "train.de.gz").write_bytes(packed)
    with pytest.raises(DataError, match=r"could not read .*train\.de\.gz"):
        read_split(data_cfg(tmp_path), "train")


def test_tsv_wrong_column_count_names_line(tmp_path):
    write_lines(tmp_path / "train.tsv", ["a\tb", "c\td", "only one column", "e\tf"])
    with pytest.raises(DataError, match=r"train\.tsv line 3: expected 2 tab-separated columns .* found 1"):
        read_split(data_cfg(tmp_path, format="tsv"), "train")
    write_lines(tmp_path / "train.tsv", ["a\tb", "c\td\te"])
    with pytest.raises(DataError, match=r"line 2: .* found 3"):
        read_split(data_cfg(tmp_path, format="tsv"), "train")


@pytest.mark.parametrize("header", ["en\tde", "EN\tDE", "source\ttarget", "src\ttgt"])
def test_a_tsv_header_is_not_taken_for_a_sentence_pair(tmp_path, header):
    write_lines(tmp_path / "train.tsv", [header, "a\tb"])
    with pytest.raises(DataError, match=r"train\.tsv line 1 looks like a header .*remove that line\."):
        read_split(data_cfg(tmp_path, format="tsv"), "train")
    write_lines(tmp_path / "train.tsv", ["a\tb", header])  # further down it is a pair like any other
    assert read_split(data_cfg(tmp_path, format="tsv"), "train")[0] == ["a", header.split("\t")[0]]


def test_tsv_empty_column_is_an_empty_side_not_an_error(tmp_path):
    write_lines(tmp_path / "train.tsv", ["a\tb", "c\t", "\td", "\t"])
    assert read_split(data_cfg(tmp_path, format="tsv"), "train") == (["a", "c", "", ""], ["b", "", "d", ""])


def test_jsonl_bad_rows_name_line(tmp_path):
    rows = [json.dumps({"en": "a", "de": "b"}), "{not json", json.dumps({"en": "a"})]
    write_lines(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train\.jsonl line 2: invalid JSON"):
        read_split(data_cfg(tmp_path, format="jsonl"), "train")
    write_lines(tmp_path / "train.jsonl", [rows[0], rows[2]])
    with pytest.raises(DataError, match=r"train\.jsonl line 2: expected .*\"de\""):
        read_split(data_cfg(tmp_path, format="jsonl"), "train")


@pytest.mark.parametrize(
    "row, message",
    [
        # Valid JSON; the escape names half of a surrogate pair, which no UTF-8 text can hold.
        (
            '{"en": "bad \\ud800 half", "de": "b"}',
            r"the escape of '\\ud800' is half of a UTF-16 surrogate pair",
        ),
        (
            '{"en": "a", "de": "b", "id": ' + "9" * 5000 + "}",
            r"JSON that cannot be read \(a number of over 4,300 digits\); remove it",
        ),
        ("[" * 100_000 + "]" * 100_000, r"JSON that cannot be read \(maximum recursion depth"),
    ],
    ids=["lone-surrogate", "huge-number", "deep-nesting"],
)
def test_jsonl_that_python_cannot_hold_names_the_line(tmp_path, row, message):
    write_lines(tmp_path / "train.jsonl", [json.dumps({"en": "a", "de": "b"}), row])
    with pytest.raises(DataError, match=r"train\.jsonl line 2: " + message):
        read_split(data_cfg(tmp_path, format="jsonl"), "train")


def test_missing_tsv_and_jsonl(tmp_path):
    with pytest.raises(DataError, match=r"missing tsv file .*train\.tsv.*data\.dir="):
        read_split(data_cfg(tmp_path, format="tsv"), "train")
    with pytest.raises(DataError, match=r"missing jsonl file .*val\.jsonl"):
        read_split(data_cfg(tmp_path, format="jsonl"), "valid")


def test_the_content_hash_tells_a_line_break_inside_a_sentence_from_two_sentences():
    from nmt.data.sources import content_hash

    assert content_hash(["A\nB"], ["X\nY"]) != content_hash(["A", "B"], ["X", "Y"])
    assert content_hash(["a"], ["b", "c"]) != content_hash(["a", "b"], ["c"])
    assert content_hash(["a", "b"], ["c", "d"]) == content_hash(iter(["a", "b"]), ("c", "d"))


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ---- BOM, CRLF, blank lines, odd line separators -------------------------------------------------------


def test_bom_crlf_and_blank_lines_keep_alignment(tmp_path):
    write_lines(tmp_path / "train.en", ["Hello.", "", "  Two  ", "Three."], bom=True, crlf=True)
    write_lines(tmp_path / "train.de", ["Hallo.", "Leer?", "Zwei", ""], gz=True)
    src, tgt = read_split(data_cfg(tmp_path), "train")
    assert src == ["Hello.", "", "Two", "Three."]
    assert tgt == ["Hallo.", "Leer?", "Zwei", ""]


def test_unicode_line_separators_inside_a_line_do_not_split_it(tmp_path):
    """str.splitlines() would break these lines and shift the file against its translation."""
    write_lines(tmp_path / "train.en", ["a\u2028b", "c\x85d", "e\x1cf"])
    write_lines(tmp_path / "train.de", ["1", "2", "3"])
    src, tgt = read_split(data_cfg(tmp_path), "train")
    assert src == ["a\u2028b", "c\x85d", "e\x1cf"] and tgt == ["1", "2", "3"]


def test_missing_final_newline(tmp_path):
    (tmp_path / "train.en").write_text("a\nb")
    (tmp_path / "train.de").write_text("x\ny\n")
    assert read_split(data_cfg(tmp_path), "train") == (["a", "b"], ["x", "y"])


def test_tsv_and_jsonl_with_bom_crlf_and_blank_lines(tmp_path):
    write_lines(tmp_path / "train.tsv", ["a\tb", "", "c\td"], bom=True, crlf=True)
    assert read_split(data_cfg(tmp_path, format="tsv"), "train") == (["a", "", "c"], ["b", "", "d"])
    write_lines(
        tmp_path / "train.jsonl",
        ['{"en": "a", "de": "b"}', "", '{"en": "c", "de": "d"}'],
        bom=True,
        crlf=True,
    )
    assert read_split(data_cfg(tmp_path, format="jsonl"), "train") == (["a", "", "c"], ["b", "", "d"])


# ---- Multi30k download (never touches the network) ----------------------------------------------------


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _multi30k_cfg(tmp_path, **overrides):
    settings = {"train": "train", "valid": "val", "test": "test_2016_flickr", "download": "multi30k"}
    return data_cfg(tmp_path / "m30k", **{**settings, **overrides})


def test_download_checks_sha256_and_writes_atomically(tmp_path, monkeypatch):
    payload = gzip.compress(b"A dog.\n")
    name = "val.en.gz"
    monkeypatch.setattr(download, "MULTI30K_SHA256", {name: hashlib.sha256(payload).hexdigest()})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    cfg = _multi30k_cfg(tmp_path)
    assert download.missing_multi30k_files(cfg) == [name]
    assert download.ensure_multi30k(cfg) == [tmp_path / "m30k" / name]
    assert (tmp_path / "m30k" / name).read_bytes() == payload
    assert download.missing_multi30k_files(cfg) == [] and download.ensure_multi30k(cfg) == []


def test_downloaded_files_get_the_mode_open_gives_under_the_umask(tmp_path, monkeypatch):
    payload = gzip.compress(b"A dog.\n")
    monkeypatch.setattr(download, "MULTI30K_SHA256", {"val.en.gz": hashlib.sha256(payload).hexdigest()})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResponse(payload))
    old = os.umask(0o022)
    try:
        (path,) = download.ensure_multi30k(_multi30k_cfg(tmp_path))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # readable by the other users of a shared data folder


def test_download_into_a_folder_it_cannot_write_is_one_clear_error(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)  # as in a folder of another user
    with pytest.raises(download.DownloadError, match=r"could not write into .*m30k to download Multi30k"):
        download.ensure_multi30k(_multi30k_cfg(tmp_path))


@pytest.mark.parametrize("size", [300_000, 100_100])
def test_a_download_onto_a_full_disk_says_so_not_that_the_network_failed(tmp_path, size):
    """Writes past a file size limit fail as on a full disk: the error is about the folder, with no
    advice to download by hand (into the same full disk), and no partial file is left. (100,100 bytes:
    the last 100 wait in the file's buffer, and it is closing the file that fails.)"""
    import subprocess
    import sys

    from tests.conftest import REPO, files_limited_to

    code = f"""
import gzip, hashlib, io, os, urllib.request
from nmt.data import download
from nmt.config import DataConfig
payload = os.urandom({size})
download.MULTI30K_SHA256 = {{"val.en.gz": hashlib.sha256(payload).hexdigest()}}
class Response(io.BytesIO):
    headers = {{}}
urllib.request.urlopen = lambda url, timeout: Response(payload)
cfg = DataConfig(dir={str(tmp_path / "m30k")!r}, train="train", valid="val", test="", download="multi30k")
try:
    download.ensure_multi30k(cfg)
except download.DownloadError as e:
    print(type(e).__name__, e)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
        preexec_fn=files_limited_to(100_000),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(
        f"DownloadError could not write {tmp_path / 'm30k' / 'val.en.gz'} (File too large)"
    )
    assert "make room in" in out.stdout and "by hand" not in out.stdout
    assert not (tmp_path / "m30k").exists()  # nor the folder made for it


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    urls = []

    def fake_urlopen(url, timeout):
        urls.append(url)
        return FakeResponse(b"truncated")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(download.DownloadError, match=r"train\.en\.gz .* has sha256 .*expected d79cfa99"):
        download.ensure_multi30k(_multi30k_cfg(tmp_path))
    assert urls == ["https://github.com/multi30k/dataset/raw/master/data/task1/raw/train.en.gz"]
    assert list(tmp_path.iterdir()) == []  # not even the folder it made for the download


def test_download_offline_message(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    # A folder (and parent) that did not exist.
    cfg = _multi30k_cfg(tmp_path, src_lang="de", tgt_lang="fr", dir=str(tmp_path / "typo" / "m30k"))
    with pytest.raises(DataError) as e:
        download.ensure_multi30k(cfg)
    assert str(e.value) == (
        "could not download Multi30k (train.de.gz: Name or service not known). Download the files it needs "
        "by hand (train.de.gz, train.fr.gz, val.de.gz, val.fr.gz, test_2016_flickr.de.gz, "
        f"test_2016_flickr.fr.gz, from {download.MULTI30K_URL}; gzipped or not) into {tmp_path / 'typo' / 'm30k'}, "
        "or set data.dir to a folder that holds them."
    )
    assert list(tmp_path.iterdir()) == []  # the folders made for the download are gone with it


def test_a_folder_with_files_of_its_own_is_never_filled_up_with_multi30k(tmp_path, monkeypatch, caplog):
    """A user's corpus without a test split trains (with a warning); Multi30k's test files must not be
    fetched into it, nor an offline error about them hide what is really missing."""
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)
    folder = tmp_path / "m30k"
    folder.mkdir()
    for split in ("train", "val"):
        for lang in ("en", "de"):
            write_lines(folder / f"{split}.{lang}", [f"my own {split} {lang}"])
    cfg = _multi30k_cfg(tmp_path)
    assert download.missing_multi30k_files(cfg) == ["test_2016_flickr.en.gz", "test_2016_flickr.de.gz"]
    with caplog.at_level("WARNING", logger="nmt.data.download"):
        assert download.ensure_multi30k(cfg) == []
    assert "holds files that are not Multi30k's (train.de, train.en, val.de, ...)" in caplog.text
    assert "test_2016_flickr.en.gz, test_2016_flickr.de.gz are missing" in caplog.text


def test_a_folder_holding_multi30k_files_alone_gets_the_rest(tmp_path, monkeypatch):
    """An interrupted first download is completed: the files there are Multi30k's, by checksum."""
    have, want = gzip.compress(b"A dog.\n"), gzip.compress(b"Ein Hund.\n")
    sums = {
        name: hashlib.sha256(data).hexdigest() for name, data in (("val.en.gz", have), ("val.de.gz", want))
    }
    monkeypatch.setattr(download, "MULTI30K_SHA256", sums)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: FakeResponse(want))
    (tmp_path / "m30k" / ".cache").mkdir(parents=True)  # an encoding cache does not count
    (tmp_path / "m30k" / "val.en.gz").write_bytes(have)
    assert download.ensure_multi30k(_multi30k_cfg(tmp_path)) == [tmp_path / "m30k" / "val.de.gz"]
    (tmp_path / "m30k" / "val.de.gz").unlink()
    (tmp_path / "m30k" / "README.md").write_text("notes\n")  # does not make the folder a corpus
    (tmp_path / "m30k" / "val.en.gz").rename(tmp_path / "m30k" / "val.en")
    (tmp_path / "m30k" / "val.en").write_bytes(b"A dog.\n")  # gunzipped: still Multi30k's
    monkeypatch.setattr(download, "MULTI30K_TEXT_SHA256", {"val.en": hashlib.sha256(b"A dog.\n").hexdigest()})
    assert download.ensure_multi30k(_multi30k_cfg(tmp_path)) == [tmp_path / "m30k" / "val.de.gz"]
    (tmp_path / "m30k" / "val.de.gz").unlink()
    (tmp_path / "m30k" / "val.en").write_bytes(b"A cat.\n")  # same name, other text
    assert download.ensure_multi30k(_multi30k_cfg(tmp_path)) == []


def test_download_only_for_known_multi30k_files(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)
    (tmp_path / "m30k").mkdir()
    write_lines(tmp_path / "m30k" / "train.en", ["x"], gz=True)
    cfg = _multi30k_cfg(tmp_path, train="mytrain", valid="mydev", test="mytest")
    assert download.missing_multi30k_files(cfg) == []
    cfg = _multi30k_cfg(tmp_path, valid="mydev", test="mytest")
    assert download.missing_multi30k_files(cfg) == ["train.de.gz"]  # train.en.gz is present


def test_expected_checksums_match_the_shared_copy():
    if MULTI30K is None:
        pytest.skip(multi30k_missing())
    for name, expected in download.MULTI30K_SHA256.items():
        assert hashlib.sha256((MULTI30K / name).read_bytes()).hexdigest() == expected, name
    assert {f"{name}.gz" for name in download.MULTI30K_TEXT_SHA256} == set(download.MULTI30K_SHA256)
    for name, expected in download.MULTI30K_TEXT_SHA256.items():  # as gunzip leaves them
        text = gzip.decompress((MULTI30K / f"{name}.gz").read_bytes())
        assert hashlib.sha256(text).hexdigest() == expected, name


def test_large_corpus_script_joins_random_pairs_and_copies_the_rest(tmp_path):
    from script_loader import load_script

    small, big = tmp_path / "small", tmp_path / "big"
    written = write_corpus(small, sizes={"train": 60, "val": 5, "test_2016_flickr": 5})
    load_script("large_corpus").main(["--data-dir", str(small), "--pairs", "250", "--out", str(big)])
    src, tgt = read_split(data_cfg(big), "train")
    pairs = list(zip(*written["train"], strict=True))
    joined = {(f"{a} {c}", f"{b} {d}") for a, b in pairs for c, d in pairs}
    assert len(src) == len(tgt) == 250 and set(zip(src, tgt, strict=True)) <= joined
    assert len(set(src)) > 200  # random pairs, not one repeated
    assert read_split(data_cfg(big), "valid") == written["val"]
    assert read_split(data_cfg(big, test="test_2016_flickr"), "test") == written["test_2016_flickr"]
