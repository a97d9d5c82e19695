"""Temporary files and folders for atomic writes, with the modes ``open()`` and ``mkdir()`` give.

``tempfile`` creates files 0600 and folders 0700 whatever the umask; renamed into place, they would
keep the corpus, the cache, the tokenizer and the checkpoints from the other users of a shared folder.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FILE_MODE, DIR_MODE = 0o666, 0o777  # before the umask, as open() and mkdir() create them


def temp_file_beside(path: Path, suffix: str = "") -> tuple[int, Path]:
    """A new file ``.NAME.XXXXXXXX{suffix}`` in ``path``'s folder, to be renamed onto ``path``: its open
    descriptor and its path."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.chmod(name, FILE_MODE & ~umask())
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    return fd, Path(name)


def temp_dir_beside(path: Path) -> Path:
    """A new folder ``.NAME.XXXXXXXX`` in ``path``'s folder, to be renamed onto ``path``."""
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(folder, DIR_MODE & ~umask())
    except BaseException:
        folder.rmdir()
        raise
    return folder


def unwritable(folder: Path, create: bool = True) -> str | None:
    """Why new files cannot be made in ``folder`` (made first, with ``create``), in the system's words
    ("Permission denied", "Read-only file system"), or None when they can."""
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__
    return None


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one rename: a reader sees the old file or the new one, and a
    failed write (a full disk) leaves the old file and no temporary one."""
    fd, tmp = temp_file_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish_folder(folder: Path, fill: Callable[[Path], None], marker: str) -> None:
    """Make ``folder`` appear whole: ``fill`` a new folder beside it, whose file ``marker`` is written
    last, then rename that onto ``folder``, so a reader never sees a half-written one. If another
    process published a complete ``folder`` first (its ``marker`` is there), that one is kept."""
    tmp = temp_dir_beside(folder)
    try:
        fill(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries to disk, so that a file just renamed into it is still there, under its
    new name, after a power loss. File systems that cannot sync a folder are left as they are."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # EINVAL on file systems without folder sync
        pass
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask. Linux shows it in /proc; os.umask can only read it by changing it, which
    races with threads creating files meanwhile, so elsewhere it is read that way once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_read_once()


@functools.cache
def _umask_read_once() -> int:
    mask = os.umask(0o077)  # strict while it is changed: a file created meanwhile is not exposed
    os.umask(mask)
    return mask
