#!/usr/bin/env python
"""Training-speed benchmark: tokens/s, step-time breakdown, peak memory and MFU of one model shape.

    python scripts/benchmark.py --model small --data synthetic --steps 20
    python scripts/benchmark.py --model tiny --data multi30k --data-dir data/multi30k --compare-hf
    python scripts/benchmark.py --model base --device cuda --precision bf16 --compile --compare-hf \\
        --max-tokens 16384 --breakdown --json bench-base.json

What a step is. The same work as ``Trainer.train_step`` with one micro-batch: collate the batch from
the encoded pairs and move it to the device ("data"), autocast forward and ``label_smoothed_nll``
(with ``--compile``, its compiled form ``nmt.runtime.compile_loss``, as in the trainer; on CPU in
fp32, as in the trainer, ``nmt.loss.ProjectedLoss`` computes the loss without a logits tensor:
``nmt.trainer.uses_projected_loss``) ("forward"), backward of the loss divided by the batch's target
tokens ("backward"), then gradient clipping, the AdamW step of ``nmt.optim.build_optimizer``,
zero_grad and the schedule ("optimizer").
The timed loop never reads a value back from the device: the per-step losses are kept on the device
and read once, after the last step. (The trainer reads each step's numbers one step late, once the
next step's passes are queued, which likewise leaves the device nothing to wait for.)
``--read-every-step`` reads the loss and gradient norm before each update, as the trainer did before
(docs/performance.md, log item 22): on CUDA the difference is what that wait cost.

Timing. ``--warmup`` untimed steps, then ``--steps`` timed steps; throughput is the median over the
timed steps of (tokens of the step / time of the step). On CUDA, step boundaries are CUDA events, so
the headline pass has no synchronisation in it; the phase breakdown (``--breakdown``) comes from a
second pass over the same batches with ``torch.cuda.synchronize()`` between phases, which removes the
overlap of host and device work and so is slower than the headline pass. On CPU every operation is
synchronous: the breakdown is taken in the headline pass itself at no cost. With ``--interleave`` the
sides' timed steps alternate (step i of one side, then step i of the other), so that a change of
machine load hits both alike: use it on shared or noisy hosts. "speed, same step" is the median over
timed steps of (Marian's time for step i / ours for step i): both train the same batches in the same
order, so with ``--interleave`` each pair ran seconds apart under the same load.

Model FLOPs per step (MFU = model FLOPs per second / ``--peak-tflops``). With d = d_model,
f = ffn_dim, V = target vocabulary, L_e / L_d = encoder / decoder layers, and for each sentence i of
the batch s_i = source tokens (pieces + EOS) and t_i = target tokens (BOS + pieces), both without
padding:

    per source token  N_src = L_e * (4 d^2 + 2 d f)        self-attention Q, K, V, out + FFN
                            + L_d * 2 d^2                  cross-attention K, V (of the encoder output)
    per target token  N_tgt = L_d * (6 d^2 + 2 d f)        self Q, K, V, out + cross Q, out + FFN
                            + d V                          output projection (tied or not)
    dense     = 6 * (N_src * sum_i s_i + N_tgt * sum_i t_i)
    attention = 12 * d * (L_e * sum_i s_i^2 + L_d * sum_i t_i^2 + L_d * sum_i t_i * s_i)
    FLOPs     = dense + attention

6 = 2 (a multiply-add) x 3 (forward, and a backward that computes gradients for both the input and
the weight of every matrix product). The attention term is Q K^T and (attention weights) V, 2 * 2 *
T_q * T_k * d forward per layer and sequence, times 3; causal masking is not discounted. Not counted:
biases, LayerNorm, softmax, dropout, embedding look-ups and their gradient, the loss, the optimizer
(a few per cent of the total at d_model = 64, under 1% from d_model = 256). Padding is not counted:
MFU measures useful work, and the padding efficiency is reported beside it. On CPU there is no default
peak: pass ``--peak-tflops`` (for instance the rate of a large fp32 matmul on the same threads).

Synthetic data ("WMT-like"). ``--synthetic-pairs`` pairs with source lengths (in pieces, before EOS)
round(LogNormal(mu, sigma)), sigma = ``--len-sigma`` (0.5), mu = ln(``--mean-len``) - sigma^2 / 2 so
that the mean is ``--mean-len`` (30; median 26.5), clipped to [1, ``--max-len``]; target lengths
round(source length * LogNormal(0, 0.15)) clipped likewise; token ids uniform over the vocabulary
without the special ids. The pairs are batched by the real :class:`TokenBatchSampler` and collated by
``PackedPairs.collate``, as ``Trainer._batch_stream`` does (``--collate lists``: ``collate()`` over
per-example rows, for comparison: the dataset's columns cost an Arrow lookup per row).

Memory allocator. On CPU ``python -m nmt.train`` calls ``nmt.runtime.keep_freed_memory_in_heap`` (glibc serves
big tensors from its heap and keeps freed memory for reuse, instead of fresh zero-filled pages every
step); the benchmark does the same, for the whole process and so for both sides, unless
``--malloc default``.

Comparison (``--compare-hf``). Hugging Face ``MarianMTModel`` built to the same shape (layers,
d_model, FFN, heads, vocabulary, tied/shared embeddings, dropouts, activation, embedding scale
sqrt(d)), trained on the same batches in the same precision with a plain loop: forward with
``decoder_input_ids`` = our ``tgt_in`` (the labels shifted right), the same ``label_smoothed_nll`` on
its logits, backward, clipping, ``torch.optim.AdamW`` with the same hyper-parameters, the same
fused implementation and the same learning-rate schedule (so the losses are comparable too).
Marian differs by design: post-norm (ours is pre-norm with a final LayerNorm unless
``norm_first=false``), separate Q/K/V projections, a logits bias, sinusoidal positions with sin/cos
halves instead of interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nmt.config import DataConfig, ModelConfig, TrainConfig
from nmt.data.batching import Batch, PackedPairs, TokenBatchSampler, collate, padding_efficiency
from nmt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from nmt.device import avoid_per_shape_attention_kernels, device_name
from nmt.device import resolve_device as nmt_resolve_device
from nmt.device import resolve_dtype as nmt_resolve_dtype
from nmt.loss import ProjectedLoss, label_smoothed_nll
from nmt.model import Transformer
from nmt.optim import adamw, build_optimizer, build_scheduler
from nmt.runtime import compile_loss, compile_model, compiled_graph_count, keep_freed_memory_in_heap
from nmt.trainer import uses_projected_loss

log = logging.getLogger("benchmark")

MODEL_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "model"
PHASES = ("data", "forward", "backward", "optimizer")
FIRST_PIECE_ID = 4  # ids below are the special tokens
# Dense peak TFLOP/s by (GPU name fragment, autocast dtype). fp32 means full fp32 matmuls (TF32 off,
# PyTorch's default). H200 has the H100 SXM's compute.
GPU_PEAK_TFLOPS = {
    ("H100", torch.bfloat16): 989.4, ("H100", torch.float16): 989.4, ("H100", torch.float32): 66.9,
    ("H200", torch.bfloat16): 989.4, ("H200", torch.float16): 989.4, ("H200", torch.float32): 66.9,
    ("A100", torch.bfloat16): 312.0, ("A100", torch.float16): 312.0, ("A100", torch.float32): 19.5,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- FLOPs
def matmul_params(cfg: ModelConfig, tgt_vocab: int) -> tuple[int, int]:
    """Weights multiplied per (source token, target token): (N_src, N_tgt) of the module docstring."""
    d, f = cfg.d_model, cfg.ffn_dim
    per_src = cfg.enc_layers * (4 * d * d + 2 * d * f) + cfg.dec_layers * 2 * d * d
    per_tgt = cfg.dec_layers * (6 * d * d + 2 * d * f) + d * tgt_vocab
    return per_src, per_tgt


def training_flops(cfg: ModelConfig, tgt_vocab: int, src_lens: np.ndarray, tgt_lens: np.ndarray) -> float:
    """Model FLOPs of one forward + backward over sentences with these unpadded lengths."""
    s = np.asarray(src_lens, dtype=np.float64)
    t = np.asarray(tgt_lens, dtype=np.float64)
    per_src, per_tgt = matmul_params(cfg, tgt_vocab)
    dense = 6.0 * (per_src * s.sum() + per_tgt * t.sum())
    attention = (
        12.0
        * cfg.d_model
        * (cfg.enc_layers * (s * s).sum() + cfg.dec_layers * ((t * t).sum() + (t * s).sum()))
    )
    return float(dense + attention)


def peak_tflops(requested: float | None, device: torch.device, dtype: torch.dtype) -> float | None:
    """``--peak-tflops``, else the table value for a known GPU, else None (MFU reported as n/a)."""
    if requested:
        return requested
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for (fragment, kind), value in GPU_PEAK_TFLOPS.items():
        if fragment in name and kind == dtype:
            return value
    return None


# ----------------------------------------------------------------------------------------------- data
@dataclass
class BenchData:
    pairs: PackedPairs
    batches: list[np.ndarray]  # warm-up batches first, then the timed ones
    src_vocab: int
    tgt_vocab: int
    description: str
    collate: Callable[[np.ndarray], Batch]  # example indices -> padded batch on the CPU


def load_model_config(args: argparse.Namespace) -> ModelConfig:
    """A preset name (configs/model/NAME.yaml) or a YAML path, then the command-line overrides."""
    from omegaconf import OmegaConf

    path = Path(args.model)
    if not path.suffix:
        path = MODEL_PRESETS / f"{args.model}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in MODEL_PRESETS.glob("*.yaml")))
        raise SystemExit(f"error: no model config {path}; use a preset ({presets}) or a YAML file.")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path))
    flags = {"d_model": args.d_model, "n_heads": args.heads, "enc_layers": args.enc_layers,
             "dec_layers": args.dec_layers, "ffn_dim": args.ffn_dim, "dropout": args.dropout}  # fmt: skip
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.override)
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)


def lengths(values: np.ndarray, max_len: int) -> np.ndarray:
    return np.clip(np.rint(values), 1, max_len).astype(np.int64)


def synthetic_pairs(args: argparse.Namespace) -> PackedPairs:
    """Random token ids with WMT-like lengths (see the module docstring)."""
    rng = np.random.default_rng(args.seed)
    sigma = args.len_sigma
    mu = math.log(args.mean_len) - sigma**2 / 2
    src_pieces = lengths(rng.lognormal(mu, sigma, args.synthetic_pairs), args.max_len)
    tgt_pieces = lengths(src_pieces * rng.lognormal(0.0, 0.15, args.synthetic_pairs), args.max_len)
    src_lens = src_pieces + 1  # + EOS
    src_values = rng.integers(FIRST_PIECE_ID, args.vocab_size, int(src_lens.sum()))
    src_offsets = np.concatenate([[0], np.cumsum(src_lens)])
    src_values[src_offsets[1:] - 1] = EOS_ID
    tgt_values = rng.integers(FIRST_PIECE_ID, args.vocab_size, int(tgt_pieces.sum()))
    tgt_offsets = np.concatenate([[0], np.cumsum(tgt_pieces)])
    return PackedPairs(src_values, src_offsets, tgt_values, tgt_offsets)


def multi30k_pairs(args: argparse.Namespace) -> tuple[PackedPairs, Any, int, int]:
    """The training split through the project's tokenizer, filter and Arrow cache (``prepare_data``)."""
    from nmt.data.corpus import prepare_data

    cfg = DataConfig(
        dir=args.data_dir, src_lang=args.src_lang, tgt_lang=args.tgt_lang, download="",
        vocab_size=args.vocab_size or DataConfig.vocab_size, max_len=args.max_len,
        max_tokens=args.max_tokens, cache_dir=args.cache_dir,
    )  # fmt: skip
    data = prepare_data(cfg)
    tok = data.tokenizer
    return PackedPairs.from_dataset(data.train), data.train, tok.src_vocab_size, tok.tgt_vocab_size


def list_collate(src_rows: Any, tgt_rows: Any) -> Callable[[np.ndarray], Batch]:
    """``collate`` over per-example rows (``--collate lists``), the path the trainer no longer takes."""

    def collate_rows(indices: np.ndarray) -> Batch:
        rows = indices.tolist()
        return collate([src_rows[i] for i in rows], [tgt_rows[i] for i in rows], rows)

    return collate_rows


def load_data(args: argparse.Namespace) -> BenchData:
    dataset = None
    if args.data == "multi30k":
        pairs, dataset, src_vocab, tgt_vocab = multi30k_pairs(args)
        name = f"multi30k {args.src_lang}-{args.tgt_lang} train ({args.data_dir})"
    else:
        pairs = synthetic_pairs(args)
        src_vocab = tgt_vocab = args.vocab_size
        name = f"synthetic WMT-like (lognormal mean {args.mean_len:g}, sigma {args.len_sigma:g})"
    sampler = TokenBatchSampler(pairs.src_lengths, pairs.tgt_lengths, args.max_tokens, seed=args.seed)
    needed, batches, epoch = args.warmup + args.steps, [], 0
    while len(batches) < needed:  # a small corpus may need more than one epoch
        sampler.set_epoch(epoch)
        batches.extend(sampler.rank_batches())
        epoch += 1
    collate_fn = pairs.collate if args.collate == "packed" else list_collate(*example_rows(pairs, dataset))
    return BenchData(
        pairs, batches[:needed], src_vocab, tgt_vocab, f"{name}, {args.collate} collate", collate_fn
    )


def example_rows(pairs: PackedPairs, dataset: Any) -> tuple[Any, Any]:
    """Per-example id lists: the dataset's columns as the trainer indexes them, else Python lists."""
    if dataset is not None:
        return dataset["src_ids"], dataset["tgt_ids"]
    src = np.split(pairs.src_values, pairs.src_offsets[1:-1])
    tgt = np.split(pairs.tgt_values, pairs.tgt_offsets[1:-1])
    return [r.tolist() for r in src], [r.tolist() for r in tgt]


# ---------------------------------------------------------------------------------------------- sides
@dataclass
class Side:
    """One implementation under test: how to get logits from a batch, and what to update."""

    name: str
    model: nn.Module  # what is called (possibly compiled)
    logits: Callable[[Batch], torch.Tensor]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    attention: str
    num_params: int
    # ProjectedLoss around the model (possibly compiled), as in the trainer; None: the loss of the logits.
    loss_model: nn.Module | None = None
    loss: Callable = label_smoothed_nll  # of the logits, as in the trainer: compiled with --compile


def logits_loss(args: argparse.Namespace) -> Callable:
    """The loss of the logits both sides use: the trainer's choice (``nmt.runtime.compile_loss`` when
    compiling)."""
    return compile_loss() if args.compile else label_smoothed_nll


def projected_loss_model(raw: Transformer, args: argparse.Namespace) -> nn.Module:
    """The trainer's :class:`ProjectedLoss` around the model, compiled as the trainer compiles it."""
    loss_model = ProjectedLoss(raw)
    return compile_model(loss_model) if args.compile else loss_model


def train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(seed=args.seed, lr=args.lr, warmup_steps=args.warmup_steps, precision=args.precision)


def build_ours(
    cfg: ModelConfig, data: BenchData, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> Side:
    torch.manual_seed(args.seed)
    raw = Transformer(cfg, data.src_vocab, data.tgt_vocab, pad_id=PAD_ID).to(device)
    model = compile_model(raw) if args.compile else raw
    tcfg = train_config(args)
    optimizer = build_optimizer(raw, tcfg)
    params = [p for p in raw.parameters() if p.requires_grad]
    return Side(
        "nmt", model, lambda b: model(b.src, b.tgt_in), params, optimizer,
        build_scheduler(optimizer, tcfg), "sdpa", raw.num_parameters(),
        loss_model=projected_loss_model(raw, args) if uses_projected_loss(device, dtype) else None,
        loss=logits_loss(args),
    )  # fmt: skip


def marian_config(cfg: ModelConfig, data: BenchData) -> Any:
    from transformers import MarianConfig

    return MarianConfig(
        vocab_size=data.src_vocab, decoder_vocab_size=data.tgt_vocab, d_model=cfg.d_model,
        encoder_layers=cfg.enc_layers, decoder_layers=cfg.dec_layers,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim,
        encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        dropout=cfg.dropout, attention_dropout=cfg.attn_dropout, activation_dropout=cfg.act_dropout,
        activation_function=cfg.activation, max_position_embeddings=cfg.max_positions,
        scale_embedding=True, share_encoder_decoder_embeddings=cfg.share_embeddings,
        tie_word_embeddings=cfg.tie_output, pad_token_id=PAD_ID, decoder_start_token_id=BOS_ID,
        eos_token_id=EOS_ID, forced_eos_token_id=EOS_ID, use_cache=False,
    )  # fmt: skip


def build_hf(cfg: ModelConfig, data: BenchData, args: argparse.Namespace, device: torch.device) -> Side:
    import transformers
    from transformers import MarianMTModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    try:
        raw = MarianMTModel._from_config(marian_config(cfg, data), attn_implementation="sdpa")
    except (ValueError, ImportError):  # an older transformers without SDPA for Marian
        raw = MarianMTModel._from_config(marian_config(cfg, data), attn_implementation="eager")
    raw = raw.to(device)
    model = compile_model(raw) if args.compile else raw
    tcfg = train_config(args)
    params = [p for p in raw.parameters() if p.requires_grad]  # Marian's sinusoids are frozen parameters
    optimizer = adamw(  # the same implementation as nmt.optim.build_optimizer
        params, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.adam_eps, weight_decay=tcfg.weight_decay
    )

    def logits(b: Batch) -> torch.Tensor:
        src_mask = b.src != PAD_ID  # (B, S)
        return model(
            input_ids=b.src, attention_mask=src_mask, decoder_input_ids=b.tgt_in, use_cache=False
        ).logits

    attention = raw.config._attn_implementation
    num_params = sum(p.numel() for p in params)
    scheduler = build_scheduler(optimizer, tcfg)  # the same learning rates: comparable losses
    return Side(
        "hf-marian", model, logits, params, optimizer, scheduler, attention, num_params,
        loss=logits_loss(args),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------- timing
class PhaseClock:
    """Wall-clock phase times; with ``sync`` the device is synchronised at every mark."""

    def __init__(self, device: torch.device, sync: bool) -> None:
        self.sync = sync and device.type == "cuda"
        self.times: dict[str, list[float]] = {p: [] for p in PHASES}
        self._last = 0.0

    def start(self) -> None:
        if self.sync:
            torch.cuda.synchronize()
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[phase].append(now - self._last)
        self._last = now


class StepClock:
    """Start and end of each step: CUDA events (read after one final sync) or ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[Any, Any]] = []

    def _now(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._start = self._now()

    def stop(self) -> None:
        self.marks.append((self._start, self._now()))

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in self.marks]
        return [b - a for a, b in self.marks]


@dataclass
class StepRunner:
    """The training step of one side, mirroring ``Trainer.train_step`` for a single micro-batch."""

    side: Side
    collate: Callable[[np.ndarray], Batch]
    device: torch.device
    dtype: torch.dtype
    label_smoothing: float
    clip_norm: float
    read_every_step: bool = False  # --read-every-step
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, indices: np.ndarray, clock: PhaseClock | None) -> torch.Tensor:
        mark = clock.mark if clock is not None else lambda phase: None
        batch = self.collate(indices)
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(self.device, non_blocking=True)
        mark("data")
        if self.side.loss_model is not None:
            loss_sum, _ = self.side.loss_model(batch.src, batch.tgt_in, batch.tgt_out, self.label_smoothing)
        else:
            with self.autocast():
                logits = self.side.logits(batch)  # (B, T, V)
            loss_sum, _ = self.side.loss(logits, batch.tgt_out, self.label_smoothing, PAD_ID)
        mark("forward")
        self.scaler.scale(loss_sum / max(batch.num_tgt_tokens, 1)).backward()
        mark("backward")
        self.scaler.unscale_(self.side.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.side.params, self.clip_norm)
        if self.read_every_step:  # the host waits for the device, as the trainer did before log item 22
            torch.stack([loss_sum.detach().float(), grad_norm.float()]).tolist()
        self.scaler.step(self.side.optimizer)
        self.scaler.update()
        self.side.optimizer.zero_grad(set_to_none=True)
        if self.side.scheduler is not None:
            self.side.scheduler.step()
        mark("optimizer")
        return loss_sum.detach() / max(batch.num_tgt_tokens, 1)


# ---------------------------------------------------------------------------------------------- memory
def current_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS:") or 0


def reset_peak_memory(device: torch.device) -> int:
    """Restart peak tracking; returns the memory in use now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _return_free_heap()
        with contextlib.suppress(OSError):  # Linux: "5" resets the VmHWM (peak RSS) of the process
            Path("/proc/self/clear_refs").write_text("5")
    return current_memory(device)


def _return_free_heap() -> None:
    """glibc keeps freed blocks mapped; hand them back so that the next side's growth shows in RSS."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Bytes and what they measure."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    peak = _proc_status_bytes("VmHWM:")
    if peak is not None:
        return peak, "process peak RSS (VmHWM, reset before each side)"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak, "process peak RSS (ru_maxrss, whole run)"


def _proc_status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return None


# ---------------------------------------------------------------------------------------------- measuring
class Measurement:
    """One side's clocks, losses and memory over the warm-up, timed and breakdown passes."""

    def __init__(self, side: Side, data: BenchData, args: argparse.Namespace, device, dtype) -> None:
        tcfg = train_config(args)
        self.side, self.device, self.seed = side, device, args.seed
        self.runner = StepRunner(
            side, data.collate, device, dtype, tcfg.label_smoothing, tcfg.clip_norm, args.read_every_step
        )
        self.steps = StepClock(device)
        # On CPU every op is synchronous, so phase times cost nothing: take them in the timed pass.
        self.phases = PhaseClock(device, sync=False) if device.type == "cpu" else None
        self.losses: list[torch.Tensor] = []
        self.memory: dict[str, Any] = {}
        self._memory_at_start = 0
        self.warmup_seconds = 0.0
        self.compiled = args.compile
        self.graphs = {"warmup": 0, "timed": 0}  # graphs compiled during this side's steps

    def warm_up(self, batches: list[np.ndarray]) -> None:
        self.side.model.train()
        self._memory_at_start = reset_peak_memory(self.device)
        torch.manual_seed(self.seed)
        graphs, start = compiled_graph_count(), time.perf_counter()
        self.losses += [self.runner.step(b, None) for b in batches]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.warmup_seconds = time.perf_counter() - start  # compilation included
        self.graphs["warmup"] += compiled_graph_count() - graphs
        # Logged as it happens: a run stopped by a time limit still shows how far each side got.
        compiled = f", {self.graphs['warmup']} graphs compiled" if self.compiled else ""
        log.info(
            "%s: warm-up of %d steps in %.1f s%s", self.side.name, len(batches), self.warmup_seconds, compiled
        )

    def timed_step(self, indices: np.ndarray) -> None:
        graphs = compiled_graph_count()
        self.steps.start()
        if self.phases is not None:
            self.phases.start()
        self.losses.append(self.runner.step(indices, self.phases))
        self.steps.stop()
        self.graphs["timed"] += compiled_graph_count() - graphs

    def record_memory(self, note: str = "") -> None:
        peak, kind = peak_memory(self.device)
        self.memory = {
            "peak_memory_bytes": peak,
            "peak_memory_above_start_bytes": peak - self._memory_at_start,
            "peak_memory_kind": kind + note,
        }

    def breakdown(self, batches: list[np.ndarray]) -> dict[str, list[float]] | None:
        """CPU: the timed pass's phases. CUDA: a separate pass, synchronised at every phase boundary."""
        if self.phases is not None:
            return self.phases.times
        clock = PhaseClock(self.device, sync=True)
        for indices in batches:
            clock.start()
            self.runner.step(indices, clock)
        return clock.times


def measure(builders: list[Callable[[], Side]], data: BenchData, cfg, args, device, dtype) -> list[dict]:
    """Sequential: each side is built, warmed up, timed and freed in turn (exact peak memory).
    Interleaved: all sides are warmed up, then timed steps alternate between them, so a change of
    machine load hits every side alike (peak memory is then read at the end of each warm-up)."""
    warmup, timed = data.batches[: args.warmup], data.batches[args.warmup :]
    if not args.interleave:
        return [measure_one(build(), data, cfg, args, device, dtype) for build in builders]
    runs = []
    for build in builders:
        run = Measurement(build(), data, args, device, dtype)
        run.warm_up(warmup)
        run.record_memory(", read after its warm-up with the other model resident")
        runs.append(run)
    for indices in timed:
        for run in runs:
            run.timed_step(indices)
    return [finish(run, data, cfg, args, device, dtype) for run in runs]


def measure_one(side: Side, data: BenchData, cfg, args, device, dtype) -> dict:
    run = Measurement(side, data, args, device, dtype)
    run.warm_up(data.batches[: args.warmup])
    for indices in data.batches[args.warmup :]:
        run.timed_step(indices)
    run.record_memory()
    result = finish(run, data, cfg, args, device, dtype)
    del run, side
    if args.compile:
        torch._dynamo.reset()  # compiled graphs hold on to the model's parameters
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def finish(run: Measurement, data: BenchData, cfg, args, device, dtype) -> dict:
    timed = data.batches[args.warmup :]
    seconds = run.steps.seconds()  # the one synchronisation of the timed pass
    losses = torch.stack(run.losses).float().cpu().tolist()
    phases = run.breakdown(timed) if (args.breakdown or device.type == "cpu") else None
    result = summarise(run.side, data, cfg, timed, seconds, phases, args, device, dtype)
    result.update(run.memory, loss_first=losses[0], loss_last=losses[-1], warmup_seconds=run.warmup_seconds)
    if args.compile:
        result.update(compiled_graphs_warmup=run.graphs["warmup"], compiled_graphs_timed=run.graphs["timed"])
    log.info(
        "%s: %.0f target tokens/s, %.1f ms per step (medians of %d timed steps)",
        result["name"], result["tgt_tokens_per_sec"], result["step_time_ms_median"], len(timed),
    )  # fmt: skip
    if args.profile:
        result["profile"] = profile_side(run.runner, timed[: args.profile], device)
    return result


def summarise(side, data, cfg, timed, seconds, breakdown, args, device, dtype) -> dict:
    src_tokens = np.array([data.pairs.src_lengths[b].sum() for b in timed], dtype=np.float64)
    tgt_tokens = np.array([data.pairs.tgt_lengths[b].sum() for b in timed], dtype=np.float64)
    src_lens, tgt_lens = data.pairs.src_lengths, data.pairs.tgt_lengths
    flops = np.array([training_flops(cfg, data.tgt_vocab, src_lens[b], tgt_lens[b]) for b in timed])
    secs = np.array(seconds)
    peak = peak_tflops(args.peak_tflops, device, dtype)
    achieved = flops.sum() / secs.sum() / 1e12
    return {
        "name": side.name,
        "attention": side.attention,
        "num_params": side.num_params,
        "steps": len(timed),
        "step_time_ms_median": 1000 * statistics.median(seconds),
        "step_times_ms": [round(1000 * x, 3) for x in seconds],
        "tgt_tokens_per_step_mean": float(tgt_tokens.mean()),
        "src_tokens_per_step_mean": float(src_tokens.mean()),
        "tgt_tokens_per_sec": float(np.median(tgt_tokens / secs)),
        "src_tgt_tokens_per_sec": float(np.median((src_tokens + tgt_tokens) / secs)),
        "tgt_tokens_per_sec_overall": float(tgt_tokens.sum() / secs.sum()),
        "model_flops_per_step_mean": float(flops.mean()),
        "achieved_tflops": float(achieved),
        "peak_tflops": peak,
        "mfu": None if peak is None else float(achieved / peak),
        "breakdown_ms_median": None if breakdown is None else {
            phase: 1000 * statistics.median(times) for phase, times in breakdown.items()
        },
        "breakdown_synchronised": device.type == "cuda",
    }  # fmt: skip


def profile_side(runner: StepRunner, batches: list[np.ndarray], device: torch.device, top: int = 25) -> str:
    """torch.profiler table of the ops with the largest self time over a few steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for indices in batches:
            runner.step(indices, None)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------- report
def resolve_device(name: str) -> torch.device:
    try:
        return nmt_resolve_device(name, "--device")
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The trainer's choice, fp16 on GPUs without bf16 included."""
    try:
        return nmt_resolve_dtype(precision, device, "--precision", torch.float16)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def metadata(args, cfg: ModelConfig, data: BenchData, device: torch.device, dtype: torch.dtype) -> dict:
    pad = padding_efficiency(data.batches[args.warmup :], data.pairs.src_lengths, data.pairs.tgt_lengths)
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *args.argv]),
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": hf_version,
        "precision": str(dtype).replace("torch.", ""),
        "compile": args.compile,
        "cudnn_attention": args.cudnn_attention if device.type == "cuda" else None,
        "interleave": args.interleave,
        "read_every_step": args.read_every_step,
        "model": args.model,
        "model_config": dict(vars(cfg)),
        "data": data.description,
        "src_vocab": data.src_vocab,
        "tgt_vocab": data.tgt_vocab,
        "max_tokens": args.max_tokens,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "padding_efficiency": pad,
        "seed": args.seed,
    }


def memory_key(meta: dict) -> str:
    """Interleaved runs keep both models resident: compare what each side adds to it."""
    return "peak_memory_above_start_bytes" if meta["interleave"] else "peak_memory_bytes"


def ratios(result: dict) -> dict:
    ours, hf = result["ours"], result["hf"]
    keys = ("tgt_tokens_per_sec", "src_tgt_tokens_per_sec", "tgt_tokens_per_sec_overall")
    out = {k: ours[k] / hf[k] for k in keys}
    # Both sides train the same batches in the same order: step i of one against step i of the other.
    # With --interleave the two ran seconds apart, so this median is the least sensitive to load drift.
    paired = [h / o for o, h in zip(ours["step_times_ms"], hf["step_times_ms"], strict=True) if o > 0]
    out["step_speed_paired"] = statistics.median(paired) if paired else None
    mem = memory_key(result["meta"])
    out["peak_memory"] = ours[mem] / hf[mem] if hf[mem] > 0 else None
    return out


def phase_ms(side: dict, phase: str) -> float | None:
    return (side["breakdown_ms_median"] or {}).get(phase)


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_table(result: dict) -> str:
    sides = [result["ours"]] + ([result["hf"]] if result.get("hf") else [])
    mem = memory_key(result["meta"])
    memory_label = "peak memory above start (MiB)" if result["meta"]["interleave"] else "peak memory (MiB)"
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("parameters (M)", lambda r: _fmt(r["num_params"] / 1e6, ".2f")),
        ("attention", lambda r: r["attention"]),
        ("tgt tokens / step", lambda r: _fmt(r["tgt_tokens_per_step_mean"], ".0f")),
        ("step time (ms, median)", lambda r: _fmt(r["step_time_ms_median"], ".1f")),
        ("tgt tokens/s (median)", lambda r: _fmt(r["tgt_tokens_per_sec"], ",.0f")),
        ("src+tgt tokens/s (median)", lambda r: _fmt(r["src_tgt_tokens_per_sec"], ",.0f")),
    ]
    if len(sides) == 2:
        rows.append(("speed, same step (median)", lambda r: ""))
    for phase in PHASES:
        rows.append((f"  {phase} (ms)", lambda r, p=phase: _fmt(phase_ms(r, p), ".1f")))
    rows += [
        (memory_label, lambda r: _fmt(r[mem] / 2**20, ",.0f")),
        ("model TFLOP/s", lambda r: _fmt(r["achieved_tflops"], ".3f")),
        ("MFU", lambda r: "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
        ("loss first -> last", lambda r: f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}"),
        ("warm-up (s)", lambda r: _fmt(r["warmup_seconds"], ".1f")),
    ]
    if "compiled_graphs_warmup" in sides[0]:
        rows.append(
            (
                "graphs compiled: warm-up, timed",
                lambda r: f"{r['compiled_graphs_warmup']}, {r['compiled_graphs_timed']}",
            )
        )
    header = ["metric"] + [r["name"] for r in sides] + (["nmt / hf"] if len(sides) == 2 else [])
    lines = [header]
    ratio_rows = {
        "tgt tokens/s (median)": "tgt_tokens_per_sec",
        "src+tgt tokens/s (median)": "src_tgt_tokens_per_sec",
        "speed, same step (median)": "step_speed_paired",
        memory_label: "peak_memory",
    }
    for label, get in rows:
        line = [label] + [get(r) for r in sides]
        if len(sides) == 2:
            key = ratio_rows.get(label)
            line.append(_fmt(result["ratio"][key], ".2f") + "x" if key else "")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = []
    for line in lines:
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        text.append("  ".join(cells))
    return "\n".join([text[0], "-" * len(text[0]), *text[1:]])


def describe_run(meta: dict) -> str:
    cfg = meta["model_config"]
    return (
        f"{meta['model']}: d={cfg['d_model']} ffn={cfg['ffn_dim']} heads={cfg['n_heads']} "
        f"layers={cfg['enc_layers']}+{cfg['dec_layers']} vocab={meta['tgt_vocab']} | {meta['device']} "
        f"({meta['device_type']}, {meta['threads']} threads) {meta['precision']}"
        f"{' compiled' if meta['compile'] else ''}"
        f"{', read every step' if meta.get('read_every_step') else ''} | {meta['data']} | max_tokens={meta['max_tokens']}, "
        f"padding efficiency {100 * meta['padding_efficiency']:.1f}% | {meta['warmup_steps']} warm-up + "
        f"{meta['timed_steps']} timed steps | malloc {meta['malloc']} | torch {meta['torch']}"
    )


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="small", help="preset of configs/model (tiny, compact, small, base, big) or YAML"
    )
    p.add_argument("--d-model", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--enc-layers", type=int)
    p.add_argument("--dec-layers", type=int)
    p.add_argument("--ffn-dim", type=int)
    p.add_argument("--dropout", type=float)
    p.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                   help="any ModelConfig field, e.g. -o norm_first=false (repeatable)")  # fmt: skip
    p.add_argument("--data", choices=("synthetic", "multi30k"), default="synthetic")
    p.add_argument("--data-dir", default=DataConfig.dir, help="multi30k: folder with train.{en,de}[.gz]")
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de")
    p.add_argument("--cache-dir", default="", help="multi30k: tokenizer/encoding cache (default DIR/.cache)")
    p.add_argument("--vocab-size", type=int, help="synthetic: 32000; multi30k: SentencePiece size (8000)")
    p.add_argument("--synthetic-pairs", type=int, default=20_000)
    p.add_argument("--mean-len", type=float, default=30.0, help="synthetic: mean source length in pieces")
    p.add_argument("--len-sigma", type=float, default=0.5, help="synthetic: sigma of the log-normal lengths")
    p.add_argument("--max-len", type=int, default=DataConfig.max_len)
    p.add_argument(
        "--collate", choices=("packed", "lists"), default="packed",
        help="packed: PackedPairs.collate, as the trainer does; lists: collate() on per-example rows",
    )  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=DataConfig.max_tokens, help="token budget of a batch")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' layers and their loss")
    p.add_argument(
        "--cudnn-attention", action="store_true",
        help="CUDA: leave cuDNN's SDPA kernels on for both sides (off by default, as in the trainer: "
        "nmt.device.avoid_per_shape_attention_kernels)",
    )  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores available)")
    p.add_argument(
        "--malloc", choices=("heap", "default"), default="heap",
        help="CPU: heap = keep freed memory in glibc's heap, as the trainer does (whole process, both "
        "sides); default = glibc's defaults (fresh pages for every tensor above 32 MiB)",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup-steps", type=int, default=TrainConfig.warmup_steps, help="LR schedule warm-up")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--breakdown", action="store_true", help="CUDA: extra synchronised pass for phase times")
    p.add_argument("--compare-hf", action="store_true", help="also train transformers' MarianMTModel")
    p.add_argument("--interleave", action="store_true", help="alternate the sides' timed steps (noisy hosts)")
    p.add_argument(
        "--read-every-step", action="store_true",
        help="read the loss and gradient norm back before each update (what a per-step host sync costs)",
    )  # fmt: skip
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs; CPU: n/a)")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="torch.profiler table over N steps")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.vocab_size is None and args.data == "synthetic":
        args.vocab_size = 32_000
    if args.warmup < 0 or args.steps < 1:
        p.error("--warmup must be >= 0 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or available_cores())
    try:
        return run(args)
    finally:
        torch.set_num_threads(previous_threads)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    heap = device.type == "cpu" and args.malloc == "heap" and keep_freed_memory_in_heap()
    if not args.cudnn_attention:
        avoid_per_shape_attention_kernels(device)  # for both sides, as the trainer does
    cfg = load_model_config(args)
    data = load_data(args)
    result: dict[str, Any] = {"meta": metadata(args, cfg, data, device, dtype)}
    result["meta"]["malloc"] = "glibc, freed memory kept in the heap" if heap else "default"
    log.info("benchmarking %s on %s (%s)", args.model, device, data.description)
    builders = [lambda: build_ours(cfg, data, args, device, dtype)]
    if args.compare_hf:
        builders.append(lambda: build_hf(cfg, data, args, device))
    results = measure(builders, data, cfg, args, device, dtype)
    result["ours"] = results[0]
    if args.compare_hf:
        result["hf"] = results[1]
        result["ratio"] = ratios(result)
    result["meta"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(describe_run(result["meta"]))
    print(format_table(result))
    for key in ("ours", "hf"):
        if result.get(key, {}).get("profile"):
            print(f"\nprofile of {result[key]['name']} ({args.profile} steps):\n{result[key]['profile']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
