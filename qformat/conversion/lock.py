"""One conversion per output: an exclusive ``flock`` on a lock file beside the output folder.

The lock file is ``.<out name>.qformat.lock`` in the output's parent folder (not inside ``<out>.partial``, which a
conversion may delete and recreate while it holds the lock). The kernel drops the lock when the process exits or is
killed, so a stale file never blocks anyone; a holder removes the file when it releases. Because a file can be
removed between another process opening and locking it, a taker checks that the path still names the file it
locked, and retries otherwise.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ..errors import ConversionError

try:
    import fcntl
except ImportError:  # Windows: no flock; conversions are not serialised there
    fcntl = None  # type: ignore[assignment]


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.qformat.lock")


class OutputLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process ends)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = lock_path(out)
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None or self._fd is not None:
            return
        for _ in range(100):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise ConversionError(f"cannot create the lock file {self.path} beside the output: "
                                      f"{exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                raise ConversionError(f"another qformat convert is writing {self.out} (pid {holder or 'unknown'}); "
                                      "wait for it to finish or stop it, then run this command again") from None
            except OSError:
                os.close(fd)  # a file system without flock: go on unserialised rather than refuse every conversion
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return
            os.close(fd)  # the holder removed the file after we opened it: lock the new one
        raise ConversionError(f"cannot take the lock {self.path}: it keeps being replaced")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still locked: no one can hold a lock on a file we are removing
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self) -> None:
        self.release()


def _read_pid(fd: int) -> str | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


__all__ = ["OutputLock", "lock_path"]
