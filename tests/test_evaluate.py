"""nmt.evaluate agrees with sacreBLEU's own command line on the same files."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nmt.data.sources import read_text_lines
from nmt.evaluate import main, score

REFS = [
    "Ein Mann fährt Fahrrad auf der Straße.",
    "Zwei Hunde spielen im Schnee.",
    "Eine Frau liest ein Buch im Park.",
    "Kinder spielen Fußball auf einer Wiese.",
]
HYPS = [
    "ein Mann fährt ein Fahrrad auf der Straße.",
    "Zwei Hunde spielen im Schnee.",
    "Die Frau liest im Park.",
    "kinder spielen auf der Wiese Fußball.",
]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sacrebleu_cli(ref: Path, hyp: Path, *extra: str) -> dict[str, dict]:
    """BLEU and chrF from ``python -m sacrebleu`` (JSON, 4 decimals), keyed by metric name."""
    cmd = [
        sys.executable,
        "-m",
        "sacrebleu",
        str(ref),
        "-i",
        str(hyp),
        "-m",
        "bleu",
        "chrf",
        "-w",
        "4",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60)
    return {entry["name"]: entry for entry in json.loads(proc.stdout)}


@pytest.mark.parametrize("lowercase", [False, True])
def test_scores_and_signatures_equal_sacrebleu_cli(tmp_path, lowercase):
    ref, hyp = write(tmp_path / "ref.de", REFS), write(tmp_path / "hyp.de", HYPS)
    expected = sacrebleu_cli(ref, hyp, *(["-lc"] if lowercase else []))
    got = score(read_text_lines(hyp), read_text_lines(ref), lowercase=lowercase)
    assert got.bleu == pytest.approx(expected["BLEU"]["score"], abs=1e-4)
    assert got.chrf == pytest.approx(expected["chrF2"]["score"], abs=1e-4)
    assert got.bleu_signature == expected["BLEU"]["signature"]
    assert got.chrf_signature == expected["chrF2"]["signature"]
    assert 0 < got.bleu < 100 and 0 < got.chrf < 100  # a comparison at 0 or 100 would prove little


ZH_REFS = ["我爱北京天安门。", "他们在公园里踢足球。", "一个男人骑着自行车。"]
ZH_HYPS = ["我爱北京天安門。", "他们在公园踢足球。", "一个男人骑自行车。"]


def test_chinese_is_tokenized_as_sacrebleu_does_for_chinese(tmp_path, capsys):
    """13a splits no Chinese words: each sentence is one token, and close translations score near 0."""
    ref, hyp = write(tmp_path / "ref.zh", ZH_REFS), write(tmp_path / "hyp.zh", ZH_HYPS)
    expected = sacrebleu_cli(ref, hyp, "-l", "en-zh")
    for lang in ("zh", "zh-CN", "ZH_Hans"):
        got = score(ZH_HYPS, ZH_REFS, tgt_lang=lang)
        assert got.bleu == pytest.approx(expected["BLEU"]["score"], abs=1e-4)
        assert got.bleu_signature == expected["BLEU"]["signature"] and "tok:zh" in got.bleu_signature
    assert got.bleu > 30 and score(ZH_HYPS, ZH_REFS).bleu < 5  # 13a, the default for other languages
    assert main(["--hyp", str(hyp), "--ref", str(ref), "--tgt-lang", "zh"]) == 0
    assert f"BLEU {expected['BLEU']['score']:.2f} (" in capsys.readouterr().out
    assert "tok:char" in score(ZH_HYPS, ZH_REFS, tokenize="char", tgt_lang="zh").bleu_signature


def test_a_tokenizer_that_cannot_run_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"no tokenizer 'moses'; choose one of: auto, 13a, char"):
        score(HYPS, REFS, tokenize="moses")
    ref, hyp = write(tmp_path / "ref", REFS), write(tmp_path / "hyp", HYPS)
    with pytest.raises(SystemExit) as exit_info:
        main(["--hyp", str(hyp), "--ref", str(ref), "--tokenize", "moses"])
    assert exit_info.value.code == 1 and "no tokenizer 'moses'" in capsys.readouterr().err
    if not _has_mecab():
        with pytest.raises(
            ValueError, match=r"target language 'ja' needs .*: pip install sacrebleu\[ja\] \(or choose"
        ):
            score(["猫"], ["猫"], tgt_lang="ja")
        with pytest.raises(ValueError, match=r"^BLEU's tokenizer 'ja-mecab' needs packages"):  # named
            score(["猫"], ["猫"], tokenize="ja-mecab", tgt_lang="de")


def test_a_tokenizer_whose_model_cannot_be_downloaded_is_a_clear_error(tmp_path, monkeypatch):
    """flores200 (and spm, flores101) fetch a SentencePiece model on first use; offline that fails."""
    import urllib.error

    from sacrebleu.tokenizers import tokenizer_spm

    def offline(url, path):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tokenizer_spm, "SACREBLEU_DIR", str(tmp_path))  # no model there yet
    monkeypatch.setattr(tokenizer_spm, "download_file", offline)
    with pytest.raises(
        ValueError, match=r"^BLEU's tokenizer 'flores200' downloads its SentencePiece model on "
    ):
        score(HYPS, REFS, tokenize="flores200")


def _has_mecab() -> bool:
    try:
        import MeCab  # noqa: F401
    except ImportError:
        return False
    return True


def test_lowercase_changes_bleu_only_and_says_so():
    cased, lowered = score(HYPS, REFS), score(HYPS, REFS, lowercase=True)
    assert lowered.bleu > cased.bleu  # "ein Mann" / "kinder" match only without case
    assert lowered.chrf == cased.chrf
    assert "case:mixed" in cased.bleu_signature and "case:lc" in lowered.bleu_signature
    assert "tok:13a" in cased.bleu_signature
    assert f"{cased.bleu:.2f}" in cased.format() and cased.chrf_signature in cased.format()


def test_identical_text_scores_100():
    got = score(REFS, REFS)
    assert got.bleu == pytest.approx(100.0) and got.chrf == pytest.approx(100.0)


def test_mismatched_line_counts_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="3 hypotheses but 4 references"):
        score(HYPS[:3], REFS)
    ref, hyp = write(tmp_path / "ref", REFS), write(tmp_path / "hyp", HYPS[:3])
    with pytest.raises(SystemExit) as exit_info:
        main(["--hyp", str(hyp), "--ref", str(ref)])
    assert exit_info.value.code == 1
    assert "3 hypotheses but 4 references" in capsys.readouterr().err


def test_cli_prints_scores_with_signatures_and_reads_gzip(tmp_path, capsys):
    ref = tmp_path / "ref.de.gz"
    ref.write_bytes(gzip.compress("".join(r + "\n" for r in REFS).encode()))
    hyp = write(tmp_path / "hyp.de", HYPS)
    assert main(["--hyp", str(hyp), "--ref", str(ref), "--lowercase"]) == 0
    out = capsys.readouterr().out
    expected = score(HYPS, REFS, lowercase=True)
    assert f"BLEU {expected.bleu:.2f} ({expected.bleu_signature})" in out
    assert f"chrF {expected.chrf:.2f} ({expected.chrf_signature})" in out


def test_cli_reads_hypotheses_from_standard_input_and_refuses_a_second_ref(tmp_path, capsys, monkeypatch):
    import io

    ref, other = write(tmp_path / "ref.de", REFS), write(tmp_path / "other.de", HYPS)
    stdin = io.TextIOWrapper(io.BytesIO("".join(h + "\n" for h in HYPS).encode()))
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["--hyp", "-", "--ref", str(ref)]) == 0
    assert f"BLEU {score(HYPS, REFS).bleu:.2f}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # last one wins would score against other.de alone
        main(["--hyp", "-", "--ref", str(ref), "--ref", str(other)])
    assert (
        exit_.value.code == 2
        and f"--ref is given twice ({ref}, {other}); give it once." in capsys.readouterr().err
    )


def test_a_carriage_return_inside_a_line_does_not_split_it(tmp_path):
    """Only "\\n" ends a line, as in sacreBLEU's own reader; a lone "\\r" stays part of its line."""
    refs = [REFS[0], "Zwei Hunde\rspielen im Schnee.", REFS[2]]
    ref = tmp_path / "ref.de"
    ref.write_bytes(("\r\n".join(refs) + "\r\n").encode())
    assert read_text_lines(ref) == refs
    got = score(refs, read_text_lines(ref))
    assert got.bleu == pytest.approx(100.0)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("ref.de", "Ein Hund läuft.\n".encode("latin-1"), r"ref\.de line 1: invalid UTF-8"),
        ("ref.de.gz", gzip.compress(b"Ein Hund.\n" * 50)[:-10], r"could not read .*ref\.de\.gz"),
    ],
    ids=["latin-1", "truncated-gzip"],
)
def test_unreadable_files_are_one_error_naming_the_file(tmp_path, capsys, name, content, message):
    ref = tmp_path / name
    ref.write_bytes(content)
    hyp = write(tmp_path / "hyp.de", ["Ein Hund."])
    with pytest.raises(SystemExit) as exit_info:
        main(["--hyp", str(hyp), "--ref", str(ref)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err
