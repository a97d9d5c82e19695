"""Batched greedy search."""

from __future__ import annotations

import torch
from torch import Tensor

from nmt.data.tokenizer import EOS_ID
from nmt.search.common import (
    DecodingModel,
    IncrementalDecoder,
    LengthLimits,
    apply_constraints,
    bos_prefix,
    fill_holes,
    max_output_lengths,
    position_cap,
)


@torch.inference_mode()
def greedy_search(
    model: DecodingModel,
    src: Tensor,
    src_mask: Tensor,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    min_len: int = 1,
    max_len_cap: int | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """Most probable token at every step. ``src``/``src_mask`` are (B, S); returns B token lists.

    ``max_len_cap`` bounds every output length; by default the model's positions do (``position_cap``).
    """
    if src.size(0) == 0:
        return []
    cap = position_cap(model, max_len_cap)
    limits = LengthLimits(max_output_lengths(src_mask, max_len_a, max_len_b, cap))
    memory = model.encode(src, src_mask)
    decoder = IncrementalDecoder(model, memory, src_mask, use_cache, capacity=limits.steps)
    outputs: list[list[int]] = [[] for _ in range(src.size(0))]
    sentence = list(range(src.size(0)))  # original index of each active row
    prefix = bos_prefix(src.size(0), src.device)  # (R, 1 + t)
    for step in range(limits.steps):
        logits = apply_constraints(decoder.logits(prefix), step, min_len, limits.at_max(step))
        next_token = logits.argmax(dim=-1)  # (R,)
        prefix = torch.cat([prefix, next_token[:, None]], dim=1)
        ended = (next_token == EOS_ID).tolist()
        if not any(ended):
            continue
        finished = _where(ended)
        for row, tokens in zip(finished, prefix[finished, 1:-1].tolist(), strict=True):
            outputs[sentence[row]] = tokens
        keep = _where(ended, False)
        if not keep:
            break
        order = fill_holes(keep)
        rows = torch.tensor(order, device=src.device)
        sentence = [sentence[i] for i in order]
        prefix = prefix[rows]
        limits.keep(order, rows)
        decoder.select(rows)
    return outputs


def _where(flags: list[bool], value: bool = True) -> list[int]:
    return [i for i, flag in enumerate(flags) if flag == value]
