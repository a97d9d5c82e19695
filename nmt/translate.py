"""Translate text with a trained checkpoint, one sentence per line.

    python -m nmt.translate --ckpt runs/x/checkpoints/best.pt < input.en > output.de
    python -m nmt.translate --ckpt best.pt --input test.en --output test.de --ref test.de.ref

Output: exactly one line per input line, in order, when the run succeeds; an empty input line gives
an empty output line. Input is read as bytes and decoded as UTF-8 (a byte-order mark is dropped); a
line that is not valid UTF-8 is an error naming it. Everything that can be checked first is: the
flags, an ``--output`` that is the ``--input``, ``--ref`` or ``--ckpt`` file (refused), and the
encoding and line counts of ``--input`` and ``--ref``. An ``--output`` file appears, or replaces the
one there, only once it holds every line: a run that fails or is interrupted before that leaves it as
it was.
Standard input is translated as it arrives: lines are gathered into chunks of up to 1000 and a
chunk is translated as soon as no more input is waiting, so interactive use answers line by line
while piped files are batched efficiently. On CPU the batches of a chunk are decoded side by side,
by default one per torch thread (``--workers``); a chunk of one batch, as in interactive use, gets
all the threads.

With ``--nbest N`` (N > 1) each input line gives up to N lines ``INDEX ||| TRANSLATION ||| SCORE``,
best first, where INDEX is the 0-based input line number and SCORE the length-normalised
log-probability that beam search ranks by (the Moses n-best layout without a feature column).

``--ref FILE`` scores the (best) translations with sacreBLEU BLEU and chrF and prints the scores
and their signatures on standard error. BLEU tokenizes as validation did (the checkpoint's
``train.bleu_tokenize``: by default sacreBLEU's choice for its target language), unless ``--tokenize``
names another.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import logging
import os
import queue
import re
import signal
import stat
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO, TextIO

from tqdm import tqdm

from nmt.checkpoint import CheckpointError, checkpoint_file
from nmt.config import ConfigError, DecodeConfig
from nmt.data.sources import (
    carriage_return_error,
    carriage_return_line_ends,
    encoding_advice,
    read_errors_named,
    read_text_lines,
)
from nmt.device import resolve_device, resolve_dtype
from nmt.evaluate import GivenOnce, bleu_metric, bleu_options, score
from nmt.files import temp_file_beside
from nmt.runtime import keep_freed_memory_in_heap
from nmt.translator import Translation, Translator

log = logging.getLogger("nmt.translate")

CHUNK_LINES = 1000
# After the first line of a chunk, wait this long for more input before translating what is there.
INPUT_IDLE_SECONDS = 0.05
# Characters that some readers (str.splitlines, universal newlines) take as line breaks.
LINE_BREAKS = str.maketrans({c: " " for c in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


class LineDecoder:
    """Input lines as text; a line that is not valid UTF-8 is an error naming it, before anything of
    it is translated. The advice on the encoding is worked out from the input's first bytes, not from
    the line alone: UTF-16 splits at every byte 0x0A, which many characters hold."""

    HEAD_BYTES = 1 << 16

    def __init__(self, name: str) -> None:
        self.name = name
        self.head = bytearray()  # the input's first bytes, as read

    def __call__(self, raw: bytes, number: int) -> str:
        """``raw``: line ``number`` as read, with its line ending."""
        if len(self.head) < self.HEAD_BYTES:
            self.head += raw
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not part of the sentence
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{self.name} line {number} is not valid UTF-8 ({e.reason} at byte {e.start + 1}); "
                f"{encoding_advice(bytes(self.head))}."
            ) from None
        if "\x00" in text:  # valid UTF-8, but never in text
            raise ValueError(
                f"{self.name} line {number} holds a NUL byte, which text does not; "
                f"{encoding_advice(bytes(self.head))}."
            )
        # Classic Mac OS line ends (or a first line with two stray CRs, which no sentence has).
        if number == 1 and carriage_return_line_ends(text + "\n"):
            raise ValueError(carriage_return_error(self.name))
        return text


def read_lines_from(stream: BinaryIO, name: str = "standard input") -> Iterator[str]:
    """Lines of a byte stream, decoded; a last line without a newline still counts, unless it is
    empty (a file holding only a byte-order mark has no lines, as for ``read_text_lines``)."""
    decode = LineDecoder(name)
    with read_errors_named(name):
        for number, raw in enumerate(stream, start=1):
            if number == 1 and raw == b"\xef\xbb\xbf":
                return
            yield decode(raw, number)


def read_chunks(
    stream: BinaryIO, chunk_lines: int = CHUNK_LINES, name: str = "standard input"
) -> Iterator[list[str]]:
    """Chunks of decoded lines, each handed over once full or once the input pauses.

    A reader thread fills a bounded queue, so translation never waits for the end of the input.
    """
    lines: queue.Queue = queue.Queue(maxsize=4 * chunk_lines)
    end = object()

    def reader() -> None:
        try:
            for line in read_lines_from(stream, name):
                lines.put(line)
        except BaseException as e:  # handed to the main thread, which raises it
            lines.put(e)
        lines.put(end)

    threading.Thread(target=reader, daemon=True, name="nmt-input").start()
    finished = False
    while not finished:
        chunk: list[str] = []
        item = lines.get()  # block for the first line of a chunk
        while item is not end:
            if isinstance(item, BaseException):  # the lines before it are translated first
                if chunk:
                    yield chunk
                raise item
            chunk.append(item)
            if len(chunk) >= chunk_lines:
                break
            try:
                item = lines.get(timeout=INPUT_IDLE_SECONDS)
            except queue.Empty:
                break
        finished = item is end
        if chunk:
            yield chunk


def format_output(index: int, translations: list[Translation], nbest: int) -> str:
    """The output line(s) of one input line, with a trailing newline."""
    if nbest == 1:
        return translations[0].text.translate(LINE_BREAKS) + "\n"
    return "".join(f"{index} ||| {t.text.translate(LINE_BREAKS)} ||| {t.score:.4f}\n" for t in translations)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m nmt.translate",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "--ckpt",
        required=True,
        action=GivenOnce,
        help="checkpoint file (or a run folder: its checkpoints/latest.pt)",
    )
    p.add_argument(
        "--input", action=GivenOnce, help="source text file (.gz allowed); default (or -) standard input"
    )
    p.add_argument(
        "--output",
        action=GivenOnce,
        help="file for the translations (.gz: compressed), written when complete; default (or -) standard output",
    )
    p.add_argument(
        "--ref",
        action=GivenOnce,
        help="reference translations: score the output with BLEU and chrF (stderr)",
    )
    p.add_argument("--lowercase", action="store_true", help="with --ref: lowercased BLEU (chrF stays cased)")
    p.add_argument("--tokenize", help="with --ref: BLEU's sacreBLEU tokenizer; default as in validation")
    p.add_argument("--beam", type=int, help="beam size (1 = greedy); default from the checkpoint")
    p.add_argument("--nbest", type=int, default=1, help="hypotheses per line (format below)")
    p.add_argument("--len-penalty", type=float, help="GNMT length penalty alpha")
    p.add_argument("--max-len-a", type=float, help="outputs end at max_len_a * source length + max_len_b")
    p.add_argument("--max-len-b", type=int)
    p.add_argument("--min-len", type=int, help="minimum output length in tokens")
    p.add_argument("--batch-size", type=int, help="sentences per batch (cap)")
    p.add_argument("--max-tokens", type=int, help="padded source tokens per batch (cap)")
    p.add_argument(
        "--workers",
        type=int,
        help="CPU: batches decoded at once, each on an equal share of the threads (0 = one per thread, at most 8)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p.parse_args(argv)


DECODE_OVERRIDES = (
    "beam",
    "len_penalty",
    "max_len_a",
    "max_len_b",
    "min_len",
    "batch_size",
    "max_tokens",
    "workers",
)


def check_args(args: argparse.Namespace) -> None:
    """What can be checked before anything is read or written."""
    if args.input == "-":
        args.input = None  # standard input
    if args.output == "-":
        args.output = None  # standard output
    for path in (args.ckpt, args.input, args.ref):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(
                f"{path} does not exist{_checkpoints_beside(path) if path == args.ckpt else ''}."
            )
    for flag, path in (("--input", args.input), ("--ref", args.ref)):
        if path is not None and Path(path).is_dir():
            raise ConfigError(f"{flag} {path} is a folder; give the name of a text file in it.")
    if args.output is not None and Path(args.output).is_dir():
        raise ConfigError(f"--output {args.output} is a folder; give the name of a file in it.")
    if args.output is not None and not Path(args.output).parent.is_dir():
        raise FileNotFoundError(
            f"--output {args.output}: the folder {Path(args.output).parent} does not exist."
        )
    for flag, given in (("--lowercase", args.lowercase), ("--tokenize", args.tokenize is not None)):
        if given and args.ref is None:  # else silently ignored: nothing is scored without references
            raise ConfigError(f"{flag} applies to scoring, which needs --ref FILE (the references).")
    resolve_dtype(args.dtype, resolve_device(args.device, "--device"), "--dtype")
    if args.nbest < 1:
        raise ConfigError(f"--nbest {args.nbest}: give at least 1 hypothesis per line.")
    if args.beam is not None and args.beam < 1:
        raise ConfigError(f"--beam {args.beam}: the beam size is at least 1 (1 = greedy).")
    if args.beam is not None and args.nbest > args.beam:
        raise ConfigError(f"--nbest {args.nbest} needs --beam of at least {args.nbest}.")
    try:
        DecodeConfig(**decode_overrides(args))
    except ConfigError as e:  # in the words of the command line: --max-len-a 2000, not decode.max_len_a=2000
        raise ConfigError(re.sub(r"decode\.(\w+)(=?)", _as_flag, str(e))) from None
    if args.output is not None and Path(args.output).exists():
        for flag, path in (
            ("--input", args.input),
            ("--ref", args.ref),
            ("--ckpt", checkpoint_file(args.ckpt)),
        ):
            if path is not None and Path(path).exists() and Path(args.output).samefile(path):
                raise ConfigError(
                    f"--output {args.output} is the {flag} file; writing the translations there would "
                    "destroy it. Choose another output file."
                )


def _checkpoints_beside(path: str) -> str:
    """For a mistyped checkpoint name: the ones its folder does hold."""
    folder = Path(path).parent
    names = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
    if not names:
        return ""
    return f" ({folder} holds {', '.join(names[:6])}{', ...' if len(names) > 6 else ''})"


def decode_overrides(args: argparse.Namespace) -> dict[str, int | float]:
    """The decoding settings given on the command line, as :class:`DecodeConfig` fields."""
    return {k: getattr(args, k) for k in DECODE_OVERRIDES if getattr(args, k) is not None}


def _as_flag(match: re.Match[str]) -> str:
    return f"--{match[1].replace('_', '-')}" + (" " if match[2] else "")


def load_translator(args: argparse.Namespace) -> Translator:
    """The checkpoint's model with the decoding settings given on the command line."""
    translator = Translator.from_checkpoint(args.ckpt, device=args.device, dtype=args.dtype)
    translator.decode_cfg = replace(translator.decode_cfg, **decode_overrides(args))
    vocab = translator.tokenizer.tgt_vocab_size
    beam = max(translator.decode_cfg.beam, args.nbest)  # as translate_nbest will search
    if beam >= vocab:  # else it fails at the first sentence
        flag = "--beam" if beam == translator.decode_cfg.beam else "--nbest"
        raise ConfigError(
            f"{flag} {beam} needs more than {beam} target tokens (a beam of {beam}) and {args.ckpt} has "
            f"{vocab}; lower {flag}."
        )
    if translator.device.type == "cpu":
        keep_freed_memory_in_heap()  # the (rows, vocabulary) tensors of each step reuse the last's memory
    return translator


def bleu_settings(translator: Translator, tokenize: str | None) -> dict[str, str]:
    """BLEU's tokenizer and target language for ``--ref``: those of the checkpoint's validation unless
    ``--tokenize`` is given; checked now, before anything is translated."""
    settings = bleu_options(translator.checkpoint_config)
    if tokenize:
        settings["tokenize"] = tokenize
    try:
        bleu_metric(**settings)
    except ValueError as e:
        raise ConfigError(f"--ref: {e}") from None
    return settings


def open_input(path: str | None) -> tuple[BinaryIO, int | None]:
    """The input byte stream and its number of lines when known in advance.

    Lines are counted first only in a regular file: a pipe or a FIFO (``/dev/stdin``, ``<(...)``) can be
    read only once.
    """
    if path is None:
        if sys.stdin is None:
            raise ConfigError("standard input is closed; give the source text with --input FILE.")
        try:  # a reader of its own: see _translate
            return open(os.dup(sys.stdin.fileno()), "rb"), None
        except (OSError, ValueError):  # no file descriptor (an in-memory stream)
            return sys.stdin.buffer, None
    opener = gzip.open if path.endswith(".gz") else open
    if not stat.S_ISREG(os.stat(path).st_mode):
        return opener(path, "rb"), None
    with opener(path, "rb") as f:  # every line read and decoded: a bad one fails before the model loads
        total = sum(1 for _ in read_lines_from(f, path))
    return opener(path, "rb"), total


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[TextIO]:
    """UTF-8 text with "\n" line endings, whatever the locale (gzipped for a name ending in .gz);
    standard output is left open.

    A file is written beside its final name and renamed onto it once every line is there, so it never
    holds part of a translation: a run that fails or is stopped (a full disk, Ctrl-C) leaves the file as
    it was. Devices and pipes (``/dev/stdout``, a FIFO) are written directly.
    """
    if path is not None:
        if Path(path).exists() and not Path(path).is_file():
            with _written(open(path, "w", encoding="utf-8", newline="\n"), path) as out:
                yield out
            return
        target = Path(os.path.realpath(path))  # through a symbolic link, to the file it names
        try:
            fd, tmp = temp_file_beside(target, ".tmp")
            if target.exists():  # the file it replaces keeps its permissions
                os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
        except OSError as e:
            raise OSError(f"cannot write the translations to {path} ({e.strerror or e})") from e
        raw = open(fd, "wb", buffering=0)
        if path.endswith(".gz"):  # compressed, as a .gz --input is read
            # The header names the file (not the temporary one) and no time: the same translations
            # give the same bytes, as with `gzip -n`.
            gz = gzip.GzipFile(filename=target.name, mode="wb", fileobj=raw, mtime=0)
            f = io.TextIOWrapper(gz, encoding="utf-8", newline="\n")
        else:
            f = io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", newline="\n")
        try:
            with _written(f, path) as out:
                yield out
            try:
                os.replace(tmp, target)
            except OSError as e:
                raise _output_error(path, e) from e
        finally:
            raw.close()
            tmp.unlink(missing_ok=True)
        return
    if sys.stdout is None:
        raise ConfigError("standard output is closed; give a file for the translations with --output FILE.")
    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="\n", write_through=True)
    try:
        try:
            yield out
        finally:
            out.flush()
            out.detach()
    except OSError as e:  # a full disk, a closed pipe: its own message does not say where
        raise OSError(f"could not write the translations to standard output ({e.strerror or e})") from e


@contextlib.contextmanager
def _written(f: TextIO, path: str) -> Iterator[TextIO]:
    """``f``, whose write errors name ``path``, closed at the end: closing writes what is buffered, so
    a full disk or device may fail there, and that error names ``path`` too."""
    try:
        yield _NamedOutput(f, path)
    except BaseException:
        with contextlib.suppress(OSError):
            f.close()
        raise
    try:
        f.close()
    except OSError as e:
        raise _output_error(path, e) from e


class _NamedOutput:
    """The output file, whose write errors (a full disk) name it: its own ``OSError`` does not."""

    def __init__(self, f: TextIO, path: str) -> None:
        self._f, self._path = f, path

    def write(self, text: str) -> int:
        try:
            return self._f.write(text)
        except OSError as e:
            raise _output_error(self._path, e) from e

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            raise _output_error(self._path, e) from e


def _output_error(path: str, e: OSError) -> OSError:
    return OSError(
        f"could not write the translations to {path} ({e.strerror or e}); nothing was written there"
    )


def translate_stream(
    translator: Translator,
    source: BinaryIO,
    out: TextIO,
    nbest: int,
    total: int | None,
    name: str = "standard input",
    keep_best: bool = True,
) -> list[str]:
    """Translate chunk by chunk, writing as it goes; returns the best translation of every line (with
    ``keep_best``, to be scored: else nothing is held, for an input of any length)."""
    best: list[str] = []
    done = 0
    bar = tqdm(total=total, unit=" lines", file=sys.stderr, disable=not sys.stderr.isatty())
    with bar:
        for chunk in read_chunks(source, name=name):
            if nbest == 1:  # translate() takes the faster greedy path for beam 1
                results = [
                    [Translation(t, 0.0)]
                    for t in translator.translate(chunk, progress=bar.update, first_line=done + 1)
                ]
            else:
                results = translator.translate_nbest(
                    chunk, nbest=nbest, progress=bar.update, first_line=done + 1
                )
            out.write("".join(format_output(done + i, r, nbest) for i, r in enumerate(results)))
            out.flush()
            done += len(results)
            if keep_best:
                best.extend(r[0].text for r in results)
    return best


class _Stopped(BaseException):
    """SIGTERM (or SIGHUP) arrived: unwind, so that a partial output file is removed, then exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise _Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # only the main thread may set them
        for signum in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(signum) == signal.SIG_DFL:  # not when the caller chose otherwise (nohup)
                handlers[signum] = signal.signal(signum, _stop)
    # Filled in by _translate once the output file is in place: a list, not a return value, so that it
    # survives a Ctrl-C that comes after that (while the scores are printed).
    written: list[str] = []
    try:
        return _translate(args, written)
    except (KeyboardInterrupt, _Stopped) as e:
        signum = e.signum if isinstance(e, _Stopped) else signal.SIGINT
        output = args.output and Path(args.output)
        atomic = output and not written and (not output.exists() or output.is_file())
        kept = f"; {output} was not written" if atomic else ""
        print(f"nmt.translate: stopped by {signal.Signals(signum).name}{kept}", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def _translate(args: argparse.Namespace, written: list[str]) -> int:
    try:
        check_args(args)
        refs = read_text_lines(args.ref) if args.ref else None
        source, total = open_input(args.input)
        with contextlib.ExitStack() as stack:
            # Standard input is left open: closing it would wait for its reader thread, blocked in a
            # read until more input comes (Ctrl-C on an idle terminal would wait for Ctrl-D), and so
            # would the interpreter's own closing of sys.stdin; hence a reader of its own.
            if args.input is not None:
                stack.enter_context(source)
            if refs is not None and total is not None and len(refs) != total:
                raise ValueError(
                    f"{args.input} has {total:,} line{'s' * (total != 1)} but {args.ref} has {len(refs):,}; "
                    "the references must be aligned with the input line by line."
                )
            translator = load_translator(args)
            scoring = bleu_settings(translator, args.tokenize) if refs is not None else {}
            out = stack.enter_context(open_output(args.output))
            hyps = translate_stream(
                translator, source, out, args.nbest, total, args.input or "standard input", refs is not None
            )
            # Scored before the output file is put in place: references that do not fit (standard
            # input of another length) leave it as it was.
            scores = None
            if refs is not None and (hyps or refs):
                scores = score(hyps, refs, lowercase=args.lowercase, **scoring)
            elif refs is not None:
                log.warning("nothing to score: the input and %s are empty", args.ref)
        if args.output is not None:
            written.append(args.output)
        if scores is not None:
            print(scores.bleu_detail, file=sys.stderr)
            print(scores.format(), file=sys.stderr)
    except (CheckpointError, ConfigError, OSError, ValueError) as e:
        print(f"nmt.translate: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
