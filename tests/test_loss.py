"""label_smoothed_nll against F.cross_entropy, a hand-computed value, plain autograd (gradients), and
its compiled form."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nmt.data.tokenizer import PAD_ID
from nmt.loss import label_smoothed_nll, label_smoothed_nll_ops
from nmt.runtime import compile_loss

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


# The loss through plain autograd (before the closed-form backward), and what compile_loss compiles.
reference_label_smoothed_nll = label_smoothed_nll_ops


def values_and_grads(fn, logits, target, epsilon, upstream):
    leaf = logits.detach().clone().requires_grad_(True)
    loss, nll = fn(leaf, target, epsilon, PAD_ID)
    (loss * upstream).backward()
    return loss.detach(), nll.detach(), leaf.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_closed_form_backward_equals_autograd(dtype, epsilon):
    logits, target = logits_and_target(seed=3)
    logits = logits.to(dtype)
    upstream = 0.37  # the trainer scales the loss by 1 / tokens before backward
    loss, nll, grad = values_and_grads(label_smoothed_nll, logits, target, epsilon, upstream)
    ref_loss, ref_nll, ref_grad = values_and_grads(
        reference_label_smoothed_nll, logits, target, epsilon, upstream
    )
    assert loss.dtype == ref_loss.dtype and grad.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)  # the forward is the same computation
    torch.testing.assert_close(nll, ref_nll, rtol=0, atol=0)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol)
    assert torch.count_nonzero(grad[target == PAD_ID]) == 0


def test_closed_form_backward_equals_autograd_for_bf16_logits():
    logits, target = logits_and_target(seed=4)
    low = (logits * 4).bfloat16()
    loss, nll, grad = values_and_grads(label_smoothed_nll, low, target, 0.1, 1.0)
    ref_loss, ref_nll, ref_grad = values_and_grads(reference_label_smoothed_nll, low, target, 0.1, 1.0)
    assert grad.dtype == torch.bfloat16  # the gradient comes back in the logits' dtype
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(nll, ref_nll, rtol=0, atol=0)
    # Both round a float32 gradient to bf16 once: at most one bf16 ulp apart.
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=2**-7, atol=1e-6)


def test_backward_through_a_larger_graph_with_padding():
    # Logits from a linear layer, as in the model: the gradient reaches the weights unchanged.
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 7, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, 16, generator=gen, dtype=torch.float64)
    target = torch.randint(4, VOCAB, (3, 7), generator=gen)
    target[0, 5:] = PAD_ID
    target[2, 1:] = PAD_ID
    grads = []
    for fn in (label_smoothed_nll, reference_label_smoothed_nll):
        w = weight.clone().requires_grad_(True)
        loss, _ = fn(hidden @ w.T, target, 0.1, PAD_ID)
        loss.backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_nll_is_not_differentiable_and_a_second_backward_is_refused():
    logits, target = logits_and_target()
    logits.requires_grad_(True)
    loss, nll = label_smoothed_nll(logits, target, epsilon=0.1, pad_id=PAD_ID)
    assert loss.requires_grad and not nll.requires_grad
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


def test_no_grad_needs_no_backward_state():
    logits, target = logits_and_target()
    with torch.no_grad():
        loss, nll = label_smoothed_nll(logits.requires_grad_(True), target, epsilon=0.1, pad_id=PAD_ID)
    assert not loss.requires_grad
    ref_loss, ref_nll = reference_label_smoothed_nll(logits.detach(), target, 0.1, PAD_ID)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)


# --- the output projection and the loss in slices ----------------------------------------------


def projection_case(dtype: torch.dtype, seed: int = 0):
    """hidden (3, 9, 6), a (V, 6) projection and a target with padding in two rows."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, 6, generator=gen, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, 6, generator=gen, dtype=dtype, requires_grad=True)
    target = torch.randint(4, VOCAB, (3, 9), generator=gen)
    target[1, 5:] = PAD_ID
    target[2, 1:] = PAD_ID
    return hidden, weight, target


@pytest.mark.parametrize("rows_per_slice", [4, 1000])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_projected_loss_equals_loss_on_the_logits(dtype, epsilon, rows_per_slice, monkeypatch):
    import nmt.loss

    monkeypatch.setattr(nmt.loss, "chunk_rows", lambda vocab: rows_per_slice)  # 4: five slices, one short
    hidden, weight, target = projection_case(dtype)
    loss, nll = label_smoothed_nll(hidden @ weight.T, target, epsilon, PAD_ID)
    (loss * 0.37).backward()
    expected = loss.detach(), nll, hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    loss, nll = nmt.loss.projected_label_smoothed_nll(hidden, weight, target, epsilon, PAD_ID)
    (loss * 0.37).backward()
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for got, want in zip((loss.detach(), nll, hidden.grad, weight.grad), expected, strict=True):
        torch.testing.assert_close(got, want, **tol)
    assert not nll.requires_grad
    assert torch.all(hidden.grad[2, 1:] == 0)  # padding positions get no gradient


def test_projected_loss_without_grad_keeps_no_gradient_state():
    from nmt.loss import projected_label_smoothed_nll

    hidden, weight, target = projection_case(torch.float64)
    with torch.no_grad():
        loss, nll = projected_label_smoothed_nll(hidden, weight, target, 0.1, PAD_ID)
    expected, expected_nll = label_smoothed_nll(hidden.detach() @ weight.detach().T, target, 0.1, PAD_ID)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, expected_nll)
    assert loss.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_projected_loss_survives_target_probabilities_that_underflow(dtype):
    """Logits 12,000 apart: the target's probability are exactly 0 in float32 and float64, so the
    log-sum-exp must come from another token of those rows. Checked against float64 on the logits."""
    from nmt.loss import projected_label_smoothed_nll

    hidden, weight, target = projection_case(dtype)
    with torch.no_grad():
        weight[target[0, 0]] = -100.0  # row 0, position 0: its target's logit is -12,000
        hidden[0, 0] = 20.0
    hidden.requires_grad_(True)
    logits64 = hidden.detach().double() @ weight.detach().double().T
    assert torch.softmax(logits64[0, 0], dim=-1)[target[0, 0]] == 0  # underflows
    want_loss, want_nll = label_smoothed_nll(logits64, target, 0.1, PAD_ID)
    loss, nll = projected_label_smoothed_nll(hidden, weight, target, 0.1, PAD_ID)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(nll.double(), want_nll, rtol=1e-6, atol=0)


def padded_case(batch: int, length: int, dtype: torch.dtype, seed: int):
    """(B, T, 50) logits and a target whose rows end in 0 to T - 1 pads."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, 50, generator=gen) * 4).to(dtype)
    target = torch.randint(4, 50, (batch, length), generator=gen)
    for row in range(batch):
        target[row, length - row % length :] = PAD_ID
    return logits, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_loss_equals_the_eager_loss(dtype):
    # compile_loss with inductor's generated CPU code, over batches of three shapes.
    loss_fn = compile_loss()
    for seed, (batch, length) in enumerate([(2, 5), (3, 9), (5, 4)]):
        logits, target = padded_case(batch, length, dtype, seed)
        loss, nll, grad = values_and_grads(loss_fn, logits, target, 0.1, 0.37)
        ref_loss, ref_nll, ref_grad = values_and_grads(label_smoothed_nll, logits, target, 0.1, 0.37)
        assert loss.dtype == ref_loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-4)
        # bf16: both round a float32 gradient to bf16 once.
        tol = 2**-7 if dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=1e-6)
        assert torch.count_nonzero(grad[target == PAD_ID]) == 0


def test_compiled_loss_traces_once_for_every_batch_shape(traced_graphs):
    loss_fn = compile_loss()
    for seed, (batch, length) in enumerate([(3, 3), (2, 6), (4, 7)]):  # equal B and T first
        logits, target = padded_case(batch, length, torch.bfloat16, seed)
        values_and_grads(loss_fn, logits, target, 0.1, 1.0)
    assert len(traced_graphs) == 1
