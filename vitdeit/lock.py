"""One writer per folder: an advisory lock on the folder itself, so that two commands never write one folder at once."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from .errors import SettingError


@contextmanager
def folder_lock(folder: Path, busy: str):
    """Hold an exclusive flock on `folder` (which exists) until the block ends, or this process does; another
    process holding it is a SettingError: `busy`, what to do. Where the system or its file system has no such
    locks (Windows; some network file systems), no lock: the block runs as before."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SettingError(busy) from None
        except OSError:  # a file system without flock
            pass
        yield
    finally:
        os.close(fd)  # (lets go of the lock)
