"""bench/services.py runs end to end: every mode carries traffic on the path it claims to."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]
LOADGEN = ROOT / "build" / "loadgen"


def test_bench_services_quick() -> None:
    if not LOADGEN.exists():
        r = subprocess.run(["make", "-C", str(ROOT), "build/loadgen"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "services.py"), "--quick", "--json"],
                       capture_output=True, text=True, timeout=240)
    assert r.stdout, r.stderr
    res = json.loads(r.stdout)
    for mode in ("direct", "iptables", "tuplet", "tuplet-sock"):
        m = res["modes"][mode]
        assert m["crr"]["median"] > 0 and m["rr"]["median"] > 0, (mode, m)
        assert min(m["crr"]["samples"]) > 0 and min(m["rr"]["samples"]) > 0, (mode, m)
        assert m["checks"]["passed"], (mode, m["checks"])
    assert res["checks_passed"]
    assert set(res["tuplet_sock_vs_direct_paired"]) == set(res["tuplet_sock_vs_iptables_paired"]) == {"crr", "rr", "udp_rr"}
    assert r.returncode == 0, r.stderr
