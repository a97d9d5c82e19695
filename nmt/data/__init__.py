"""Data pipeline: reading corpora, SentencePiece, filtering, encoded Arrow caches, token-budget batches.

Names are imported on first use, so ``from nmt.data import PAD_ID`` does not load ``datasets``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "nmt.data.tokenizer": ("PAD_ID", "UNK_ID", "BOS_ID", "EOS_ID", "SPECIAL_IDS", "Tokenizer"),
    "nmt.data.sources": ("DataError", "read_split", "content_hash"),
    "nmt.data.corpus": ("PreparedData", "FilterStats", "prepare_data", "encode_split", "filter_mask"),
    "nmt.data.batching": (
        "Batch",
        "BatchLoader",
        "PackedPairs",
        "TokenBatchSampler",
        "collate",
        "make_loader",
        "padding_efficiency",
    ),
    "nmt.data.download": ("DownloadError", "ensure_multi30k"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'nmt.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
