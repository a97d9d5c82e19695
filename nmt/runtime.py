"""Process-level plumbing of a training run: random number generators, the allocator, signals, progress.

Kept apart from :mod:`nmt.trainer` so that the trainer reads as the training loop alone.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import sys
import time
from typing import Any

import numpy as np
import torch

log = logging.getLogger("nmt.trainer")


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory_in_heap() -> bool:
    """Make glibc serve every allocation from its heap and keep freed memory there (CPU training and
    decoding: ``python -m nmt.train`` and ``python -m nmt.translate`` call it).

    By default glibc gives each allocation above 32 MiB pages of its own (mmap) and returns them on
    free, so the (B, T, V) logits, log-probabilities and gradients get fresh pages every step, which
    the kernel zero-fills on first touch: ~25 ms per 64 MiB on one core, several per cent of a step.
    Training allocates the same sizes every step, so reusing freed heap memory removes that cost
    (the same reason PyTorch's CPU tuning guide suggests jemalloc or tcmalloc); the process keeps its
    peak memory, which a training step reaches every time anyway. Process-wide, so call it once at the
    start. Decoding gains too: without it, beam 5 on 320 Multi30k sentences took ~120,000 page faults
    (a fresh (rows, vocabulary) tensor per step), with it none. Returns False where it does not apply
    (no glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success. The trim threshold is a C int: 2 GiB - 1 at most.
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` for batches whose (B, T) changes every step: symbolic shapes from the
    first call, so one compilation serves every batch (instead of a static one, then a recompile;
    docs/performance.md, log item 15).

    Two of dynamo's defaults would trace the model again (log item 18), so this sets them for the
    whole process:

    * duck sizing gives sizes that are equal in the first batch one symbol: when its source and
      target happened to have the same length, the next batch whose lengths differ recompiles;
    * with symbolic shapes, float attributes (LayerNorm's eps, dropout's p, ``nn.Embedding``'s
      ``norm_type``) are first traced as symbols too, and every graph is traced a second time when
      they cannot be turned into tensors. They are constants of the model, so they are specialised.
    """
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.specialize_float = True
    fx_config.use_duck_shape = False
    return torch.compile(model, dynamic=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def install_signal_handlers(handler: Any) -> dict[int, Any]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class Progress:
    """A tqdm bar on a terminal; plain periodic log lines otherwise (files, CI, nohup)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.start, self.initial = time.monotonic(), initial
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stdout)
        self.last = initial

    def update(self, step: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(
                loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", tok_s=f"{stats['tokens_per_sec']:.0f}"
            )
        else:
            rate = (step - self.initial) / max(time.monotonic() - self.start, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            log.info(
                "step %d/%d | loss %.3f | lr %.2e | grad_norm %.2f | %.0f tok/s | eta %s",
                step,
                self.total,
                stats["loss"],
                stats["lr"],
                stats["grad_norm"],
                stats["tokens_per_sec"],
                format_duration(eta),
            )
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
