"""Reading parallel corpora into lists of source and target sentences (:func:`read_split`).

Formats (``cfg.format``), for a split whose file prefix is ``PREFIX`` (``cfg.train``/``valid``/``test``):

* ``text``: ``DIR/PREFIX.SRC`` and ``DIR/PREFIX.TGT``, one sentence a line, optionally gzipped
  (``PREFIX.SRC.gz`` is used when the plain file is absent);
* ``tsv``: ``DIR/PREFIX.tsv``, ``source<TAB>target`` a line, no header (a first line such as ``en<TAB>de`` is refused), no quoting;
* ``jsonl``: ``DIR/PREFIX.jsonl``, one object a line, either ``{"translation": {SRC: ..., TGT: ...}}``
  (the Hugging Face layout) or flat ``{SRC: ..., TGT: ...}``;
* ``hub``: ``datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=PREFIX)`` with a ``translation``
  column or one column per language.

Every line is one pair, so line *i* of the source always stays aligned with line *i* of the target.
A UTF-8 byte-order mark and CRLF line ends are accepted; surrounding whitespace is stripped. A blank line
becomes an empty pair: filtering drops (and counts) it in the training split, validation and test keep it.
Anything malformed raises :class:`DataError` naming the file and, where it applies, the line.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from nmt.config import DataConfig

log = logging.getLogger(__name__)

SPLIT_ROLES = ("train", "valid", "test")


class DataError(ValueError):
    """The corpus is missing or malformed; the message names the file (and line) and how to fix it."""


# What to do when the tokenizer or encoding cache cannot be written.
CACHE_HINT = "make room there or set data.cache_dir=PATH"


def damaged_cache(folder: Path, error: object) -> DataError:
    """A cache folder that exists but cannot be read (a file deleted or cut short by hand: the atomic
    writes never leave one). It is not removed here: another process may be reading it."""
    return DataError(
        f"the cache {folder} cannot be read ({error}); delete that folder and run again (it is rebuilt "
        "from the corpus)."
    )


@contextlib.contextmanager
def writing(what: str, hint: str) -> Iterator[None]:
    """Turn a failed write (a full disk, a quota, a read-only folder) into a :class:`DataError` naming
    ``what`` was being written and the setting to change. For writes only: a failed read of a cache is
    reported as what it is."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise DataError(f"could not write {what} ({reason}); {hint}.") from e


def split_prefix(cfg: DataConfig, split: str) -> str:
    """File prefix (or hub split name) of ``split``: a role (train/valid/test) or a prefix itself."""
    return getattr(cfg, split) if split in SPLIT_ROLES else split


def split_limit(cfg: DataConfig, split: str) -> int:
    """First-N limit of a split (0 = all); only the training and validation splits have one."""
    return {"train": cfg.train_limit, "valid": cfg.valid_limit}.get(split, 0)


def read_split(cfg: DataConfig, split: str) -> tuple[list[str], list[str]]:
    """Source and target sentences of ``split`` (a role or a file prefix), limits applied."""
    prefix = split_prefix(cfg, split)
    readers = {"text": _read_text_pair, "tsv": _read_tsv, "jsonl": _read_jsonl, "hub": _read_hub}
    src, tgt = readers[cfg.format](cfg, prefix)
    limit = split_limit(cfg, split)
    if limit:
        src, tgt = src[:limit], tgt[:limit]
    return src, tgt


def content_hash(src: Iterable[str], tgt: Iterable[str]) -> str:
    """sha256 of a parallel corpus' text; cache keys are built from it."""
    h = hashlib.sha256()
    for side in (src, tgt):
        for line in side:
            data = line.encode("utf-8")
            # Its length first: a sentence with a line break inside (JSONL, a hub dataset) is not two.
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        # End of a side, as a length no line has: (["a"], ["b", "c"]) and (["a", "b"], ["c"]) differ.
        h.update(b"\xff" * 8)
    return h.hexdigest()


def text_paths(cfg: DataConfig, prefix: str) -> list[Path]:
    """Where the text-format files of a split are, whether or not they exist (``.gz`` when only it does)."""
    return [resolve_gz(Path(cfg.dir) / f"{prefix}.{lang}") for lang in (cfg.src_lang, cfg.tgt_lang)]


def resolve_gz(path: Path) -> Path:
    """``path``, or ``path.gz`` when only that exists (the name to read, or to report as missing)."""
    gz = path.with_name(path.name + ".gz")
    return gz if not path.exists() and gz.exists() else path


def _missing(path: Path, cfg: DataConfig, what: str) -> DataError:
    return DataError(
        f"missing {what} file {path} (also looked for {path.name}.gz); put the corpus in a folder and set "
        f"data.dir=PATH (now {cfg.dir!r}), or data.train/valid/test to the file prefixes."
    )


@contextlib.contextmanager
def read_errors_named(name: str | Path) -> Iterator[None]:
    """Turn a failure to read ``name`` (gzipped or not) into a :class:`DataError` naming it: an
    ``OSError``, or the ``EOFError`` / ``zlib.error`` of a truncated or corrupt gzip stream."""
    try:
        yield
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"could not read {name}: {e}") from e


def read_text_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file (gzipped if it ends in .gz) without BOM and line ends (LF or CRLF).

    Only "\n" ends a line (with an optional "\r" before it), as in sacreBLEU: the other characters
    that ``str.splitlines`` takes as line breaks (\x1c, \x85, \u2028, ...) stay inside their line.
    Raises :class:`DataError` naming the file (and the line, for invalid UTF-8).
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with read_errors_named(path), opener(path, "rb") as f:
        raw = f.read()
    return text_lines(raw, path)


UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")  # byte-order marks, little- and big-endian
UTF32_MARKS = (b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")


def encoding_advice(raw: bytes) -> str:
    """What to do with ``raw`` (the start of a file) that is not UTF-8 text or holds NUL bytes. It
    names a conversion only when the encoding is known or clear, and suggests deleting NUL bytes only
    when what is left is UTF-8 text: a wrong guess must not garble the file."""
    if raw.startswith(b"\x1f\x8b"):  # gzip's magic number, which no text starts with
        return "it is gzip-compressed: give it a .gz name or gunzip it (do not convert it)"
    if raw.startswith(UTF32_MARKS):
        return "it is UTF-32 (it starts with a byte-order mark): convert it with iconv -f UTF-32 -t UTF-8"
    utf16 = utf16_codec(raw)
    if utf16 == "UTF-16":
        return "it is UTF-16 (it starts with a byte-order mark): convert it with iconv -f UTF-16 -t UTF-8"
    if utf16 is not None:
        return f"it looks like UTF-16 without a byte-order mark: convert it with iconv -f {utf16} -t UTF-8"
    if b"\x00" in raw and raw.strip(b"\x00") and _is_text(raw.replace(b"\x00", b"")):
        return "it is UTF-8 text with stray NUL bytes: delete them (tr -d '\\000')"
    return (
        "convert it with iconv -f ENCODING -t UTF-8 (ENCODING is the file's own: e.g. LATIN1 or CP1252 for "
        "Western European text; for UTF-16 without a byte-order mark, UTF-16LE or UTF-16BE)"
    )


def _is_text(raw: bytes) -> bool:
    """Valid UTF-8 without control characters other than tab, CR and LF."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(ord(c) < 32 and c not in "\t\r\n" for c in text)


def utf16_codec(raw: bytes) -> str | None:
    """ "UTF-16" for a UTF-16 byte-order mark; "UTF-16LE" or "UTF-16BE" for text that looks like UTF-16
    without one; else None.

    Without a mark: the characters of one script share their high byte (0x00 for ASCII spaces,
    digits and punctuation, 0x04 for Cyrillic, 0x03 for Greek, ...), so in UTF-16 the NUL bytes sit
    (nearly) all at odd offsets (little-endian) or all at even ones (big-endian), and two values make
    up most of the bytes at those offsets. UTF-8 text with a few stray NULs, or a binary file, has
    letters or anything at all there; and UTF-8 text with non-ASCII letters stays valid UTF-8 once its
    NULs are deleted, which UTF-16 does not. (Scripts whose characters span many high bytes, such as
    Chinese, are not recognised: they get the general advice.)
    """
    if raw.startswith(UTF32_MARKS):  # whose little-endian mark begins with UTF-16's
        return None
    if raw.startswith(UTF16_MARKS):
        return "UTF-16"
    data = np.frombuffer(raw, dtype=np.uint8)[: len(raw) // 2 * 2]
    zeros = data == 0
    count = int(zeros.sum())
    if count < 2 or count == len(data):
        return None
    odd = int(zeros[1::2].sum())
    if max(odd, count - odd) < 0.95 * count:
        return None
    high = data[1::2] if odd > count - odd else data[0::2]
    if np.sort(np.bincount(high, minlength=256))[-2:].sum() < 0.8 * len(high):
        return None
    rest = raw.replace(b"\x00", b"")
    if _is_text(rest) and not rest.isascii():  # UTF-8 letters with stray NULs among them
        return None
    return "UTF-16LE" if odd > count - odd else "UTF-16BE"


def carriage_return_line_ends(text: str) -> bool:
    """Whether ``text`` (a whole file, or what is known of it) has classic Mac OS line ends: two or
    more carriage returns not followed by a line feed, and at most one line feed (which an editor adds
    at the end). One stray CR in a sentence, or CRs in a file of many lines, are text."""
    bare = text.count("\r") - text.count("\r\n")
    return bare >= 2 and text.count("\n") <= 1


def carriage_return_error(name: str | Path) -> str:
    return (
        f"{name} ends its lines with a carriage return alone (classic Mac OS), so it reads as one line; "
        "convert its line ends to newlines (tr '\\r' '\\n')."
    )


def text_lines(raw: bytes, name: str | Path) -> list[str]:
    """The lines of ``raw``, read from ``name``, as :func:`read_text_lines` gives them. (Where the
    bytes look like UTF-16, the error names no line: its line feeds are not where the bytes 0x0A are.)"""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # utf-8-sig counts from after the mark it skips
        where = _where(raw, bom + e.start, name)
        raise DataError(f"{where}: invalid UTF-8 ({e.reason}); {encoding_advice(raw)}.") from e
    if "\x00" in text:  # valid UTF-8, but never in text
        where = _where(raw, raw.index(b"\x00"), name)
        raise DataError(f"{where} holds a NUL byte, which text does not; {encoding_advice(raw)}.")
    if carriage_return_line_ends(text):
        raise DataError(carriage_return_error(name))
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _where(raw: bytes, offset: int, name: str | Path) -> str:
    if utf16_codec(raw):
        return str(name)
    line = raw.count(b"\n", 0, offset) + 1
    return f"{name} line {line}"


def read_lines(path: Path) -> list[str]:
    """:func:`read_text_lines` of a corpus file, which must hold at least one non-blank line."""
    lines = read_text_lines(path)
    if not any(line.strip() for line in lines):
        raise DataError(f"{path} is empty; every split needs at least one sentence.")
    return lines


def _read_text_pair(cfg: DataConfig, prefix: str) -> tuple[list[str], list[str]]:
    src_path, tgt_path = text_paths(cfg, prefix)
    for path in (src_path, tgt_path):
        if not path.exists():
            raise _missing(path, cfg, "text")
    src = [line.strip() for line in read_lines(src_path)]
    tgt = [line.strip() for line in read_lines(tgt_path)]
    if len(src) != len(tgt):
        raise DataError(
            f"{src_path} has {len(src):,} lines but {tgt_path} has {len(tgt):,}; line i of one must "
            "translate line i of the other."
        )
    return src, tgt


def _format_path(cfg: DataConfig, prefix: str, ext: str) -> Path:
    path = resolve_gz(Path(cfg.dir) / f"{prefix}.{ext}")
    if not path.exists():
        raise _missing(path, cfg, ext)
    return path


def _read_tsv(cfg: DataConfig, prefix: str) -> tuple[list[str], list[str]]:
    path = _format_path(cfg, prefix, "tsv")
    src, tgt = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            src.append("")
            tgt.append("")
            continue
        columns = line.split("\t")
        if len(columns) != 2:
            raise DataError(
                f"{path} line {number}: expected 2 tab-separated columns "
                f"({cfg.src_lang}<TAB>{cfg.tgt_lang}), found {len(columns)}."
            )
        if number == 1 and _is_header(columns, cfg):
            raise DataError(
                f"{path} line 1 looks like a header ({line.strip()!r}); the file holds sentence pairs only: "
                "remove that line."
            )
        src.append(columns[0].strip())
        tgt.append(columns[1].strip())
    return src, tgt


def _is_header(columns: list[str], cfg: DataConfig) -> bool:
    names = tuple(c.strip().lower() for c in columns)
    return names in {(cfg.src_lang.lower(), cfg.tgt_lang.lower()), ("source", "target"), ("src", "tgt")}


def _read_jsonl(cfg: DataConfig, prefix: str) -> tuple[list[str], list[str]]:
    path = _format_path(cfg, prefix, "jsonl")
    src, tgt = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            src.append("")
            tgt.append("")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number}: invalid JSON ({e.msg}).") from e
        # Valid JSON that Python will not hold: a number of over 4,300 digits, deep nesting.
        except (ValueError, RecursionError) as e:
            reason = "a number of over 4,300 digits" if "integer string conversion" in str(e) else str(e)
            raise DataError(f"{path} line {number}: JSON that cannot be read ({reason}); remove it.") from e
        pair = _pair_from_row(row, cfg)
        if pair is None:
            raise DataError(
                f'{path} line {number}: expected {{"translation": {{"{cfg.src_lang}": ..., '
                f'"{cfg.tgt_lang}": ...}}}} or {{"{cfg.src_lang}": ..., "{cfg.tgt_lang}": ...}} '
                "with string values."
            )
        for text in pair:  # JSON's \uXXXX escapes can name half of a surrogate pair, which is not text
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(
                    f"{path} line {number}: the escape of {ascii(text[e.start])} is half of a UTF-16 "
                    "surrogate pair, not a character; fix or remove it."
                ) from None
        src.append(pair[0])
        tgt.append(pair[1])
    return src, tgt


def _pair_from_row(row: object, cfg: DataConfig) -> tuple[str, str] | None:
    if isinstance(row, dict) and isinstance(row.get("translation"), dict):
        row = row["translation"]
    if not isinstance(row, dict):
        return None
    src, tgt = row.get(cfg.src_lang), row.get(cfg.tgt_lang)
    if not isinstance(src, str) or not isinstance(tgt, str):
        return None
    return src.strip(), tgt.strip()


def _read_hub(cfg: DataConfig, split_name: str) -> tuple[list[str], list[str]]:
    import datasets

    name = f"{cfg.hub_name}" + (f" ({cfg.hub_config})" if cfg.hub_config else "")
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config or None, split=split_name)
    except Exception as e:  # noqa: BLE001 - network, missing split, unknown name: all reported the same way
        raise DataError(f"could not load hub dataset {name} split {split_name!r}: {e}") from e
    if "translation" in ds.column_names:
        rows = ds["translation"]
        src = [(r or {}).get(cfg.src_lang) for r in rows]
        tgt = [(r or {}).get(cfg.tgt_lang) for r in rows]
    elif cfg.src_lang in ds.column_names and cfg.tgt_lang in ds.column_names:
        src, tgt = list(ds[cfg.src_lang]), list(ds[cfg.tgt_lang])
    else:
        raise DataError(
            f"hub dataset {name} split {split_name!r} has columns {ds.column_names}; expected 'translation' "
            f"or '{cfg.src_lang}' and '{cfg.tgt_lang}'."
        )
    for side, lang in ((src, cfg.src_lang), (tgt, cfg.tgt_lang)):
        bad = next((i for i, s in enumerate(side) if not isinstance(s, str)), None)
        if bad is not None:
            raise DataError(f"hub dataset {name} split {split_name!r} row {bad}: no {lang!r} string.")
    if not src:
        raise DataError(f"hub dataset {name} split {split_name!r} is empty.")
    return [s.strip() for s in src], [t.strip() for t in tgt]
