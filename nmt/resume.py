"""What a resumed run may change, what it may not, and what it tells the user.

:meth:`nmt.trainer.Trainer.resume` restores the checkpoint's state; these functions compare the
checkpoint with this run's config, data and number of processes, and return the sentences to say:
a refusal (the trainer raises it) or warnings that the run no longer continues exactly.
"""

from __future__ import annotations

import os
from typing import Any

from nmt.checkpoint import model_differences
from nmt.config import Config, TrainConfig
from nmt.evaluate import bleu_tokenizer

# The train settings that a resumed run may change, each with a warning: it no longer continues exactly.
TRAJECTORY_SETTINGS = (
    "lr", "betas", "adam_eps", "weight_decay", "schedule", "warmup_steps", "min_lr", "accum_steps", "clip_norm",
    "label_smoothing", "precision",
)  # fmt: skip


def resume_refusal(cfg: Config, saved: dict[str, Any], path: str | os.PathLike) -> str | None:
    """Why ``cfg`` cannot resume the checkpoint at ``path`` (its config ``saved``), in one sentence: a
    different model, language pair or SentencePiece settings (the checkpoint's tokenizer is kept: new
    settings would not be used), or BLEU tokenized otherwise. None if it can."""
    differences = model_differences(saved, cfg.to_dict())
    # Best score and patience compare BLEU across the resume: it must be tokenized as before. (Checkpoints
    # from before train.bleu_tokenize existed were scored with 13a.)
    was = bleu_tokenizer(saved.get("train", {}).get("bleu_tokenize", "13a"), saved["data"]["tgt_lang"])
    now = bleu_tokenizer(cfg.train.bleu_tokenize, cfg.data.tgt_lang)
    if was != now and cfg.train.best_metric == "bleu":
        differences.append(("train.bleu_tokenize", was, now))
    if not differences:
        return None
    was = ", ".join(f"{key}={a!r}" for key, a, _ in differences)
    now = ", ".join(f"{key}={b!r}" for key, _, b in differences)
    return f"{path} was trained with {was} and this run asks for {now}; resume with the run's own settings."


def changed_settings_warnings(saved: dict[str, Any], train: TrainConfig) -> list[str]:
    """A warning for each setting of :data:`TRAJECTORY_SETTINGS` (and, with a cosine schedule, which
    it sets the decay of, max_steps) that ``train`` changes from the checkpoint's train config ``saved``."""
    keys = [*TRAJECTORY_SETTINGS, *(["max_steps"] if train.schedule == "cosine" else [])]
    return [
        f"train.{key} changed from {saved[key]} to {getattr(train, key)} since the checkpoint: the run goes on "
        "with the new value"
        for key in keys
        if key in saved and saved[key] != getattr(train, key)
    ]


def data_change_warning(
    saved: dict[str, str] | None, now: dict[str, str], path: str | os.PathLike
) -> str | None:
    """The warning for a run resumed on other data than it was trained on (fine-tuning goes that way),
    from the splits' keys (``PreparedData.split_keys``); None when they agree or the checkpoint, from
    before the keys were kept, has none."""
    changed = [split for split in ("train", "valid") if saved and saved.get(split) != now.get(split)]
    if not changed:
        return None
    splits = " and ".join({"train": "training", "valid": "validation"}[s] for s in changed)
    text = (
        f"{path} was trained on other {splits} data than this run reads (their text, the length filter or "
        "data.train_limit/valid_limit changed): training goes on with the new data, so it does not continue "
        "the run exactly"
    )
    if "valid" in changed:
        text += "; validation scores from here on are not comparable with the best so far (best.pt, train.patience)"
    return text


def world_size_warning(
    state: dict[str, Any],
    cfg: Config,
    world_size: int,
    step: int,
    epoch: int,
    path: str | os.PathLike,
    same_order: bool = True,
) -> str | None:
    """The warning for a checkpoint (``state``) resumed on another number of processes (e.g. moved from
    one GPU to eight), at ``step`` in ``epoch``; None when the number is the same. ``same_order``: the
    sampler goes on with the epoch's batches not yet trained on (else in a new order, which it tells)."""
    saved_world_size = state.get("world_size", 1)
    if saved_world_size == world_size:
        return None
    saved_max_tokens = state["config"].get("data", {}).get("max_tokens", cfg.data.max_tokens)
    saved_accum_steps = state["config"].get("train", {}).get("accum_steps", cfg.train.accum_steps)
    before = saved_world_size * saved_max_tokens * saved_accum_steps
    now = world_size * cfg.data.max_tokens * cfg.train.accum_steps
    update = (
        f"an update still sees up to {now:,} tokens, in other batches"
        if now == before
        else f"an update now sees up to {now:,} tokens (world size x data.max_tokens x train.accum_steps; it was "
        f"{before:,})"
    )
    text = (
        f"{path} was written by a run of {saved_world_size} processes and this run has {world_size}: it goes on "
        f"from step {step} with the same weights, optimizer state and schedule, "
        + (f"with the batches of epoch {epoch} not yet trained on, " if same_order else "")
        + f"but {update}, so it does not continue the run exactly"
    )
    same_update, rest = divmod(saved_world_size * saved_accum_steps, world_size)
    if now != before and not rest and cfg.data.max_tokens == saved_max_tokens:
        text += f"; train.accum_steps={same_update} keeps the update size"
    return text
