#!/usr/bin/env python
"""Loss benchmark: forward and backward of the label-smoothed loss over (B, T, V) logits, eager against
compiled.

    python scripts/benchmark_loss.py --device cpu --dtype bf16 --vocab 8000 --tokens 4096
    python scripts/benchmark_loss.py --device cuda --dtype bf16 --vocab 32000 --tokens 16384 --json loss.json

The two implementations are the training step's two choices for logits (every GPU run, and CPU runs
in bf16): ``eager`` is ``nmt.loss.label_smoothed_nll`` (closed-form backward, float32
log-probabilities kept for the backward pass), ``compiled`` is ``nmt.runtime.compile_loss()``, what
``train.compile=true`` and ``scripts/benchmark.py --compile`` use. Each step draws a batch shape
within the token budget (target lengths around ``--mean-len``, rows padded to the longest) and fresh
logits; the implementations take turns on the same batch, in alternating order.

Reported per implementation: the median time of forward + backward over the timed steps (CUDA:
synchronised at both ends), target positions per second, the time of the warm-up steps (with the
compilation, for ``compiled``; set ``TORCHINDUCTOR_CACHE_DIR`` to an empty folder to time it from
scratch), the graphs compiled, the memory held for the backward pass beyond the logits
themselves (the tensors autograd saves), on CUDA the peak memory above the logits, and the largest
relative difference of the loss from ``eager``'s on the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch._dynamo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nmt.data.tokenizer import PAD_ID  # noqa: E402
from nmt.device import device_name  # noqa: E402
from nmt.loss import label_smoothed_nll  # noqa: E402
from nmt.runtime import compile_loss, compiled_graph_count, keep_freed_memory_in_heap  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="of the logits")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--tokens", type=int, default=4096, help="padded target positions per batch, at most")
    p.add_argument("--mean-len", type=int, default=30, help="target lengths are drawn around this")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--impl", default="eager,compiled", help="comma-separated: eager, compiled")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if args.vocab < 2 or args.tokens < 2 * args.mean_len or args.mean_len < 2:
        p.error("need --vocab >= 2, --mean-len >= 2 and --tokens >= 2 * --mean-len")
    args.impl = [name.strip() for name in args.impl.split(",") if name.strip()]
    if not args.impl or not set(args.impl) <= {"eager", "compiled"}:
        p.error(f"--impl takes eager and/or compiled, not {args.impl}")
    if args.steps < 1 or args.warmup < 0:
        p.error("need --steps >= 1 and --warmup >= 0")
    return args


def batch_shapes(args: argparse.Namespace, count: int) -> list[tuple[int, int]]:
    """(B, T) of each step: T around the mean length, B as many rows as the token budget allows."""
    rng = np.random.default_rng(args.seed)
    lengths = rng.integers(args.mean_len // 2, 2 * args.mean_len, size=count, endpoint=True)
    return [(max(1, args.tokens // int(t)), int(t)) for t in lengths]


def make_batch(shape: tuple[int, int], args: argparse.Namespace, device: torch.device, step: int):
    """Logits (B, T, V) of the chosen dtype, a leaf that wants its gradient, and a padded target."""
    batch, length = shape
    gen = torch.Generator(device=device).manual_seed(args.seed * 100_003 + step)
    logits = torch.randn(batch, length, args.vocab, generator=gen, device=device) * 3
    logits = logits.to(DTYPES[args.dtype]).requires_grad_()
    target = torch.randint(PAD_ID + 4, args.vocab, (batch, length), generator=gen, device=device)
    keep = torch.randint(length // 2, length + 1, (batch, 1), generator=gen, device=device)
    target.masked_fill_(torch.arange(length, device=device) >= keep, PAD_ID)
    return logits, target


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def saved_beyond_logits(loss_fn, logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> int:
    """Bytes of the tensors autograd keeps for the backward pass, not counting the logits' storage."""
    seen: set[int] = {logits.untyped_storage().data_ptr()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = loss_fn(logits, target, smoothing, PAD_ID)
    loss.backward()
    return total


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmark_loss: --device cuda but no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    # As in training on CPU: without it, whichever implementation runs first in a step pays the page
    # faults of fresh (B, T, V) buffers and the second reuses them.
    heap = device.type == "cpu" and keep_freed_memory_in_heap()
    torch._dynamo.reset()  # compile afresh: the graph count and warm-up are this run's
    impls = {"eager": label_smoothed_nll, "compiled": compile_loss() if "compiled" in args.impl else None}
    shapes = batch_shapes(args, args.warmup + args.steps)
    results = {
        name: {"times_ms": [], "warmup_s": 0.0, "graphs": 0, "max_rel_diff": 0.0} for name in args.impl
    }
    for step, shape in enumerate(shapes):
        logits, target = make_batch(shape, args, device, step)
        tokens = int((target != PAD_ID).sum())
        order = args.impl if step % 2 == 0 else args.impl[::-1]
        losses = {}
        for name in order:
            leaf = logits.detach().requires_grad_()
            graphs = compiled_graph_count()
            synchronize(device)
            start = time.perf_counter()
            loss, _ = impls[name](leaf, target, args.smoothing, PAD_ID)
            (loss / tokens).backward()
            synchronize(device)
            seconds = time.perf_counter() - start
            res = results[name]
            res["graphs"] += compiled_graph_count() - graphs
            if step < args.warmup:
                res["warmup_s"] += seconds
            else:
                res["times_ms"].append(1000 * seconds)
            losses[name] = float(loss.detach())
        if "eager" in losses:
            for name, value in losses.items():
                diff = abs(value - losses["eager"]) / max(abs(losses["eager"]), 1e-30)
                results[name]["max_rel_diff"] = max(results[name]["max_rel_diff"], diff)

    # Memory, on the last batch shape: what the backward pass holds, and on CUDA the peak.
    logits, target = make_batch(shapes[-1], args, device, len(shapes))
    positions = logits.shape[0] * logits.shape[1]
    mean_positions = sum(b * t for b, t in shapes[args.warmup :]) / args.steps  # of the timed steps
    for name in args.impl:
        res = results[name]
        res["saved_beyond_logits_bytes"] = saved_beyond_logits(
            impls[name], logits.detach().requires_grad_(), target, args.smoothing
        )
        if device.type == "cuda":
            leaf = logits.detach().requires_grad_()
            synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            loss, _ = impls[name](leaf, target, args.smoothing, PAD_ID)
            loss.backward()
            synchronize(device)
            res["peak_above_logits_bytes"] = torch.cuda.max_memory_allocated(device) - base
        res["step_ms_median"] = statistics.median(res["times_ms"])
        res["positions_per_sec"] = mean_positions / (res["step_ms_median"] / 1000)
    meta = {
        **{k: v for k, v in vars(args).items() if k not in ("json", "device", "threads")},
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "freed_memory_kept_in_heap": heap,
        "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (may hold earlier graphs)"),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "last_shape": [logits.shape[0], logits.shape[1], args.vocab],
        "last_positions": positions,
    }
    return {"meta": meta, "results": results}


def table(out: dict) -> str:
    meta, results = out["meta"], out["results"]
    names = list(results)
    rows = [
        ("step, forward + backward (ms, median)", lambda r: f"{r['step_ms_median']:,.1f}"),
        ("padded positions / s (mean batch, median step)", lambda r: f"{r['positions_per_sec']:,.0f}"),
        ("warm-up steps, compile included (s)", lambda r: f"{r['warmup_s']:.1f}"),
        ("graphs compiled", lambda r: str(r["graphs"])),
        ("held for backward beyond logits (MiB)", lambda r: f"{r['saved_beyond_logits_bytes'] / 2**20:,.1f}"),
    ]
    if "peak_above_logits_bytes" in results[names[0]]:
        rows.append(("peak above logits (MiB)", lambda r: f"{r['peak_above_logits_bytes'] / 2**20:,.1f}"))
    if "eager" in results:
        rows.append(("loss, largest rel. diff from eager", lambda r: f"{r['max_rel_diff']:.1e}"))
    width = max(len(label) for label, _ in rows) + 2
    device = meta["device"]
    if meta["device_type"] == "cpu":
        device += f" ({meta['threads']} threads)"
    lines = [
        f"loss over {meta['dtype']} logits | V={meta['vocab']} | up to {meta['tokens']} positions per batch "
        f"(last {meta['last_shape'][0]} x {meta['last_shape'][1]}) | {device} | "
        f"{meta['warmup']} warm-up + {meta['steps']} timed steps | torch {meta['torch']}",
        "metric".ljust(width) + "".join(name.rjust(14) for name in names),
    ]
    lines.append("-" * len(lines[-1]))
    for label, fmt in rows:
        lines.append(label.ljust(width) + "".join(fmt(results[name]).rjust(14) for name in names))
    if "eager" in results and "compiled" in results:
        speedup = results["eager"]["step_ms_median"] / results["compiled"]["step_ms_median"]
        lines.append(f"compiled / eager speed: {speedup:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = run(args)
    print(table(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
