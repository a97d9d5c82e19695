"""Dropout whose CPU masks come from random bytes instead of one Bernoulli draw per element.

On CPU, ``F.dropout`` runs ``bernoulli_``: one draw from the generator per element, about a quarter
of a training step of the ``small`` model. Here a (random) 64-bit word from torch's global generator
gives eight bytes, and an element is dropped when its byte is below ``round(p * 256)``: the drop
probability is rounded to a multiple of 1/256 (0.1 -> 26/256 = 0.1016, 0.3 -> 77/256 = 0.3008), and
kept elements are scaled by 1 / P(keep) of that rounded probability, so the output equals the input
in expectation. The mask costs a compare and a multiply per element, about a tenth of ``bernoulli_``.

Rates that round to 0 or to 1 (p < 1/512 or p > 511/512) and other devices use ``F.dropout``, which
has the exact rate (on CUDA it draws its fused Philox numbers). Every path draws from torch's global
generator, so a checkpoint's RNG state resumes the same masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 256  # values of one random byte


def byte_mask(like: Tensor, drop_below: int) -> Tensor:
    """A mask shaped and typed like ``like``: 0 where a random byte is below ``drop_below``, else
    256 / (256 - drop_below). In 16-bit dtypes that scale is rounded, as in ``F.dropout``."""
    count = like.numel()
    # random_ over the full int64 range: every bit of each word uniform, one generator call per word.
    words = torch.empty((count + 7) // 8, dtype=torch.int64, device=like.device)
    words.random_(torch.iinfo(torch.int64).min, None)
    random_bytes = words.view(torch.uint8)[:count].view(like.shape)
    mask = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    torch.ge(random_bytes, drop_below, out=mask)  # 1.0 = keep, 0.0 = drop
    return mask.mul_(_LEVELS / (_LEVELS - drop_below))


class Dropout(nn.Module):
    """Drop-in for ``nn.Dropout(p)`` with byte masks on CPU (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.drop_below = round(p * _LEVELS)  # bytes below this are dropped (CPU)

    @property
    def cpu_rate(self) -> float:
        """The drop probability on CPU: ``p`` rounded to a multiple of 1/256 (``p`` itself at the extremes)."""
        return self.drop_below / _LEVELS if self._uses_bytes else self.p

    @property
    def _uses_bytes(self) -> bool:
        return 0 < self.drop_below < _LEVELS

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or not self._uses_bytes or torch.compiler.is_compiling():
            # torch.compile cannot trace the in-place random_ of byte_mask (a graph break per call,
            # then recompiles); its own generated dropout is cheap.
            return F.dropout(x, self.p, training=True)
        return x * byte_mask(x, self.drop_below)

    def extra_repr(self) -> str:
        return f"p={self.p}"
