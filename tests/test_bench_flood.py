"""bench/flood.py runs end to end: every mode's flood reaches its tracker, and the handshake
table is what keeps established connections through it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[1]


def quick(*extra: str) -> dict:
    """bench/flood.py --quick --json [extra]: its results, the run's exit status checked."""
    for exe in ("build/loadgen", "build/synflood"):
        if not (ROOT / exe).exists():
            r = subprocess.run(["make", "-C", str(ROOT), exe], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "flood.py"), "--quick", "--json", *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.stdout, r.stderr
    res: dict = json.loads(r.stdout)
    assert r.returncode == 0, r.stderr
    return res


def test_bench_flood_quick_ipv6() -> None:
    res = quick("--ipv6")
    assert res["stack"] == "ipv6" and res["flood_sources"] == "2001:2::/48"
    assert set(res["modes"]) == {"tuplet-syn", "tuplet-lru"}
    for m in res["modes"].values():
        assert m["checks"]["passed"], m["checks"]
        assert all(f["sent"] == res["flood_syns"] for f in m["flood"]), m["flood"]
    assert res["modes"]["tuplet-syn"]["fraction"] == 1.0, res["modes"]["tuplet-syn"]
    assert res["modes"]["tuplet-lru"]["fraction"] < 0.5, res["modes"]["tuplet-lru"]


def test_bench_flood_quick() -> None:
    res = quick()
    assert res["flood_syns"] == 10 * res["tcp_max"]
    for mode in ("tuplet-syn", "tuplet-lru", "nf_conntrack"):
        m = res["modes"][mode]
        assert m["checks"]["passed"], (mode, m["checks"])
        assert m["connections"] == [res["connections"]], (mode, m)
        assert all(f["sent"] == res["flood_syns"] and f["rate"] > 0 for f in m["flood"]), (mode, m["flood"])
    assert res["modes"]["tuplet-syn"]["fraction"] == 1.0, res["modes"]["tuplet-syn"]
    assert res["modes"]["tuplet-lru"]["fraction"] < 0.5, res["modes"]["tuplet-lru"]
    assert res["checks_passed"]
