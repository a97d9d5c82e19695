"""Process-level plumbing of a training run: random number generators, the allocator, signals, progress,
TensorBoard events.

Kept apart from :mod:`nmt.trainer` so that the trainer reads as the training loop alone.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


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
    """A view of ``model`` for training whose repeated layers are compiled with ``torch.compile``.

    * **Layer by layer** ("regional compilation"): every ``nn.ModuleList`` named ``layers`` (the
      encoder's and the decoder's, in nmt's model and in Hugging Face's) holds compiled wrappers of
      the same layers. All layers of a class share one graph, so the model is traced as two layers
      instead of twelve; embeddings, the output projection and the loss stay eager. On CPU this
      cut the warm-up of ``base`` to about a third, at the same step time (docs/performance.md, log
      item 19).
    * **A view**: the returned module shares every parameter with ``model``, which itself stays
      eager, so validation and decoding (which run ``model``) compile nothing.
    * **Symbolic shapes from the first call**, so one compilation serves every batch shape (log item
      15). Two of dynamo's defaults would trace again (log item 18), so this sets them for the whole
      process: duck sizing gives sizes that are equal in the first batch one symbol (when its source
      and target had the same length, the next batch recompiled), and float attributes (LayerNorm's
      eps, dropout's p) are first traced as symbols, then every graph a second time as constants.

    The loss is compiled apart: :func:`compile_loss`.
    """
    _trace_once_for_all_shapes()

    def view(module: torch.nn.Module) -> tuple[torch.nn.Module, int]:
        children, compiled = {}, 0
        for name, child in module._modules.items():
            if name == "layers" and isinstance(child, torch.nn.ModuleList):
                children[name] = torch.nn.ModuleList(torch.compile(layer, dynamic=True) for layer in child)
                compiled += len(child)
            elif child is not None:
                children[name], count = view(child)  # the child itself when it has no layers
                compiled += count
            else:
                children[name] = child
        if not compiled:
            return module, 0
        clone = copy.copy(module)  # shares parameters, buffers and hooks; only its children differ
        clone._modules = children
        return clone, compiled

    training_view, compiled = view(model)
    if not compiled:
        raise ValueError(f"compile_model: {type(model).__name__} has no nn.ModuleList named 'layers'")
    return training_view


def compile_loss() -> Callable[[torch.Tensor, torch.Tensor, float, int], tuple[torch.Tensor, torch.Tensor]]:
    """``nmt.loss.label_smoothed_nll`` for compiled training: its plain-operation form, compiled with
    symbolic shapes (one graph for every batch shape, as in :func:`compile_model`).

    Eagerly, the loss over bf16 logits keeps float32 log-probabilities of every position and word
    for the backward pass, and reads and writes them in several passes; on the H100 that was about 6
    of the 39 ms of a ``base`` step (docs/performance.md). Compiled, softmax, loss and gradient are
    fused into a few passes over the logits, and only the logits are saved. Use it for the
    training step only: validation runs the eager loss, which compiles nothing.
    """
    from nmt.loss import label_smoothed_nll_ops

    _trace_once_for_all_shapes()
    return torch.compile(label_smoothed_nll_ops, dynamic=True)


def compiled_graph_count() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far, recompilations included (0 before
    anything was compiled): one per layer class and one for the loss is the aim, each more is another
    trace and code generation. The benchmarks report it."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _trace_once_for_all_shapes() -> None:
    """Process-wide dynamo settings that keep one symbolic-shape graph for every batch shape
    (docs/performance.md, log item 18): no duck sizing, floats specialised."""
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.specialize_float = True
    fx_config.use_duck_shape = False


def seed_from(*entropy: int) -> int:
    """A seed mixed from ``entropy`` (the run's seed and a rank, say): distinct inputs, unrelated streams."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def install_signal_handlers(handler: Any) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class Progress:
    """A tqdm bar on a terminal, which moves every step and shows the numbers of each log step; plain
    log lines at the log steps otherwise (files, CI, nohup). Either way the first step of the process
    gets a line of its own, saying how long it took, so a slow start is not silence."""

    def __init__(self, total: int, initial: int, enabled: bool, log_every: int):
        self.enabled = enabled
        self.total, self.log_every = total, log_every
        self.start, self.initial = time.monotonic(), initial
        self.bar = None
        self._redirect: Any = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stdout)
            self._redirect = logging_redirect_tqdm()  # log lines above the bar, not written over it
            self._redirect.__enter__()
        self.last = initial

    def advance(self, step: int) -> None:
        """Optimizer step ``step`` is done (its numbers may not be read yet)."""
        if not self.enabled or step <= self.last:
            return
        if self.last == self.initial:
            log.info(
                "step %d done in %s; %s every %d steps (train.log_every)",
                step,
                format_duration(time.monotonic() - self.start, decimals=1),
                "numbers" if self.bar is not None else "a line",
                self.log_every,
            )
        if self.bar is not None:
            self.bar.update(step - self.last)
        self.last = step

    def update(self, step: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.advance(step)
        if self.bar is not None:
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

    def close(self) -> None:
        """End the bar and give log lines back their handlers; again, nothing."""
        if self.bar is not None:
            self.bar.close()
            self._redirect.__exit__(None, None, None)
            self.bar = None


class EventLog:
    """A run's TensorBoard events, through ``SummaryWriter``. Once a write fails (a full disk, a removed
    run_dir) the curves stop, not the run: the failure is logged once, later writes are dropped, and
    training goes on (on a full disk its next checkpoint stops it, naming the space it needs).

    Creating it writes the first event file, so a folder that cannot be written fails here, at once.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = log_dir
        self._writer: SummaryWriter | None = SummaryWriter(str(log_dir), purge_step=purge_step)
        _silence_event_writer_thread()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._call("add_scalar", tag, value, step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        self._call("add_text", tag, text, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self) -> None:
        self._call("close")
        self._writer = None

    def _call(self, method: str, *args: Any) -> None:
        if self._writer is None:
            return
        try:
            getattr(self._writer, method)(*args)
        except OSError as e:
            self._writer = None
            log.warning(
                "TensorBoard events can no longer be written to %s (%s); training goes on without them",
                self.log_dir,
                e.strerror or e,
            )


def _silence_event_writer_thread() -> None:
    """TensorBoard writes events from a thread of its own; a failed write ends that thread with a
    traceback on stderr, and the next call in the main thread raises the same error, which
    :class:`EventLog` reports. Keep the thread's traceback out of the terminal."""
    previous = threading.excepthook
    if getattr(previous, "_nmt_event_writer", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if issubclass(args.exc_type, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook._nmt_event_writer = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def format_duration(seconds: float, decimals: int = 0) -> str:
    """H:MM:SS (with ``decimals`` digits of the seconds)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds, decimals)
    whole = int(seconds)
    fraction = "." + f"{seconds:.{decimals}f}".split(".")[1] if decimals else ""
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}{fraction}"
