"""One writer per run directory: an exclusive ``flock`` on the directory itself.

`RunLock` locks the run directory's own file descriptor (no lock file is written, so a refused
command leaves the directory byte for byte unchanged). The operating system releases the lock
when the holder exits or is killed, so a crashed run never leaves it stuck. A second process that
meets the lock gets `RunDirLocked` (an OSError: the CLI prints it as one line, exit 2).
"""

from __future__ import annotations

import os
from pathlib import Path


class RunDirLocked(OSError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The lock of run directory ``path``; `acquire` takes it (once the directory exists) and
    `release` (or leaving the ``with`` block) drops it. Re-acquiring a held lock is a no-op."""

    def __init__(self, path: str | os.PathLike, what: str = "run directory"):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Takes the lock; raises `RunDirLocked` naming the directory when another process holds
        it. A directory that does not exist yet is not locked (call again after creating it)."""
        import fcntl

        if self._fd is not None or not self.path.is_dir():
            return self
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunDirLocked(f"{self.what} {str(self.path)!r} is in use by another jaxprune "
                               "process (it holds the directory's lock); wait for it to end or "
                               "use another directory") from None
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


__all__ = ["RunLock", "RunDirLocked"]
