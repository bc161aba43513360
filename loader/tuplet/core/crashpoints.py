"""Test-only crash points: ``TUPLET_TEST_KILL_AT=<name>`` makes the process SIGKILL itself when
it reaches the point of that name, so tests can check that the next command finds a
consistent node after a crash at each step (tests/test_crash.py); ``TUPLET_TEST_FAIL_AT=<name>``
raises an error there instead, so tests can check that the command undoes what it did. Unset in
production: a point costs two environment lookups."""
from __future__ import annotations

import os
import signal

from tuplet.core.errors import TupletError

ENV = "TUPLET_TEST_KILL_AT"
FAIL_ENV = "TUPLET_TEST_FAIL_AT"


def point(name: str) -> None:
    """SIGKILL this process, or fail, here when the test asked for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(FAIL_ENV) == name:
        raise TupletError(f"test point {name}", detail=f"injected failure ({FAIL_ENV})")
