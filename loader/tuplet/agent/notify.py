"""systemd's notify protocol: READY/RELOADING/STOPPING/STATUS/WATCHDOG lines over
$NOTIFY_SOCKET (nothing without it), and the watchdog interval systemd asked for."""
from __future__ import annotations

import os

import sdnotify


class Notifier:
    """sd_notify over $NOTIFY_SOCKET (no-op without it), with the sdnotify package."""

    def __init__(self) -> None:

        self._n = sdnotify.SystemdNotifier() if os.environ.get("NOTIFY_SOCKET") else None

    def __call__(self, *lines: str) -> None:
        if self._n is not None:
            self._n.notify("\n".join(lines))


def watchdog_interval() -> float | None:
    """Half the WatchdogSec systemd asked for, or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.05)
    except ValueError:
        return None
