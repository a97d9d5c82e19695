"""A WMT-sized parallel corpus from a small one, to measure data preparation at scale.

    python scripts/large_corpus.py --data-dir data/multi30k --pairs 4500000 --out /tmp/large
    python -m nmt.train +experiment=base data.dir=/tmp/large data.vocab_size=32000 train.max_steps=20

Pair i joins two random training pairs of ``--data-dir`` (source to source, target to target), so
the sentences are about twice as long (WMT-like, ~25 words) and nearly all distinct; the validation
and test files are copied unchanged. The vocabulary stays that of the small corpus (Multi30k: about
21,000 SentencePiece pieces at most), so it measures time and memory, not translation quality.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from nmt.data.sources import read_text_lines, resolve_gz

BLOCK = 100_000  # pairs written at a time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", required=True, help="folder of the small corpus (Multi30k layout)")
    p.add_argument("--src-lang", default="en")
    p.add_argument("--tgt-lang", default="de")
    p.add_argument("--pairs", type=int, default=4_500_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder to write train/val/test_2016_flickr files into")
    args = p.parse_args(argv)
    data, out = Path(args.data_dir), Path(args.out)
    if out.resolve() == data.resolve():
        raise SystemExit(
            "error: --out is --data-dir; writing the large corpus there would replace the small one."
        )
    out.mkdir(parents=True, exist_ok=True)
    src = read_text_lines(resolve_gz(data / f"train.{args.src_lang}"))
    tgt = read_text_lines(resolve_gz(data / f"train.{args.tgt_lang}"))
    if len(src) != len(tgt):
        raise SystemExit(f"error: the training files of {data} have {len(src):,} and {len(tgt):,} lines.")
    rng = np.random.default_rng(args.seed)
    first, second = rng.integers(0, len(src), args.pairs), rng.integers(0, len(src), args.pairs)
    with (
        open(out / f"train.{args.src_lang}", "w", encoding="utf-8") as fs,
        open(out / f"train.{args.tgt_lang}", "w", encoding="utf-8") as ft,
    ):
        for start in range(0, args.pairs, BLOCK):
            rows = list(zip(first[start : start + BLOCK], second[start : start + BLOCK], strict=True))
            fs.write("".join(f"{src[a]} {src[b]}\n" for a, b in rows))
            ft.write("".join(f"{tgt[a]} {tgt[b]}\n" for a, b in rows))
    for split in ("val", "test_2016_flickr"):
        for lang in (args.src_lang, args.tgt_lang):
            path = resolve_gz(data / f"{split}.{lang}")
            shutil.copyfile(path, out / path.name)
    print(f"{args.pairs:,} training pairs in {out}")


if __name__ == "__main__":
    main()
