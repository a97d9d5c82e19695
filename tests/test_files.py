"""nmt.files: a folder published whole, and what happens when another process published it first."""

from __future__ import annotations

import errno
import os

import pytest

from nmt.files import publish_folder, sync_folder, unwritable, write_atomic


def fill_with(text: str):
    def fill(tmp):
        (tmp / "data").write_text(text)
        (tmp / "done").write_text("")  # the marker, last

    return fill


def test_a_published_folder_appears_whole_and_nothing_is_left_beside_it(tmp_path):
    publish_folder(tmp_path / "cache", fill_with("mine"), "done")
    assert (tmp_path / "cache" / "data").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_complete_folder_published_first_by_another_process_is_kept(tmp_path):
    publish_folder(tmp_path / "cache", fill_with("theirs"), "done")
    publish_folder(tmp_path / "cache", fill_with("mine"), "done")  # the rename fails: theirs is there
    assert (tmp_path / "cache" / "data").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_an_incomplete_folder_in_the_way_is_an_error_and_the_temporary_folder_goes(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "data").write_text("half")  # no marker
    with pytest.raises(OSError):
        publish_folder(tmp_path / "cache", fill_with("mine"), "done")
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


def test_a_failed_fill_leaves_nothing(tmp_path):
    def fail(tmp):
        (tmp / "data").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        publish_folder(tmp_path / "cache", fail, "done")
    assert list(tmp_path.iterdir()) == []


def test_sync_folder_syncs_the_folder_and_ignores_what_cannot_be_synced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    sync_folder(tmp_path)
    assert synced == [tmp_path.stat().st_ino]
    sync_folder(tmp_path / "missing")  # nothing to sync: no error
    assert len(synced) == 1

    def no_sync(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", no_sync)
    sync_folder(tmp_path)  # a file system without folder sync: no error either


def test_write_atomic_replaces_a_file_and_a_failed_write_leaves_the_old_one_alone(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    write_atomic(path, b"old")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_atomic(path, b"newer")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_unwritable_gives_the_systems_reason_or_none(tmp_path, monkeypatch):
    from nmt import files

    assert unwritable(tmp_path / "new" / "folder") is None and (tmp_path / "new" / "folder").is_dir()
    assert unwritable(tmp_path / "absent", create=False) is not None  # nothing there to write into

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "TemporaryFile", refused)
    assert unwritable(tmp_path) == "Permission denied"
    monkeypatch.setattr(files.tempfile, "TemporaryFile", lambda *a, **k: (_ for _ in ()).throw(OSError()))
    assert unwritable(tmp_path) == "OSError"  # no words from the system: still a reason, never ""
