#!/usr/bin/env python
"""Average the last N checkpoints of a run into one that ``nmt.translate`` loads.

python scripts/average_checkpoints.py --run-dir runs/base --last 10 --output runs/base/checkpoints/avg10.pt
python scripts/average_checkpoints.py --inputs a.pt b.pt c.pt --output avg.pt
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from nmt.checkpoint import (
    RUN_FILE,
    CheckpointError,
    average_checkpoints,
    last_checkpoints,
    run_checkpoint,
    save_checkpoint,
)


def check_output(output: Path, inputs: list[Path]) -> None:
    """Refuse to write the average over one of its inputs or over a file a training run owns: an
    averaged checkpoint holds weights only, so a run whose latest.pt it replaced could not resume."""
    if RUN_FILE.fullmatch(output.name) and run_checkpoint(output.parent) is not None:
        raise CheckpointError(
            f"--output {output} is a name the training run in {output.parent} writes (latest.pt, best.pt, "
            "step_N.pt): the average would replace or mix with its checkpoints. Choose another name, e.g. avg.pt."
        )
    if output.is_dir():
        raise CheckpointError(f"--output {output} is a folder; give a file name, e.g. {output / 'avg.pt'}.")

    def identity(path: Path) -> tuple[int, int] | None:  # latest.pt and best.pt may be one file
        if not path.exists():
            return None
        st = path.stat()
        return st.st_dev, st.st_ino

    written_over, seen = identity(output), {}
    for path in inputs:
        same = identity(path)
        if same is None:  # missing: average_checkpoints says so
            continue
        if same in seen:  # it would count twice in the average
            again = "" if str(seen[same]) == str(path) else f" (as {seen[same]}, the same file)"
            raise CheckpointError(f"{path} is given twice{again}; name each checkpoint once.")
        if same == written_over:
            raise CheckpointError(
                f"--output {output} is one of the checkpoints being averaged; choose another file."
            )
        seen[same] = path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-dir", help="a training run directory (uses its checkpoints/step_N.pt)")
    source.add_argument("--inputs", nargs="+", help="checkpoint files to average")
    parser.add_argument(
        "--last", type=int, default=10, help="with --run-dir: how many of the newest to average"
    )
    parser.add_argument("--output", required=True, help="where to write the averaged checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        paths = args.inputs if args.inputs else last_checkpoints(args.run_dir, args.last)
        check_output(Path(args.output), [Path(p) for p in paths])
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
