"""bench/services.py runs end to end: every mode carries traffic on the path it claims to, for IPv4 and
IPv6 (the bench's own path checks: SVC entries in the mode's family's CT tables and none in the other's,
DNAT rule hits in iptables' or ip6tables' nat table, servers' counts)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
LOADGEN = ROOT / "build" / "loadgen"
METRICS = {"crr", "rr", "udp_rr"}


def test_bench_services_quick() -> None:
    if not LOADGEN.exists():
        r = subprocess.run(["make", "-C", str(ROOT), "build/loadgen"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "services.py"), "--quick", "--json"],
                       capture_output=True, text=True, timeout=420)
    assert r.stdout, r.stderr
    res = json.loads(r.stdout)
    assert res["families"] == [4, 6]
    modes = ("direct", "iptables", "tuplet", "tuplet-sock", "direct6", "ip6tables", "tuplet6")
    assert set(res["modes"]) == set(modes)
    for mode in modes:
        m = res["modes"][mode]
        assert m["crr"]["median"] > 0 and m["rr"]["median"] > 0, (mode, m)
        assert min(m["crr"]["samples"]) > 0 and min(m["rr"]["samples"]) > 0, (mode, m)
        assert m["checks"]["passed"], (mode, m["checks"])
    verified = {mode: " | ".join(res["modes"][mode]["checks"]["verified"]) for mode in modes}
    assert "ip6tables DNAT hits" in verified["ip6tables"], verified
    assert "tpl_ct6_v1=" in verified["tuplet6"] and "none in the other family's" in verified["tuplet6"], verified
    assert res["checks_passed"]
    assert set(res["tuplet_sock_vs_direct_paired"]) == set(res["tuplet_sock_vs_iptables_paired"]) == METRICS
    assert set(res["tuplet6_vs_ip6tables_paired"]) == set(res["tuplet_vs_iptables_paired"]) == METRICS
    assert set(res["ipv6_cost_vs_ipv4_paired"]) == {"direct6", "ip6tables", "tuplet6"}
    assert all(v is not None and v > 0 for r6 in res["ipv6_cost_vs_ipv4_paired"].values() for v in r6.values())
    assert r.returncode == 0, r.stderr


def test_bench_services_bad_families() -> None:
    """A bad --families is refused by name before anything is set up."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "services.py"), "--families", "4,5"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--families" in r.stderr and "'4,5'" in r.stderr, r.stderr
