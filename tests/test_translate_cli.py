"""python -m nmt.translate: one output line per input line whatever the input, streaming, n-best
format, scores equal to sacreBLEU's, clear errors."""

from __future__ import annotations

import gzip
import json
import logging
import os
import queue
import subprocess
import sys
import threading

import pytest

from nmt.translate import main
from nmt.translator import Translator
from tests.conftest import REPO
from tests.test_translator import SENTENCES, copy_translator, make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "best.pt")


def translate_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nmt.translate", *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def read_line_within(stream, seconds: float) -> bytes:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(stream.readline()), daemon=True).start()
    return lines.get(timeout=seconds)


def test_stdin_streams_and_keeps_one_line_per_input(checkpoint):
    """The first line is answered before stdin closes; empty, over-long, invalid-UTF-8 and
    unterminated lines each still give exactly one output line."""
    expected = Translator.from_checkpoint(checkpoint, device="cpu").translate(SENTENCES[:2])
    proc = translate_cli("--ckpt", str(checkpoint), "--device", "cpu")
    try:
        proc.stdin.write(SENTENCES[0].encode() + b"\n")
        proc.stdin.flush()
        assert read_line_within(proc.stdout, 60).decode().rstrip("\n") == expected[0]
        rest = [
            b"",
            b"the dog \xff\xfe runs",  # invalid UTF-8
            " ".join(["a big dog"] * 60).encode(),  # longer than the model's positions
            b"the cat\r",  # Windows line ending
            SENTENCES[1].encode(),  # no final newline
        ]
        out, err = proc.communicate(b"\n".join(rest), timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().split("\n")
    assert lines[-1] == "" and len(lines[:-1]) == len(rest)
    assert lines[0] == "" and lines[-2] == expected[1]
    assert "line 3 is not valid UTF-8" in err.decode()  # 1-based, counting the first line
    assert "translating only its beginning" in err.decode()


def test_files_nbest_format(checkpoint, tmp_path):
    src = tmp_path / "in.en"
    src.write_text("\n".join(["", *SENTENCES[:4]]) + "\n", encoding="utf-8")
    out = tmp_path / "out.de"
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]
    assert main([*args, "--beam", "3", "--nbest", "3"]) == 0
    rows = [line.split(" ||| ") for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(len(r) == 3 for r in rows)
    indices = [int(r[0]) for r in rows]
    assert sorted(set(indices)) == [0, 1, 2, 3, 4] and indices == sorted(indices)
    assert rows[0] == ["0", "", "0.0000"]  # the empty line
    for i in range(1, 5):
        scores = [float(r[2]) for r in rows if int(r[0]) == i]
        assert 1 <= len(scores) <= 3 and scores == sorted(scores, reverse=True)
    # The best of each n-best list is what plain output gives.
    assert main([*args, "--beam", "3"]) == 0
    plain = out.read_text(encoding="utf-8").split("\n")[:-1]
    assert plain == [next(r[1] for r in rows if int(r[0]) == i) for i in range(5)]


def test_ref_scores_equal_sacrebleu_cli(checkpoint, tmp_path, capsys, monkeypatch):
    # A model that copies its input gives known outputs, so the reference can overlap them
    # partly: an untrained model's output would score 0 and prove nothing.
    tok = Translator.from_checkpoint(checkpoint, device="cpu").tokenizer
    monkeypatch.setattr(Translator, "from_checkpoint", lambda *args, **kwargs: copy_translator(tok))
    src, hyp, ref = tmp_path / "in.en", tmp_path / "hyp.de", tmp_path / "ref.de"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    refs = [" ".join(s.split()[: max(1, 2 * len(s.split()) // 3)] + ["und", "so"]) for s in SENTENCES]
    ref.write_text("\n".join(refs) + "\n", encoding="utf-8")
    args = ["--ckpt", str(checkpoint), "--input", str(src), "--output", str(hyp), "--ref", str(ref)]
    assert main(args) == 0
    assert hyp.read_text(encoding="utf-8") == src.read_text(encoding="utf-8")
    err = capsys.readouterr().err
    cmd = [sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-w", "2"]
    expected = {e["name"]: e for e in json.loads(subprocess.run(cmd, capture_output=True, check=True).stdout)}
    assert 0 < expected["BLEU"]["score"] < 100
    assert f"BLEU {expected['BLEU']['score']:.2f} ({expected['BLEU']['signature']})" in err
    assert f"chrF {expected['chrF2']['score']:.2f} ({expected['chrF2']['signature']})" in err
    assert main([*args, "--lowercase"]) == 0
    assert "case:lc" in capsys.readouterr().err


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "nope.pt does not exist" in err and len(err.splitlines()) == 1


def test_nbest_larger_than_beam_is_rejected(checkpoint, capsys):
    assert main(["--ckpt", str(checkpoint), "--beam", "2", "--nbest", "3"]) == 1
    assert "--nbest 3 needs --beam of at least 3" in capsys.readouterr().err


def test_workers_flag_same_output_and_bad_value_rejected(checkpoint, tmp_path, capsys, torch_threads):
    # 4 threads, so that --workers 2 runs two batches at once on any machine.
    src = tmp_path / "in.en"
    src.write_text("\n".join([*SENTENCES, "", *SENTENCES]) + "\n", encoding="utf-8")
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--beam", "3"]
    outputs = []
    for workers in ("1", "2"):
        out = tmp_path / f"out-{workers}.de"
        assert main([*args, "--output", str(out), "--workers", workers]) == 0
        outputs.append(out.read_text(encoding="utf-8"))
    assert outputs[0] == outputs[1] and len(outputs[0].split("\n")) == 2 * len(SENTENCES) + 2
    assert main([*args, "--workers", "-1"]) == 1
    assert "decode.workers=-1 must be in [0, 1024]" in capsys.readouterr().err


def test_input_from_a_pipe_is_read_once_and_translated(checkpoint):
    """``--input /dev/stdin`` (or ``<(...)``) is a pipe: it cannot be read twice to count its lines."""
    expected = Translator.from_checkpoint(checkpoint, device="cpu").translate(SENTENCES[:3])
    proc = translate_cli("--ckpt", str(checkpoint), "--device", "cpu", "--input", "/dev/stdin")
    try:
        out, err = proc.communicate("\n".join(SENTENCES[:3]).encode() + b"\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err.decode()
    assert out.decode().split("\n") == [*expected, ""]


def test_output_onto_the_input_or_the_reference_is_refused_and_destroys_nothing(checkpoint, tmp_path, capsys):
    src, ref = tmp_path / "in.en", tmp_path / "ref.de"
    text = "\n".join(SENTENCES[:3]) + "\n"
    src.write_text(text, encoding="utf-8")
    ref.write_text(text, encoding="utf-8")
    base = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src)]
    assert main([*base, "--output", str(src)]) == 1
    assert "is the --input file" in capsys.readouterr().err
    assert main([*base, "--ref", str(ref), "--output", str(tmp_path / "." / "ref.de")]) == 1
    assert "is the --ref file" in capsys.readouterr().err
    assert src.read_text(encoding="utf-8") == text and ref.read_text(encoding="utf-8") == text


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nbest", "-1"], "--nbest -1: give at least 1"),
        (["--nbest", "0"], "--nbest 0: give at least 1"),
        (["--beam", "0"], "--beam 0: the beam size is at least 1"),
        (["--max-len-a", "inf"], "decode.max_len_a=inf must be in"),
        (["--max-len-b", "100000000000000000000"], "decode.max_len_b=100000000000000000000 must be in"),
    ],
)
def test_bad_decoding_flags_fail_before_the_output_is_touched(checkpoint, tmp_path, capsys, flags, message):
    src, out = tmp_path / "in.en", tmp_path / "out.de"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    out.write_text("an earlier translation\n", encoding="utf-8")
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]
    assert main([*args, *flags]) == 1
    assert message in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "an earlier translation\n"


def test_reference_line_count_is_checked_before_translating(checkpoint, tmp_path, capsys, monkeypatch):
    src, ref = tmp_path / "in.en", tmp_path / "ref.de"
    src.write_text("\n".join(SENTENCES[:3]) + "\n", encoding="utf-8")
    ref.write_text("\n".join(SENTENCES[:4]) + "\n", encoding="utf-8")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the line counts were compared")

    monkeypatch.setattr(Translator, "from_checkpoint", no_model)
    assert main(["--ckpt", str(checkpoint), "--input", str(src), "--ref", str(ref)]) == 1
    assert "in.en has 3 lines but" in capsys.readouterr().err


def test_a_truncated_gzip_input_is_one_error_line(checkpoint, tmp_path, capsys):
    src = tmp_path / "in.en.gz"
    src.write_bytes(gzip.compress(("\n".join(SENTENCES) + "\n").encode())[:-12])
    assert main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nmt.translate: error: could not read") and "in.en.gz" in err
    assert len(err.splitlines()) == 1


def test_a_byte_order_mark_is_not_translated_and_bad_utf8_is_summarised(checkpoint, tmp_path, caplog):
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    src, out = tmp_path / "in.en", tmp_path / "out.de"
    latin1 = [f"{s} café".encode("latin-1") for s in SENTENCES[:5]]
    src.write_bytes(b"\xef\xbb\xbf" + b"\n".join([SENTENCES[0].encode(), *latin1]) + b"\n")
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]
    with caplog.at_level(logging.WARNING, logger="nmt.translate"):
        assert main(args) == 0
    lines = out.read_text(encoding="utf-8").split("\n")
    assert len(lines) == 7 and lines[0] == translator.translate(SENTENCES[:1])[0]
    per_line = [r for r in caplog.records if "is not valid UTF-8" in r.getMessage()]
    assert [r.getMessage().split()[2] for r in per_line] == ["2", "3", "4"]
    assert any("5 input lines in all were not valid UTF-8" in r.getMessage() for r in caplog.records)
