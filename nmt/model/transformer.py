"""Encoder-decoder Transformer (Vaswani et al. 2017) with the ``encode``/``decode`` seam search uses.

Initialisation (:meth:`Transformer._init_parameters`):

* every ``nn.Linear``: Xavier uniform weights, zero bias. The fused (3D, D) attention input
  projection is initialised as one matrix, which equals Xavier on each D x D block with gain
  1/sqrt(2);
* token embeddings: normal(0, D^-0.5) with the padding row zero; an untied output projection and
  learned positions: normal(0, D^-0.5). Embeddings are multiplied by sqrt(D) on the way in, so
  inputs have unit-scale components, and a tied output projection gives logits of unit scale;
* LayerNorm: weight 1, bias 0.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nmt.config import ConfigError, ModelConfig
from nmt.data.tokenizer import PAD_ID
from nmt.model.cache import KVCache
from nmt.model.embedding import Embedder, LearnedPositions, SinusoidalPositions
from nmt.model.layers import DecoderLayer, EncoderLayer


def _positions(cfg: ModelConfig) -> nn.Module:
    if cfg.positions == "learned":
        return LearnedPositions(cfg.max_positions, cfg.d_model)
    return SinusoidalPositions(cfg.max_positions, cfg.d_model)


def _key_mask(src_mask: Tensor | None) -> Tensor | None:
    """(B, S) -> (B, 1, 1, S): the same keys are visible to every head and every query."""
    return None if src_mask is None else src_mask[:, None, None, :]


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed: Embedder) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(self, src: Tensor, src_mask: Tensor | None) -> Tensor:
        x = self.embed(src)  # (B, S, D)
        key_mask = _key_mask(src_mask)
        for layer in self.layers:
            x = layer(x, key_mask)
        return self.final_norm(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, embed: Embedder) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()

    def forward(
        self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor | None, cache: KVCache | None
    ) -> Tensor:
        start = 0 if cache is None else cache.length
        x = self.embed(tgt_in, start)  # (B, T, D)
        key_mask = _key_mask(src_mask)
        for i, layer in enumerate(self.layers):
            x = layer(x, memory, key_mask, None if cache is None else cache.layers[i])
        return self.final_norm(x)  # (B, T, D)


class Transformer(nn.Module):
    """Encoder-decoder Transformer.

    Masks follow one convention: boolean, True = real token / may be attended. ``src_mask`` may be
    ``None`` when the caller knows the batch has no padding; attention then runs without a mask,
    which lets fused GPU kernels be used.
    """

    def __init__(
        self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int, pad_id: int = PAD_ID
    ) -> None:
        super().__init__()
        if cfg.share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ConfigError(
                "model.share_embeddings=true needs one joint vocabulary, but the source has "
                f"{src_vocab_size} tokens and the target {tgt_vocab_size}; "
                "set data.joint_vocab=true or model.share_embeddings=false."
            )
        self.cfg = cfg
        self.pad_id = pad_id
        tgt_tokens = nn.Embedding(tgt_vocab_size, cfg.d_model, padding_idx=pad_id)
        src_tokens = (
            tgt_tokens
            if cfg.share_embeddings
            else nn.Embedding(src_vocab_size, cfg.d_model, padding_idx=pad_id)
        )
        self.encoder = Encoder(cfg, Embedder(src_tokens, _positions(cfg), cfg.dropout))
        self.decoder = Decoder(cfg, Embedder(tgt_tokens, _positions(cfg), cfg.dropout))
        self.output = nn.Linear(cfg.d_model, tgt_vocab_size, bias=False)
        if cfg.tie_output:
            self.output.weight = tgt_tokens.weight
        self._init_parameters()

    @torch.no_grad()
    def _init_parameters(self) -> None:
        d_model = self.cfg.d_model
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # After the Linear loop: a tied output projection takes its values from here.
        token_tables = [self.decoder.embed.tokens]
        if self.encoder.embed.tokens is not self.decoder.embed.tokens:
            token_tables.append(self.encoder.embed.tokens)
        for tokens in token_tables:
            nn.init.normal_(tokens.weight, mean=0.0, std=d_model**-0.5)
            tokens.weight[self.pad_id].zero_()
        if not self.cfg.tie_output:
            nn.init.normal_(self.output.weight, mean=0.0, std=d_model**-0.5)
        for embed in (self.encoder.embed, self.decoder.embed):
            if isinstance(embed.positions, LearnedPositions):
                nn.init.normal_(embed.positions.embedding.weight, mean=0.0, std=d_model**-0.5)

    def encode(self, src: Tensor, src_mask: Tensor | None) -> Tensor:
        """src (B, S) long, src_mask (B, S) bool True = real token -> memory (B, S, D)."""
        return self.encoder(src, src_mask)

    def decode(
        self, tgt_in: Tensor, memory: Tensor, src_mask: Tensor | None, cache: KVCache | None = None
    ) -> Tensor:
        """tgt_in (B, T) long -> logits (B, T, V).

        ``memory`` (N, S, D) and ``src_mask`` (N, S) have B rows, or N rows with N dividing B, each
        serving B / N consecutive target rows (beam search's beams of one sentence share one row).

        With a cache, ``tgt_in`` holds only the new positions, which continue from ``cache.length``;
        the cross-attention keys/values are computed from ``memory`` on the first call and reused.
        """
        return self.output(self.decoder(tgt_in, memory, src_mask, cache))

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V); masks come from ``pad_id``. (For the loss without the
        logits, see :class:`nmt.loss.ProjectedLoss`.)"""
        src_mask = src != self.pad_id  # (B, S)
        return self.decode(tgt_in, self.encode(src, src_mask), src_mask)

    def new_cache(self, capacity: int = 32) -> KVCache:
        """An empty cache for incremental decoding; :meth:`decode` fills it.

        ``capacity``: target positions to allocate at once (more are added by doubling).
        """
        return KVCache.empty(len(self.decoder.layers), capacity)

    def num_parameters(self) -> int:
        """Number of distinct parameter values (shared and tied weights counted once)."""
        return sum(p.numel() for p in self.parameters())
