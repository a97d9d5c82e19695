"""python -m nmt.translate: one output line per input line whatever the input, streaming, n-best
format, scores equal to sacreBLEU's, clear errors."""

from __future__ import annotations

import gzip
import json
import os
import queue
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nmt.translate import main
from nmt.translator import Translator
from tests.conftest import REPO, files_limited_to
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
    """The first line is answered before stdin closes; empty, over-long and unterminated lines each
    still give exactly one output line."""
    expected = Translator.from_checkpoint(checkpoint, device="cpu").translate(SENTENCES[:2])
    proc = translate_cli("--ckpt", str(checkpoint), "--device", "cpu")
    try:
        proc.stdin.write(SENTENCES[0].encode() + b"\n")
        proc.stdin.flush()
        assert read_line_within(proc.stdout, 60).decode().rstrip("\n") == expected[0]
        rest = [
            b"",
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
    assert main([*args, "--tokenize", "char"]) == 0
    assert "tok:char" in capsys.readouterr().err
    hyp.write_text("an earlier translation\n", encoding="utf-8")
    assert main([*args, "--tokenize", "moses"]) == 1  # refused before anything is translated
    assert "--ref: BLEU has no tokenizer 'moses'" in capsys.readouterr().err
    assert hyp.read_text(encoding="utf-8") == "an earlier translation\n"


def test_ref_tokenizes_bleu_as_the_checkpoints_validation_did(checkpoint):
    from nmt.translate import bleu_settings

    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    cfg = translator.checkpoint_config
    assert bleu_settings(translator, None) == {"tokenize": "auto", "tgt_lang": cfg.data.tgt_lang}
    translator.checkpoint_config = replace(cfg, data=replace(cfg.data, tgt_lang="zh"))
    assert bleu_settings(translator, None) == {"tokenize": "auto", "tgt_lang": "zh"}
    translator.checkpoint_config = replace(cfg, train=replace(cfg.train, bleu_tokenize="intl"))
    assert bleu_settings(translator, None)["tokenize"] == "intl"
    assert bleu_settings(translator, "char")["tokenize"] == "char"  # --tokenize wins


def test_missing_checkpoint_is_one_clear_line(tmp_path, capsys):
    assert main(["--ckpt", str(tmp_path / "nope.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert "nope.pt does not exist.\n" in err + "\n" and len(err.splitlines()) == 1
    (tmp_path / "x.pt").write_bytes(b"")  # checked later than the flags' paths
    assert main(["--ckpt", str(tmp_path / "nope.pt")]) == 1
    assert f"nope.pt does not exist ({tmp_path} holds x.pt)." in capsys.readouterr().err  # a typo?
    for flag in ("--input", "--ref"):
        assert main(["--ckpt", str(tmp_path / "x.pt"), flag, str(tmp_path)]) == 1
        assert (
            f"{flag} {tmp_path} is a folder; give the name of a text file in it." in capsys.readouterr().err
        )


@pytest.mark.parametrize("damage", ["missing-weight", "other-shape", "bad-tokenizer", "config-string"])
def test_a_damaged_checkpoint_is_one_clear_line(damage, checkpoint, tmp_path, capsys):
    """An nmt checkpoint (it has its format_version) whose parts do not fit: one error line naming it."""
    state = torch.load(checkpoint, weights_only=True)
    if damage == "missing-weight":
        del state["model"][next(iter(state["model"]))]
    elif damage == "other-shape":
        state["config"]["model"]["d_model"] *= 2
    elif damage == "bad-tokenizer":
        state["tokenizer"] = {
            key: b"garbage" if isinstance(v, bytes) else v for key, v in state["tokenizer"].items()
        }
    else:
        state["config"] = "base"
    damaged = tmp_path / "damaged.pt"
    torch.save(state, damaged)
    src = tmp_path / "in.en"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    assert main(["--ckpt", str(damaged), "--device", "cpu", "--input", str(src)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nmt.translate: error: {damaged} is damaged") and err.count("\n") == 1, err


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
    assert "--workers -1 must be in [0, 1024]" in capsys.readouterr().err


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


def test_an_output_file_that_does_not_fit_on_disk_leaves_the_previous_file_and_no_partial_one(
    checkpoint, tmp_path
):
    """A real failed write: the process may not grow any file past 100 bytes, as on a full disk."""
    src, out = tmp_path / "in.en", tmp_path / "out" / "test.de"
    src.write_text("\n".join(SENTENCES * 20) + "\n", encoding="utf-8")
    out.parent.mkdir()
    out.write_text("the previous translation\n", encoding="utf-8")
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "nmt.translate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=files_limited_to(100),
    )
    assert proc.returncode == 1
    assert proc.stderr.endswith(
        f"nmt.translate: error: could not write the translations to {out} (File too large); nothing was written "
        "there\n"
    ), proc.stderr
    assert [p.name for p in out.parent.iterdir()] == ["test.de"], "no partial file is left"
    assert out.read_text(encoding="utf-8") == "the previous translation\n"


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_stopped_translation_leaves_the_output_file_as_it_was(checkpoint, tmp_path, signum):
    """Stopped midway, with translated lines already written: the output file is not a partial one."""
    import signal
    import time

    out = tmp_path / "out" / "test.de"
    out.parent.mkdir()
    out.write_text("the previous translation\n", encoding="utf-8")
    proc = translate_cli("--ckpt", str(checkpoint), "--device", "cpu", "--output", str(out))
    proc.stdin.write(("\n".join(SENTENCES) + "\n").encode())
    proc.stdin.flush()  # and left open: the run is still going when the signal comes
    deadline = time.monotonic() + 60
    partial = []
    while not partial and time.monotonic() < deadline:
        partial = [p for p in out.parent.iterdir() if p.name != "test.de" and p.stat().st_size > 0]
        time.sleep(0.05)
    assert partial, "the first lines were written beside the output file"
    time.sleep(1.0)  # every line translated by now, most likely: the reader waits on the idle input
    proc.send_signal(getattr(signal, signum))
    try:
        proc.wait(timeout=30)  # standard input still open: the signal alone ends the run
    finally:
        proc.kill()
        proc.stdin.close()
    err = proc.stderr.read()
    assert proc.returncode == 128 + getattr(signal, signum)
    assert err.decode().endswith(f"nmt.translate: stopped by {signum}; {out} was not written\n"), err
    assert [p.name for p in out.parent.iterdir()] == ["test.de"]
    assert out.read_text(encoding="utf-8") == "the previous translation\n"


def test_output_through_a_link_or_onto_a_device(checkpoint, tmp_path):
    """A symbolic link is written through (the file it names gets the translations); a device or pipe
    (/dev/stdout) is written directly, not replaced."""
    src = tmp_path / "in.en"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    real, link = tmp_path / "real.de", tmp_path / "link.de"
    real.write_text("old\n", encoding="utf-8")
    link.symlink_to(real)
    base = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src)]
    assert main([*base, "--output", str(link)]) == 0
    assert link.is_symlink() and len(real.read_text(encoding="utf-8").splitlines()) == len(SENTENCES)
    proc = subprocess.run(
        [sys.executable, "-m", "nmt.translate", *base, "--output", "/dev/stdout"],
        cwd=REPO,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode("utf-8") == real.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--nbest", "-1"], "--nbest -1: give at least 1"),
        (["--nbest", "0"], "--nbest 0: give at least 1"),
        (["--beam", "0"], "--beam 0: the beam size is at least 1"),
        (["--beam", "1000"], "--beam 1000 needs more than 1000 target tokens (a beam of 1000) and "),
        (["--nbest", "1000"], "--nbest 1000 needs more than 1000 target tokens (a beam of 1000) and "),
        (["--lowercase"], "--lowercase applies to scoring, which needs --ref FILE"),
        (["--tokenize", "intl"], "--tokenize applies to scoring, which needs --ref FILE"),
        (["--max-len-a", "inf"], "--max-len-a inf must be in [0, 1000]"),
        (["--max-len-b", "100000000000000000000"], "--max-len-b 100000000000000000000 must be in"),
        (["--batch-size", "0"], "--batch-size and --max-tokens must be >= 1"),
        (["--len-penalty", "-1"], "--len-penalty -1.0 must be in [0, 100]"),
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


def test_a_byte_order_mark_is_not_translated(checkpoint, tmp_path):
    translator = Translator.from_checkpoint(checkpoint, device="cpu")
    src, out = tmp_path / "in.en", tmp_path / "out.de"
    src.write_bytes(b"\xef\xbb\xbf" + "\n".join(SENTENCES[:2]).encode() + b"\n")
    assert (
        main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]) == 0
    )
    assert out.read_text(encoding="utf-8").split("\n") == [*translator.translate(SENTENCES[:2]), ""]
    # A file holding only the mark has no lines, as --ref and nmt.evaluate count it.
    src.write_bytes(b"\xef\xbb\xbf")
    assert (
        main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]) == 0
    )
    assert out.read_bytes() == b""


@pytest.mark.parametrize(
    "content, message",
    [
        (
            b"\n".join([b"the dog", "a café".encode("latin-1"), b"the cat"]) + b"\n",
            r"line 2 is not valid UTF-8 \(unexpected end of data at byte 6\); convert it with iconv",
        ),
        (
            "the dog\nthe cat\n".encode("utf-16"),
            r"line 1 is not valid UTF-8 .*\); it is UTF-16 \(it starts with a byte-order mark\): convert it with "
            r"iconv -f UTF-16 -t UTF-8",
        ),
        # Without its mark, ASCII text in UTF-16 is valid UTF-8 with a NUL after every letter.
        (
            "the dog\nthe cat\n".encode("utf-16-le"),
            r"line 1 holds a NUL byte, which text does not; it looks like UTF-16 without a byte-order mark: "
            r"convert it with iconv -f UTF-16LE -t UTF-8",
        ),
        # One NUL in a UTF-8 line: not UTF-16, and iconv from UTF-16 would garble it.
        (
            b"the dog\nthe\x00 cat\n",
            r"line 2 holds a NUL byte, which text does not; it is UTF-8 text with stray NUL bytes: delete them",
        ),
        # Classic Mac OS line ends: three sentences would be translated as one line.
        (b"the dog\rthe cat\ra bird\r", r"ends its lines with a carriage return alone"),
        (
            b"the dog\rthe cat\ra bird\r\n",
            r"ends its lines with a carriage return alone",
        ),  # an editor's final LF
        # Thai in UTF-16 splits at its letter U+0E0A (bytes 0A 0E): line 1 alone is too short to tell
        # the byte order, but its NULs are never said to be stray ones to delete.
        (
            "สวัสดี ช้าง ชม\nช่วย ด้วย\n".encode("utf-16-le"),
            r"line 1 holds a NUL byte, which text does not; convert it with iconv -f ENCODING -t UTF-8 "
            r"\(ENCODING is the file's own: e\.g\. LATIN1 or CP1252 for Western European text; for UTF-16 "
            r"without a byte-order mark, UTF-16LE or UTF-16BE\)",
        ),
    ],
    ids=["latin-1", "utf-16", "utf-16-without-mark", "stray-nul", "cr-line-ends", "cr-and-lf", "thai-utf-16"],
)
def test_input_that_is_not_utf8_fails_before_anything_is_written(
    checkpoint, tmp_path, capsys, content, message
):
    import re

    src, out = tmp_path / "in.en", tmp_path / "out.de"
    src.write_bytes(content)
    out.write_text("previous\n", encoding="utf-8")
    assert (
        main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]) == 1
    )
    err = capsys.readouterr().err
    assert re.search(rf"^nmt.translate: error: {re.escape(str(src))} {message}", err), err
    assert out.read_text(encoding="utf-8") == "previous\n"


def test_standard_input_that_is_not_utf8_stops_at_the_line(checkpoint):
    """Read as it arrives, standard input can only stop where the bad line is: the lines before it
    have their translations, and the error names the line."""
    expected = Translator.from_checkpoint(checkpoint, device="cpu").translate(SENTENCES[:2])
    proc = translate_cli("--ckpt", str(checkpoint), "--device", "cpu", "--input", "-")
    out, err = proc.communicate("\n".join(SENTENCES[:2]).encode() + b"\na caf\xe9\n", timeout=120)
    assert proc.returncode == 1
    assert out.decode().split("\n") == [*expected, ""]
    assert err.decode().endswith(
        "nmt.translate: error: standard input line 3 is not valid UTF-8 (unexpected end of data at byte 6); "
        "convert it with iconv -f ENCODING -t UTF-8 (ENCODING is the file's own: e.g. LATIN1 or CP1252 for Western "
        "European text; for UTF-16 without a byte-order mark, UTF-16LE or UTF-16BE).\n"
    ), err


def test_signal_handlers_are_restored_after_a_run(checkpoint, tmp_path):
    import signal

    src = tmp_path / "in.en"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    out = tmp_path / "out.de"
    assert (
        main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]) == 0
    )
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


def test_output_onto_the_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    import shutil

    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copy(checkpoint, ckpts / "latest.pt")
    (ckpts / "best.pt").hardlink_to(ckpts / "latest.pt")
    src = tmp_path / "in.en"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    before = (ckpts / "latest.pt").read_bytes()
    for ckpt in (tmp_path / "run", ckpts / "best.pt"):  # a run folder names its latest.pt
        args = [
            "--ckpt",
            str(ckpt),
            "--device",
            "cpu",
            "--input",
            str(src),
            "--output",
            str(ckpts / "latest.pt"),
        ]
        assert main(args) == 1
        assert "is the --ckpt file" in capsys.readouterr().err
    assert (ckpts / "latest.pt").read_bytes() == before


def test_a_missing_output_folder_fails_before_the_model_loads(checkpoint, tmp_path, capsys, monkeypatch):
    import nmt.translate

    monkeypatch.setattr(nmt.translate, "load_translator", lambda args: pytest.fail("the model was loaded"))
    src = tmp_path / "in.en"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    out = tmp_path / "missing" / "out.de"
    assert (
        main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]) == 1
    )
    assert f"--output {out}: the folder {out.parent} does not exist." in capsys.readouterr().err
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(tmp_path)]
    assert main(args) == 1
    assert f"--output {tmp_path} is a folder; give the name of a file in it." in capsys.readouterr().err


def test_a_gz_output_is_compressed_as_a_gz_input_is_read(checkpoint, tmp_path):
    src, out = tmp_path / "in.en.gz", tmp_path / "out.de.gz"
    src.write_bytes(gzip.compress(("\n".join(SENTENCES) + "\n").encode("utf-8")))
    base = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src)]
    assert main([*base, "--output", str(out)]) == 0
    assert main([*base, "--output", str(tmp_path / "out.de")]) == 0
    assert gzip.decompress(out.read_bytes()) == (tmp_path / "out.de").read_bytes()
    assert len((tmp_path / "out.de").read_text(encoding="utf-8").splitlines()) == len(SENTENCES)
    # The header names the file, not the temporary one it was written as, and holds no time (RFC 1952:
    # flags byte 3, mtime bytes 4-7, the name from byte 10), so a second run writes the same bytes.
    first = out.read_bytes()
    assert first[3] & 0x08 and first[4:8] == bytes(4) and first[10:17] == b"out.de\0"
    assert main([*base, "--output", str(out)]) == 0
    assert out.read_bytes() == first


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_device_is_one_error_naming_it(checkpoint, tmp_path, capsys):
    src = tmp_path / "in.en"
    src.write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    assert (
        main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", "/dev/full"])
        == 1
    )
    err = capsys.readouterr().err
    assert "could not write the translations to /dev/full (No space left on device)" in err


def test_replacing_an_output_file_keeps_its_permissions(checkpoint, tmp_path):
    src, out = tmp_path / "in.en", tmp_path / "out.de"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    out.write_text("previous\n", encoding="utf-8")
    out.chmod(0o600)
    assert (
        main(["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]) == 0
    )
    assert out.stat().st_mode & 0o777 == 0o600 and out.read_text(encoding="utf-8") != "previous\n"


@pytest.mark.parametrize("case", ["stdin-of-another-length", "empty"])
def test_references_that_do_not_fit_leave_the_output_as_it_was(
    case, checkpoint, tmp_path, capsys, caplog, monkeypatch
):
    """Scoring fails (standard input of another length than --ref): the run exits 1 and the output
    file keeps its previous translations, as with any other failure. An empty input with an empty
    --ref is not a failure: its translation (no lines) is written, with a warning that nothing was
    scored."""
    import io

    ref, out = tmp_path / "ref.de", tmp_path / "out.de"
    lines = SENTENCES[:2] if case != "empty" else []
    ref.write_text("".join(line + "\n" for line in (SENTENCES if case != "empty" else [])), encoding="utf-8")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("".join(f"{x}\n" for x in lines).encode())))
    out.write_text("previous\n", encoding="utf-8")
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--output", str(out), "--ref", str(ref)]
    assert main(args) == (1 if case != "empty" else 0)
    err = capsys.readouterr().err
    if case == "empty":
        assert "nothing to score" in caplog.text and "BLEU" not in err
        assert out.read_text(encoding="utf-8") == ""
    else:
        assert "2 hypotheses but" in err
        assert out.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.de", "ref.de"]  # no temporary file left


@pytest.mark.parametrize("device", ["cuda", "mps", "meta"])
def test_a_device_that_cannot_run_here_is_one_error_in_the_flags_words(device, checkpoint, tmp_path, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    src = tmp_path / "in.en"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    assert main(["--ckpt", str(checkpoint), "--device", device, "--input", str(src)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nmt.translate: error: --device={device} ") and err.count("\n") == 1, err
    assert "use --device=cpu" in err


@pytest.mark.parametrize("flag", ["--ref", "--input", "--output", "--ckpt"])
def test_a_file_flag_given_twice_is_an_error(flag, checkpoint, tmp_path, capsys):
    """--ref a --ref b would score against b alone (one reference, last wins): refused instead."""
    args = ["--ckpt", str(checkpoint), flag, str(tmp_path / "a"), flag, str(tmp_path / "b")]
    with pytest.raises(SystemExit) as exit_:
        main(args if flag != "--ckpt" else args[2:])
    assert exit_.value.code == 2
    assert (
        f"{flag} is given twice ({tmp_path / 'a'}, {tmp_path / 'b'}); give it once."
        in capsys.readouterr().err
    )


def test_an_interrupt_after_the_output_is_in_place_does_not_claim_it_was_not_written(
    checkpoint, tmp_path, capsys, monkeypatch
):
    import nmt.translate

    class Interrupted:  # Ctrl-C while the scores are printed, after the output is in place
        bleu_detail = "BLEU = ..."

        def format(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(nmt.translate, "score", lambda *args, **kwargs: Interrupted())
    src, ref, out = tmp_path / "in.en", tmp_path / "ref.de", tmp_path / "out.de"
    src.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    ref.write_text(SENTENCES[0] + "\n", encoding="utf-8")
    out.write_text("previous\n", encoding="utf-8")
    args = ["--ckpt", str(checkpoint), "--device", "cpu", "--input", str(src), "--output", str(out)]
    args += ["--ref", str(ref)]
    assert main(args) == 130
    assert capsys.readouterr().err.endswith("nmt.translate: stopped by SIGINT\n")
    assert out.read_text(encoding="utf-8") != "previous\n", "the translations were in place"
