"""The node lock: one changer of a node's datapath at a time; a second waits a bounded
time and fails naming the holder."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from endpoint_harness import ROOT, tuplet
from tuplet.node.lock import NodeLockedError, node_lock

HOLD = """
import sys, time
from tuplet.node.lock import node_lock
with node_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def holder(pin_root: str, seconds: float) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", HOLD, pin_root, str(seconds)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "loader")})
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("argv", [("endpoint", "add", "x", "--ifname", "lo", "--ipv4", "10.9.9.9"),
                                  ("endpoint", "delete", "x"), ("ipcache", "add", "10.1.0.0/16", "--identity", "5"),
                                  ("svc", "delete", "x"), ("teardown",)])
def test_second_changer_fails_naming_the_holder(pin_root, argv) -> None:
    p = holder(pin_root, 30)
    try:
        t0 = time.monotonic()
        r = tuplet(pin_root, *argv, env={"TUPLET_LOCK_TIMEOUT": "0.5"}, check=False)
        assert r.returncode == 1
        assert f"held by pid {p.pid} (-c {pin_root}" in r.stderr and "gave up after" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 20
    finally:
        p.kill()
        p.wait()


def test_waits_for_a_short_holder(pin_root) -> None:
    p = holder(pin_root, 1.0)
    t0 = time.monotonic()
    with node_lock(pin_root, timeout=20):
        assert time.monotonic() - t0 >= 0.5
    p.wait()


def test_killed_holder_releases(pin_root) -> None:
    p = holder(pin_root, 60)
    p.kill()
    p.wait()
    with node_lock(pin_root, timeout=2):
        pass


def test_reentrant_per_thread_exclusive_across_threads(pin_root) -> None:
    got: list[object] = []
    with node_lock(pin_root):
        with node_lock(pin_root):          # the agent's reload calls apply: re-entry
            pass

        def other() -> None:
            try:
                with node_lock(pin_root, timeout=0.3):
                    got.append("locked")
            except NodeLockedError as e:
                got.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert isinstance(got[0], NodeLockedError) and f"pid {os.getpid()}" in str(got[0])
