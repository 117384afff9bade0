import errno

import pytest

from conftest import lock_held
from vitdeit import lock
from vitdeit.errors import SettingError


def test_the_lock_is_held_for_the_block_refuses_a_second_holder_and_goes_with_an_error_in_the_block(tmp_path):
    path = tmp_path / "lock"
    with pytest.raises(ValueError, match="the block's own"), lock.folder_lock(path, "busy"):
        assert lock_held(path) and lock._HELD
        with pytest.raises(SettingError, match="^wait for it$"), lock.folder_lock(path, "wait for it"):
            pytest.fail("a second holder ran")
        assert lock_held(path)  # (the refused second holder did not let go of the first's lock)
        raise ValueError("the block's own")
    assert not lock_held(path) and not lock._HELD


def test_where_the_file_cannot_be_opened_or_locked_the_block_runs_unlocked(tmp_path, monkeypatch):
    ran = []
    with lock.folder_lock(tmp_path / "no such folder" / "lock", "busy"):  # (the writes that follow name the folder)
        ran.append("not opened")
    import fcntl

    def no_flock(fd, operation):  # Lustre mounted without -o flock
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with lock.folder_lock(tmp_path / "lock", "busy"):
        ran.append("not locked")
    assert ran == ["not opened", "not locked"] and not lock._HELD


def test_a_holder_of_an_instant_is_waited_for(tmp_path):
    import threading

    path = tmp_path / "lock"
    held, let_go = threading.Event(), threading.Event()

    def look():  # train.py's look at the lock before its set-up (lock_busy): held, then let go at once
        with lock.folder_lock(path, "busy"):
            held.set()
            let_go.wait()

    looker = threading.Thread(target=look)
    looker.start()
    held.wait()
    threading.Timer(0.1, let_go.set).start()  # let go 0.1 s in: within the wait (the default 0.5 s; 5 here, on a
    with lock.folder_lock(path, "busy", wait=5):  # loaded machine), it takes the lock
        assert lock_held(path)
    looker.join()
    with lock.folder_lock(path, "held on"):
        with pytest.raises(SettingError, match="^held on$"), lock.folder_lock(path, "held on", wait=0.2):
            pytest.fail("a second holder ran")  # (one that holds on is refused once the wait is over)


def test_a_lock_file_this_user_cannot_write_is_locked_all_the_same(tmp_path, monkeypatch):
    import os

    path = tmp_path / "lock"
    path.touch()
    real = os.open

    def read_only(file, flags, *mode):  # another user's lock file, 0644, in a folder both write in
        if str(file) == str(path) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, flags, *mode)

    with monkeypatch.context() as m:
        m.setattr(os, "open", read_only)
        held = lock.folder_lock(path, "busy")
        held.__enter__()
    try:
        assert lock_held(path)  # another train.py into the folder would be refused, not run beside it
    finally:
        held.__exit__(None, None, None)
    assert not lock_held(path)


def test_a_lock_file_is_made_group_writable_and_one_nfs_cannot_lock_read_only_is_said(tmp_path, monkeypatch, capsys):
    import fcntl
    import os
    import stat

    path = tmp_path / "lock"
    with lock.folder_lock(path, "busy"):
        pass
    assert stat.S_IMODE(path.stat().st_mode) & 0o060 == 0o060  # (a colleague's command opens it for writing too)
    real = os.open

    def read_only(file, flags, *mode):  # another user's older lock file, 0644
        if str(file) == str(path) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real(file, flags, *mode)

    def nfs(fd, operation):  # NFS's flock is fcntl's lock, which needs a file open for writing
        raise OSError(errno.EBADF, "Bad file descriptor")

    ran = []
    with monkeypatch.context() as m:
        m.setattr(os, "open", read_only)
        m.setattr(fcntl, "flock", nfs)
        with lock.folder_lock(path, "busy"):
            ran.append(True)
    assert ran == [True] and capsys.readouterr().err == (
        f"warning: {path} is read-only to this user, and this file system locks writable files only (NFS): no lock, "
        f"so nothing stops another command writing in {tmp_path} at the same time; make it writable (chmod g+w "
        f"{path})\n")


def test_a_forked_child_lets_go_of_the_lock_with_its_parent(tmp_path):
    import os

    path = tmp_path / "lock"
    (read, write), (started, says) = os.pipe(), os.pipe()
    with lock.folder_lock(path, "busy"):
        child = os.fork()
        if child == 0:  # a DataLoader worker that outlives the block: it waits for the pipe to close, then exits
            os.close(write)
            os.write(says, b"1")  # (its fork handlers have run)
            os.read(read, 1)
            os._exit(0)
    assert os.read(started, 1) == b"1"
    try:
        assert not lock_held(path)  # the parent let go, and the child keeps no copy of the lock
    finally:
        for fd in (write, read, started, says):
            os.close(fd)
        os.waitpid(child, 0)
