"""label_smoothed_nll against F.cross_entropy and a hand-computed value."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nmt.data.tokenizer import PAD_ID
from nmt.loss import label_smoothed_nll

VOCAB = 11


def logits_and_target(seed: int = 0):
    """(2, 5, V) logits and a (2, 5) target whose second row ends in two pads."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, VOCAB, generator=gen) * 3
    target = torch.randint(4, VOCAB, (2, 5), generator=gen)
    target[1, 3:] = PAD_ID
    return logits, target


def test_without_smoothing_equals_cross_entropy():
    logits, target = logits_and_target()
    loss, nll = label_smoothed_nll(logits, target, epsilon=0.0, pad_id=PAD_ID)
    expected = F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), ignore_index=PAD_ID, reduction="sum")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected)


def test_smoothing_follows_cross_entropy_convention_and_leaves_nll_alone():
    logits, target = logits_and_target()
    loss, nll = label_smoothed_nll(logits, target, epsilon=0.1, pad_id=PAD_ID)
    flat_logits, flat_target = logits.view(-1, VOCAB), target.view(-1)
    expected = F.cross_entropy(
        flat_logits, flat_target, ignore_index=PAD_ID, reduction="sum", label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(
        nll, F.cross_entropy(flat_logits, flat_target, ignore_index=PAD_ID, reduction="sum")
    )


def test_label_smoothing_matches_hand_formula():
    # One token, V = 4, reference token 2: the target distribution is 1 - eps + eps/4 on token 2
    # and eps/4 on each of the others.
    logits = [1.0, -0.5, 2.0, 0.25]
    eps = 0.2
    log_z = math.log(sum(math.exp(x) for x in logits))
    log_p = [x - log_z for x in logits]
    expected = -((1 - eps) * log_p[2] + eps / 4 * sum(log_p))
    loss, nll = label_smoothed_nll(torch.tensor([[logits]]), torch.tensor([[2]]), epsilon=eps, pad_id=PAD_ID)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert nll.item() == pytest.approx(-log_p[2], rel=1e-6)


def test_padding_is_ignored():
    logits, target = logits_and_target()
    logits.requires_grad_(True)
    loss, nll = label_smoothed_nll(logits, target, epsilon=0.1, pad_id=PAD_ID)
    real = target != PAD_ID
    # The same sums over the real positions only, as one flat "batch" without any padding.
    real_loss, real_nll = label_smoothed_nll(
        logits[real][None], target[real][None], epsilon=0.1, pad_id=PAD_ID
    )
    torch.testing.assert_close(loss, real_loss)
    torch.testing.assert_close(nll, real_nll)
    loss.backward()
    assert torch.count_nonzero(logits.grad[~real]) == 0  # pad positions get no gradient
    assert torch.count_nonzero(logits.grad[real]) > 0


def test_bf16_logits_are_reduced_in_float32():
    logits, target = logits_and_target()
    logits = logits * 10  # large logits: the softmax is where bf16 would lose the most
    low = logits.bfloat16()
    loss, nll = label_smoothed_nll(low, target, epsilon=0.1, pad_id=PAD_ID)
    assert loss.dtype == nll.dtype == torch.float32
    # Identical to the float32 computation on the same (bf16-rounded) values.
    ref_loss, ref_nll = label_smoothed_nll(low.float(), target, epsilon=0.1, pad_id=PAD_ID)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(nll, ref_nll)
