"""Errors raised by tuplet: one base class that says what failed, on what, and why.

Every error carries the operation (``"batch lookup"``), the object it was applied
to (``"map tpl_ct4_v1"``) and, for system calls, the errno. ``str(err)`` reads
``map tpl_ct4_v1: batch lookup: ENOSPC (No space left on device)``.
"""
from __future__ import annotations

import errno as _errno
import os


class TupletError(Exception):
    """Base class of every error tuplet raises on purpose."""

    def __init__(self, what: str, op: str = "", err: int = 0, detail: str = "") -> None:
        self.what = what
        self.op = op
        self.errno = err
        self.detail = detail
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [p for p in (self.what, self.op) if p]
        msg = ": ".join(parts)
        if self.errno:
            name = _errno.errorcode.get(self.errno, str(self.errno))
            msg += f": {name} ({os.strerror(self.errno)})"
        if self.detail:
            msg += f": {self.detail}" if msg else self.detail
        return msg


class ConfigError(TupletError):
    """A configuration file or flag is invalid. ``key`` names the offending key."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        what = key if key.startswith("--") else (f"config {key}" if key else "config")
        super().__init__(what, detail=detail)


class NotFoundError(TupletError):
    """A key, map, program, interface or pin that does not exist."""


class NotSupportedError(TupletError):
    """The running kernel lacks a feature (``feature`` says which, ``since`` from which version)."""

    def __init__(self, feature: str, since: str = "", detail: str = "") -> None:
        self.feature = feature
        self.since = since
        text = f"kernel does not support {feature}"
        if since:
            text += f" (needs Linux {since} or newer)"
        super().__init__(text, detail=detail)


class VerifierError(TupletError):
    """The kernel's verifier rejected a program. ``log`` holds the whole verifier log."""

    TAIL_LINES = 25

    def __init__(self, program: str, err: int, log: str) -> None:
        self.program = program
        self.log = log
        tail = "\n".join(log.rstrip().splitlines()[-self.TAIL_LINES:])
        super().__init__(f"program {program}", "load", err,
                         f"verifier rejected it; last lines of the log:\n{tail}")


class IncompatiblePinError(TupletError):
    """A pinned map exists with a layout the objects being loaded cannot use."""

    def __init__(self, path: str, differences: list[str]) -> None:
        self.path = path
        self.differences = differences
        super().__init__(
            f"pinned map {path}", "reuse",
            detail="incompatible with the map being loaded ("
            + "; ".join(differences)
            + f"). Remove the datapath and its maps with `tuplet --pin-root {os.path.dirname(path)} teardown` "
            "(their entries are lost), or load with a matching configuration.")
