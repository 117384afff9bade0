"""One writer per folder: an advisory lock on a file in it, so that two commands never write one folder at once."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from .errors import SettingError

_HELD: set[int] = set()  # this process's lock files, open


def _drop_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies: the lock is the parent's alone, and goes with it, not
    with workers that outlive it (an exception's traceback keeping them, or the parent killed)."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_in_child)


@contextmanager
def folder_lock(lock_file: Path, busy: str):
    """Hold an exclusive flock on `lock_file` (made if missing, in a folder that exists) until the block ends, or
    this process does; another process holding it is a SettingError: `busy`, what to do. A regular file, not the
    folder: NFS and Lustre (mounted with -o flock) lock files across nodes, folders only within one. Where there are
    no such locks (Windows, a file system without them) or the file cannot be opened (a folder this user may not
    write in, which the writes that follow name), no lock: the block runs as before."""
    try:
        import fcntl

        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        fd = None
    if fd is None:  # (outside the except: an error in the block is not chained to this one)
        yield
        return
    _HELD.add(fd)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SettingError(busy) from None
        except OSError:  # a file system without flock (Lustre mounted without -o flock: ENOSYS)
            pass
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # (lets go of the lock)
