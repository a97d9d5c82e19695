"""scripts/gpu_benchmarks.sh, the one command behind the GPU figures: ``--dry-run`` lists what it would
run, and every command parses with its script's own arguments (the recipe's overrides compose into a
valid config), so a renamed flag fails here rather than on the GPU."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
from script_loader import SCRIPTS, load_script

REPO = SCRIPTS.parent
PARTS = [
    "tests",
    "loss",
    "train-base",
    "train-big",
    "sync-base",
    "compiled-base",
    "compiled-big",
    "batch-base",
    "recipe",
    "decode",
]


def dry_run(tmp_path: Path, *parts: str) -> list[tuple[str, int, list[str]]]:
    out, data = tmp_path / "out", tmp_path / "data"
    command = [
        "bash",
        str(SCRIPTS / "gpu_benchmarks.sh"),
        "--dry-run",
        "--out",
        str(out),
        "--data",
        str(data),
    ]
    done = subprocess.run([*command, *parts], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert not out.exists(), "a dry run creates nothing"
    rows = []
    for line in done.stdout.splitlines():
        name, limit, *argv = shlex.split(line)
        rows.append((name, int(limit), argv))
    return rows


def test_dry_run_lists_every_part_within_the_stated_time(tmp_path):
    rows = dry_run(tmp_path)
    assert [name for name, _, _ in rows] == PARTS
    header = (SCRIPTS / "gpu_benchmarks.sh").read_text()
    assert f"add up to {sum(limit for _, limit, _ in rows) // 60} minutes" in header
    assert [name for name, _, _ in dry_run(tmp_path, "recipe", "decode")] == ["recipe", "decode"]
    assert [name for name, _, _ in dry_run(tmp_path, "compiled")] == ["compiled-base", "compiled-big"]
    # One part is one call of at most 10 minutes on a lent GPU machine, set-up included.
    assert max(limit for _, limit, _ in rows) <= 540


def test_every_command_parses_with_its_script(tmp_path):
    rows = {name: argv for name, _, argv in dry_run(tmp_path)}
    for name, argv in rows.items():
        assert Path(argv[0]).name.startswith("python"), name
        if argv[1:3] == ["-m", "pytest"]:
            assert (REPO / argv[-1]).is_file()
        elif argv[1] == "scripts/benchmark.py":
            benchmark = load_script("benchmark")
            args = benchmark.parse_args(argv[2:])
            cfg = benchmark.load_model_config(args)  # the preset exists and loads
            assert args.device == "cuda" and args.json == str(tmp_path / "out" / f"{name}.json")
            assert cfg.d_model == {"base": 512, "big": 1024}[args.model]
        elif argv[1] == "scripts/recipe.py":
            recipe = load_script("recipe")
            args = recipe.parse_args(argv[2:])
            cfg = recipe.compose(args.experiment, args.overrides)
            assert cfg.data.dir == str(tmp_path / "data") and cfg.train.max_time_min == 3
            run_dir = cfg.run_dir
        elif argv[1] == "scripts/benchmark_loss.py":
            args = load_script("benchmark_loss").parse_args(argv[2:])
            assert args.device == "cuda" and args.impl == ["eager", "compiled"]
            assert args.json == str(tmp_path / "out" / "loss.json")
        elif argv[1] == "scripts/benchmark_decode.py":
            args = load_script("benchmark_decode").parse_args(argv[2:])
            assert args.device == "cuda" and args.data_dir == str(tmp_path / "data")
        else:
            pytest.fail(f"{name}: no check for {argv[1]}")
    decode = load_script("benchmark_decode").parse_args(rows["decode"][2:])
    assert decode.ckpt == f"{run_dir}/checkpoints/latest.pt", "decode reads the recipe's run"


def test_unknown_part_is_refused(tmp_path):
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_benchmarks.sh"), "--dry-run", "nonsense"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "unknown part: nonsense" in done.stdout


@pytest.mark.parametrize("part_exit", [0, 3])
def test_a_failing_part_fails_the_script_after_the_others_ran(tmp_path, part_exit):
    # A stand-in interpreter: its CUDA check and device report pass; every part exits with part_exit.
    fake = tmp_path / "python3"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -c ]; then echo fake GPU; exit 0; fi\nexit {part_exit}\n')
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_benchmarks.sh"), "--out", str(tmp_path / "out"), "loss", "tests"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)},
    )
    assert f"--- loss: exit {part_exit}" in done.stdout and f"--- tests: exit {part_exit}" in done.stdout
    assert done.returncode == (1 if part_exit else 0), done.stdout + done.stderr
