"""`tuplet ct stats` (conntrack -S) counters against known packets run through the programs."""
from __future__ import annotations

from lxc_harness import LxcHarness, tcp
from tuplet.conntrack import stats as ctstats
from tuplet.datapath import enums
from tuplet.datapath.abi import EVENTS_MAP, METRICS_MAP, OBJ_LXC
from tuplet.datapath.paths import object_dir

A, B = "10.64.0.36", "10.64.0.64"


def read(h: LxcHarness) -> tuple[list[ctstats.CpuStats], ctstats.CpuStats]:
    ev = enums.object_names(str(object_dir() / OBJ_LXC), enums.CT_EVENTS)
    return ctstats.collect(h.coll.maps[METRICS_MAP], h.names, h.coll.maps[EVENTS_MAP], ev)


def test_columns_count_known_packets(lxc: LxcHarness) -> None:
    assert lxc.egress(tcp(A, 1000, B, 80, "S")).reason == "PASS_CT_NEW"
    assert lxc.ingress(tcp(B, 80, A, 1000, "SA")).reason == "PASS_CT_REPLY"
    assert lxc.egress(tcp(A, 1000, B, 80, "A")).reason == "PASS_CT_ESTABLISHED"   # promoted here
    assert lxc.egress(tcp(A, 1000, B, 80, "A", b"data")).reason == "PASS_CT_ESTABLISHED"
    bad = lxc.egress(tcp(A, 1001, B, 80, "S")[:14 + 20 + 8])      # frame cut short
    assert bad.reason == "DROP_INVALID_L3"     # the IP length says more than the frame holds
    cpus, total = read(lxc)
    t = total.columns
    assert (t["new"], t["found"], t["invalid"], t["drop"]) == (1, 3, 1, 1)
    assert t["promoted"] == 1 and t["insert_failed"] == 0 and t["promote_failed"] == 0
    # the SYN's entry in the handshake table (+ nothing else: no related twin before promotion),
    # then at promotion the entry in tpl_ct4_v1 and its related ICMP twin
    assert t["insert"] == 3
    assert total.drops == {"DROP_INVALID_L3": 1}
    assert all(t[c] == 0 for c in ctstats.NO_COUNTERPART)
    # the total is the sum of the CPUs, and the packets ran on one CPU here
    assert sum(c.columns["found"] for c in cpus) == 3 and len(cpus) >= 1
    assert total.line().startswith("total  found=3 new=1 invalid=1 insert=3 insert_failed=0 drop=1 ")
