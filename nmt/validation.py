"""Validation of a training run: teacher-forced loss and perplexity on the validation set, BLEU and
chrF of the model's translations of it, and their report (log lines, TensorBoard, sample translations).

The translations come from :class:`nmt.translator.Translator` with the run's ``decode`` settings, the
same code path as ``python -m nmt.translate``, and are scored on detokenized text with sacreBLEU, so
a validation BLEU is what translating the file and scoring it would give. (In float32 exactly; in bf16,
on a GPU, a few sentences can come out otherwise when the batch size differs, since the rounding of
a matrix product depends on its shape.)
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn

from nmt.config import Config, ConfigError
from nmt.data.batching import Batch, BatchLoader, make_loader
from nmt.device import resolve_dtype
from nmt.evaluate import bleu_options, score
from nmt.translator import Translator

if TYPE_CHECKING:
    import datasets

    from nmt.data.corpus import PreparedData
    from nmt.runtime import EventLog

log = logging.getLogger(__name__)

BatchLoss = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]  # sums of loss and NLL of a batch


def perplexity(nll: float) -> float:
    """exp(NLL per token), capped at exp(50) so that an untrained model's value stays printable."""
    return math.exp(min(nll, 50.0))


class Validator:
    """Validates a model on ``data.valid``; ``batch_loss`` computes a batch's loss as training does.
    ``log_left_out``: whether to log the pairs left out of the loss (under DDP, rank 0 alone says it)."""

    def __init__(
        self,
        cfg: Config,
        data: PreparedData,
        device: torch.device,
        batch_loss: BatchLoss,
        writer: EventLog | None = None,
        log_left_out: bool = True,
    ):
        self.cfg, self.data, self.device = cfg, data, device
        self.batch_loss = batch_loss
        self.writer = writer
        # Checked now: a validation set none of fits is an error.
        self._fitting = self._pairs_that_fit(log_left_out)
        self._loader: BatchLoader | None = None  # built on first use: the same batches every time

    @torch.no_grad()
    def loss(self) -> tuple[float, float]:
        """Label-smoothed loss and NLL per target token on the validation set (teacher forcing)."""
        if self._loader is None:
            self._loader = make_loader(
                self._fitting,
                self.cfg.data.max_tokens,
                shuffle=False,
                pin_memory=self.device.type == "cuda",
            )
        sums: list[torch.Tensor] = []  # (loss, nll) of each batch, kept on the device
        tokens = 0
        for batch in self._loader:
            batch = batch.to(self.device, non_blocking=True)
            sums.append(torch.stack(self.batch_loss(batch)))
            tokens += batch.num_tgt_tokens
        pairs = torch.stack(sums).tolist() if sums else []  # one host sync; summed in float64 here
        loss = sum(pair[0] for pair in pairs)
        nll = sum(pair[1] for pair in pairs)
        return loss / max(tokens, 1), nll / max(tokens, 1)

    def _pairs_that_fit(self, log_left_out: bool) -> datasets.Dataset:
        """The validation pairs the model can read whole. Validation data is not length-filtered, and a
        pair longer than ``model.max_positions`` cannot be scored teacher-forced; it is left out of the
        loss (with a warning), while BLEU still covers it (its source truncated, as nmt.translate does)."""
        valid, limit = self.data.valid, self.cfg.model.max_positions
        table = valid.with_format("arrow")[:]
        src = pc.list_value_length(table["src_ids"]).to_numpy()  # pieces + EOS
        tgt = pc.list_value_length(table["tgt_ids"]).to_numpy() + 1  # BOS + pieces, pieces + EOS
        fits = np.flatnonzero((src <= limit) & (tgt <= limit))
        if len(fits) == len(valid):
            return valid
        if len(fits) == 0:
            raise ConfigError(
                f"none of the {len(valid):,} validation pairs fits model.max_positions={limit} (the shortest "
                f"takes {int(np.maximum(src, tgt).min())} positions); raise model.max_positions."
            )
        if log_left_out:
            log.warning(
                "validation loss leaves out %d of %d pairs longer than model.max_positions=%d",
                len(valid) - len(fits),
                len(valid),
                limit,
            )
        return valid.select(fits)

    def _decoding_copy(self, model: nn.Module) -> nn.Module:
        """The model as ``nmt.translate`` would decode a checkpoint of it: in the precision its
        ``--dtype auto`` picks for this device (bf16 weights on a GPU that has them, the model itself
        on the CPU), so that validation BLEU is what translating the file would give."""
        dtype = resolve_dtype("auto", self.device)
        if dtype == next(model.parameters()).dtype:
            return model
        return copy.deepcopy(model).to(dtype)

    def run(self, model: nn.Module, step: int) -> dict[str, float]:
        """Loss, perplexity, BLEU and chrF of ``model`` (which ``batch_loss`` runs), reported at ``step``."""
        model.eval()
        try:
            loss, nll = self.loss()
            translator = Translator(
                self._decoding_copy(model), self.data.tokenizer, self.cfg.decode, self.device
            )
            hyps = translator.translate(self.data.valid_src)
            scores = score(hyps, self.data.valid_ref, **bleu_options(self.cfg))
        finally:
            model.train()
        metrics = {"loss": loss, "ppl": perplexity(nll), "bleu": scores.bleu, "chrf": scores.chrf}
        samples = list(zip(self.data.valid_src, self.data.valid_ref, hyps))[: self.cfg.train.num_samples]
        for src, ref, hyp in samples:
            log.info("sample | src: %s\n         | ref: %s\n         | hyp: %s", src, ref, hyp)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"valid/{key}", value, step)
            text = "\n\n".join(f"**src** {s}  \n**ref** {r}  \n**hyp** {h}" for s, r, h in samples)
            self.writer.add_text("valid/samples", text, step)
            self.writer.flush()
        log.info(
            "validation at step %d | loss %.3f | ppl %.2f | BLEU %.2f | chrF %.2f | %s",
            step,
            loss,
            metrics["ppl"],
            scores.bleu,
            scores.chrf,
            scores.bleu_signature,
        )
        return metrics
