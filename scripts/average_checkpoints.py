#!/usr/bin/env python
"""Average the last N checkpoints of a run into one that ``nmt.translate`` loads.

python scripts/average_checkpoints.py --run-dir runs/base --last 10 --output runs/base/checkpoints/avg10.pt
python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt
"""

from __future__ import annotations

import argparse
import logging
import sys

from nmt.checkpoint import CheckpointError, average_checkpoints, last_checkpoints, save_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a training run directory (uses its checkpoints/step_*.pt)")
    source.add_argument("--inputs", nargs="+", help="checkpoint files to average")
    parser.add_argument(
        "--last", type=int, default=10, help="with --run-dir: how many of the newest to average"
    )
    parser.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        paths = args.inputs if args.inputs else last_checkpoints(args.run_dir, args.last)
        state = average_checkpoints(paths)
        save_checkpoint(state, args.output)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"averaged {len(paths)} checkpoints -> {args.output}")
    for p in paths:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
