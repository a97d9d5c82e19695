"""From raw corpus to encoded, filtered Arrow datasets, cached between runs.

:func:`prepare_data` is what training calls. It reads the training and validation splits (failing early on
bad input), trains or reuses the SentencePiece model, and encodes both splits. Encoded splits are saved
with ``datasets.Dataset.save_to_disk`` under ``cache_dir/encoded-NAME-KEY`` (NAME: the split's), where
KEY hashes the split's text, the tokenizer model bytes and the filter settings, so a second run with the
same data and tokenizer only memory-maps the Arrow files and tokenizes nothing.

Filtering (training split only; validation and test are never filtered), with lengths counted in
SentencePiece pieces without BOS/EOS:

* empty: either side has no pieces (blank lines, whitespace-only lines);
* too long: either side has more than ``max_len`` pieces;
* bad ratio: ``max(ls, lt) > max_len_ratio * max(min(ls, lt), RATIO_FLOOR)``. Lengths below RATIO_FLOOR
  count as RATIO_FLOOR, so short pairs such as "Yes." / "Ja, genau." are not dropped for a ratio
  that means nothing at that length.

A pair is counted under the first rule it breaks, in that order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from nmt.config import DataConfig
from nmt.data.download import ensure_multi30k
from nmt.data.sources import (
    CACHE_HINT,
    DataError,
    content_hash,
    damaged_cache,
    read_split,
    split_prefix,
    writing,
)
from nmt.data.tokenizer import Tokenizer
from nmt.files import publish_folder, unwritable

__all__ = [
    "RATIO_FLOOR",
    "FilterStats",
    "PreparedData",
    "encode_split",
    "filter_mask",
    "prepare_data",
    "resolve_cache_dir",
]

log = logging.getLogger(__name__)

RATIO_FLOOR = 5
# Bump when the layout or meaning of the encoded cache changes.
ENCODING_VERSION = 2  # 2: 64-bit offsets
ENCODE_BLOCK = 200_000  # sentences per SentencePiece call
# Large lists (64-bit offsets): 32-bit ones overflow past 2**31 - 1 ids on one side, about 70 million
# sentences of 30 pieces.
ID_ARROW = pa.large_list(pa.int32())
ID_LIST = datasets.LargeList(datasets.Value("int32"))
ENCODED_FEATURES = datasets.Features(
    {"src_ids": ID_LIST, "tgt_ids": ID_LIST, "index": datasets.Value("int64")}
)


@dataclass
class FilterStats:
    total: int
    empty: int = 0
    too_long: int = 0
    bad_ratio: int = 0

    @property
    def kept(self) -> int:
        return self.total - self.empty - self.too_long - self.bad_ratio

    def format(self) -> str:
        return (
            f"kept {self.kept:,} of {self.total:,} pairs: {self.empty:,} empty, {self.too_long:,} too long, "
            f"{self.bad_ratio:,} bad ratio"
        )


@dataclass
class PreparedData:
    """Everything training needs from the data side."""

    tokenizer: Tokenizer
    train: datasets.Dataset  # columns src_ids (pieces + EOS), tgt_ids (pieces), index (line in the split)
    valid: datasets.Dataset  # same columns, unfiltered: row i is validation pair i
    valid_src: list[str]
    valid_ref: list[str]
    train_stats: FilterStats
    cache_dir: Path
    # Per split, :func:`encoded_key`: equal keys mean equal encoded pairs.
    split_keys: dict[str, str] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Equal on two machines when they encoded the same text with the same tokenizer and filter."""
        return "-".join(self.split_keys[split] for split in ("train", "valid"))


def filter_mask(
    src_lens: np.ndarray, tgt_lens: np.ndarray, max_len: int, max_len_ratio: float
) -> tuple[np.ndarray, FilterStats]:
    """Which pairs to keep (bool array) and why the others go; lengths in pieces without BOS/EOS."""
    src_lens, tgt_lens = np.asarray(src_lens), np.asarray(tgt_lens)
    empty = (src_lens == 0) | (tgt_lens == 0)
    too_long = ~empty & ((src_lens > max_len) | (tgt_lens > max_len))
    shorter = np.maximum(np.minimum(src_lens, tgt_lens), RATIO_FLOOR)
    bad_ratio = ~empty & ~too_long & (np.maximum(src_lens, tgt_lens) > max_len_ratio * shorter)
    stats = FilterStats(len(src_lens), int(empty.sum()), int(too_long.sum()), int(bad_ratio.sum()))
    return ~(empty | too_long | bad_ratio), stats


def encode_split(
    tokenizer: Tokenizer, src: list[str], tgt: list[str], cfg: DataConfig | None = None
) -> tuple[datasets.Dataset, FilterStats]:
    """Encode a split in bulk; with ``cfg`` also filter it (training split) by its length rules."""
    src_ids = _encode_column(tokenizer.encode_src, src)
    tgt_ids = _encode_column(tokenizer.encode_tgt, tgt)
    keep = np.ones(len(src), dtype=bool)
    stats = FilterStats(len(src))
    if cfg is not None:
        src_lens = np.diff(src_ids.offsets.to_numpy()) - 1  # pieces: without EOS
        tgt_lens = np.diff(tgt_ids.offsets.to_numpy())
        keep, stats = filter_mask(src_lens, tgt_lens, cfg.max_len, cfg.max_len_ratio)
        if stats.kept == 0:
            raise DataError(
                f"no training pairs left after filtering ({stats.format()}); check the data in {cfg.dir} or "
                "raise data.max_len / data.max_len_ratio."
            )
    rows = pa.array(np.flatnonzero(keep))
    columns = {"src_ids": src_ids.take(rows), "tgt_ids": tgt_ids.take(rows), "index": rows}
    return datasets.Dataset.from_dict(columns, features=ENCODED_FEATURES), stats


def _encode_column(encode: Callable[[list[str]], list[list[int]]], texts: list[str]) -> pa.ListArray:
    """Encode in large blocks (SentencePiece spreads each over its threads) straight into Arrow.

    pyarrow converts nested id lists far faster than ``datasets``' row-wise typing, and blocks bound the
    memory held as Python lists on large corpora.
    """
    blocks = [
        pa.array(encode(texts[i : i + ENCODE_BLOCK]), type=ID_ARROW)
        for i in range(0, len(texts), ENCODE_BLOCK)
    ]
    return pa.concat_arrays(blocks) if blocks else pa.array([], type=ID_ARROW)


def cached_encode_split(
    tokenizer: Tokenizer,
    src: list[str],
    tgt: list[str],
    cache_dir: Path,
    name: str,
    text_hash: str,
    cfg: DataConfig | None = None,
) -> tuple[datasets.Dataset, FilterStats]:
    """:func:`encode_split` through the Arrow cache: reused when text (``text_hash``, its
    :func:`nmt.data.sources.content_hash`), tokenizer and filter are unchanged."""
    filter_settings = None if cfg is None else {"max_len": cfg.max_len, "max_len_ratio": cfg.max_len_ratio}
    key_parts = [
        ENCODING_VERSION,
        text_hash,
        tokenizer.fingerprint(),
        filter_settings,
        RATIO_FLOOR,
    ]
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    folder = cache_dir / f"encoded-{name}-{key}"
    if folder.exists():  # complete, as the atomic save leaves it, unless damaged by hand
        try:
            stats = FilterStats(**json.loads((folder / "stats.json").read_text()))
            dataset = datasets.load_from_disk(str(folder))
        except (OSError, ValueError, TypeError) as e:
            raise damaged_cache(folder, e) from e
        log.info("%s: reusing encoded split %s", name, folder)
        return dataset, stats
    log.info("%s: encoding %s pairs", name, f"{len(src):,}")
    dataset, stats = encode_split(tokenizer, src, tgt, cfg)
    _save_atomic(dataset, stats, folder)
    return datasets.load_from_disk(str(folder)), stats  # memory-mapped, like a cached run


def encoded_key(dataset: datasets.Dataset, *extra: str) -> str:
    """A hash of an encoded split's pairs themselves (their ids and the lines they came from, in order)
    and of ``extra``. Equal keys mean the same data to train or validate on, however the cache was built."""
    table = dataset.with_format("arrow")[:]
    digests = list(extra)
    for name in ("src_ids", "tgt_ids"):
        lengths, values = hashlib.sha256(), hashlib.sha256()
        for chunk in table.column(name).chunks:  # chunk by chunk: the same data in other chunks hashes alike
            offsets = chunk.offsets.to_numpy(zero_copy_only=False)
            lengths.update(np.diff(offsets).astype(np.int64).tobytes())
            values.update(chunk.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].tobytes())
        digests += [lengths.hexdigest(), values.hexdigest()]
    index = np.asarray(table.column("index").to_numpy(), dtype=np.int64)
    digests.append(hashlib.sha256(index.tobytes()).hexdigest())
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16]


def _joined_text_hash(src: list[str], ref: list[str]) -> str:
    """sha256 of the lines joined by line breaks, each side ended by a NUL: the validation key's hash of
    the text, as checkpoints have recorded it, so that a resumed run compares alike. (Unlike
    :func:`nmt.data.sources.content_hash` it cannot tell a line break inside a sentence from two
    sentences; beside the ids, which fix each line's length, it need not.)"""
    h = hashlib.sha256()
    for side in (src, ref):
        for line in side:
            h.update(line.encode("utf-8") + b"\n")
        h.update(b"\0")
    return h.hexdigest()


def _save_atomic(dataset: datasets.Dataset, stats: FilterStats, folder: Path) -> None:
    def fill(tmp: Path) -> None:
        dataset.save_to_disk(str(tmp))
        (tmp / "stats.json").write_text(json.dumps(asdict(stats)))  # written last: marks the folder complete

    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a bar per save is noise next to the one-line log
    try:
        with writing(f"the encoded data cache in {folder.parent}", CACHE_HINT):
            publish_folder(folder, fill, "stats.json")
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """``cfg.cache_dir`` or DIR/.cache; a read-only data folder falls back to the user cache folder."""
    folder = Path(cfg.cache_dir or Path(cfg.dir) / ".cache")
    if _writable(folder):
        return folder
    if cfg.cache_dir:
        raise DataError(f"data.cache_dir={cfg.cache_dir!r} is not writable; choose another folder.")
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nmt"
    log.warning("%s is not writable; caching in %s instead (set data.cache_dir to choose)", folder, fallback)
    if not _writable(fallback):
        raise DataError(f"neither {folder} nor {fallback} is writable; set data.cache_dir=PATH.")
    return fallback


def _writable(folder: Path) -> bool:
    return unwritable(folder) is None


def prepare_data(
    cfg: DataConfig,
    *,
    run_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
) -> PreparedData:
    """Read, tokenize, filter and encode the training and validation splits (cached between runs).

    The tokenizer is the one in the checkpoint ``resume_from``, else one trained on the training split,
    or reused from the cache when the same text and settings were seen before. With ``run_dir`` the
    tokenizer used is saved in ``run_dir/tokenizer``. With several processes (DDP), run this on rank 0
    first and on the other ranks after a barrier: they then only read the caches.
    """
    if cfg.format == "text" and cfg.download:
        ensure_multi30k(cfg)
    # Read everything first so that a bad file fails before any training of the tokenizer.
    train_src, train_tgt = read_split(cfg, "train")
    valid_src, valid_ref = read_split(cfg, "valid")
    _check_test_split(cfg)
    cache_dir = resolve_cache_dir(cfg)
    # Each split's text is hashed once for the caches' keys (2.4 s for 4.5M pairs); the validation key
    # hashes the validation text again, the earlier way (_joined_text_hash).
    train_hash, valid_hash = content_hash(train_src, train_tgt), content_hash(valid_src, valid_ref)
    if resume_from is not None:
        from nmt.checkpoint import load_checkpoint  # only resumed runs need it

        log.info("tokenizer: from checkpoint %s", resume_from)
        tokenizer = Tokenizer.from_state(load_checkpoint(resume_from)["tokenizer"])
    else:
        tokenizer = Tokenizer.load_or_train(train_src, train_tgt, cfg, cache_dir, data_hash=train_hash)
    if run_dir is not None:
        with writing(
            f"the tokenizer into {Path(run_dir) / 'tokenizer'}", "make room there or set run_dir=PATH"
        ):
            tokenizer.save(Path(run_dir) / "tokenizer")
    train, stats = cached_encode_split(tokenizer, train_src, train_tgt, cache_dir, "train", train_hash, cfg)
    log.info("train: %s", stats.format())
    valid, _ = cached_encode_split(tokenizer, valid_src, valid_ref, cache_dir, "valid", valid_hash)
    log.info("valid: %s pairs (not filtered); %s", f"{len(valid):,}", tokenizer.describe())
    return PreparedData(
        tokenizer,
        train,
        valid,
        valid_src,
        valid_ref,
        stats,
        cache_dir,
        # Validation also scores BLEU on the reference text, which ids do not show in full (UNKs).
        {"train": encoded_key(train), "valid": encoded_key(valid, _joined_text_hash(valid_src, valid_ref))},
    )


def _check_test_split(cfg: DataConfig) -> None:
    """The test split is scored only after training (scripts/recipe.py); say now if it cannot be read.
    (Not for a hub dataset: that would download it.)"""
    if cfg.format == "hub" or split_prefix(cfg, "test") in (
        split_prefix(cfg, "train"),
        split_prefix(cfg, "valid"),
    ):
        return  # a hub dataset would be downloaded; a split read already needs no second reading
    try:
        read_split(cfg, "test")
    except DataError as e:
        log.warning("test split: %s (training goes on; scoring the test split will fail)", e)
