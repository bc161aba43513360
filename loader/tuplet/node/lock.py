"""The node lock: one owner of a node's datapath at a time.

Every command that changes the datapath under a pin root (apply, teardown, svc,
endpoint, ipcache, the CNI plugin, the agent's reload and auto-grow) holds an exclusive
``flock`` on ``/run/tuplet/<pin root>.lock``. A second one waits up to a bounded time
(``TUPLET_LOCK_TIMEOUT`` seconds, default 30) and then fails naming the holder: the
holder writes its pid and command line into the lock file once it has the lock.

The lock is re-entrant within a thread (the agent's reload calls apply, which takes it
too); ``flock`` itself is per open file, so re-entry is counted here, per thread: two
threads of one process exclude each other like two processes. A holder killed
with SIGKILL releases the lock with its last file descriptor.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Iterator

import structlog

from tuplet.core.errors import TupletError
from tuplet.datapath.paths import lock_path

log = structlog.get_logger("tuplet.lock")

DEFAULT_TIMEOUT = 30.0
_POLL = 0.05


class NodeLockedError(TupletError):
    """Another process holds the node lock (``holder`` says which)."""

    def __init__(self, pin_root: str, holder: str, waited: float) -> None:
        self.holder = holder
        super().__init__(f"node {pin_root}", "lock", errno.EBUSY,
                         f"held by {holder or 'an unknown process'}; gave up after {waited:g}s")


_held: dict[tuple[int, str], tuple[IO[str], int]] = {}
_guard = threading.RLock()


def timeout_default() -> float:
    try:
        return float(os.environ.get("TUPLET_LOCK_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def describe_self() -> str:
    return f"pid {os.getpid()} ({' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))})"


def holder_of(pin_root: str) -> str:
    """Who holds (or last held) the lock, as written in the lock file."""
    try:
        return lock_path(pin_root).read_text(encoding="utf-8").strip()
    except OSError:
        return ""


@contextlib.contextmanager
def node_lock(pin_root: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the node lock of pin_root (re-entrant in this process)."""
    key = (threading.get_ident(), os.path.normpath(pin_root))
    with _guard:
        if key in _held:
            f, depth = _held[key]
            _held[key] = (f, depth + 1)
            try:
                yield
            finally:
                _release(key)
            return
    f = _acquire(key[1], timeout_default() if timeout is None else timeout)
    with _guard:
        _held[key] = (f, 1)
    try:
        yield
    finally:
        _release(key)


def _acquire(pin_root: str, timeout: float) -> IO[str]:
    path: Path = lock_path(pin_root)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    t0 = time.monotonic()
    logged = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            waited = time.monotonic() - t0
            if waited >= timeout:
                f.close()
                raise NodeLockedError(pin_root, holder_of(pin_root), round(waited, 1)) from None
            if not logged:
                log.info("waiting for the node lock", pin_root=pin_root, holder=holder_of(pin_root))
                logged = True
            time.sleep(_POLL)
    f.seek(0)
    f.truncate()
    f.write(describe_self() + "\n")
    f.flush()
    return f


def _release(key: tuple[int, str]) -> None:
    with _guard:
        f, depth = _held[key]
        if depth > 1:
            _held[key] = (f, depth - 1)
            return
        del _held[key]
    f.close()   # releases the flock
