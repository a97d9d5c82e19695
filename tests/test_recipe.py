"""scripts/recipe.py on a finished toy run (--skip-train): which checkpoint, which settings, the row."""

from __future__ import annotations

import json
from pathlib import Path

from nmt.checkpoint import load_checkpoint
from nmt.data.corpus import prepare_data
from nmt.trainer import Trainer
from tests.conftest import tiny_config
from tests.script_loader import load_script
from tests.test_config import cli_overrides

recipe = load_script("recipe")


def train_toy_run(toy_dir: Path, run_dir: Path, **settings):
    cfg = tiny_config(toy_dir, run_dir, max_steps=6, valid_every=2, keep_last=5, **settings)
    Trainer(cfg, prepare_data(cfg.data), run_dir).train()
    return cfg


def test_skip_train_decodes_with_the_commands_settings_and_records_them(toy_dir, tmp_path, capsys):
    cfg = train_toy_run(toy_dir, tmp_path / "run")
    out = tmp_path / "row.json"
    args = [
        "smoke",
        *cli_overrides(cfg),
        "decode.beam=3",
        "--skip-train",
        "--average",
        "3",
        "--json",
        str(out),
    ]
    assert recipe.main(args) == 0
    result = json.loads(out.read_text())
    assert result["beam"] == 3  # the command's decode.beam, not the checkpoint's
    assert set(result["valid_bleu"]) == {"best", "avg3"} and result["checkpoint"] in result["valid_bleu"]
    assert result["steps"] == 6 and "CPU" in result["hardware"]
    assert (
        capsys.readouterr()
        .out.strip()
        .splitlines()[-1]
        .endswith(f"{result['checkpoint']}, beam 3, alpha 1.0 |")
    )


def test_decoding_settings_the_command_does_not_name_are_the_checkpoints(toy_dir, tmp_path, capsys):
    """The experiment's file may have changed since the run was trained; only what the command names
    (decode.KEY=..., --len-penalty) replaces the checkpoint's settings."""
    cfg = train_toy_run(toy_dir, tmp_path / "run")  # trained with beam 2, alpha 1.0
    overrides = [a for a in cli_overrides(cfg) if not a.startswith("decode.")]  # the experiment's: greedy
    assert recipe.main(["smoke", *overrides, "--skip-train", "--average", "1", "--len-penalty", "0.5"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("best, beam 2, alpha 0.5 |")


def test_every_candidate_is_decoded_with_the_runs_latest_settings(toy_dir, tmp_path, capsys):
    """A run resumed with other decoding settings has a best.pt that records the old ones."""
    from nmt.checkpoint import save_checkpoint

    cfg = train_toy_run(toy_dir, tmp_path / "run")  # beam 2
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    state["config"]["decode"]["beam"] = 1
    best.unlink()  # a file of its own, not latest.pt's
    save_checkpoint(state, best)
    overrides = [a for a in cli_overrides(cfg) if not a.startswith("decode.")]
    assert recipe.main(["smoke", *overrides, "--skip-train", "--average", "1"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("best, beam 2, alpha 1.0 |")


def test_a_run_without_step_files_is_scored_from_best_alone(toy_dir, tmp_path, caplog):
    cfg = train_toy_run(toy_dir, tmp_path / "run")
    for step_file in (tmp_path / "run" / "checkpoints").glob("step_*.pt"):
        step_file.unlink()  # as train.keep_last=0 leaves it
    assert recipe.main(["smoke", *cli_overrides(cfg), "--skip-train", "--average", "5"]) == 0
    assert "nothing to average" in caplog.text
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["train_state"]["step"] == 6
