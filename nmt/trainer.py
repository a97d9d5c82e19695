"""Training: train step, checkpoint contents, exact resume, stopping rules.

Validation is :mod:`nmt.validation`; the checkpoint files of a run (latest, step_N, best) are written
by :func:`nmt.checkpoint.save_run_checkpoint`.

Everything the run needs to continue exactly (weights, optimizer, scheduler, scaler, step, sampler
position, RNG states) is in each checkpoint, so stopping at any step and resuming gives, on CPU, the
same losses bit for bit as a run that never stopped.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from nmt.checkpoint import (
    RUN_FILE,
    CheckpointError,
    load_checkpoint,
    restore_best_link,
    run_checkpoint,
    save_run_checkpoint,
)
from nmt.config import Config, first_line
from nmt.data.batching import Batch, make_loader
from nmt.data.tokenizer import PAD_ID
from nmt.device import avoid_per_shape_attention_kernels, resolve_device, resolve_dtype
from nmt.distributed import (
    DistInfo,
    all_gather_state,
    all_reduce_sum,
    any_flags,
    broadcast_flag,
    raise_main_rank_failure,
)
from nmt.loss import ProjectedLoss, label_smoothed_nll
from nmt.model import Transformer
from nmt.optim import build_optimizer, build_scheduler, is_fused, lr_multiplier
from nmt.resume import changed_settings_warnings, data_change_warning, resume_refusal, world_size_warning
from nmt.runtime import (
    EventLog,
    Progress,
    compile_loss,
    compile_model,
    install_signal_handlers,
    restore_signal_handlers,
    rng_state,
    seed_everything,
    seed_from,
    set_rng_state,
)
from nmt.validation import Validator, perplexity

if TYPE_CHECKING:
    from nmt.data.corpus import PreparedData

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted by a signal"  # the stop reason when a signal (on any rank) ends the run


class TrainingError(RuntimeError):
    """Training cannot go on (repeated NaN losses, a checkpoint that does not fit the config, ...)."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    best_score: float | None = None
    best_step: int = 0
    bad_validations: int = 0  # validations in a row without improvement (early stopping)
    # The best score of the validations every valid_every steps, which alone count for patience: a run
    # stopped off that schedule (time limit) and resumed compares as one that never stopped.
    schedule_best: float | None = None
    elapsed_sec: float = 0.0  # training wall-clock time, summed over resumed runs
    losses: list[float] = field(default_factory=list)  # per-step training loss of this process's data


@dataclass
class TrainResult:
    state: TrainState
    stop_reason: str
    best_checkpoint: Path | None
    last_valid: dict[str, float]
    # The signal that stopped the run (SIGTERM where another rank received it), else None.
    signal: int | None = None


@dataclass
class _Backward:
    """A step whose gradients are computed (or queued): the sums over its target tokens."""

    loss: torch.Tensor
    nll: torch.Tensor
    local_tokens: float
    global_tokens: torch.Tensor | None  # DDP: over all ranks


class _HostCopy:
    """A small device tensor copied to the host without waiting: on CUDA into pinned memory, with an
    event to wait for that copy alone; elsewhere the tensor itself, whose values are already there."""

    def __init__(self, values: torch.Tensor) -> None:
        self.event: Any = None
        if values.device.type == "cuda":
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(values.device))  # the copy's stream
        else:
            self.host = values

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class _Step:
    """An update applied (or skipped) on the device, whose numbers the host has not read yet."""

    # loss sum, NLL sum, gradient norm, skipped (1/0)[, DDP: global tokens, any rank signalled, out of time]
    readings: _HostCopy
    local_tokens: float
    lr: float


def uses_projected_loss(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether training computes the loss with :class:`nmt.loss.ProjectedLoss` rather than on logits.

    Yes on CPU in fp32: slice by slice, without (B, T, V) logits (docs/performance.md has the
    figures). Elsewhere the logits path keeps the output projection under autocast. (``train.compile``
    compiles the layers, and the loss only on the logits path, so it does not change this.)
    """
    return device.type == "cpu" and dtype == torch.float32


def _check_settings(cfg: Config, tgt_vocab: int, is_main: bool) -> None:
    """Refuse settings that would fail only later in the run; warn (rank 0) about likely slips."""
    if cfg.decode.beam >= tgt_vocab:  # validation would fail only once it is reached
        raise TrainingError(
            f"decode.beam={cfg.decode.beam} needs more than {cfg.decode.beam} target tokens and the "
            f"tokenizer has {tgt_vocab}; lower decode.beam."
        )
    if not is_main:
        return
    if cfg.train.lr > 0.01:  # allowed, (0, 1), but a likely slip of a digit
        log.warning(
            "train.lr=%g is far above the 1e-4 to 2e-3 that AdamW trains Transformers with; the loss may not go "
            "down",
            cfg.train.lr,
        )
    if cfg.train.warmup_steps > cfg.train.max_steps:
        log.warning(
            "train.warmup_steps=%d > train.max_steps=%d: the learning rate never reaches train.lr=%g",
            cfg.train.warmup_steps,
            cfg.train.max_steps,
            cfg.train.lr,
        )


def _model_too_big(cfg: Config, tok: Any, error: BaseException) -> str:
    m = cfg.model
    with torch.device("meta"):  # shapes only: counting needs no memory
        params = Transformer(m, tok.src_vocab_size, tok.tgt_vocab_size, pad_id=PAD_ID).num_parameters()
    return (
        f"the model does not fit in memory: about {params / 1e6:,.0f}M parameters ({4 * params / 2**30:,.1f} GiB "
        f"in float32, before gradients and optimizer state) with model.d_model={m.d_model}, "
        f"model.ffn_dim={m.ffn_dim}, model.enc_layers={m.enc_layers}, model.dec_layers={m.dec_layers} "
        f"({type(error).__name__}); choose a smaller model."
    )


class Trainer:
    """Owns the model, optimizer and data stream of one run; ``train()`` runs until a stop rule fires."""

    def __init__(
        self,
        cfg: Config,
        data: PreparedData,
        run_dir: Path,
        dist: DistInfo | None = None,
        writer: EventLog | None = None,
    ):
        cfg.check_for_training()
        self.cfg, self.data, self.run_dir = cfg, data, Path(run_dir)
        self.dist = dist or DistInfo()
        self.writer = writer if self.dist.is_main else None
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device, self.dtype = self._device_and_dtype()
        self.projected_loss = uses_projected_loss(self.device, self.dtype)
        _check_settings(cfg, data.tokenizer.tgt_vocab_size, self.dist.is_main)
        seed_everything(cfg.train.seed)
        self.raw_model = self._build_model()
        # What a training step calls: the model (logits), or the loss around it; compiled, under DDP.
        self.loss_model: nn.Module = ProjectedLoss(self.raw_model) if self.projected_loss else self.raw_model
        self.model: nn.Module = self.loss_model
        avoid_per_shape_attention_kernels(self.device)
        self.train_loss = label_smoothed_nll  # of the training step; validation runs the eager one
        if cfg.train.compile:
            self.model = compile_model(self.model)
            if not self.projected_loss:
                self.train_loss = compile_loss()
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if self.dist.rank > 0:
            # The weights above are the same on every rank; dropout must not be: each rank its own stream.
            seed_everything(seed_from(cfg.train.seed, self.dist.rank))
        self.optimizer = build_optimizer(self.raw_model, cfg.train)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.state = TrainState()

        self.loader = make_loader(
            data.train,
            cfg.data.max_tokens,
            shuffle=True,
            seed=cfg.train.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            pin_memory=self.device.type == "cuda",
        )
        self.sampler = self.loader.sampler
        # Validation runs the plain model, with the eager loss: nothing compiled.
        self.validator = Validator(
            cfg, data, self.device, lambda b: self._loss(self.loss_model, b), self.writer, self.dist.is_main
        )
        self._stop_signal: int | None = None
        self._bad_steps = 0
        self._agreed_stop: tuple[bool, bool] | None = None  # DDP: stop flags, as of the last step read
        # The step the run's checkpoint (latest.pt, see run_checkpoint) holds, once this run wrote or resumed it.
        self._saved_step: int | None = None

    def log_to(self, writer: EventLog | None) -> None:
        """Send TensorBoard scalars and validation reports to ``writer`` (rank 0 only) from now on."""
        self.writer = self.validator.writer = writer if self.dist.is_main else None

    def _device_and_dtype(self) -> tuple[torch.device, torch.dtype]:
        """train.device and train.precision resolved; under DDP on GPUs, this rank's GPU."""
        try:
            device = resolve_device(self.cfg.train.device, "train.device")
            if device.type == "cuda" and self.dist.enabled:
                device = torch.device("cuda", self.dist.local_rank)
            return device, resolve_dtype(self.cfg.train.precision, device, "train.precision", torch.float16)
        except ValueError as e:
            raise TrainingError(str(e)) from None

    def _build_model(self) -> Transformer:
        """The model on the training device; one that does not fit in memory is one sentence."""
        tok = self.data.tokenizer
        try:
            return Transformer(self.cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, pad_id=PAD_ID).to(
                self.device
            )
        except (MemoryError, RuntimeError) as e:  # the CPU allocator's, or torch.OutOfMemoryError
            out_of_memory = not isinstance(e, RuntimeError) or isinstance(e, torch.OutOfMemoryError)
            if not (out_of_memory or "can't allocate memory" in str(e)):
                raise
            raise TrainingError(_model_too_big(self.cfg, tok, e)) from None

    # ------------------------------------------------------------------ data
    def _batch_stream(self) -> Iterator[Batch]:
        """Training batches forever, epoch after epoch; the sampler tracks the position for resume.

        Batches come from :class:`BatchLoader`: ``PackedPairs.collate`` pads a batch with a few numpy
        operations on the Arrow buffers (~0.2 ms for 200 sentences), where ``collate()`` over the
        dataset's rows pays an Arrow lookup per row (~60 ms).
        """
        if self.dist.is_main:
            log.info(
                "padding efficiency of this epoch's batches: %.1f%%", 100 * self.loader.padding_efficiency()
            )
        while True:
            for batch in self.loader:
                yield batch.to(self.device, non_blocking=True)
            self.state.epoch += 1
            self.loader.set_epoch(self.state.epoch)

    # ------------------------------------------------------------------ one step
    def _autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _loss(
        self, model: nn.Module, batch: Batch, loss_fn: Callable = label_smoothed_nll
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sums of label-smoothed loss and NLL over the batch's target tokens; ``model``: what
        ``self.model`` or ``self.loss_model`` is, the model or :class:`ProjectedLoss` around it."""
        smoothing = self.cfg.train.label_smoothing
        if self.projected_loss:
            return model(batch.src, batch.tgt_in, batch.tgt_out, smoothing)
        with self._autocast():
            logits = model(batch.src, batch.tgt_in)  # (B, T, V)
        return loss_fn(logits, batch.tgt_out, smoothing, PAD_ID)

    def _micro_step(
        self, batch: Batch, loss_scale: float | torch.Tensor, sync: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        no_sync = getattr(self.model, "no_sync", None)
        ctx = no_sync() if (no_sync is not None and not sync) else nullcontext()
        with ctx:
            loss_sum, nll_sum = self._loss(self.model, batch, self.train_loss)
            self.scaler.scale(loss_sum * loss_scale).backward()
        return loss_sum.detach(), nll_sum.detach()

    def train_step(self, batches: list[Batch]) -> dict[str, float] | None:
        """One optimizer step over ``accum_steps`` micro-batches, read back at once. Returns None if the
        step was skipped (a NaN/Inf loss or gradient).

        The loss is normalised by the number of target tokens in the whole step (all micro-batches,
        all ranks), so accumulating two half batches gives the same update as one full batch. DDP
        averages gradients over ranks, hence the factor world_size.

        :meth:`train` runs the same three parts, but reads each step's numbers only once the next
        step's forward and backward passes are queued, so that the device never waits for the host.
        """
        return self._read(self._update(self._backward(batches)))

    def _backward(self, batches: list[Batch]) -> _Backward:
        """Forward and backward passes of every micro-batch; nothing is read from the device."""
        local_tokens = float(sum(b.num_tgt_tokens for b in batches))  # counted at collate time: no sync
        global_tokens: torch.Tensor | None = None
        scale: float | torch.Tensor
        if self.dist.enabled:
            # torch.full, not torch.tensor: a copy from the host would wait for the device's queue.
            global_tokens = all_reduce_sum(torch.full((), local_tokens, device=self.device), self.dist)
            scale = self.dist.world_size / global_tokens.clamp(min=1.0)
        else:
            # 1 / tokens rounded to float32 as the device would; no host-to-device copy.
            scale = float(np.float32(1.0) / np.float32(max(local_tokens, 1.0)))
        loss = torch.zeros((), device=self.device)
        nll = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            loss_i, nll_i = self._micro_step(batch, scale, sync=i == len(batches) - 1)
            loss, nll = loss + loss_i, nll + nll_i
        return _Backward(loss, nll, local_tokens, global_tokens)

    def _update(self, work: _Backward, stop_flags: tuple[bool, bool] = (False, False)) -> _Step:
        """Clip, then apply the update unless the step is bad, decided on the device.

        A step is skipped when its loss is not finite on some rank (every rank then skips it, or their
        steps would count part of the batch), or its gradient is not: in fp16 the gradient scaler's
        overflows are expected, so there the update is skipped but the step counts, as ``GradScaler``
        does. The fused AdamW kernel takes the skip flag as ``found_inf``; an optimizer without one
        makes the host read the flag first. The learning rate is the schedule's at this moment: the
        previous step must have been read (:meth:`_read`) before this one is updated.

        Under DDP this rank's ``stop_flags`` (a signal received, the time limit reached) travel in the
        all-reduce of the bad-loss flag, and every rank reads the sums with the step: see
        :meth:`_should_stop`.
        """
        bad = (~torch.isfinite(work.loss)).float()
        agreed: list[torch.Tensor] = []
        if self.dist.enabled:
            flags = torch.stack([bad, *(torch.full((), float(f), device=self.device) for f in stop_flags)])
            bad, *agreed = (all_reduce_sum(flags, self.dist) > 0).float().unbind()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.raw_model.parameters() if p.grad is not None]
        if self.cfg.train.clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.clip_norm)
        else:  # the norm only, for the log: clipping at infinity would rescale every gradient by 1
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        overflow = (~torch.isfinite(grad_norm)).float()
        if not self.scaler.is_enabled():
            bad = torch.maximum(bad, overflow)
        skip_update = torch.maximum(bad, overflow)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this update uses
        if is_fused(self.optimizer):
            self.optimizer.grad_scale, self.optimizer.found_inf = None, skip_update
            try:
                self.optimizer.step()
            finally:  # as GradScaler.step does: no later step() may find a stale flag
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif not skip_update.item():  # no fused kernel for this device: the host decides
            self.optimizer.step()
        if self.scaler.is_enabled():
            self.scaler.update()  # from the overflow unscale_ found: back off, or grow the scale
        self.optimizer.zero_grad(set_to_none=True)
        readings = [work.loss, work.nll, grad_norm.to(work.loss.dtype), bad]
        if work.global_tokens is not None:
            readings += [work.global_tokens, *agreed]
        return _Step(_HostCopy(torch.stack(readings)), work.local_tokens, lr)

    def _read(self, step: _Step) -> dict[str, float] | None:
        """Wait for ``step`` (only: later work stays queued), then account for it: the schedule moves
        on, or the step counts as skipped. Returns its statistics, or None if it was skipped."""
        values = step.readings.values()
        loss_sum, nll_sum, norm, bad = values[:4]
        global_tokens = values[4] if len(values) > 4 else step.local_tokens
        if len(values) > 4:  # DDP: whether any rank was signalled or out of time when it took this step
            self._agreed_stop = (values[5] > 0, values[6] > 0)
        loss_value = loss_sum / max(step.local_tokens, 1.0)
        if bad:
            return self._skip_step(loss_value)
        self.scheduler.step()
        self._bad_steps = 0
        return {
            "loss": loss_value,
            "nll": nll_sum / max(step.local_tokens, 1.0),
            "lr": step.lr,
            "grad_norm": norm,
            "tokens": global_tokens,
        }

    def _skip_step(self, loss_value: float) -> None:
        self._bad_steps += 1
        log.warning(
            "non-finite loss or gradient at step %d (loss %s): step skipped (%d in a row)",
            self.state.step + 1,
            loss_value,
            self._bad_steps,
        )
        if self._bad_steps >= self.cfg.train.max_bad_steps:
            kept = self._kept_checkpoint(
                "continue from there with train.resume=true",
                f"no checkpoint of this run was written (the first is saved at step {self.cfg.train.valid_every})",
            )
            raise TrainingError(
                f"{self._bad_steps} steps in a row had a NaN/Inf loss or gradient; stopping. "
                "Lower train.lr, raise train.warmup_steps, or use train.precision=bf16/fp32 instead of fp16; "
                f"{kept}."
            )
        return None

    # ------------------------------------------------------------------ validation
    def validate(self) -> dict[str, float]:
        """Loss, perplexity, BLEU and chrF on the validation set, decoded like ``nmt.translate`` does."""
        return self.validator.run(self.raw_model, self.state.step)

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best if self.cfg.train.best_metric == "loss" else value > best

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, rng_states: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """The checkpoint's contents; ``rng_states``: every rank's RNG state, in rank order (DDP)."""
        train_state = asdict(self.state)
        rng_states = rng_states or [rng_state()]
        return {
            "config": self.cfg.to_dict(),
            "tokenizer": self.data.tokenizer.state_dict(),
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": train_state,
            "sampler": self.loader.state_dict(),
            "rng": rng_states[0],  # rank 0's; what checkpoints without rng_per_rank resume from
            # Each rank draws its own dropout masks, so each resumes from its own RNG state.
            "rng_per_rank": rng_states,
            "world_size": self.dist.world_size,
            "encoded_data": dict(self.data.split_keys),  # what it was trained and validated on
        }

    def save(self, best: bool) -> Path | None:
        """Write latest.pt atomically, linked as step_N.pt (keep_last) and as best.pt if it is the best.

        Under DDP call it on every rank: each contributes its RNG state; only rank 0 writes.
        """
        rng_states = all_gather_state(rng_state(), self.dist)
        if not self.dist.is_main:
            return None
        state = self.checkpoint_state(rng_states)
        try:
            latest = save_run_checkpoint(
                state, self.ckpt_dir, self.state.step, self.cfg.train.keep_last, best
            )
        except CheckpointError as e:
            remedy = "make room" if e.no_space else "fix that"
            kept = self._kept_checkpoint(
                f"{remedy} and continue from there with train.resume=true",
                f"No checkpoint of this run was written; {remedy} and start it again",
            )
            raise TrainingError(f"step {self.state.step} was not saved: {e}. {kept}.") from e
        self._saved_step = self.state.step
        log.info("saved checkpoint %s%s", latest, " (best)" if best else "")
        return latest

    def _kept_checkpoint(self, go_on: str, none: str) -> str:
        """What a run that stops on an error keeps: the checkpoint train.resume=true would take now (a
        save that failed midway may have linked its step_N.pt before latest.pt) and its step."""
        held = run_checkpoint(self.ckpt_dir)
        if held is None:
            return none
        numbered = RUN_FILE.fullmatch(held.name)
        step = int(numbered[1]) if numbered and numbered[1] else self._saved_step
        return f"{held} holds {'its last checkpoint' if step is None else f'step {step}'}; {go_on}"

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from a training checkpoint: weights, optimizer, scheduler, scaler, data order, RNG.

        Exactly, with the same world size and settings; otherwise with a warning of what changed.
        """
        # Read onto the CPU: RNG states must stay there (numpy, torch.set_rng_state), and the model,
        # optimizer and scaler copy their tensors to the training device as they load them.
        state = load_checkpoint(path)
        if "optimizer" not in state:
            raise TrainingError(f"{path} holds weights only (e.g. an average); it cannot be resumed from.")
        refused = resume_refusal(self.cfg, state["config"], path)
        if refused:
            raise TrainingError(refused)
        try:
            self.raw_model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise TrainingError(
                f"{path} does not fit this model config ({first_line(e)}); resume with the run's own config."
            ) from None
        for group in state["optimizer"]["param_groups"]:  # this run's implementation, not the saved one
            group.update(fused=self.optimizer.defaults["fused"], foreach=self.optimizer.defaults["foreach"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optimizer_settings(state["config"].get("train", {}))
        # Empty when saved without fp16: a run that switches to fp16 starts its loss scale anew.
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.state = TrainState(**state["train_state"])
        if "schedule_best" not in state["train_state"]:  # a checkpoint from before the field existed
            self.state.schedule_best = self.state.best_score
        # (The sampler states of older checkpoints do not record the world size: the checkpoint does.)
        order_changed = self.loader.load_state_dict(
            {"world_size": state.get("world_size", 1), **state["sampler"]}
        )
        moved = world_size_warning(
            state, self.cfg, self.dist.world_size, self.state.step, self.state.epoch, path, not order_changed
        )
        data_changed = data_change_warning(state.get("encoded_data"), self.data.split_keys, path)
        for warning in (moved, order_changed and f"{path}: {order_changed}", data_changed):
            if warning and self.dist.is_main:
                log.warning("%s", warning)
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        if self.dist.rank < len(per_rank):
            set_rng_state(per_rank[self.dist.rank])
        else:  # a rank the saved run did not have: a stream of its own, as every rank has
            seed_everything(seed_from(self.cfg.train.seed, self.dist.rank, self.state.step))
        held = run_checkpoint(self.ckpt_dir)
        if held is not None and os.path.samefile(path, held):  # (by any of its names)
            self._saved_step = self.state.step  # what this run's checkpoint holds
        if self.dist.is_main and self.state.best_score is not None:
            best = restore_best_link(self.ckpt_dir, Path(path), self.state.step, self.state.best_step)
            if best is not None:
                log.warning(
                    "%s was missing: linked it again to step %d's checkpoint", best, self.state.best_step
                )
        log.info("resumed from %s at step %d (epoch %d)", path, self.state.step, self.state.epoch)

    def weight_checksum(self) -> float:
        """A float64 sum of every weight, in a fixed order: equal weights give equal sums."""
        return float(sum(p.detach().double().sum() for p in self.raw_model.parameters()))

    def _apply_optimizer_settings(self, saved: dict[str, Any]) -> None:
        """Give the restored optimizer and schedule this config's lr, betas, eps and weight decay, and
        warn about every changed setting of :data:`nmt.resume.TRAJECTORY_SETTINGS`.

        Loading their state brings back the values the checkpoint was trained with; a run resumed with
        train.lr=... would otherwise go on with the old ones while its config.yaml says otherwise.
        With an unchanged config this sets the values the state already holds.
        """
        t = self.cfg.train
        for warning in changed_settings_warnings(saved, t):
            log.warning("%s", warning)
        decay, no_decay = self.optimizer.param_groups  # as build_optimizer makes them
        # What LambdaLR would have set, had it been built with this config.
        lr = t.lr * lr_multiplier(self.scheduler.last_epoch, t)
        for group in (decay, no_decay):
            group.update(initial_lr=t.lr, lr=lr, betas=tuple(t.betas), eps=t.adam_eps)
        decay["weight_decay"] = t.weight_decay
        self.scheduler.base_lrs = [t.lr] * len(self.optimizer.param_groups)

    # ------------------------------------------------------------------ loop
    def _handle_signal(self, signum: int, frame: Any) -> None:
        """Stop after the current step (or validation) and save. A second Ctrl-C stops at once, without
        saving: the last checkpoint is kept. A repeated SIGTERM changes nothing (schedulers send
        SIGKILL when they stop waiting)."""
        if self._stop_signal is not None and signum == signal.SIGINT:
            log.warning(
                "second SIGINT: stopping now without saving; earlier checkpoints, if any, are in %s",
                self.ckpt_dir,
            )
            raise KeyboardInterrupt
        log.warning(
            "received %s: finishing the current step, saving a checkpoint, then exiting%s",
            signal.Signals(signum).name,
            " (Ctrl-C again: stop at once, without saving)" if signum == signal.SIGINT else "",
        )
        self._stop_signal = signum

    def _due(self, step: int) -> bool:
        """Whether something follows optimizer step ``step``: a log line, a validation, the end. Such a
        step is read at once; any other is read during the next one."""
        t = self.cfg.train
        return step % t.log_every == 0 or step % t.valid_every == 0 or step >= t.max_steps

    def _stop_flags(self, start_time: float, start_elapsed: float) -> tuple[bool, bool]:
        """This rank's own view: a signal received, the time limit reached (by its own clock)."""
        t = self.cfg.train
        elapsed = start_elapsed + time.monotonic() - start_time
        return self._stop_signal is not None, bool(t.max_time_min) and elapsed >= t.max_time_min * 60

    def _should_stop(self, start_time: float, start_elapsed: float) -> str | None:
        """Why training stops now, or None. Every rank gets the same answer: steps and epochs are the
        same on all of them, and a signal or the time limit on any one rank stops them all (each rank
        reads its own clock; deciding alone, one would wait in a collective the others never reach).

        Under DDP the ranks agree through the flags each sent with its last step read (:meth:`_update`),
        so a stop comes a step or two after the signal, without a collective and a wait of its own;
        before the first step, through one all-reduce.
        """
        t = self.cfg.train
        if self.dist.enabled and self._agreed_stop is not None:
            signalled, time_up = self._agreed_stop
        else:
            signalled, time_up = any_flags(
                list(self._stop_flags(start_time, start_elapsed)), self.dist, self.device
            )
        if signalled:
            return INTERRUPTED
        if self.state.step >= t.max_steps:
            return f"reached train.max_steps={t.max_steps}"
        if self._patience_out():  # a run that early stopping ended, resumed with the same patience
            return self._patience_reason()
        if t.max_epochs and self._epochs_done() >= t.max_epochs:
            return f"reached train.max_epochs={t.max_epochs}"
        if time_up:
            return f"reached train.max_time_min={t.max_time_min}"
        return None

    def _patience_out(self) -> bool:
        t = self.cfg.train
        return bool(t.patience) and self.state.bad_validations >= t.patience

    def _patience_reason(self) -> str:
        return f"no improvement in {self.cfg.train.patience} validations (train.patience)"

    def _epochs_done(self) -> int:
        """Epochs whose every batch has been taken (the stream moves to the next epoch only when asked)."""
        return self.state.epoch + int(self.loader.sampler.position >= len(self.loader))

    def _validate_and_save(self) -> tuple[dict[str, float], bool]:
        """Validate on rank 0, save, and tell every rank whether patience ran out.

        Only validations every ``valid_every`` steps count toward ``train.patience``, and they are
        compared with each other only (``TrainState.schedule_best``): the one at the end of a run that
        stops elsewhere (time limit, max_steps) may update best.pt, but a run continued from there keeps
        the patience count an uninterrupted run would have. If validation fails, the
        training state is saved before the error propagates.
        """
        t = self.cfg.train
        on_schedule = self.state.step % t.valid_every == 0
        metrics: dict[str, float] = {}
        stop = best = False
        error: Exception | None = None
        if self.dist.is_main:
            try:
                metrics = self.validate()
            except Exception as e:
                log.error(
                    "validation failed at step %d; saving the training state before stopping", self.state.step
                )
                error = e
            else:
                value = metrics[t.best_metric]
                best = self._better(value, self.state.best_score)
                if best:
                    self.state.best_score = value
                    self.state.best_step = self.state.step
                if on_schedule:
                    improved = self._better(value, self.state.schedule_best)
                    if improved:
                        self.state.schedule_best = value
                    self.state.bad_validations = 0 if improved else self.state.bad_validations + 1
                stop = self._patience_out()
        self._save_on_every_rank(best, error)
        return metrics, broadcast_flag(stop, self.dist, self.device)

    def _save_on_every_rank(self, best: bool, error: Exception | None = None) -> None:
        """:meth:`save` on every rank (each contributes its RNG state), then a barrier at which the other
        ranks learn whether rank 0 failed: ``error`` (its validation's) or its save's. If so, every rank
        stops with rank 0's reason, instead of the others meeting a closed connection later."""
        try:
            self.save(best=best)
        except Exception as e:  # rank 0: the checkpoint could not be written; the others still hear why
            if error is not None:
                log.error("%s", e)
            error = error or e
        raise_main_rank_failure(error, self.dist, TrainingError)

    def train(self) -> TrainResult:
        t = self.cfg.train
        progress = Progress(t.max_steps, self.state.step, self.dist.is_main, t.log_every)
        handlers = install_signal_handlers(self._handle_signal)
        try:
            return self._train_loop(progress)
        finally:
            restore_signal_handlers(handlers)
            progress.close()  # (again) after an error: the bar ends and log lines go back

    def _train_loop(self, progress: Progress) -> TrainResult:
        t = self.cfg.train
        self.model.train()
        stream = self._batch_stream()
        start, start_elapsed = time.monotonic(), self.state.elapsed_sec
        metrics: dict[str, float] = {}
        window_tokens, window_start = 0.0, time.monotonic()
        pending: _Step | None = None  # updated on the device, not read yet

        def count(stats: dict[str, float] | None) -> None:
            nonlocal window_tokens
            if stats is not None:
                self.state.step += 1
                self.state.losses.append(stats["loss"])
                window_tokens += stats["tokens"]
                progress.advance(self.state.step)

        reason = self._should_stop(start, start_elapsed)
        while reason is None:
            work = self._backward([next(stream) for _ in range(t.accum_steps)])
            if pending is not None:  # the host waits for it while the device runs the passes above
                count(self._read(pending))
                pending = None
            step = self._update(work, self._stop_flags(start, start_elapsed))
            self.state.elapsed_sec = start_elapsed + time.monotonic() - start
            if not self._due(self.state.step + 1):
                pending = step  # read once the next step's passes are queued
            elif (stats := self._read(step)) is not None:
                count(stats)
                if self.state.step % t.log_every == 0 or self.state.step == t.max_steps:
                    now = time.monotonic()
                    stats["tokens_per_sec"] = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0.0, now
                    self._log_train(stats)
                    progress.update(self.state.step, stats)
                if self.state.step % t.valid_every == 0:
                    metrics, patience_out = self._validate_and_save()
                    window_start = time.monotonic()  # validation time is not training throughput
                    if patience_out:
                        reason = self._patience_reason()
                        break
            reason = self._should_stop(start, start_elapsed)
            if reason is not None and pending is not None:
                count(self._read(pending))
                pending = None
        progress.close()
        if self.state.step % t.valid_every != 0 and reason != INTERRUPTED:
            metrics, _ = self._validate_and_save()
        elif self.state.step % t.valid_every != 0:
            self._save_on_every_rank(best=False)  # interrupted: keep the exact position, validate later
        log.info("training stopped at step %d: %s", self.state.step, reason)
        best = self.ckpt_dir / "best.pt"
        stopped_by = (self._stop_signal or signal.SIGTERM) if reason == INTERRUPTED else None
        return TrainResult(self.state, reason, best if best.exists() else None, metrics, stopped_by)

    def _log_train(self, stats: dict[str, float]) -> None:
        if self.writer is None:
            return
        step = self.state.step
        self.writer.add_scalar("train/loss", stats["loss"], step)
        self.writer.add_scalar("train/ppl", perplexity(stats["nll"]), step)
        self.writer.add_scalar("train/lr", stats["lr"], step)
        self.writer.add_scalar("train/grad_norm", stats["grad_norm"], step)
        self.writer.add_scalar("train/tokens_per_sec", stats["tokens_per_sec"], step)
