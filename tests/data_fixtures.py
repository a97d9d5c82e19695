"""Toy parallel corpora and tiny data configs for the data tests (imported as a plain module)."""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

from nmt.config import DataConfig

# A small word-for-word lexicon: enough structure for a ~100-piece SentencePiece model.
_WORDS = {
    "en": "a the man woman dog cat child runs sits eats sees big small red green house park ball with in on",
    "de": "ein der mann frau hund katze kind rennt sitzt isst sieht groß klein rot grün haus park ball mit "
    "in auf",
    "fr": "un le homme femme chien chat enfant court assis mange voit grand petit rouge vert maison parc "
    "balle avec dans sur",
}
LEXICON = {lang: words.split() for lang, words in _WORDS.items()}


def multi30k_candidates() -> list[Path]:
    """Where the tests look for Multi30k (gzipped, as downloaded): ``$NMT_MULTI30K`` alone when set,
    else a shared copy next to the repository or inside it, then ``data/multi30k``, where
    ``python -m nmt.train`` downloads it."""
    if "NMT_MULTI30K" in os.environ:
        return [Path(os.environ["NMT_MULTI30K"])]
    root = Path(__file__).resolve().parents[1]
    return [
        root.parent / "shared" / "data" / "multi30k",
        root / "shared" / "data" / "multi30k",
        root / "data" / "multi30k",
    ]


def multi30k_dir() -> Path | None:
    """The first of :func:`multi30k_candidates` that holds Multi30k; None when none does."""
    return next((folder for folder in multi30k_candidates() if (folder / "train.en.gz").is_file()), None)


def multi30k_missing() -> str:
    """The reason a test that needs Multi30k is skipped."""
    looked = ", ".join(str(folder) for folder in multi30k_candidates())
    return f"Multi30k (train.en.gz, ...) not found in {looked}; set NMT_MULTI30K to its folder"


def toy_pairs(
    n: int, src_lang: str = "en", tgt_lang: str = "de", seed: int = 0
) -> tuple[list[str], list[str]]:
    """``n`` sentence pairs of 3-9 words, the target a word-by-word rendering of the source."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        words = [rng.randrange(len(LEXICON["en"])) for _ in range(rng.randint(3, 9))]
        src.append(" ".join(LEXICON[src_lang][w] for w in words).capitalize() + ".")
        tgt.append(" ".join(LEXICON[tgt_lang][w] for w in words).capitalize() + ".")
    return src, tgt


def write_lines(
    path: Path, lines: list[str], gz: bool = False, bom: bool = False, crlf: bool = False
) -> Path:
    """Write ``lines`` as UTF-8 (gzipped when ``gz``: the name gets .gz), one a line."""
    end = "\r\n" if crlf else "\n"
    data = ("\ufeff" if bom else "") + "".join(line + end for line in lines)
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data.encode("utf-8"))
    else:
        path.write_bytes(data.encode("utf-8"))
    return path


def write_corpus(
    folder: Path,
    fmt: str = "text",
    src_lang: str = "en",
    tgt_lang: str = "de",
    sizes: dict[str, int] | None = None,
    gz: bool = False,
    layout: str = "translation",
) -> dict[str, tuple[list[str], list[str]]]:
    """Write train/val/test splits of a toy corpus in ``fmt``; returns the pairs written per prefix."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {"train": 300, "val": 20, "test": 20}
    written = {}
    for seed, (prefix, n) in enumerate(sizes.items()):
        src, tgt = toy_pairs(n, src_lang, tgt_lang, seed=seed)
        written[prefix] = (src, tgt)
        if fmt == "text":
            write_lines(folder / f"{prefix}.{src_lang}", src, gz=gz)
            write_lines(folder / f"{prefix}.{tgt_lang}", tgt, gz=gz)
        elif fmt == "tsv":
            write_lines(folder / f"{prefix}.tsv", [f"{s}\t{t}" for s, t in zip(src, tgt, strict=True)], gz=gz)
        elif fmt == "jsonl":
            rows = [{src_lang: s, tgt_lang: t} for s, t in zip(src, tgt, strict=True)]
            if layout == "translation":
                rows = [{"translation": r, "id": i} for i, r in enumerate(rows)]
            write_lines(folder / f"{prefix}.jsonl", [json.dumps(r, ensure_ascii=False) for r in rows], gz=gz)
        else:
            raise ValueError(fmt)
    return written


def data_cfg(folder: Path, **overrides) -> DataConfig:
    """A tiny config: splits train/val/test in ``folder``, 100-piece vocabulary, no download."""
    settings = {
        "dir": str(folder),
        "train": "train",
        "valid": "val",
        "test": "test",
        "download": "",
        "vocab_size": 100,
        "max_len": 32,
        "max_tokens": 256,
        "cache_dir": str(folder / "cache"),
    }
    settings.update(overrides)
    return DataConfig(**settings)
