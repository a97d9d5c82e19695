"""Checkpoint files: atomic writes, safe loading, averaging."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nmt.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    average_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from nmt.config import Config


def minimal_state(weight: float) -> dict:
    return {
        "config": Config().to_dict(),
        "tokenizer": {"kind": "test", "model": b"\x00\x01"},
        "model": {"w": torch.full((2, 3), weight), "steps": torch.tensor(7)},
    }


def test_round_trip_with_weights_only(tmp_path):
    path = save_checkpoint(minimal_state(1.5), tmp_path / "c.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], torch.full((2, 3), 1.5))
    assert state["tokenizer"]["model"] == b"\x00\x01"
    assert Config.from_dict(state["config"]) == Config()


def test_crash_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = save_checkpoint(minimal_state(1.0), tmp_path / "latest.pt")

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(minimal_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((2, 3), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"], "the partial temp file is removed"


def test_killed_process_mid_write_leaves_the_previous_checkpoint(tmp_path):
    """A real SIGKILL during torch.save: the old file survives, only a stray temp file may remain."""
    path = save_checkpoint(minimal_state(1.0), tmp_path / "latest.pt")
    code = f"""
import os, signal, torch
from nmt.checkpoint import save_checkpoint
real_save = torch.save
def save_then_die(obj, f, *a, **k):
    f.write(b"partial")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
save_checkpoint({{"model": {{}}, "config": {{}}, "tokenizer": {{}}}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((2, 3), 1.0))


def test_unreadable_and_foreign_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format_version": 999, "model": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 999"):
        load_checkpoint(tmp_path / "future.pt")


def test_average_of_checkpoints(tmp_path):
    paths = [
        save_checkpoint(minimal_state(w), tmp_path / f"step_{i}.pt") for i, w in enumerate([1.0, 2.0, 6.0])
    ]
    avg = average_checkpoints(paths)
    assert torch.allclose(avg["model"]["w"], torch.full((2, 3), 3.0))
    assert avg["model"]["w"].dtype == torch.float32
    assert torch.equal(avg["model"]["steps"], torch.tensor(7))
    out = save_checkpoint(avg, tmp_path / "avg.pt")
    assert "optimizer" not in load_checkpoint(out)


def test_average_refuses_checkpoints_of_different_models(tmp_path):
    a = save_checkpoint(minimal_state(1.0), tmp_path / "a.pt")
    other = minimal_state(1.0)
    other["model"]["extra"] = torch.zeros(1)
    b = save_checkpoint(other, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="different parameters"):
        average_checkpoints([a, b])
