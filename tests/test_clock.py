"""Clock safety: the datapath's u32 seconds may read near zero (a node booted seconds ago) or
near the wrap; comparisons hold across it, and the test clock offset reaches every program.

`make test` runs the `clock`-marked tests a second time with ``--datapath-clock 5``."""
from __future__ import annotations

import pytest

from lb_harness import LbHarness, l4_of
from lxc_harness import LxcHarness, tcp
from test_lb_progs import BP, LB_POD, POD1, POD2, POD3, clusterip, pod1_sends
from tuplet.datapath import clock
from tuplet.datapath.abi import CT_MAP_SYN, TUPLE_F_OUT

pytestmark = pytest.mark.clock

A, B = "10.64.0.36", "10.64.0.64"


def set_clock(h: LxcHarness, value: int) -> None:
    """Make the programs' clock read ``value`` now."""
    h.advance((value - h.now()) % clock.U32)


def test_diff_is_signed_across_the_wrap() -> None:
    assert clock.diff(5, clock.U32 - 5) == 10
    assert clock.diff(clock.U32 - 5, 5) == -10
    assert clock.diff(8000, 30) == 7970 and clock.diff(30, 8000) == -7970


def test_the_test_offset_reaches_the_programs_and_the_agent_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(clock.TEST_OFFSET_ENV, str(clock.offset_for(7)))
    assert clock.monotonic_now() in (7, 8)
    h = LxcHarness.load()   # through open_object, as apply loads the datapath
    try:
        assert h.now() in (7, 8)
        h.egress(tcp(A, 1000, B, 80, "S"))
        o = h.entry(A, B, 80, 1000, 6, TUPLE_F_OUT)
        assert o is not None and o.lifetime in range(7 + 59, 8 + 61), o.lifetime   # SYN lifetime from ~7
        assert h.table_of(A, B, 80, 1000, 6, TUPLE_F_OUT) == CT_MAP_SYN
    finally:
        h.close()


def test_affinity_holds_across_the_wrap() -> None:
    lb = LbHarness.load_both()
    try:
        for ip, ident in ((POD1, 3096), (POD2, 4000), (POD3, 4001), (LB_POD, 4002)):
            lb.add_endpoint(ip, ident)
        set_clock(lb, clock.U32 - 50)   # last_used + timeout wraps; now does not yet
        lb.program(clusterip({19: (POD2, BP, False), 20: (POD3, BP, False), 21: (LB_POD, BP, False)},
                             affinity_timeout=100))
        first = l4_of(pod1_sends(lb, "S", sport=41000)[1])[2]
        lb.advance(10)
        picked = {l4_of(pod1_sends(lb, "S", sport=41001 + i)[1])[2] for i in range(20)}
        assert picked == {first}
    finally:
        lb.close()


def test_report_interval_holds_across_the_wrap(lxc: LxcHarness) -> None:
    """LastTxReport moves when a new flag shows or the report interval (5 s) passed, not on every packet."""
    set_clock(lxc, clock.U32 - 3)   # last report + interval wraps; now does not yet
    lxc.egress(tcp(A, 1000, B, 80, "S"))
    lxc.ingress(tcp(B, 80, A, 1000, "SA"))
    lxc.egress(tcp(A, 1000, B, 80, "A"))
    first = lxc.entry(A, B, 80, 1000, 6, TUPLE_F_OUT)
    assert first is not None
    lxc.advance(1)
    lxc.egress(tcp(A, 1000, B, 80, "A", b"x"))
    again = lxc.entry(A, B, 80, 1000, 6, TUPLE_F_OUT)
    assert again is not None and again.last_tx_report == first.last_tx_report
