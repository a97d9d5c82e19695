"""SentencePiece tokenization: one joint model for both languages (default) or one per language.

This module owns the special ids; every model it trains uses them, in source and target alike:
PAD=0, UNK=1, BOS=2, EOS=3. Source ids are ``pieces + [EOS]``; target ids are the pieces alone
(batching adds BOS for the decoder input and EOS for the output).

Training is deterministic: fixed random seed, fixed thread count and the sentences in corpus order, so
the same data and settings always give the same model bytes. :meth:`Tokenizer.load_or_train` keeps
trained models in a cache folder keyed by a hash of the training text and the settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from nmt.config import DataConfig
from nmt.data.sources import CACHE_HINT, DataError, content_hash, damaged_cache, writing
from nmt.files import publish_folder, write_atomic

log = logging.getLogger(__name__)

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
SPECIAL_IDS = frozenset((PAD_ID, UNK_ID, BOS_ID, EOS_ID))

TRAIN_SEED = 1
TRAIN_THREADS = 2
# Bump when training settings change in a way the config does not show, so old caches are not reused.
TOKENIZER_VERSION = 2  # 2: trained with a soft vocabulary limit (the model bytes record it)
# SentencePiece holds its training sentences in memory; above this many it samples (with TRAIN_SEED).
MAX_TRAIN_SENTENCES = 5_000_000
STATE_VERSION = 1


def encode_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


class Tokenizer:
    """One SentencePiece model shared by both languages (``joint``) or a source and a target model."""

    def __init__(self, src_model: bytes, tgt_model: bytes | None = None) -> None:
        self._src_bytes = src_model
        self._tgt_bytes = tgt_model
        self._src = spm.SentencePieceProcessor(model_proto=src_model)
        self._tgt = self._src if tgt_model is None else spm.SentencePieceProcessor(model_proto=tgt_model)
        for sp in {id(self._src): self._src, id(self._tgt): self._tgt}.values():
            ids = (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
            if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
                raise ValueError(
                    f"SentencePiece model has special ids {ids}, expected (0, 1, 2, 3) = pad/unk/bos/eos."
                )

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def train(cls, src_texts: list[str], tgt_texts: list[str], cfg: DataConfig) -> Tokenizer:
        """Train on the training split (empty lines skipped); joint unless ``cfg.joint_vocab`` is false."""
        if cfg.joint_vocab:
            return cls(_train_model([*src_texts, *tgt_texts], cfg, "joint"))
        return cls(_train_model(src_texts, cfg, cfg.src_lang), _train_model(tgt_texts, cfg, cfg.tgt_lang))

    @classmethod
    def load_or_train(
        cls,
        src_texts: list[str],
        tgt_texts: list[str],
        cfg: DataConfig,
        cache_dir: str | os.PathLike,
        data_hash: str | None = None,
    ) -> Tokenizer:
        """Reuse the model cached for (training text, settings) in ``cache_dir``, or train and cache it.

        ``data_hash`` identifies the training text (``sources.content_hash``); computed when not given.
        """
        data_hash = data_hash or content_hash(src_texts, tgt_texts)
        key = hashlib.sha256(json.dumps([data_hash, _settings(cfg)], sort_keys=True).encode()).hexdigest()
        folder = Path(cache_dir) / f"tokenizer-{key[:16]}"
        if folder.exists():  # complete, as the atomic save leaves it, unless damaged by hand
            try:
                tok = cls.load(folder)
            except (OSError, ValueError, KeyError, RuntimeError) as e:  # RuntimeError: SentencePiece's
                raise damaged_cache(folder, e) from e
            log.info("tokenizer: reusing %s", folder)
            return tok
        tok = cls.train(src_texts, tgt_texts, cfg)
        _save_atomic(tok, folder)
        log.info("tokenizer: trained (%s), cached in %s", tok.describe(), folder)
        return tok

    @classmethod
    def from_state(cls, state: dict) -> Tokenizer:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"tokenizer state version {state.get('version')!r}, expected {STATE_VERSION}.")
        return cls(state["src_model"], None if state["joint"] else state["tgt_model"])

    def state_dict(self) -> dict:
        """Plain dict (bytes, bool, int) for checkpoints; ``tgt_model`` only without a joint vocabulary.

        (No empty ``b""`` placeholder: torch pickles empty bytes in a form ``weights_only`` loading refuses.)
        """
        state = {"version": STATE_VERSION, "joint": self.joint, "src_model": self._src_bytes}
        if not self.joint:
            state["tgt_model"] = self._tgt_bytes
        return state

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the model file(s) (``spm.model`` or ``spm.src/tgt.model``) and an index to ``folder``.

        Each file is replaced atomically and only when its content changes, so several processes may
        save the same tokenizer into the same folder.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.joint:
            files = {"spm.model": self._src_bytes}
        else:
            files = {"spm.src.model": self._src_bytes, "spm.tgt.model": self._tgt_bytes}
        index = json.dumps({"joint": self.joint, "files": sorted(files)}).encode()
        # The index is written last: its presence means the folder is complete.
        for name, data in [*files.items(), ("tokenizer.json", index)]:
            _write_if_changed(folder / name, data)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Tokenizer:
        folder = Path(folder)
        index = json.loads((folder / "tokenizer.json").read_text())
        if index["joint"]:
            return cls((folder / "spm.model").read_bytes())
        return cls((folder / "spm.src.model").read_bytes(), (folder / "spm.tgt.model").read_bytes())

    # ---- properties ---------------------------------------------------------------------------------

    @property
    def joint(self) -> bool:
        return self._tgt_bytes is None

    @property
    def src_vocab_size(self) -> int:
        return self._src.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self._tgt.get_piece_size()

    def fingerprint(self) -> str:
        """sha256 of the model bytes: equal fingerprints encode identically."""
        h = hashlib.sha256(self._src_bytes)
        if not self.joint:
            h.update(self._tgt_bytes)
        return h.hexdigest()

    def describe(self) -> str:
        if self.joint:
            return f"joint vocabulary of {self.src_vocab_size:,}"
        return f"source vocabulary {self.src_vocab_size:,}, target vocabulary {self.tgt_vocab_size:,}"

    # ---- encoding -----------------------------------------------------------------------------------

    def encode_src(self, texts: list[str]) -> list[list[int]]:
        """Source ids: pieces + EOS."""
        return self._src.encode(list(texts), out_type=int, add_eos=True, num_threads=encode_threads())

    def encode_tgt(self, texts: list[str]) -> list[list[int]]:
        """Target ids: pieces only (no BOS, no EOS)."""
        return self._tgt.encode(list(texts), out_type=int, num_threads=encode_threads())

    def decode_src(self, ids: Iterable[Iterable[int]]) -> list[str]:
        return _decode(self._src, ids)

    def decode_tgt(self, ids: Iterable[Iterable[int]]) -> list[str]:
        """Text of each id sequence, cut at the first EOS; PAD/BOS dropped, UNK as SentencePiece shows it."""
        return _decode(self._tgt, ids)

    def src_pieces(self, text: str) -> list[str]:
        return self._src.encode(text, out_type=str)

    def tgt_pieces(self, text: str) -> list[str]:
        return self._tgt.encode(text, out_type=str)


def _decode(sp: spm.SentencePieceProcessor, batch: Iterable[Iterable[int]]) -> list[str]:
    size = sp.get_piece_size()
    cleaned: list[list[int]] = []
    for ids in batch:
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        cleaned.append([i for i in ids if i not in (PAD_ID, BOS_ID) and 0 <= i < size])
    return sp.decode(cleaned) if cleaned else []


def _settings(cfg: DataConfig) -> dict:
    return {
        "version": TOKENIZER_VERSION,
        "vocab_size": cfg.vocab_size,
        "joint": cfg.joint_vocab,
        "model_type": cfg.spm_model_type,
        "character_coverage": cfg.character_coverage,
    }


def _train_model(texts: list[str], cfg: DataConfig, name: str) -> bytes:
    sentences = [t for t in texts if t]
    if not sentences:
        raise DataError(f"no non-empty sentences to train the {name} SentencePiece model on.")
    sample = f", a sample of {MAX_TRAIN_SENTENCES:,}" if len(sentences) > MAX_TRAIN_SENTENCES else ""
    log.info(
        "tokenizer: training the %s SentencePiece model (%s, %s pieces) on %s sentences%s",
        name,
        cfg.spm_model_type,
        f"{cfg.vocab_size:,}",
        f"{len(sentences):,}",
        sample,
    )
    try:
        model = _run_trainer(sentences, cfg)
    except RuntimeError as e:
        chars = re.search(r"Vocabulary size is smaller than required_chars\. \d+ vs (\d+)", str(e))
        if chars:
            raise DataError(
                f"data.vocab_size={cfg.vocab_size} is smaller than the {chars.group(1)} characters the {name} "
                "corpus needs (plus the special tokens); raise data.vocab_size or lower "
                "data.character_coverage."
            ) from None
        if "sentences_.empty()" in str(e):  # SentencePiece skips lines of over 4,192 bytes
            raise DataError(
                f"no line of the {name} corpus is short enough for SentencePiece to train on (at most 4,192 "
                "bytes); a corpus needs sentences, one per line."
            ) from None
        raise
    pieces = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    if pieces < cfg.vocab_size:
        log.warning(
            "the %s corpus (%s sentences) is too small for data.vocab_size=%d: the vocabulary has %s pieces",
            name,
            f"{len(sentences):,}",
            cfg.vocab_size,
            f"{pieces:,}",
        )
    return model


def _run_trainer(sentences: list[str], cfg: DataConfig) -> bytes:
    """``cfg.vocab_size`` is a soft limit: a corpus too small for it gives fewer pieces. (Where it is
    big enough, the pieces and their scores are those of a hard limit, which would fail, at the end of
    the training, on a small corpus.)"""
    model = io.BytesIO()
    spm.set_random_generator_seed(TRAIN_SEED)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=cfg.vocab_size,
        model_type=cfg.spm_model_type,
        character_coverage=cfg.character_coverage,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        hard_vocab_limit=False,
        num_threads=TRAIN_THREADS,
        input_sentence_size=MAX_TRAIN_SENTENCES,
        shuffle_input_sentence=True,
        minloglevel=2,
    )
    return model.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    if not (path.is_file() and path.read_bytes() == data):
        write_atomic(path, data)


def _save_atomic(tok: Tokenizer, folder: Path) -> None:
    """Publish the cache folder whole (:func:`nmt.files.publish_folder`): a reader never sees half of it."""
    with writing(f"the tokenizer cache in {folder.parent}", CACHE_HINT):
        folder.parent.mkdir(parents=True, exist_ok=True)
        publish_folder(folder, tok.save, "tokenizer.json")
