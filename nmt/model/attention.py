"""Multi-head attention on ``torch.nn.functional.scaled_dot_product_attention`` (SDPA).

Mask convention (the only one in this package): a boolean tensor broadcastable to
(B, H, T_query, T_key) where **True means the query may attend to that key**. ``None`` means
every key may be attended; passing ``None`` (and ``is_causal`` for plain causal masks) lets SDPA
pick the fused flash / memory-efficient kernels on GPU.

On CPU, attention over short keys computes the same three steps (scores, softmax, weighted sum) with
plain matmuls instead (see ``MultiHeadAttention._attend_explicit``): SDPA's CPU flash kernel works in
tiles meant for long sequences and takes twice as long, forward and backward, at the 10-60 tokens of
a sentence (one query at a time, as in a cached decoding step, is the exception). Training on CPU
with attention dropout always takes that path, so that the weights are dropped with the cheap byte
masks of :mod:`nmt.model.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmt.model.cache import CrossAttentionCache, SelfAttentionCache
from nmt.model.dropout import Dropout

# On CPU, up to this many keys the explicit matmul / softmax / matmul beats SDPA's flash kernel
# (2 threads, fp32, forward + backward: 3.4 against 7.2 ms for 200 sentences of 20 tokens, 9.6
# against 10.9 ms at 64 keys; from 128 keys SDPA is faster and needs far less memory).
CPU_EXPLICIT_MAX_KEYS = 64


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention with ``n_heads`` heads, for self- and cross-attention.

    One input projection ``in_proj`` of shape (3D, D) holds the query, key and value weights stacked.
    Self-attention applies it in one matmul (fused QKV); cross-attention applies the query rows to
    the decoder states and the key/value rows to the encoder output (separate Q, fused KV), so both
    uses share one parameter layout.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout  # on the attention probabilities, training only
        self.weights_dropout = Dropout(dropout)  # CPU training: byte masks (see _attend_explicit)
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None = None,
        mask: Tensor | None = None,
        causal: bool = False,
        cache: SelfAttentionCache | CrossAttentionCache | None = None,
    ) -> Tensor:
        """Attend from ``x`` (B, T, D) to ``x`` itself (memory=None) or to ``memory`` (N, S, D).

        memory: N = B rows, or N dividing B: memory row ``n`` then serves the G = B / N
            consecutive query rows ``n * G ... n * G + G - 1`` (the beams of one sentence), and
            ``mask`` (then a key mask (N, 1, 1, S)) and the cross-attention cache have N rows too.
        mask: bool, broadcastable to (B, H, T, T_key), True = may attend; None = no restriction.
        causal: query ``i`` (at absolute position ``past + i``) sees keys ``<= past + i``, where
            ``past`` is the number of keys cached before this call.
        cache: for self-attention a :class:`SelfAttentionCache` (new keys/values are appended);
            for cross-attention a :class:`CrossAttentionCache` (keys/values of ``memory`` are
            computed on the first call and reused after). For inference only.
        Returns (B, T, D).
        """
        if memory is None:
            q, k, v = self._self_qkv(x, cache)
        else:
            if causal:
                raise ValueError("causal masking only applies to self-attention")
            q, k, v = self._cross_qkv(self._group_by_memory_row(x, memory.size(0)), memory, cache)
        out = self._attend(q, k, v, mask, causal)  # (B, H, T, Dh), or (N, H, G*T, Dh) grouped
        out = out.transpose(1, 2).reshape(x.shape)  # (B, T, D)
        return self.out_proj(out)

    @staticmethod
    def _group_by_memory_row(x: Tensor, memory_rows: int) -> Tensor:
        """(B, T, D) -> (N, G*T, D) where N = memory rows and each serves G = B / N consecutive rows.

        Beam search keeps one memory row per sentence and ``beam`` target rows per sentence: the
        queries of a sentence's beams are stacked as positions of one query row, so the encoder
        output, its keys/values and the mask are neither repeated ``beam`` times nor reordered
        after each step. Each query attends independently, so the result is that of repetition.
        """
        rows = x.size(0)
        if rows == memory_rows:
            return x
        if memory_rows == 0 or rows % memory_rows:
            raise ValueError(f"{rows} query rows cannot share {memory_rows} memory rows evenly")
        return x.reshape(memory_rows, -1, x.size(-1))  # (N, G*T, D); row n*G+g at positions g*T:(g+1)*T

    def _split_heads(self, t: Tensor) -> Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def _self_qkv(self, x: Tensor, cache: SelfAttentionCache | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.in_proj(x).chunk(3, dim=-1)  # 3 x (B, T, D)
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)  # (B, H, T, Dh)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H, past + T, Dh)
        return q, k, v

    def _cross_qkv(
        self, x: Tensor, memory: Tensor, cache: CrossAttentionCache | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        d = self.d_model
        weight, bias = self.in_proj.weight, self.in_proj.bias  # (3D, D), (3D,)
        q = self._split_heads(F.linear(x, weight[:d], bias[:d]))  # (B, H, T, Dh)
        if cache is not None and cache.k is not None:
            return q, cache.k, cache.v
        k, v = F.linear(memory, weight[d:], bias[d:]).chunk(2, dim=-1)  # 2 x (B, S, D)
        k, v = self._split_heads(k), self._split_heads(v)  # (B, H, S, Dh)
        if cache is not None:  # stored contiguous: every later step reads them without a copy
            k, v = k.contiguous(), v.contiguous()
            cache.k, cache.v = k, v
        return q, k, v

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        query_len, key_len = q.size(2), k.size(2)
        past = key_len - query_len
        dropout = self.dropout if self.training else 0.0
        # A single query (a cached decoding step) stays with SDPA, which reads the strided self-attention
        # cache in place where matmul would first copy it. Compiled, the choice must not depend on the
        # key length, or a batch crossing the threshold would compile the model again.
        short_keys = torch.compiler.is_compiling() or key_len <= CPU_EXPLICIT_MAX_KEYS
        explicit = q.device.type == "cpu" and ((1 < query_len and short_keys) or dropout > 0)
        use_is_causal = False
        if causal and past == 0 and mask is None and not explicit:
            use_is_causal = True  # SDPA's built-in mask is top-left aligned: right only without a cache
        elif causal and query_len > 1:
            # Bottom-right aligned: query i sits at position past + i. (One cached query needs no mask.)
            allowed = torch.ones(query_len, key_len, dtype=torch.bool, device=q.device).tril(past)  # (T, Tk)
            mask = allowed if mask is None else mask & allowed
        if explicit:
            return self._attend_explicit(q, k, v, mask)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=use_is_causal, scale=self.head_dim**-0.5
        )  # (B, H, T, Dh)

    def _attend_explicit(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """What SDPA computes, as matmul / softmax / matmul; in training, attention dropout drops the
        probabilities with :class:`Dropout`'s byte masks.

        SDPA's CPU kernels have no fused dropout: with ``dropout_p > 0`` it takes its math path, which
        draws one Bernoulli number per attention weight (about 4% of a training step of the base
        recipe's model). A byte mask costs a tenth of that.
        """
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(self.head_dim**-0.5)  # (B, H, T, Tk)
        if mask is not None:
            scores = scores.masked_fill_(~mask, float("-inf"))
        probs = scores.softmax(dim=-1)
        if mask is not None:
            # A query with no key to attend (a source all padding) gets zeros, as from SDPA, not NaN. (On
            # the CPU the check costs no wait; compiled, the fill is fused instead of branched on.)
            blind = ~mask.any(dim=-1, keepdim=True)
            if torch.compiler.is_compiling() or bool(blind.any()):
                probs = probs.masked_fill(blind, 0.0)
        return torch.matmul(self.weights_dropout(probs), v)  # (B, H, T, Dh)
