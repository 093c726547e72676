"""The lock on a training run's checkpoint directory, and the clean-up of
what a killed run left of its writes."""

import datetime
import json
import os
import pathlib
import re
import socket
import warnings

LOCK_NAME = "mfattn.lock"
# a temporary file of a checkpoint write: NAME.tmp-PID-RANDOM
_TEMPORARY = re.compile(r"^ckpt-.*\.tmp-(\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _owner_text(owner: dict) -> str:
    if not owner:
        return "an unknown process"
    return (
        f"pid {owner.get('pid')} on host {owner.get('host')}, "
        f"since {owner.get('started', 'an unknown time')}"
    )


def _parse_owner(text: str) -> dict:
    try:
        owner = json.loads(text)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class DirectoryLock:
    """An exclusive lock on a checkpoint directory: the file `mfattn.lock` in
    it, holding the owner's pid, host and start time, locked with `flock`
    (released by the kernel when the owner dies, so a killed run never leaves
    it stuck: the next run takes it over with a warning naming the dead
    owner). Use as a context manager, or `acquire()` and `release()`."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd = None

    def _in_use(self, owner: dict):
        return RuntimeError(
            f"`checkpoint_dir` {self.directory} is in use by another training run "
            f"({_owner_text(owner)}; its lock is {self.path}): wait for it to finish, "
            "or use another `checkpoint_dir`"
        )

    def _took_over(self, owner: dict):
        if not owner:
            return
        pid, host = owner.get("pid"), owner.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and _pid_alive(pid):
            state = "which no longer holds it"
        else:
            state = "which is no longer running (killed or crashed)"
        warnings.warn(
            f"taking over the lock {self.path} left by {_owner_text(owner)}, {state}",
            stacklevel=5,
        )

    def _write_owner(self, fd: int):
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(owner).encode())
        os.fsync(fd)

    def acquire(self) -> "DirectoryLock":
        """Take the lock.

        **Raises:** `RuntimeError` naming the owner (pid, host, start time) if
        another process (or another run in this one) holds it; `OSError` if
        the lock file cannot be written.
        """
        try:
            import fcntl
        except ImportError:  # no flock (Windows): an exclusive create
            return self._acquire_exclusive()
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _parse_owner(os.read(fd, 4096).decode(errors="replace"))
                os.close(fd)
                raise self._in_use(owner) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the last owner may have removed the file before we locked it
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                os.close(fd)
                continue
            try:
                self._took_over(_parse_owner(os.read(fd, 4096).decode(errors="replace")))
                self._write_owner(fd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return self
        raise RuntimeError(f"could not take the lock {self.path}")  # pragma: no cover

    def _acquire_exclusive(self) -> "DirectoryLock":  # pragma: no cover (no fcntl)
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                try:
                    owner = _parse_owner(self.path.read_text())
                except FileNotFoundError:
                    continue
                pid = owner.get("pid")
                same_host = owner.get("host") == socket.gethostname()
                if same_host and isinstance(pid, int) and not _pid_alive(pid):
                    self._took_over(owner)
                    self.path.unlink(missing_ok=True)
                    continue
                raise self._in_use(owner) from None
            self._write_owner(fd)
            self._fd = fd
            return self
        raise RuntimeError(f"could not take the lock {self.path}")

    def release(self):
        """Remove the lock file and release it (a no-op if not held)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def remove_stale_temporaries(directory) -> list[pathlib.Path]:
    """Remove the temporary files of checkpoint writes whose process (the pid
    in their name) is no longer running: left by a killed run. Call it only
    while holding the directory's lock.

    **Returns:** the removed paths.
    """
    removed = []
    for path in pathlib.Path(directory).glob("ckpt-*.tmp-*"):
        match = _TEMPORARY.match(path.name)
        if match and not _pid_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
