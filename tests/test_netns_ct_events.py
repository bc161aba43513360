"""`tuplet ct events` on real pod traffic between namespaces: NEW on creation and promotion,
DESTROY from `ct delete`, GC, an endpoint's flush and `ct flush` with their reasons, the
filters, the per-CPU rate with its undelivered count, and nothing written without a listener."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest

from traffic import LiveConnection, start_server, udp_once
from tuplet.conntrack import notify
from tuplet.conntrack.flush import flush_pinned
from tuplet.conntrack.gc import CtGc
from tuplet.datapath import abi, clock, paths
from tuplet.node import apply as node_apply
from tuplet.node import config
from two_pods import COUNTING, POD1, POD2, node_config_text, two_pods

pytestmark = pytest.mark.netns


@pytest.fixture
def topo():
    yield from two_pods()


@pytest.fixture
def dp(topo, pin_root):
    node_apply.apply(config.parse(node_config_text(topo, pin_root, conntrack=COUNTING)))   # events show Packets
    srv = start_server(topo, topo.p2, 8000)
    yield topo
    srv.kill()
    node_apply.teardown(pin_root)


class Events:
    """`tuplet ct events` in a subprocess, stopped with SIGTERM."""

    def __init__(self, pin_root: str, *argv: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "ct", "events",
                                      "-o", "json", "--timeout", "60", *argv],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.set_blocking(self.proc.stderr.fileno(), True)
        line = self.proc.stderr.readline()          # bounded by --timeout
        assert line.startswith("listening"), line + self.proc.stderr.read()

    def stop(self) -> tuple[list[dict], str]:
        time.sleep(0.5)                              # the last records: polled every 200 ms
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        return [json.loads(ln) for ln in out.splitlines()], err


def kinds(evs: list[dict], sport: int) -> list[tuple[str, str, str, str]]:
    return [(e["event"], e["reason"], e["map"], e["direction"]) for e in evs if e["sport"] == sport]


def test_new_and_destroy_with_reasons_and_filters(dp, pin_root) -> None:
    topo = dp
    ev = Events(pin_root, "-p", "tcp", "--dport", "8000")
    c1 = LiveConnection(topo, topo.p1, POD2, 8000)
    assert c1.roundtrip("a") == "a"
    udp_once(topo, topo.p1, POD2, 8000, 40001)                          # filtered out (-p tcp)
    assert subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "ct", "delete",
                           "--sport", str(c1.sport)], capture_output=True, timeout=60).returncode == 0
    c1.close()
    c2 = LiveConnection(topo, topo.p1, POD2, 8000)
    assert c2.roundtrip("b") == "b"
    with ExitStack() as st:      # a GC pass at a time far ahead: every entry is expired
        maps = [st.enter_context(paths.open_pinned(pin_root, n)) for n in abi.CT_MAPS]
        gc = st.enter_context(CtGc(maps, notify_maps=notify.open_maps(pin_root, st)))
        assert gc.run(clock.monotonic_now() + 10**6).deleted >= 2
    c2.close()
    c3 = LiveConnection(topo, topo.p1, POD2, 8000)
    assert c3.roundtrip("c") == "c"
    flush_pinned(pin_root, [POD1], reason=abi.CT_NOTIFY_R_ENDPOINT)     # what `endpoint delete` runs
    c3.close()
    c4 = LiveConnection(topo, topo.p1, POD2, 8000)
    assert c4.roundtrip("d") == "d"
    assert subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "ct", "flush"],
                          capture_output=True, timeout=60).returncode == 0
    c4.close()
    evs, err = ev.stop()

    assert all(e["proto"] == "TCP" and e["dport"] == 8000 for e in evs)
    created = [("NEW", "created", abi.CT_MAP_SYN, "OUT"), ("NEW", "created", abi.CT_MAP_SYN, "IN")]
    promoted = {("NEW", "promoted", abi.CT_MAP_TCP, "OUT"), ("NEW", "promoted", abi.CT_MAP_TCP, "IN")}
    for c, reason in ((c1, "delete"), (c2, "gc"), (c3, "endpoint"), (c4, "flush")):
        got = kinds(evs, c.sport)
        assert got[:2] == created, (reason, got)
        assert set(got[2:4]) == promoted, (reason, got)
        # (closing after the delete recreates entries: later events of the same port follow)
        assert set(got[4:6]) == {("DESTROY", reason, abi.CT_MAP_TCP, "OUT"),
                                ("DESTROY", reason, abi.CT_MAP_TCP, "IN")}, (reason, got)
    d = [e for e in evs if e["sport"] == c1.sport and e["event"] == "DESTROY"]
    assert all(e["src"] == POD1 and e["dst"] == POD2 and e["packets"] >= 2 for e in d)
    assert "0 not delivered" in err


def test_rate_limit_counts_what_it_drops_and_nothing_is_written_without_a_listener(dp, pin_root) -> None:
    topo = dp
    only_any = Events(pin_root, "--map", "any")
    c = LiveConnection(topo, topo.p1, POD2, 8000)
    assert c.roundtrip("z") == "z"
    c.close()
    evs, _ = only_any.stop()
    assert evs and {e["map"] for e in evs} == {abi.CT_MAP_ANY}     # the related twins only
    ev = Events(pin_root, "--rate", "2")
    for _ in range(3):
        c = LiveConnection(topo, topo.p1, POD2, 8000)
        assert c.roundtrip("x") == "x"
        c.close()
    evs, err = ev.stop()
    # 3 connections make 12 NEW records (+ related twins) in well under a second, a few per CPU
    # at most: 2 per CPU pass, the rest are counted.
    ncpu = os.cpu_count() or 1
    assert 0 < len(evs) <= 2 * ncpu
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tuplet ct events: {len(evs)} events shown, ")
    assert int(last.split(", ")[1].split()[0]) >= 12 - len(evs)

    # Detached: the flag is down and traffic writes nothing; a new listener sees no old record.
    with ExitStack() as st:
        assert not notify.listening(notify.open_maps(pin_root, st)[1])
    c = LiveConnection(topo, topo.p1, POD2, 8000)
    assert c.roundtrip("y") == "y"
    c.close()
    ev = Events(pin_root)
    evs, _ = ev.stop()
    assert evs == []
