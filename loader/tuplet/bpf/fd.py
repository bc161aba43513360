"""File descriptors that close exactly once."""
from __future__ import annotations

import os


class Fd:
    """Owns one file descriptor; ``close()`` is idempotent, also usable as a context manager."""

    def __init__(self, fd: int, what: str = "") -> None:
        if fd < 0:
            raise ValueError(f"invalid fd {fd} for {what}")
        self._fd = fd
        self.what = what

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{self.what}: fd already closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
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
