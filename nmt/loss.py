"""Label-smoothed cross-entropy over non-padding target tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_nll(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor]:
    """Sum of label-smoothed cross-entropy and of plain NLL over the positions where target != pad_id.

    logits (B, T, V) of any float dtype; target (B, T) long. The target distribution puts
    ``1 - epsilon`` on the reference token plus ``epsilon / V`` on every token (the convention of
    ``F.cross_entropy(label_smoothing=epsilon)``), so per token

        loss = (1 - epsilon) * nll + epsilon * mean_v(-log p_v).

    Both sums are float32 scalars even for bf16/fp16 logits: the softmax runs in float32, because
    log-probabilities of rare tokens and sums over many tokens lose too much in 16 bits. Callers
    divide by the number of non-pad tokens.
    """
    lprobs = F.log_softmax(logits, dim=-1, dtype=torch.float32)  # (B, T, V)
    non_pad = target != pad_id  # (B, T)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
    smooth = -lprobs.mean(dim=-1)  # (B, T)
    nll = nll.masked_fill(~non_pad, 0.0).sum()
    smooth = smooth.masked_fill(~non_pad, 0.0).sum()
    loss = (1.0 - epsilon) * nll + epsilon * smooth
    return loss, nll
