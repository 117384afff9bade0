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
