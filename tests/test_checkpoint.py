"""Checkpoint files: atomic writes, safe loading, a run's latest/step/best files, resume, averaging."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_loader import load_script

from nmt.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    average_checkpoints,
    checkpoint_file,
    find_resume_checkpoint,
    last_checkpoints,
    load_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)
from nmt.config import Config
from tests.conftest import REPO, files_limited_to

average_script = load_script("average_checkpoints")


def minimal_state(weight: float) -> dict:
    return {
        "config": Config().to_dict(),
        "tokenizer": {"kind": "test", "model": b"\x00\x01"},
        "model": {"w": torch.full((2, 3), weight), "steps": torch.tensor(7)},
    }


def run_state(step: int, best_step: int) -> dict:
    """A training checkpoint at ``step`` whose train state records ``best_step`` as the best so far."""
    state = minimal_state(float(step))
    state["train_state"] = {"step": step, "best_step": best_step}
    return state


def saved_step(path: Path) -> int:
    return load_checkpoint(path)["train_state"]["step"]


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
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(
        CheckpointError,
        match=r"could not write .*latest.pt: the checkpoint needs .* \(No space left on device \(simulated\)\)",
    ):
        save_checkpoint(minimal_state(2.0), path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.full((2, 3), 1.0))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pt"], "the partial temp file is removed"


def test_a_checkpoint_folder_that_cannot_be_made_is_a_checkpoint_error(tmp_path):
    (tmp_path / "run").write_text("a file where the run folder should be")
    # Not a matter of space: the message does not talk of it.
    with pytest.raises(CheckpointError, match=r"^could not write .*latest.pt \(Not a directory\)$"):
        save_run_checkpoint(
            run_state(10, best_step=10), tmp_path / "run" / "checkpoints", 10, keep_last=1, best=True
        )


def test_an_error_that_is_not_the_disks_is_not_reported_as_one(tmp_path, monkeypatch):
    def unsaveable(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("cannot pickle this tensor")

    monkeypatch.setattr(torch, "save", unsaveable)
    with pytest.raises(RuntimeError, match="^cannot pickle this tensor$"):
        save_checkpoint(minimal_state(2.0), tmp_path / "latest.pt")
    assert list(tmp_path.iterdir()) == [], "the partial temp file is removed"


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
    with pytest.raises(CheckpointError, match=r"could not be read: it is not a PyTorch checkpoint file \("):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"format_version": 999, "model": {}}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version 999"):
        load_checkpoint(tmp_path / "future.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")  # another program's state dict
    with pytest.raises(
        CheckpointError, match=r"weights\.pt is not an nmt checkpoint \(it has no format_version"
    ):
        load_checkpoint(tmp_path / "weights.pt")
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")  # as older toolkits save
    with pytest.raises(CheckpointError) as error:  # not torch's advice to load it with weights_only=False
        load_checkpoint(tmp_path / "pickled.pt")
    assert "holds Python objects" in str(error.value) and "weights_only" not in str(error.value)


def test_a_damaged_latest_checkpoint_names_the_newest_earlier_one(tmp_path):
    ckpt_dir = make_run(tmp_path / "run", [10, 20])
    latest = ckpt_dir / "latest.pt"
    data = latest.read_bytes()
    latest.unlink()  # as after cp -r, latest.pt is a file of its own; then it is cut short
    latest.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged or incomplete") as error:
        load_checkpoint(latest)
    step = ckpt_dir / "step_00000020.pt"
    assert "move latest.pt away and continue with train.resume=true." in str(error.value)  # a file of its own
    for size in (0, 1000, len(data) - 100):  # empty, and cut at other places
        latest.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="damaged or incomplete"):
            load_checkpoint(latest)
    latest.unlink()  # the advice works: the run continues from its newest step file in place
    assert find_resume_checkpoint(resume_config("true"), tmp_path / "run") == step
    assert saved_step(step) == 20


def test_a_damaged_latest_checkpoint_and_its_step_file_name_the_checkpoint_before_them(tmp_path):
    """latest.pt is a hard link of the newest step_N.pt: cut short in place, both are damaged."""
    ckpt_dir = make_run(tmp_path / "run", [10, 20, 30])  # best.pt too is latest.pt's file
    latest = ckpt_dir / "latest.pt"
    os.truncate(latest, latest.stat().st_size // 2)
    advice = (
        "step_00000020.pt beside it is the newest other checkpoint: to go on training from it, move "
        "latest.pt and step_00000030.pt and best.pt away and continue with train.resume=true."
    )
    for name in ("latest.pt", "step_00000030.pt", "best.pt"):  # whichever name was read
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(ckpt_dir / name)
        assert advice in str(error.value)
    moved = tmp_path / "damaged"
    moved.mkdir()
    for name in ("latest.pt", "step_00000030.pt", "best.pt"):
        (ckpt_dir / name).rename(moved / name)
    earlier = ckpt_dir / "step_00000020.pt"
    assert find_resume_checkpoint(resume_config("true"), tmp_path / "run") == earlier
    assert saved_step(earlier) == 20
    # Had only latest.pt been moved away, the damaged step file would stand in for it; an older one is
    # still not resumed into the run (its newer step files would mix with the new branch's).
    (moved / "step_00000030.pt").rename(ckpt_dir / "step_00000030.pt")
    with pytest.raises(CheckpointError, match="not the latest checkpoint of the run"):
        find_resume_checkpoint(resume_config(earlier), tmp_path / "run")


def test_a_damaged_step_file_that_is_not_the_runs_checkpoint_gets_no_resume_advice(tmp_path):
    ckpt_dir = make_run(tmp_path / "run", [10, 20, 30])
    old = ckpt_dir / "step_00000020.pt"
    os.truncate(old, old.stat().st_size // 2)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(old)
    assert "damaged or incomplete" in str(error.value) and "train.resume" not in str(error.value)


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


# ---------------------------------------------------------------- a run's latest / step_N / best files


def crash_when_replacing(monkeypatch, name: str) -> None:
    """Make the rename onto ``name`` fail, as if the process were killed just before it."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            raise OSError(f"killed before {name} was replaced (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


FULL_DISK = """
import sys, torch
from nmt.checkpoint import CheckpointError, save_run_checkpoint
from nmt.config import Config
state = {
    "config": Config().to_dict(),
    "tokenizer": {"kind": "test", "model": b"\\x00"},
    "model": {"w": torch.zeros(100_000)},  # 400 kB
    "train_state": {"step": 20, "best_step": 20},
}
try:
    save_run_checkpoint(state, sys.argv[1], 20, keep_last=2, best=True)
except CheckpointError as e:
    print(e)
"""


def test_a_checkpoint_that_does_not_fit_on_disk_fails_clearly_and_keeps_the_previous_one(tmp_path):
    """A real failed write (the process's file size limit stands in for a full disk): one sentence with
    the space needed and free, no partial file, and latest.pt and best.pt still the previous step."""
    ckpt_dir = tmp_path / "checkpoints"
    save_run_checkpoint(run_state(10, best_step=10), ckpt_dir, 10, keep_last=2, best=True)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(ckpt_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        preexec_fn=files_limited_to(200_000),  # below the 400 kB checkpoint
    )
    assert proc.returncode == 0, proc.stderr
    assert re.fullmatch(
        rf"could not write {re.escape(str(ckpt_dir / 'latest.pt'))}: the checkpoint needs about 0\.4 MiB and "
        r"[\d,.]+ MiB is free there \(File too large\)\n",  # the write's own error, not torch's
        proc.stdout,
    ), proc.stdout
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "latest.pt", "step_00000010.pt"]
    assert saved_step(ckpt_dir / "latest.pt") == saved_step(ckpt_dir / "best.pt") == 10


@pytest.mark.parametrize("crash_at", ["step_00000020.pt", "best.pt", "latest.pt"])
def test_a_save_killed_midway_leaves_latest_complete_and_best_no_older_than_it_records(
    tmp_path, monkeypatch, crash_at
):
    ckpt_dir = tmp_path / "checkpoints"
    save_run_checkpoint(run_state(10, best_step=10), ckpt_dir, 10, keep_last=1, best=True)
    crash_when_replacing(monkeypatch, crash_at)
    with pytest.raises(CheckpointError, match="simulated"):
        save_run_checkpoint(run_state(20, best_step=20), ckpt_dir, 20, keep_last=1, best=True)
    monkeypatch.undo()

    # latest.pt, the resume point, is still the previous checkpoint, and best.pt holds at least the
    # step it records as the best (with keep_last=1 no step file would keep those weights).
    latest = load_checkpoint(ckpt_dir / "latest.pt")
    assert latest["train_state"]["step"] == 10
    assert saved_step(ckpt_dir / "best.pt") >= latest["train_state"]["best_step"]

    # The resumed run saves the same step again: everything is in place, nothing is left over.
    save_run_checkpoint(run_state(20, best_step=20), ckpt_dir, 20, keep_last=1, best=True)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "latest.pt", "step_00000020.pt"]
    assert all(saved_step(ckpt_dir / name) == 20 for name in ("best.pt", "latest.pt", "step_00000020.pt"))


def test_a_first_save_killed_before_latest_is_resumed_from_its_step_file_and_never_overwritten(
    tmp_path, monkeypatch, caplog
):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    crash_when_replacing(monkeypatch, "latest.pt")
    with pytest.raises(CheckpointError, match="simulated"):
        save_run_checkpoint(run_state(10, best_step=10), ckpt_dir, 10, keep_last=5, best=True)
    monkeypatch.undo()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "step_00000010.pt"]

    # A fresh run into the folder would overwrite step_00000010.pt: refused, as over a latest.pt.
    with pytest.raises(CheckpointError, match=r"already holds a run \(checkpoints/step_00000010\.pt\)"):
        find_resume_checkpoint(Config(), tmp_path / "run")
    with caplog.at_level("WARNING", logger="nmt.checkpoint"):
        found = find_resume_checkpoint(resume_config("true"), tmp_path / "run")
    assert found == ckpt_dir / "step_00000010.pt" and saved_step(found) == 10
    assert "latest.pt is missing" in caplog.text
    assert checkpoint_file(tmp_path / "run") == found  # what nmt.translate --ckpt RUN_DIR loads
    # Nor may another run's checkpoint be resumed into it (its saves would prune step_00000010.pt).
    other = make_run(tmp_path / "other", [50])
    with pytest.raises(CheckpointError, match="a checkpoint of another run than the one in"):
        find_resume_checkpoint(resume_config(other / "latest.pt"), tmp_path / "run")
    assert find_resume_checkpoint(resume_config(found), tmp_path / "run") == found  # its own: fine


def test_a_saved_run_checkpoint_is_linked_under_all_its_names(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        save_run_checkpoint(run_state(step, best_step=20), ckpt_dir, step, keep_last=2, best=step == 20)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [
        "best.pt",
        "latest.pt",
        "step_00000020.pt",
        "step_00000030.pt",
    ]
    assert os.path.samefile(ckpt_dir / "latest.pt", ckpt_dir / "step_00000030.pt")
    assert saved_step(ckpt_dir / "best.pt") == 20


def test_a_save_syncs_the_folder_after_its_last_rename(tmp_path, monkeypatch):
    """The renames are on disk, not only the data: after the folder's sync, latest.pt (or the saved file)
    is already the new checkpoint, and no temporary file is left to rename."""
    import nmt.checkpoint

    synced = []

    def sync_folder(folder):
        names = sorted(p.name for p in Path(folder).iterdir())
        synced.append((Path(folder), names, saved_step(Path(folder) / "latest.pt")))

    monkeypatch.setattr(nmt.checkpoint, "sync_folder", sync_folder)
    ckpt_dir = tmp_path / "checkpoints"
    save_run_checkpoint(run_state(10, best_step=10), ckpt_dir, 10, keep_last=1, best=True)
    assert synced == [(ckpt_dir, ["best.pt", "latest.pt", "step_00000010.pt"], 10)]
    synced.clear()
    save_checkpoint(run_state(5, best_step=5), tmp_path / "other" / "latest.pt")
    assert synced == [(tmp_path / "other", ["latest.pt"], 5)]


def test_where_hard_links_fail_the_names_are_synced_copies(tmp_path, monkeypatch):
    """On a file system without hard links, step_N.pt and best.pt are copies, each on disk before it
    gets its name, as latest.pt is."""
    import nmt.checkpoint

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    synced = set()
    real_fsync = os.fsync

    def fsync(fd):
        synced.add(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(nmt.checkpoint.os, "link", no_links)
    monkeypatch.setattr(os, "fsync", fsync)
    ckpt_dir = tmp_path / "checkpoints"
    save_run_checkpoint(run_state(10, best_step=10), ckpt_dir, 10, keep_last=1, best=True)
    names = ["best.pt", "latest.pt", "step_00000010.pt"]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == names
    assert not os.path.samefile(ckpt_dir / "best.pt", ckpt_dir / "latest.pt")  # copies, not links
    assert all(saved_step(ckpt_dir / name) == 10 for name in names)
    assert {(ckpt_dir / name).stat().st_ino for name in names} <= synced


def test_temp_files_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    save_run_checkpoint(run_state(10, best_step=10), ckpt_dir, 10, keep_last=1, best=True)
    # What SIGKILL leaves during the write (mkstemp's name) and during the links.
    stale = [".latest.pt.k2x_9abc.tmp", ".best.pt.tmp", ".step_00000020.pt.tmp"]
    # Not written by save_run_checkpoint (an average being written into the folder, a user's file).
    others = [".avg10.pt.q1w2e3r4.tmp", "notes.tmp", "latest.pt.bak"]
    for name in stale + others:
        (ckpt_dir / name).write_bytes(b"partial")
    save_run_checkpoint(run_state(20, best_step=10), ckpt_dir, 20, keep_last=1, best=False)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == sorted(
        ["best.pt", "latest.pt", "step_00000020.pt", *others]
    )


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o002, 0o664)], ids=["027", "002"])
def test_checkpoint_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_run_checkpoint(run_state(10, best_step=10), tmp_path / "checkpoints", 10, keep_last=1, best=True)
        save_checkpoint(minimal_state(1.0), tmp_path / "avg.pt")
    finally:
        os.umask(old)
    for path in [*(tmp_path / "checkpoints").iterdir(), tmp_path / "avg.pt"]:
        assert path.stat().st_mode & 0o777 == mode, path.name


# ---------------------------------------------------------------- train.resume=PATH


def resume_config(resume: str | Path) -> Config:
    cfg = Config()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=str(resume)))


def make_run(run_dir: Path, steps: list[int]) -> Path:
    for step in steps:
        save_run_checkpoint(run_state(step, step), run_dir / "checkpoints", step, keep_last=5, best=True)
    return run_dir / "checkpoints"


def test_resume_from_a_path_refuses_a_run_directory_holding_another_run(tmp_path):
    make_run(tmp_path / "mine", [10, 20])
    other = make_run(tmp_path / "other", [10])
    with pytest.raises(CheckpointError, match="run_dir=NEW train.resume=") as refused:
        find_resume_checkpoint(resume_config(other / "latest.pt"), tmp_path / "mine")
    assert "is a checkpoint of another run than the one in" in str(refused.value)
    # Into a new directory it is fine.
    assert find_resume_checkpoint(resume_config(other / "latest.pt"), tmp_path / "new") == other / "latest.pt"


def test_resume_from_an_older_step_refuses_the_run_directory_it_came_from(tmp_path):
    ckpt_dir = make_run(tmp_path / "run", [10, 20])
    with pytest.raises(CheckpointError, match="is not the latest checkpoint of the run in") as refused:
        find_resume_checkpoint(resume_config(ckpt_dir / "step_00000010.pt"), tmp_path / "run")
    assert f"run_dir=NEW train.resume={ckpt_dir / 'step_00000010.pt'}" in str(refused.value)
    new_dir = tmp_path / "branch"
    assert find_resume_checkpoint(resume_config(ckpt_dir / "step_00000010.pt"), new_dir) == (
        ckpt_dir / "step_00000010.pt"
    )


@pytest.mark.parametrize("resume", ["checkpoints/latest.pt", "checkpoints/step_00000020.pt", "."])
def test_resume_from_a_path_to_the_runs_own_latest_checkpoint_continues_it(tmp_path, resume):
    make_run(tmp_path / "run", [10, 20])
    path = find_resume_checkpoint(resume_config(tmp_path / "run" / resume), tmp_path / "run")
    assert saved_step(path) == 20


def test_resume_from_a_path_that_holds_no_checkpoint_says_where_it_looked(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*run/checkpoints/latest\.pt\.$"):
        find_resume_checkpoint(resume_config(tmp_path / "run"), tmp_path / "new")
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*missing\.pt\.$"):
        find_resume_checkpoint(resume_config(tmp_path / "missing.pt"), tmp_path / "new")


# ---------------------------------------------------------------- averaging


def save_variant(tmp_path: Path, name: str, change) -> Path:
    state = minimal_state(2.0)
    change(state)
    return save_checkpoint(state, tmp_path / name)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda s: s["model"].update(w=torch.zeros(3, 3)),
            r"parameter w is float32 \[3, 3\] in .*b\.pt but float32 \[2, 3\] in .*a\.pt",
        ),
        # A shape that broadcasts would otherwise be averaged without a word.
        (lambda s: s["model"].update(w=torch.zeros(1, 3)), r"parameter w is float32 \[1, 3\] in .*b\.pt"),
        (lambda s: s["model"].update(w=torch.zeros(2, 3, dtype=torch.bfloat16)), r"parameter w is bfloat16"),
        (
            lambda s: s["config"]["model"].update(d_model=512, n_heads=8),
            r"model\.d_model=512 vs 256, model\.n_heads=8 vs 4",
        ),
        (
            lambda s: s["config"]["data"].update(tgt_lang="fr"),
            r"b\.pt and .*a\.pt .*data\.tgt_lang='fr' vs 'de'",
        ),
        (lambda s: s["config"]["data"].update(vocab_size=999), r"data\.vocab_size=999 vs 8000"),
        (lambda s: s["tokenizer"].update(model=b"\x02"), r"different tokenizers"),
    ],
    ids=["shape", "broadcastable-shape", "dtype", "model-config", "languages", "vocabulary", "tokenizer"],
)
def test_average_refuses_checkpoints_that_are_not_of_one_run(tmp_path, change, message):
    a = save_checkpoint(minimal_state(1.0), tmp_path / "a.pt")
    b = save_variant(tmp_path, "b.pt", change)
    with pytest.raises(CheckpointError, match=message):
        average_checkpoints([a, b])


@pytest.mark.parametrize("n", [0, -1])
def test_last_checkpoints_needs_at_least_one(tmp_path, n):
    make_run(tmp_path / "run", [10, 20, 30])
    with pytest.raises(CheckpointError, match="at least 1"):
        last_checkpoints(tmp_path / "run", n)
    assert [p.name for p in last_checkpoints(tmp_path / "run", 1)] == ["step_00000030.pt"]
    with pytest.raises(CheckpointError, match=r"^\S*runn does not exist \(give the run directory"):
        last_checkpoints(tmp_path / "runn", 1)  # a typo


def test_average_script_reports_a_bad_request_in_one_line(tmp_path, capsys):
    make_run(tmp_path / "run", [10, 20])
    out = tmp_path / "avg.pt"
    assert average_script.main(["--run-dir", str(tmp_path / "run"), "--last", "0", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: asked for the last 0 checkpoints") and err.count("\n") == 1
    b = save_variant(tmp_path, "b.pt", lambda s: s["config"]["data"].update(tgt_lang="fr"))
    a = tmp_path / "run" / "checkpoints" / "latest.pt"
    assert average_script.main(["--inputs", str(a), str(b), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "data.tgt_lang='fr' vs 'de'" in err and err.count("\n") == 1
    assert not out.exists()


def test_average_script_bad_outputs_and_repeated_inputs_are_one_line(tmp_path, capsys):
    """An output that is a folder or inside a file, and a checkpoint named twice (latest.pt and step_N.pt
    can be one file, linked), which would count twice in the average: one error line, nothing written."""
    ckpt_dir = make_run(tmp_path / "run", [10, 20])
    step, latest = ckpt_dir / "step_00000020.pt", ckpt_dir / "latest.pt"
    assert step.samefile(latest), "latest.pt is linked to the newest step file"
    (tmp_path / "file").write_text("x")
    cases = [
        (["--run-dir", str(tmp_path / "run")], tmp_path, f"--output {tmp_path} is a folder"),
        (["--run-dir", str(tmp_path / "run")], tmp_path / "file" / "avg.pt", f"{tmp_path / 'file'} is a file, not a folder"),
        (["--inputs", str(step), str(step)], tmp_path / "avg.pt", f"{step} is given twice; name each"),
        (["--inputs", str(step), str(latest)], tmp_path / "avg.pt", f"{latest} is given twice (as {step}, the same file)"),
    ]  # fmt: skip
    for args, out, message in cases:
        assert average_script.main([*args, "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "avg.pt").exists()


@pytest.mark.parametrize("name", ["latest.pt", "best.pt", "step_00000020.pt", "step_00000099.pt"])
@pytest.mark.parametrize("latest", [True, False], ids=["latest", "step-files-only"])
def test_average_script_will_not_write_over_the_runs_own_checkpoints(tmp_path, capsys, name, latest):
    """A weights-only average over latest.pt would leave a run that cannot be resumed; so would one
    over latest.pt's name, or a newer step_N.pt, where a cut-short save left only step files."""
    ckpt_dir = make_run(tmp_path / "run", [10, 20])
    if not latest:
        (ckpt_dir / "latest.pt").unlink()
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    out = ckpt_dir / name
    assert average_script.main(["--run-dir", str(tmp_path / "run"), "--last", "2", "--output", str(out)]) == 2
    assert "Choose another name, e.g. avg.pt" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before
    # An input given by hand is refused as well, wherever it lives.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(before["step_00000010.pt"])
    assert (
        average_script.main(
            ["--inputs", str(copy), str(ckpt_dir / "step_00000020.pt"), "--output", str(copy)]
        )
        == 2
    )
    assert "is one of the checkpoints being averaged" in capsys.readouterr().err
    assert copy.read_bytes() == before["step_00000010.pt"]


def test_an_average_beside_the_step_files_is_neither_averaged_again_nor_pruned(tmp_path):
    ckpt_dir = make_run(tmp_path / "run", [10, 20])
    assert (
        average_script.main(["--run-dir", str(tmp_path / "run"), "--output", str(ckpt_dir / "step_avg.pt")])
        == 0
    )
    assert [p.name for p in last_checkpoints(tmp_path / "run", 5)] == ["step_00000010.pt", "step_00000020.pt"]
    for step in (30, 40, 50, 60, 70):  # keep_last=5 prunes step files only
        save_run_checkpoint(run_state(step, step), ckpt_dir, step, keep_last=5, best=False)
    assert (ckpt_dir / "step_avg.pt").exists()
    assert [p.name for p in last_checkpoints(tmp_path / "run", 9)][0] == "step_00000030.pt"
    # Steps past 99,999,999 have 9 digits and still sort after the 8-digit ones.
    save_run_checkpoint(run_state(100_000_000, 80), ckpt_dir, 100_000_000, keep_last=5, best=False)
    assert last_checkpoints(tmp_path / "run", 1)[0].name == "step_100000000.pt"


@pytest.mark.parametrize("typed", ["true", "True", "latest"])  # Hydra turns train.resume=true into "True"
def test_resuming_a_run_directory_without_a_checkpoint_says_so_as_typed(tmp_path, typed):
    with pytest.raises(
        CheckpointError,
        match=rf"^train\.resume={typed.lower()} but .*latest\.pt does not exist: .* Start it without train\.resume",
    ):
        find_resume_checkpoint(resume_config(typed), tmp_path / "run")
