#!/usr/bin/env python
"""Train a recipe, average its last checkpoints, pick by validation BLEU, score the test set.

    python scripts/recipe.py base data.dir=data/multi30k            # train, average, evaluate
    python scripts/recipe.py base --skip-train --average 5          # evaluate a finished run again
    python scripts/recipe.py de_en train.max_time_min=60 --json results/de_en-cpu.json

The first argument names ``configs/experiment/NAME.yaml``; ``key=value`` arguments are passed to
``python -m nmt.train`` as they are. Two candidates are decoded on the validation set: the run's
``best.pt`` and the average of its last ``--average`` numbered checkpoints. The one with the higher
validation BLEU is the model; the test set is only ever scored with it. The last line printed is a
row of the README's results table (cased sacreBLEU, lowercased BLEU, chrF, training time, hardware).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("recipe")


def compose(experiment: str, overrides: list[str]):
    """The run's typed config, composed exactly as ``python -m nmt.train`` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nmt.config import register_schema, to_config

    register_schema()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return to_config(hydra_compose("config", [f"+experiment={experiment}", *overrides]))


def train(experiment: str, overrides: list[str]) -> float:
    """Run ``python -m nmt.train``; returns its wall-clock seconds (data preparation included)."""
    command = [sys.executable, "-m", "nmt.train", f"+experiment={experiment}", *overrides]
    log.info("training: %s", " ".join(command))
    start = time.monotonic()
    trainer = subprocess.Popen(command)
    try:
        code = trainer.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached the trainer too: it is saving a checkpoint. Wait for it rather than kill it
        # (subprocess.run would, 0.25 s later); a second Ctrl-C stops both at once.
        log.warning("interrupted: waiting for the trainer to save its checkpoint")
        code = trainer.wait()
    if code in (130, 143):  # stopped by a signal, after saving: not a finished run to score
        raise SystemExit(f"training was interrupted (exit {code}); add train.resume=true to continue it.")
    if code != 0:
        raise SystemExit(f"error: training failed (exit {code}).")
    return time.monotonic() - start


def candidates(run_dir: Path, average: int) -> dict[str, Path]:
    """``best.pt`` and, if asked, the average of the last ``average`` numbered checkpoints."""
    from nmt.checkpoint import average_checkpoints, last_checkpoints, save_checkpoint, step_checkpoints

    ckpt_dir = run_dir / "checkpoints"
    found = {"best": ckpt_dir / "best.pt"} if (ckpt_dir / "best.pt").exists() else {}
    if average > 1 and not step_checkpoints(ckpt_dir):
        log.warning("no step_*.pt checkpoints in %s (train.keep_last=0?): nothing to average", ckpt_dir)
    elif average > 1:
        paths = last_checkpoints(run_dir, average)
        name = f"avg{len(paths)}"
        found[name] = save_checkpoint(average_checkpoints(paths), ckpt_dir / f"{name}.pt")
        log.info("averaged %s .. %s into %s", paths[0].name, paths[-1].name, found[name])
    if not found:
        raise SystemExit(f"error: no checkpoints in {ckpt_dir}; train first (drop --skip-train).")
    return found


def hardware(device: torch.device) -> str:
    """What this process runs on: with --skip-train, the decoding, not the training that came before."""
    from nmt.device import device_name

    if device.type == "cuda":
        return device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'s' if threads > 1 else ''} ({device_name(device)})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("experiment", help="configs/experiment/NAME.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for nmt.train")
    parser.add_argument("--average", type=int, default=5, help="average the last N checkpoints (1 = off)")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing run only")
    parser.add_argument(
        "--len-penalty",
        type=float,
        help="decode with this GNMT alpha instead of the run's decode.len_penalty",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the results to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from nmt.checkpoint import CheckpointError

    try:
        return evaluate(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def evaluate(args: argparse.Namespace) -> int:
    from nmt.checkpoint import checkpoint_file, config_from_checkpoint, load_checkpoint
    from nmt.data.sources import read_split
    from nmt.device import resolve_device
    from nmt.evaluate import bleu_options, score
    from nmt.translator import Translator

    cfg = compose(args.experiment, args.overrides)
    run_dir = Path(cfg.run_dir)
    if not args.skip_train:
        train(args.experiment, args.overrides)
    latest = load_checkpoint(checkpoint_file(run_dir))  # latest.pt (or the step file standing in for it)
    train_state = latest["train_state"]
    # The run's decoding settings (its latest checkpoint's: every candidate is decoded alike), but for
    # those this command names: decode.KEY=... (or a whole decode=GROUP) and --len-penalty. Unnamed ones
    # stay as the run was trained, whatever the experiment's file says now.
    keys = [arg.lstrip("+").split("=", 1)[0] for arg in args.overrides]
    named = {f.name for f in dataclasses.fields(cfg.decode) if "decode" in keys or f"decode.{f.name}" in keys}
    changes = {name: getattr(cfg.decode, name) for name in named}
    if args.len_penalty is not None:
        changes["len_penalty"] = args.len_penalty
    decode = dataclasses.replace(config_from_checkpoint(latest).decode, **changes)

    valid_src, valid_ref = read_split(cfg.data, "valid")
    test_src, test_ref = read_split(cfg.data, "test")
    valid_bleu: dict[str, float] = {}
    bleu = bleu_options(cfg)  # as validation scores
    translators: dict[str, Translator] = {}
    for name, path in candidates(run_dir, args.average).items():
        translators[name] = Translator.from_checkpoint(path, device=args.device)
        translators[name].decode_cfg = decode
        valid_bleu[name] = score(translators[name].translate(valid_src), valid_ref, **bleu).bleu
        log.info("validation BLEU of %s: %.2f", name, valid_bleu[name])
    chosen = max(valid_bleu, key=valid_bleu.get)
    translator = translators[chosen]
    start = time.monotonic()
    hyps = translator.translate(test_src)
    decode_sec = time.monotonic() - start
    cased, lower = score(hyps, test_ref, **bleu), score(hyps, test_ref, lowercase=True, **bleu)
    (run_dir / f"test.{cfg.data.tgt_lang}.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")

    result = {
        "experiment": args.experiment,
        "direction": f"{cfg.data.src_lang}->{cfg.data.tgt_lang}",
        "checkpoint": chosen,
        "valid_bleu": valid_bleu,
        "test": cfg.data.test,
        # Four decimals: the table row rounds them to one, which two decimals would round twice.
        "bleu": round(cased.bleu, 4),
        "bleu_lc": round(lower.bleu, 4),
        "chrf": round(cased.chrf, 4),
        "bleu_signature": cased.bleu_signature,
        "bleu_lc_signature": lower.bleu_signature,
        "chrf_signature": cased.chrf_signature,
        "steps": train_state["step"],
        "train_min": round(train_state["elapsed_sec"] / 60, 1),
        "test_decode_sec": round(decode_sec, 1),
        # Training's, where this command trained; with --skip-train, the decoding's.
        "hardware": hardware(translator.device if args.skip_train else resolve_device(cfg.train.device)),
        "beam": translator.decode_cfg.beam,
        "len_penalty": translator.decode_cfg.len_penalty,
        "date": time.strftime("%Y-%m-%d"),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(cased.bleu_detail)
    print(cased.format())
    print(lower.format())
    print(
        f"| {result['direction']} | {result['bleu']:.1f} | {result['bleu_lc']:.1f} | {result['chrf']:.1f} | "
        f"{result['train_min']:g} min, {result['steps']} steps | {result['hardware']} | "
        f"{chosen}, beam {result['beam']}, alpha {result['len_penalty']} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
