"""One writer per folder: an advisory lock on a file in it, so that two commands never write one folder at once."""

from __future__ import annotations

import errno
import os
import sys
import time
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
def folder_lock(lock_file: Path, busy: str, wait: float = 0.5):
    """Hold an exclusive flock on `lock_file` (made if missing, in a folder that exists) until the block ends, or
    this process does; another process holding it is a SettingError: `busy`, what to do. A regular file, not the
    folder: NFS and Lustre (mounted with -o flock) lock files across nodes, folders only within one. Where there are
    no such locks (Windows, a file system without them) or the file cannot be opened (a folder this user may not
    write in, which the writes that follow name), no lock: the block runs as before. A lock file another user made
    (read-only to this one, in a folder both write in) is opened for reading, which flock locks all the same on a
    local disk (NFS's flock needs it writable: there, no lock, and a warning; a lock file this user makes is made
    group-writable for that reason). A holder is waited for up to `wait` seconds (train.py's look at the lock
    before its set-up, lock_busy, holds it for an instant)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    fd, flags = None, 0
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY) if fcntl else ():
        try:
            fd = os.open(lock_file, flags, 0o644)
            break
        except OSError:
            pass
    if fd is not None and flags != os.O_RDONLY:
        try:  # writable by the group too, so that a colleague's command in a folder you share locks it on NFS too
            os.fchmod(fd, os.fstat(fd).st_mode & 0o777 | 0o060)
        except OSError:  # (not this user's file)
            pass
    if fd is None:
        yield
        return
    _HELD.add(fd)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:  # held: by another command, or for an instant by train.py's look (lock_busy)
                if time.monotonic() >= deadline:
                    raise SettingError(busy) from None
                time.sleep(0.05)
            except OSError as e:  # a file system without flock (Lustre mounted without -o flock: ENOSYS), or
                if flags == os.O_RDONLY and e.errno == errno.EBADF:  # NFS, whose flock needs a writable file
                    print(f"warning: {lock_file} is read-only to this user, and this file system locks writable "
                          f"files only (NFS): no lock, so nothing stops another command writing in "
                          f"{lock_file.parent} at the same time; make it writable (chmod g+w {lock_file})",
                          file=sys.stderr)
                break
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)  # (lets go of the lock)
