#!/usr/bin/env python
"""Data pipeline benchmark on Multi30k: tokenizer training, encoding, caches, loader speed, padding.

    python scripts/benchmark_data.py                      # data/multi30k (data.dir), en-de
    python scripts/benchmark_data.py --src de --tgt en --max-tokens 8192 --json bench-data.json

What is measured (wall-clock seconds, one process, every CPU core the machine has):

* cold run: ``prepare_data`` with a fresh, empty cache folder: read and check both splits, train the
  SentencePiece model, encode, filter, write the Arrow caches;
* its parts, measured again on their own: SentencePiece training (``Tokenizer.train``) and encoding of
  the training and validation splits in memory (``encode_split``, no cache);
* cached run: ``prepare_data`` again on the same cache: reads the text (to hash it), loads the
  tokenizer and memory-maps the encoded Arrow files, tokenizes nothing;
* loader: batches per second of ``make_loader`` over the encoded training split (sampling, collation
  into padded tensors; no model), over ``--epochs`` epochs, and for comparison a loop that reads the
  rows one by one from the ``datasets.Dataset`` (what the loader avoids);
* padding efficiency: real tokens / padded tokens over source and target of one epoch's batches.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from nmt.config import DataConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DataConfig.dir, help="Multi30k folder (default: data.dir's)")
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=5, help="loader epochs to time")
    p.add_argument(
        "--row-batches", type=int, default=20, help="batches for the row-by-row comparison (at least 1)"
    )
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("-v", "--verbose", action="store_true", help="show the pipeline's own log lines")
    args = p.parse_args(argv)
    if args.row_batches < 1:
        p.error(f"--row-batches {args.row_batches}: time at least 1 batch row by row")
    return args


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_prepare(cfg, cache_dir: Path) -> dict:
    from nmt.data.corpus import prepare_data

    cold, cold_s = timed(prepare_data, cfg)
    warm, warm_s = timed(prepare_data, cfg)
    assert warm.tokenizer.fingerprint() == cold.tokenizer.fingerprint()
    return {"data": warm, "cold_s": cold_s, "cached_s": warm_s}


def bench_parts(cfg) -> dict:
    from nmt.data.corpus import encode_split
    from nmt.data.sources import read_split
    from nmt.data.tokenizer import Tokenizer

    (train, valid), read_s = timed(lambda: (read_split(cfg, "train"), read_split(cfg, "valid")))
    tok, spm_s = timed(Tokenizer.train, *train, cfg)
    _, encode_train_s = timed(encode_split, tok, *train, cfg)
    _, encode_valid_s = timed(encode_split, tok, *valid)
    return {
        "read_s": read_s,
        "spm_train_s": spm_s,
        "encode_s": encode_train_s + encode_valid_s,
        "train_pairs": len(train[0]),
        "valid_pairs": len(valid[0]),
        "vocab": tok.describe(),
    }


def bench_loader(dataset, max_tokens: int, epochs: int, row_batches: int) -> dict:
    from nmt.data.batching import TokenBatchSampler, collate, make_loader

    loader, setup_s = timed(make_loader, dataset, max_tokens)
    batches = sentences = tokens = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            batches += 1
            sentences += batch.size
            tokens += batch.num_src_tokens + batch.num_tgt_tokens
    loop_s = time.perf_counter() - start

    src, tgt = dataset["src_ids"], dataset["tgt_ids"]  # row access through datasets, for comparison
    sampler = TokenBatchSampler(loader.pairs.src_lengths, loader.pairs.tgt_lengths, max_tokens)
    start, done = time.perf_counter(), 0
    for indices in sampler:
        collate([src[i] for i in indices], [tgt[i] for i in indices], indices)
        done += 1
        if done == row_batches:
            break
    row_s = time.perf_counter() - start
    return {
        "loader_setup_s": setup_s,
        "batches_per_epoch": len(loader),
        "batches_per_s": batches / loop_s,
        "sentences_per_s": sentences / loop_s,
        "tokens_per_s": tokens / loop_s,
        "row_access_batches_per_s": done / row_s,
        "padding_efficiency": loader.padding_efficiency(),
    }


def table(results: dict) -> str:
    rows = [
        ("train / valid pairs", f"{results['train_pairs']:,} / {results['valid_pairs']:,}"),
        ("tokenizer", results["vocab"]),
        ("read + check text (train+valid)", f"{results['read_s']:.2f} s"),
        ("SentencePiece training", f"{results['spm_train_s']:.2f} s"),
        ("encode + filter (train+valid, in memory)", f"{results['encode_s']:.2f} s"),
        ("prepare_data, cold (empty cache)", f"{results['cold_s']:.2f} s"),
        ("prepare_data, cached", f"{results['cached_s']:.2f} s"),
        ("loader setup", f"{results['loader_setup_s'] * 1000:.0f} ms"),
        ("batches per epoch", f"{results['batches_per_epoch']:,}"),
        ("loader batches/s", f"{results['batches_per_s']:,.0f}"),
        ("loader sentences/s", f"{results['sentences_per_s']:,.0f}"),
        ("loader tokens/s (src+tgt, real)", f"{results['tokens_per_s']:,.0f}"),
        ("row-by-row Dataset access batches/s", f"{results['row_access_batches_per_s']:,.1f}"),
        (
            f"padding efficiency @ max_tokens {results['max_tokens']}",
            f"{100 * results['padding_efficiency']:.1f}%",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'measure':<{width}}  value", f"{'-' * width}  {'-' * 24}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s"
    )
    import datasets

    datasets.disable_progress_bars()
    data_dir = Path(args.data_dir)
    if not (data_dir / f"train.{args.src}.gz").exists() and not (data_dir / f"train.{args.src}").exists():
        print(f"error: no Multi30k in {data_dir}; pass --data-dir", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nmt-bench-data-") as cache:
        cfg = DataConfig(
            dir=str(data_dir), src_lang=args.src, tgt_lang=args.tgt, download="", vocab_size=args.vocab_size,
            max_tokens=args.max_tokens, cache_dir=cache,
        )  # fmt: skip
        prepared = bench_prepare(cfg, Path(cache))
        results = {
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "data_dir": str(data_dir),
            "pair": f"{args.src}-{args.tgt}",
            "vocab_size": args.vocab_size,
            "max_tokens": args.max_tokens,
            "cold_s": prepared["cold_s"],
            "cached_s": prepared["cached_s"],
            **bench_parts(cfg),
            **bench_loader(prepared["data"].train, args.max_tokens, args.epochs, args.row_batches),
        }
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
