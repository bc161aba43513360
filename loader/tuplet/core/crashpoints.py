"""Test-only crash points: ``TUPLET_TEST_KILL_AT=<name>`` makes the process SIGKILL itself when
it reaches the point of that name, so tests can check that the next command finds a
consistent node after a crash at each step (tests/test_crash.py). Unset in production:
a point costs one environment lookup."""
from __future__ import annotations

import os
import signal

ENV = "TUPLET_TEST_KILL_AT"


def point(name: str) -> None:
    """SIGKILL this process here when the test asked for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
