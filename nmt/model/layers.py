"""Encoder and decoder layers: attention and feed-forward sublayers with residual connections.

Pre-norm (``norm_first=True``): ``x + dropout(sublayer(norm(x)))``; the stack then needs a final
LayerNorm. Post-norm (Vaswani et al. 2017): ``norm(x + dropout(sublayer(x)))``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from nmt.config import ModelConfig
from nmt.model.attention import MultiHeadAttention
from nmt.model.cache import LayerCache
from nmt.model.dropout import Dropout

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear1 = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.activation = _ACTIVATIONS[cfg.activation]()
        self.act_dropout = Dropout(cfg.act_dropout)
        self.linear2 = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.act_dropout(self.activation(self.linear1(x))))


class Residual(nn.Module):
    """A sublayer's LayerNorm, residual dropout and residual connection, pre- or post-norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.self_attn_residual = Residual(cfg)
        self.ffn = FeedForward(cfg)
        self.ffn_residual = Residual(cfg)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """x (B, S, D); key_mask (B, 1, 1, S) True = real source token, or None."""
        x = self.self_attn_residual(x, lambda h: self.self_attn(h, mask=key_mask))
        return self.ffn_residual(x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.self_attn_residual = Residual(cfg)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_dropout)
        self.cross_attn_residual = Residual(cfg)
        self.ffn = FeedForward(cfg)
        self.ffn_residual = Residual(cfg)

    def forward(
        self, x: Tensor, memory: Tensor, memory_mask: Tensor | None, cache: LayerCache | None
    ) -> Tensor:
        """x (B, T, D); memory (B, S, D); memory_mask (B, 1, 1, S) True = real source token, or None.

        No target padding mask is needed: padding sits at the end, and the causal mask already
        hides later positions from every real one.
        """
        self_cache = None if cache is None else cache.self_attn
        cross_cache = None if cache is None else cache.cross_attn
        x = self.self_attn_residual(x, lambda h: self.self_attn(h, causal=True, cache=self_cache))
        x = self.cross_attn_residual(
            x, lambda h: self.cross_attn(h, memory=memory, mask=memory_mask, cache=cross_cache)
        )
        return self.ffn_residual(x, self.ffn)
