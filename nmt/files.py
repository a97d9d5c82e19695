"""File modes: files written through ``tempfile`` get the mode ``open()`` would have given them."""

from __future__ import annotations

import functools
import os

FILE_MODE, DIR_MODE = 0o666, 0o777  # before the umask, as open() and mkdir() create them


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
