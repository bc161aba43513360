"""File descriptors that close exactly once, and fds borrowed from an owner that may close
first (a loaded collection's maps and programs): using either after its close raises
instead of acting on whatever the number names by then."""
from __future__ import annotations

import errno
import os

from tuplet.core.errors import TupletError


class Lifetime:
    """Whether the owner of borrowed fds (a loaded collection) is still open."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.ended = False

    def end(self) -> None:
        self.ended = True


class Fd:
    """One file descriptor: owned (closed by ``close()``, idempotent; also a context manager)
    or borrowed from a :class:`Lifetime` (never closed here; unusable once the owner closed)."""

    def __init__(self, fd: int, what: str = "", borrowed_from: Lifetime | None = None) -> None:
        if fd < 0:
            raise ValueError(f"invalid fd {fd} for {what}")
        self._fd = fd
        self.what = what
        self._owner = borrowed_from

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise TupletError(self.what, "use", errno.EBADF, "already closed")
        if self._owner is not None and self._owner.ended:
            raise TupletError(self.what, "use", errno.EBADF, f"{self._owner.what} that held it is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0 or (self._owner is not None and self._owner.ended)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            if self._owner is None:
                os.close(fd)

    def __enter__(self) -> "Fd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass
