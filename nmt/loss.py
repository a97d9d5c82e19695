"""Label-smoothed cross-entropy over non-padding target tokens, with a closed-form backward.

Autograd's chain through ``mean``, ``gather``, ``masked_fill`` and ``log_softmax`` makes several
(B, T, V) temporaries in the backward pass. The gradient has a closed form,

    d loss / d logits = softmax - (1 - epsilon) * onehot(target) - epsilon / V   (non-pad positions)

which :class:`_LabelSmoothedNLL` computes in place on the saved log-probabilities: about half the
time of the autograd version and no extra (B, T, V) buffer at fp32.

:func:`projected_label_smoothed_nll` goes one step further and takes the output projection in: it
computes logits for the non-padding positions only, a slice of rows at a time, and turns each slice
into its loss and its gradients at once, so the (B, T, V) logits, log-probabilities and gradient are
never held in memory, and padding positions cost nothing.

:func:`label_smoothed_nll_ops` is the same loss in plain tensor operations, for ``torch.compile``
(``nmt.runtime.compile_loss``): compiled, the softmax, the loss and the gradient become a few fused
passes over the logits, and only the logits themselves are saved for the backward pass (no float32
(B, T, V) buffer for bf16/fp16 logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def label_smoothed_nll(logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor]:
    """Sum of label-smoothed cross-entropy and of plain NLL over the positions where target != pad_id.

    logits (B, T, V) of any float dtype; target (B, T) long. The target distribution puts
    ``1 - epsilon`` on the reference token plus ``epsilon / V`` on every token (the convention of
    ``F.cross_entropy(label_smoothing=epsilon)``), so per token

        loss = (1 - epsilon) * nll + epsilon * mean_v(-log p_v).

    Both sums are float32 scalars even for bf16/fp16 logits (float64 for float64 logits): the softmax
    runs in float32, because log-probabilities of rare tokens and sums over many tokens lose too much
    in 16 bits. Callers divide by the number of non-pad tokens. Only ``loss`` is differentiable; its
    gradient has the logits' dtype. The backward pass reuses the forward's buffer, so it runs once per
    call (no ``retain_graph`` second backward).
    """
    return _LabelSmoothedNLL.apply(logits, target, float(epsilon), int(pad_id))


def label_smoothed_nll_ops(
    logits: Tensor, target: Tensor, epsilon: float, pad_id: int
) -> tuple[Tensor, Tensor]:
    """:func:`label_smoothed_nll` written for a compiler: the same sums, gradient and dtypes.

    Run eagerly, autograd keeps (B, T, V) intermediates and is about twice as slow as
    :func:`label_smoothed_nll`; it is meant to be passed to ``torch.compile``.
    """
    lprobs = F.log_softmax(logits, dim=-1, dtype=_reduction_dtype(logits))  # (B, T, V)
    pad = target == pad_id  # (B, T)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(pad, 0.0).sum()
    smooth = -lprobs.mean(dim=-1).masked_fill(pad, 0.0).sum()
    return (1.0 - epsilon) * nll + epsilon * smooth, nll.detach()


def _reduction_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


class _LabelSmoothedNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, epsilon: float, pad_id: int) -> tuple[Tensor, Tensor]:
        lprobs = F.log_softmax(logits, dim=-1, dtype=_reduction_dtype(logits))  # (B, T, V)
        non_pad = target != pad_id  # (B, T)
        nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # (B, T)
        smooth = -lprobs.mean(dim=-1)  # (B, T)
        nll = nll.masked_fill(~non_pad, 0.0).sum()
        smooth = smooth.masked_fill(~non_pad, 0.0).sum()
        loss = (1.0 - epsilon) * nll + epsilon * smooth
        ctx.mark_non_differentiable(nll)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(lprobs, target, non_pad)
        ctx.epsilon, ctx.logits_dtype, ctx.used = epsilon, logits.dtype, False
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor | None) -> tuple[Tensor | None, None, None, None]:
        if ctx.used:
            raise RuntimeError(
                "label_smoothed_nll: backward ran twice through the same loss; its buffer is reused "
                "in place, so compute the loss again instead of retain_graph=True."
            )
        ctx.used = True
        lprobs, target, non_pad = ctx.saved_tensors
        eps, vocab = ctx.epsilon, lprobs.size(-1)
        # Upstream gradient per position, zero on padding: (B, T, 1).
        row_scale = (grad_loss.to(lprobs.dtype) * non_pad.to(lprobs.dtype)).unsqueeze(-1)
        grad = lprobs.exp_()  # softmax, in place: (B, T, V)
        if eps:
            # grad = row_scale * softmax - row_scale * eps / V, in one pass.
            torch.addcmul(row_scale * (-eps / vocab), grad, row_scale, out=grad)
        else:
            grad.mul_(row_scale)
        grad.scatter_add_(-1, target.unsqueeze(-1), row_scale * -(1.0 - eps))
        return grad.to(ctx.logits_dtype), None, None, None


def projected_label_smoothed_nll(
    hidden: Tensor, weight: Tensor, target: Tensor, epsilon: float, pad_id: int
) -> tuple[Tensor, Tensor]:
    """``label_smoothed_nll(hidden @ weight.T, target, epsilon, pad_id)``, without the logits tensor.

    hidden (B, T, D), weight (V, D) (the output projection), target (B, T) long. Logits are computed
    for the positions where ``target != pad_id`` only, :func:`chunk_rows` at a time, in the inputs'
    dtype with autocast off. When gradients are needed they are computed in the same pass (the loss
    is linear in its upstream gradient, which backward only multiplies in), so backward costs nothing
    but a (N, D) and a (V, D) scaling. Returns float32 sums (float64 for float64 inputs), like
    :func:`label_smoothed_nll`.
    """
    keep = target != pad_id  # (B, T)
    rows, tokens = hidden[keep], target[keep]  # (N, D), (N,)
    return _ProjectedLabelSmoothedNLL.apply(rows, weight, tokens, float(epsilon), torch.is_grad_enabled())


class ProjectedLoss(nn.Module):
    """A Transformer's label-smoothed loss on a batch without its (B, T, V) logits:
    ``forward(src, tgt_in, tgt_out, epsilon) -> (loss_sum, nll_sum)``, the values
    :func:`label_smoothed_nll` gives on ``model(src, tgt_in)``.

    The decoder's states go to :func:`projected_label_smoothed_nll` with the output projection's
    weight. A module of its own, holding only ``model``'s parameters, so that DistributedDataParallel
    (and ``nmt.runtime.compile_model``) see the whole training step as one ``forward``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
        model = self.model
        src_mask = src != model.pad_id  # (B, S)
        hidden = model.decoder(tgt_in, model.encode(src, src_mask), src_mask, None)  # (B, T, D)
        return projected_label_smoothed_nll(hidden, model.output.weight, tgt_out, epsilon, model.pad_id)


def chunk_rows(vocab: int, budget_bytes: int = 64 << 20) -> int:
    """Rows of logits per slice: about ``budget_bytes`` of float32 (2,097 rows at V = 8,000), at least
    512. Smaller slices cost more than they gain from the CPU's cache: the (V, C) x (C, D) product of
    the weight gradient runs slowly when C is small (on 2 CPU threads, V = 8,000: 2,048-row slices
    are 13-17% faster than the whole logits tensor at D = 64-256, 128-row slices up to 16% slower)."""
    return max(512, budget_bytes // (4 * vocab))


def _log_sum_exp(logits: Tensor, probs: Tensor, target: Tensor, target_logits: Tensor) -> Tensor:
    """Each row's log-sum-exp (C,) from its softmax ``probs`` (C, V): ``logit_j - log p_j`` for any j.

    j = the target token (``target`` (C, 1), whose logits ``target_logits`` (C,) the caller has)
    wherever its probability is far from underflow, which is nearly every row; the rows where it is
    not take j = their most likely token, whose probability is at least 1/V. A ``max`` over every row
    would cost a full pass over the slice (7% of a step of the tiny model on CPU).
    """
    p_target = probs.gather(1, target).squeeze(1)  # (C,)
    lse = target_logits - p_target.log()
    low = (p_target < torch.finfo(probs.dtype).tiny * 2**20).nonzero().squeeze(1)  # rows near underflow
    if low.numel():
        p_max, top = probs[low].max(dim=1)
        lse[low] = logits[low].gather(1, top[:, None]).squeeze(1) - p_max.log()
    return lse


class _ProjectedLabelSmoothedNLL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, rows: Tensor, weight: Tensor, target: Tensor, epsilon: float, with_grad: bool
    ) -> tuple[Tensor, Tensor]:
        vocab, dtype = weight.size(0), _reduction_dtype(rows)
        weight_sum = weight.sum(dim=0).to(dtype)  # (D,): x @ weight_sum is the sum of x's logits
        nll = rows.new_zeros((), dtype=dtype)
        smooth = rows.new_zeros((), dtype=dtype)  # sum over positions of -mean_v log p_v
        grad_rows = torch.empty_like(rows) if with_grad else None  # (N, D)
        grad_weight = torch.zeros_like(weight) if with_grad else None  # (V, D)
        step = chunk_rows(vocab)
        with torch.autocast(rows.device.type, enabled=False):
            for start in range(0, rows.size(0), step):
                x, t = rows[start : start + step], target[start : start + step, None]  # (C, D), (C, 1)
                logits = (x @ weight.t()).to(dtype)  # (C, V)
                probs = torch.softmax(logits, dim=-1)  # (C, V): the only exp pass over the slice
                target_logits = logits.gather(1, t).squeeze(1)  # (C,)
                lse = _log_sum_exp(logits, probs, t, target_logits)  # (C,)
                nll += (lse - target_logits).sum()
                smooth += lse.sum() - (x.to(dtype) @ weight_sum).sum() / vocab
                if with_grad:
                    # d loss / d logits = softmax - (1 - eps) onehot - eps / V; the constant eps / V
                    # comes off the two products below, not off every probability.
                    grad = probs.scatter_add_(1, t, probs.new_full(t.shape, -(1.0 - epsilon))).to(rows.dtype)
                    torch.mm(grad, weight, out=grad_rows[start : start + step])
                    grad_weight.addmm_(grad.t(), x)
        if with_grad and epsilon:
            grad_rows -= (epsilon / vocab) * weight_sum  # (N, D) - (D,)
            grad_weight -= (epsilon / vocab) * rows.sum(dim=0)  # (V, D) - (D,)
        loss = (1.0 - epsilon) * nll + epsilon * smooth
        ctx.mark_non_differentiable(nll)
        if with_grad:
            ctx.save_for_backward(grad_rows, grad_weight)
        return loss, nll

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor | None):
        grad_rows, grad_weight = ctx.saved_tensors
        return (
            grad_rows * grad_loss.to(grad_rows.dtype),
            grad_weight * grad_loss.to(grad_weight.dtype),
            None,
            None,
            None,
        )
