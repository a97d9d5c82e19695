"""Self-contained, atomically written checkpoints that load with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors and Python primitives (no pickled objects):

    format_version  int
    config          Config.to_dict(): the resolved run configuration
    tokenizer       Tokenizer.state_dict(): the SentencePiece model(s) as bytes
    model           model state_dict (unwrapped from DDP / torch.compile)
    # training checkpoints add:
    optimizer, scheduler, scaler, train_state (step, epoch, best metric, ...),
    sampler (position in the epoch), rng (python/numpy/torch/cuda states)

Everything needed to translate travels in the first four keys. A training run keeps its checkpoints
in ``RUN_DIR/checkpoints/``: ``latest.pt``, linked as ``step_N.pt`` (the last ``train.keep_last``) and
as ``best.pt`` (:func:`save_run_checkpoint`); :func:`find_resume_checkpoint` finds the one
``train.resume`` names.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from nmt.config import Config

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or of an unknown format."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``) and check its format version."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt" if (path / "checkpoints").is_dir() else path / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise CheckpointError(f"checkpoint {path} could not be read ({type(e).__name__}: {e}).") from e
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version!r}; this nmt reads version {FORMAT_VERSION}."
        )
    for key in ("config", "tokenizer", "model"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks the {key!r} entry; it is not an nmt checkpoint.")
    return state


def config_from_checkpoint(state: dict[str, Any]) -> Config:
    return Config.from_dict(state["config"])


def average_checkpoints(paths: list[str | os.PathLike]) -> dict[str, Any]:
    """Average model weights of several checkpoints of one run into a translate-ready checkpoint.

    Floating-point tensors are averaged in float64 and cast back; integer buffers must agree.
    The result keeps config and tokenizer of the last checkpoint and drops the training state.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average.")
    total: dict[str, torch.Tensor] = {}
    last: dict[str, Any] = {}
    for path in paths:
        last = load_checkpoint(path)
        weights = last["model"]
        if total and set(weights) != set(total):
            raise CheckpointError(
                f"{path} has different parameters from {paths[0]}; average one run's checkpoints."
            )
        for name, tensor in weights.items():
            if not tensor.is_floating_point():
                if name in total and not torch.equal(total[name], tensor):
                    raise CheckpointError(f"integer buffer {name} differs between checkpoints.")
                total[name] = tensor
            else:
                total[name] = total.get(name, 0) + tensor.double()
    averaged = {
        name: (t / len(paths)).to(last["model"][name].dtype) if t.is_floating_point() else t
        for name, t in total.items()
    }
    return {
        "config": last["config"],
        "tokenizer": last["tokenizer"],
        "model": averaged,
        "averaged_from": [str(p) for p in paths],
    }


def last_checkpoints(run_dir: str | os.PathLike, n: int) -> list[Path]:
    """The ``n`` most recent numbered checkpoints (step_*.pt) of a run directory."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    found = sorted(ckpt_dir.glob("step_*.pt"))
    if not found:
        raise CheckpointError(f"no step_*.pt checkpoints in {ckpt_dir} (train.keep_last must be > 0).")
    if len(found) < n:
        log.warning("asked to average %d checkpoints but %s holds only %d", n, ckpt_dir, len(found))
    return found[-n:]


def save_run_checkpoint(state: dict[str, Any], ckpt_dir: Path, step: int, keep_last: int, best: bool) -> Path:
    """Write a training run's ``ckpt_dir/latest.pt`` atomically and link it under its other names:
    ``step_N.pt`` (only the ``keep_last`` newest are kept; none when it is 0) and, if ``best``,
    ``best.pt``. A link is a hard link where the file system allows, else a copy."""
    latest = save_checkpoint(state, ckpt_dir / "latest.pt")
    if keep_last > 0:
        _link(latest, ckpt_dir / f"step_{step:08d}.pt")
        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-keep_last]:
            old.unlink(missing_ok=True)
    if best:
        _link(latest, ckpt_dir / "best.pt")
    return latest


def _link(src: Path, dst: Path) -> None:
    """Point ``dst`` at ``src``'s current contents atomically (hard link; copy where links fail)."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def find_resume_checkpoint(cfg: Config, run_dir: Path) -> Path | None:
    """Which checkpoint ``train.resume`` names, or None for a fresh run (refusing to overwrite one)."""
    latest = run_dir / "checkpoints" / "latest.pt"
    if not cfg.train.resume_requested:
        if latest.exists():
            raise CheckpointError(
                f"{run_dir} already holds a run (checkpoints/latest.pt). Continue it with train.resume=true, "
                "or start a new one elsewhere with run_dir=PATH (or name=NEW_NAME)."
            )
        return None
    if cfg.train.resume.lower() in ("true", "latest", "yes", "1"):
        if not latest.exists():
            raise CheckpointError(f"train.resume={cfg.train.resume} but {latest} does not exist.")
        return latest
    path = Path(cfg.train.resume)
    if path.is_dir():
        path = path / "checkpoints" / "latest.pt"
    if not path.is_file():
        raise CheckpointError(f"train.resume={cfg.train.resume}: no checkpoint at {path}.")
    return path
