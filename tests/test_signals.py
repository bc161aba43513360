"""The datapath's signal ring buffer: a failed conntrack insert reaches the agent, rate limited."""
from __future__ import annotations

import os
import select
import time

import pytest

from lxc_harness import LxcHarness, tcp, udp
from tuplet.datapath.abi import OBJ_LXC, SIGNAL_MAP
from tuplet.datapath.paths import object_dir
from tuplet.datapath.signals import SignalReader

A, B = "10.64.0.36", "10.64.0.64"


@pytest.fixture
def one_cpu():
    """Run on one CPU so the per-CPU rate limit applies to every packet of the test."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    yield min(before)
    os.sched_setaffinity(0, before)


@pytest.fixture
def failing() -> LxcHarness:
    h = LxcHarness.load(consts={"fault_ct_insert": 1})
    yield h
    h.close()


def reader(h: LxcHarness) -> SignalReader:
    return SignalReader(h.coll.maps[SIGNAL_MAP], str(object_dir() / OBJ_LXC))


def test_failed_insert_is_dropped_and_signalled_once_per_second(failing: LxcHarness, one_cpu: int) -> None:
    with reader(failing) as r:
        assert r.poll(0) == []
        v = failing.egress(tcp(A, 1000, B, 80, "S"))
        assert v.reason == "DROP_CT_INSERT_FAILED" and v.retval == 2   # TC_ACT_SHOT
        # The ring's fd is readable: an agent can select() on it with its timers.
        assert select.select([r], [], [], 1.0)[0] == [r]
        got = r.poll(0)
        assert [(s.kind, s.arg, s.cpu) for s in got] == [("CT_FILL_UP", "MAP_TCP", one_cpu)]

        # A storm of failures within the second: counted by the verdicts, not signalled.
        for i in range(50):
            assert failing.egress(udp(A, 2000 + i, B, 53)).reason == "DROP_CT_INSERT_FAILED"
        assert r.poll(0) == []

        time.sleep(1.05)
        failing.egress(udp(A, 3000, B, 53))
        got = r.poll(100)
        assert [(s.kind, s.arg) for s in got] == [("CT_FILL_UP", "MAP_ANY")]


def test_no_signal_when_inserts_succeed(lxc: LxcHarness) -> None:
    with reader(lxc) as r:
        for i in range(20):
            assert lxc.egress(tcp(A, 4000 + i, B, 80, "S")).reason == "PASS_CT_NEW"
        assert r.poll(0) == []


def test_runner_collects_early_on_a_signal_and_on_schedule(failing: LxcHarness, one_cpu: int) -> None:
    from tuplet.conntrack.gc import CtGc
    from tuplet.conntrack.runner import GcRunner
    from tuplet.conntrack.schedule import GcSchedule
    from tuplet.datapath.abi import CT_MAP_ANY, CT_MAP_TCP
    from tuplet.datapath.layouts import CtEntry, CtTuple4

    t = [1000.0]
    tcp_map = failing.coll.maps[CT_MAP_TCP]
    now = failing.now()
    stale = CtTuple4.make(A, B, 80, 999, 6, 0)
    tcp_map.update(stale, CtEntry(lifetime=now - 1))
    reports = []
    with CtGc([tcp_map, failing.coll.maps[CT_MAP_ANY]]) as g, reader(failing) as r:
        run = GcRunner(g, GcSchedule(fixed=3600, early_min_gap=10), signals=r,
                       on_pass=reports.append, clock=lambda: t[0], max_wait=0.1)
        assert run.step() is None                       # nothing due, no signal
        failing.egress(tcp(A, 1000, B, 80, "S"))         # insert fails -> CT_FILL_UP
        rep = run.step()
        assert rep is not None and rep.reason == "early"
        assert rep.result.deleted == 1 and tcp_map.lookup(stale) is None
        assert rep.interval == 3600

        time.sleep(1.05)                                 # the datapath may signal again...
        t[0] += 5
        failing.egress(tcp(A, 1001, B, 80, "S"))
        assert run.step() is None                        # ...but the schedule rate-limits
        t[0] = 1000 + 3600 + 1                           # the fixed interval is over
        rep = run.step()
        assert rep is not None and rep.reason == "interval"
    assert [x.reason for x in reports] == ["early", "interval"]
