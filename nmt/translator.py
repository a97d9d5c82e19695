"""Sentences in, translations out: tokenization, length-sorted batching, search, detokenization.

The trainer validates with this class and ``nmt.translate`` uses it, so validation scores and
test scores come from the same decoding code. Guarantees:

* exactly one result per input sentence, in input order;
* an empty sentence (blank, or without a single piece once tokenized, such as a lone zero-width
  space) gives an empty translation without running the model;
* a source longer than the model can take (``max_src_len``, by default the model's
  ``max_positions``) is truncated, with a warning, rather than failing the whole batch.

On CPU several batches are decoded at once (``decode.workers``), each on its own thread with an equal
share of torch's threads: the matrices of one decoder step are too small for several threads to
share well, and whole batches on separate cores are not. Each batch's result does not depend on
the others, so the output is the same as one batch at a time with that many threads per batch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from nmt.checkpoint import CheckpointError, checkpoint_file, config_from_checkpoint, load_checkpoint
from nmt.config import Config, ConfigError, DecodeConfig
from nmt.data.tokenizer import EOS_ID, PAD_ID, Tokenizer
from nmt.device import avoid_per_shape_attention_kernels, resolve_device, resolve_dtype
from nmt.search import Hypothesis, beam_search, greedy_search

log = logging.getLogger(__name__)

# Workers that decode.workers=0 starts at most: past a few, the Python of each step (under the
# interpreter lock) and the memory of one batch per worker stop paying. Measured on 2 cores only.
AUTO_MAX_WORKERS = 8
_THREAD_SETTING = threading.RLock()  # held while a parallel section has lowered torch's threads


@dataclass
class Translation:
    text: str
    score: float  # length-normalised log-probability (see nmt.search); 0.0 for an empty input


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while decoding; the caller's training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class Translator:
    """Decodes with ``model`` and ``tokenizer`` as ``decode_cfg`` says.

    ``model`` must already be on ``device`` (default: where its parameters are). ``max_src_len``
    defaults to ``model.cfg.max_positions`` when the model has a config. The decoding settings are
    ``self.decode_cfg``: replace it (``dataclasses.replace(translator.decode_cfg, beam=...)``) to decode
    otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Tokenizer,
        decode_cfg: DecodeConfig,
        device: str | torch.device | None = None,
        max_src_len: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.decode_cfg = decode_cfg
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        avoid_per_shape_attention_kernels(self.device)  # beam search's key length grows every step
        model_cfg = getattr(model, "cfg", None)
        self.max_positions: int | None = getattr(model_cfg, "max_positions", None)
        self.max_src_len = max_src_len or self.max_positions
        # The checkpoint's config, when loaded from one (from_checkpoint).
        self.checkpoint_config: Config | None = None

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        dtype: str = "auto",
    ) -> Translator:
        """Everything comes from the checkpoint: configuration (decoding settings included),
        tokenizer, weights."""
        from nmt.model import Transformer  # the model is needed only here

        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        state = load_checkpoint(path, map_location="cpu")
        try:  # an nmt checkpoint, but damaged or edited: one sentence, not a traceback
            cfg = config_from_checkpoint(state)
            tokenizer = Tokenizer.from_state(state["tokenizer"])
            model = Transformer(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
            model.load_state_dict(state["model"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
            # load_state_dict's first line only says that there are errors; the next names one.
            first = 1 if len(lines) > 1 and lines[0].endswith(":") else 0
            what = f"no {e}" if isinstance(e, KeyError) else lines[first]
            what = what if len(what) <= 200 else what[:200] + "..."
            raise CheckpointError(
                f"{path} is damaged: its config, tokenizer and weights do not fit ({what})."
            ) from e
        model.to(device=device, dtype=torch_dtype).eval()
        log.info(
            "loaded %s: %s parameters, %s, on %s in %s",
            checkpoint_file(path),  # the file, where a run folder was named
            f"{model.num_parameters():,}",
            tokenizer.describe(),
            device,
            str(torch_dtype).replace("torch.", ""),
        )
        translator = cls(model, tokenizer, cfg.decode, device)
        translator.checkpoint_config = cfg
        return translator

    # ---- public API ----------------------------------------------------------------------------

    def translate(
        self,
        sentences: list[str],
        beam: int | None = None,
        progress: Callable[[int], None] | None = None,
        first_line: int = 1,
    ) -> list[str]:
        """The best translation of each sentence, in input order (:meth:`translate_nbest` gives
        several per sentence). ``progress(n)`` is called after each batch with the number of
        sentences it held. ``first_line`` is the line number of ``sentences[0]`` in the caller's
        input, for warnings.
        """
        beam = self.decode_cfg.beam if beam is None else beam
        results = self._translate(sentences, beam, 1, progress, first_line, need_scores=False)
        return [best[0].text for best in results]

    def translate_nbest(
        self,
        sentences: list[str],
        nbest: int,
        beam: int | None = None,
        progress: Callable[[int], None] | None = None,
        first_line: int = 1,
    ) -> list[list[Translation]]:
        """Up to ``nbest`` translations per sentence, best first (at least one; empty input: one "");
        ``beam`` is at least ``nbest`` (by default the larger of the two and the configured beam)."""
        beam = max(self.decode_cfg.beam, nbest) if beam is None else beam
        return self._translate(sentences, beam, nbest, progress, first_line, need_scores=True)

    # ---- steps ---------------------------------------------------------------------------------

    def _translate(
        self,
        sentences: list[str],
        beam: int,
        nbest: int,
        progress: Callable[[int], None] | None,
        first_line: int,
        need_scores: bool,
    ) -> list[list[Translation]]:
        if isinstance(sentences, str):
            raise TypeError("pass a list of sentences, not one string (it would be read letter by letter).")
        cfg = replace(self.decode_cfg, beam=beam)  # a bad beam fails here, before any work
        if not 1 <= nbest <= beam:
            raise ConfigError(f"nbest={nbest} must be in [1, beam={beam}].")
        results = [[Translation("", 0.0)] for _ in sentences]
        source = self.encode(sentences, first_line)
        batches = self.batches({i: len(ids) for i, ids in source.items()})

        def search(batch: list[int]) -> list[list[Hypothesis]]:
            return self._search(*self.collate([source[i] for i in batch]), cfg, nbest, need_scores)

        with _eval_mode(self.model), self.batch_map(len(batches)) as map_batches:
            for batch, hyps in zip(batches, map_batches(search, batches), strict=True):
                for i, texts in zip(batch, self._detokenize(hyps), strict=True):
                    results[i] = texts
                if progress is not None:
                    progress(len(batch))
        if progress is not None and len(source) < len(sentences):
            progress(len(sentences) - len(source))  # the empty ones
        return results

    def encode(self, sentences: list[str], first_line: int = 1) -> dict[int, list[int]]:
        """Source ids of the sentences that have any, by input position; over-long ones truncated.

        A sentence that is blank, or that the tokenizer turns into no pieces at all (a lone
        zero-width space or control character), is left out: it gets an empty translation, as it
        would be dropped from training data, instead of whatever the model makes of EOS alone.
        """
        positions = [i for i, s in enumerate(sentences) if s.strip()]
        encoded = self.tokenizer.encode_src([sentences[i] for i in positions]) if positions else []
        source = {i: ids for i, ids in zip(positions, encoded, strict=True) if ids != [EOS_ID]}
        limit = self.max_src_len
        for i, ids in source.items():
            if limit is not None and len(ids) > limit:
                log.warning(
                    "source line %d has %d tokens, more than the %d the model takes; "
                    "translating only its beginning: %.60r...",
                    first_line + i,
                    len(ids),
                    limit,
                    sentences[i],
                )
                source[i] = ids[: limit - 1] + [EOS_ID]
        return source

    def batches(self, lengths: dict[int, int]) -> list[list[int]]:
        """Sentence positions grouped into batches of similar length.

        Longest first, so that a batch that does not fit in memory fails at once. A batch holds at
        most ``batch_size`` sentences and ``max_tokens`` padded source tokens (always at least one).
        """
        order = sorted(lengths, key=lambda i: lengths[i], reverse=True)
        batches: list[list[int]] = []
        for i in order:
            # Sorted longest first: the first sentence of a batch sets its padded width.
            if batches and self._fits(len(batches[-1]) + 1, lengths[batches[-1][0]]):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    def workers(self, n_batches: int) -> int:
        """How many of ``n_batches`` batches are decoded at once: ``decode.workers`` on CPU (0: one
        per torch thread, at most :data:`AUTO_MAX_WORKERS`), never more than the threads or the
        batches. Always 1 on other devices, for a compiled model, and inside a CPU autocast region
        (worker threads would not inherit it)."""
        if (
            self.device.type != "cpu"
            or hasattr(self.model, "_orig_mod")  # torch.compile's wrapper: not known to be thread-safe
            or torch.is_autocast_enabled("cpu")
        ):
            return 1
        threads = torch.get_num_threads()
        wanted = self.decode_cfg.workers or min(threads, AUTO_MAX_WORKERS)
        return max(1, min(wanted, threads, n_batches))

    @contextmanager
    def batch_map(self, n_batches: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
        """A ``map`` for ``n_batches`` batches: the built-in one, or a pool of :meth:`workers` threads
        that share torch's threads while it is open. Results come in input order either way."""
        workers = self.workers(n_batches)
        if workers == 1:
            yield map
            return
        # torch's thread count is process-wide: one parallel section at a time may change it.
        with _THREAD_SETTING:
            threads = torch.get_num_threads()
            torch.set_num_threads(threads // workers)
            try:
                pool = ThreadPoolExecutor(workers, thread_name_prefix="nmt-decode")
                try:
                    yield pool.map
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)  # on an error, queued batches never start
            finally:
                torch.set_num_threads(threads)

    def _fits(self, size: int, width: int) -> bool:
        return size <= self.decode_cfg.batch_size and size * width <= self.decode_cfg.max_tokens

    def collate(self, source: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded (B, S) ids and their mask (True = real token), on the model's device."""
        src = torch.full((len(source), max(map(len, source))), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(source):
            src[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        src = src.to(self.device)
        return src, src != PAD_ID

    def _search(
        self, src: torch.Tensor, src_mask: torch.Tensor, cfg: DecodeConfig, nbest: int, need_scores: bool
    ) -> list[list[Hypothesis]]:
        # Outputs are also capped by the model's positions, as the searches do by default.
        lengths = dict(max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b, min_len=cfg.min_len)
        if cfg.beam == 1 and not need_scores:  # beam search's result with less bookkeeping, but no scores
            return [
                [Hypothesis(tokens, 0.0, 0.0)]
                for tokens in greedy_search(self.model, src, src_mask, **lengths)
            ]
        return beam_search(
            self.model, src, src_mask, beam=cfg.beam, len_penalty=cfg.len_penalty, nbest=nbest, **lengths
        )

    def _detokenize(self, hyps: list[list[Hypothesis]]) -> list[list[Translation]]:
        texts = iter(self.tokenizer.decode_tgt([h.tokens for sentence in hyps for h in sentence]))
        return [[Translation(next(texts), h.score) for h in sentence] for sentence in hyps]
