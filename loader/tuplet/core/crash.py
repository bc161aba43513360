"""Test-only crash points: ``crashpoint("x")`` kills the process with SIGKILL when the
environment variable ``TUPLET_TEST_CRASH_AT`` is ``x``. The crash-safety tests use them
to stop a command between two of its steps; unset, they do nothing."""
from __future__ import annotations

import os
import signal

ENV = "TUPLET_TEST_CRASH_AT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
