"""The Transformer: ``Transformer.encode``/``decode`` with a typed KV cache for incremental decoding."""

from nmt.model.attention import MultiHeadAttention
from nmt.model.cache import CrossAttentionCache, KVCache, LayerCache, SelfAttentionCache
from nmt.model.transformer import Transformer

__all__ = [
    "CrossAttentionCache",
    "KVCache",
    "LayerCache",
    "MultiHeadAttention",
    "SelfAttentionCache",
    "Transformer",
]
