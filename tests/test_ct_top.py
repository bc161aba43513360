"""`tuplet ct top`: the bounded counter, then a pinned datapath's tables filled with a known
mix (entries held now) and packets run through its programs while it listens (new/s)."""
from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
import time

import numpy as np

from lxc_harness import LxcHarness, tcp
from test_prom import dp  # noqa: F401  (fixture: bpf_lxc.o pinned under pin_root, TCP table 4096)
from tuplet.bpf.maps import Map
from tuplet.cli import main as cli
from tuplet.conntrack import top
from tuplet.conntrack.ctfilter import CtFilter
from tuplet.conntrack.flush import flush_pinned
from tuplet.conntrack.notify import Listener
from tuplet.datapath import abi, clock
from tuplet.datapath.abi import CT_MAP_TCP
from tuplet.datapath.layouts import CtEntry, CtTuple6


def test_counter_exact_then_bounded() -> None:
    c = top.Counter(cap=64)
    rng = np.random.default_rng(1)
    heavy = np.repeat(np.arange(5, dtype=np.uint64), [500, 400, 300, 200, 100])
    noise = rng.integers(1000, 1_000_000, 5000).astype(np.uint64)      # ~5000 values seen once
    for part in np.array_split(rng.permutation(np.concatenate([heavy, noise])), 200):
        c.add(part)
    assert c.top(5) == [(0, 500), (1, 400), (2, 300), (3, 200), (4, 100)]
    assert len(c.values) <= 64 and 0 < c.error <= 2          # pruned: bound reported
    exact = top.Counter()
    exact.add(heavy)
    assert exact.top(2) == [(0, 500), (1, 400)] and exact.error == 0


def be(ip: str) -> int:
    return int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")


def fill(pin_root: str, rows: list[tuple[str, str, int, int, int]]) -> None:
    """(src, dst, dport, count, rev_nat): count entries each with distinct source ports."""
    with Map.from_pin(f"{pin_root}/{CT_MAP_TCP}") as m:
        keys, vals = [], []
        sport = 1000
        for src, dst, dport, n, rev in rows:
            for _ in range(n):
                k = np.zeros(m.key_size, np.uint8)
                k[0:4] = np.frombuffer(be(src).to_bytes(4, "little"), np.uint8)     # daddr: original source
                k[4:8] = np.frombuffer(be(dst).to_bytes(4, "little"), np.uint8)
                k[8:10] = np.frombuffer(dport.to_bytes(2, "big"), np.uint8)
                k[10:12] = np.frombuffer(sport.to_bytes(2, "big"), np.uint8)
                k[12] = 6
                sport += 1
                e = CtEntry(lifetime=clock.monotonic_now() + 1000, rev_nat_index=rev)
                keys.append(k.tobytes())
                vals.append(bytes(e))
        m.update_batch(b"".join(keys), b"".join(vals), len(keys))


def test_top_held_now_on_a_filled_table(dp: LxcHarness, pin_root, capsys) -> None:  # noqa: F811
    fill(pin_root, [("10.1.0.1", "10.2.0.1", 80, 1500, 0), ("10.1.0.2", "10.2.0.1", 443, 1000, 3),
                    ("10.1.0.3", "10.2.0.2", 80, 300, 3), ("10.1.0.4", "10.2.0.9", 53, 5, 7)])
    capsys.readouterr()
    assert cli.main(["--pin-root", pin_root, "ct", "top", "-n", "3", "-o", "json"]) == 0
    got = json.loads(capsys.readouterr().out)["held"]
    assert got["entries"] == 2805 and got["exact"]
    assert [(r["name"], r["count"]) for r in got["sources"]] == [("10.1.0.1", 1500), ("10.1.0.2", 1000),
                                                                 ("10.1.0.3", 300)]
    assert [(r["name"], r["count"]) for r in got["destinations"]] == [("10.2.0.1:80", 1500),
                                                                      ("10.2.0.1:443", 1000), ("10.2.0.2:80", 300)]
    assert [(r["name"], r["count"]) for r in got["services"]] == [("? (rev-NAT 3)", 1300), ("? (rev-NAT 7)", 5)]
    assert got["endpoints"] == []
    # Filters apply; the text output names the counts.
    assert cli.main(["--pin-root", pin_root, "ct", "top", "-n", "1", "--dport", "80"]) == 0
    out = capsys.readouterr().out
    assert "entries held now: 1,800 in" in out and "1,500 (83.3%)  10.1.0.1" in out


def test_top_new_per_second_from_events(dp: LxcHarness, pin_root) -> None:  # noqa: F811
    with Listener(pin_root, CtFilter()) as lis:
        for i in range(30):
            dp.egress(tcp("10.64.0.36", 2000 + i, "10.64.0.64", 80, "S"))
        for i in range(5):
            dp.egress(tcp("10.64.0.37", 2000 + i, "10.64.0.64", 22, "S"))
        t = top.Tally(np.zeros(0, top.ADDR))
        recs = lis.poll_raw(100)
        t.add(recs["tuple"][recs["type"] == abi.CT_NOTIFY_NEW], recs["entry"][recs["type"] == abi.CT_NOTIFY_NEW])
        assert lis.lost() == 0
    got = {c: [(top.label(c, v, {}, {}), k) for v, k in rows] for c, rows in t.top(2).items()}
    assert got["sources"] == [("10.64.0.36", 30), ("10.64.0.37", 5)]
    assert got["destinations"] == [("10.64.0.64:80", 30), ("10.64.0.64:22", 5)]

    # The command: --interval listens while SYNs arrive.
    p = subprocess.Popen([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "ct", "top", "-o", "json",
                          "--interval", "3"], stdout=subprocess.PIPE, text=True)
    end = time.time() + 4
    port = 3000
    while time.time() < end and p.poll() is None:
        dp.egress(tcp("10.64.0.38", port, "10.64.0.64", 8080, "S"))
        port += 1
        time.sleep(0.02)
    out, _ = p.communicate(timeout=30)
    rate = json.loads(out)["new_per_second"]
    assert rate["interval"] == 3 and rate["not_delivered"] == 0
    assert rate["sources"][0]["name"] == "10.64.0.38" and rate["sources"][0]["count"] > 5


def test_top_counts_both_families_with_ipv6_labelled_as_ct_list(dp: LxcHarness, pin_root, capsys) -> None:  # noqa: F811
    fill(pin_root, [("10.1.0.1", "10.2.0.1", 80, 30, 0)])
    with Map.from_pin(f"{pin_root}/{abi.CT6_MAP_TCP}") as m:
        now = clock.monotonic_now()
        for i, (src, n) in enumerate((("f00d::1", 50), ("f00d::2", 20))):
            keys = [bytes(CtTuple6.make(src, "f00d::80", 443, 1000 + j, 6, 0)) for j in range(n)]
            m.update_batch(b"".join(keys), bytes(CtEntry(lifetime=now + 100, rev_nat_index=9)) * n, n)
    capsys.readouterr()
    assert cli.main(["--pin-root", pin_root, "ct", "top", "-n", "3", "-o", "json"]) == 0
    got = json.loads(capsys.readouterr().out)["held"]
    assert got["entries"] == 100 and got["exact"]
    assert [(r["name"], r["count"]) for r in got["sources"]] == [("f00d::1", 50), ("10.1.0.1", 30), ("f00d::2", 20)]
    assert [(r["name"], r["count"]) for r in got["destinations"]] == [("[f00d::80]:443", 70), ("10.2.0.1:80", 30)]
    assert [(r["name"], r["count"]) for r in got["services"]] == [("? (rev-NAT 9)", 70)]
    assert cli.main(["--pin-root", pin_root, "ct", "top", "-o", "json", "--src", "f00d::2"]) == 0
    assert json.loads(capsys.readouterr().out)["held"]["entries"] == 20


def test_a_flush_with_a_listener_reports_the_ipv4_deletions_and_takes_the_ipv6_ones(dp: LxcHarness,  # noqa: F811
                                                                                     pin_root) -> None:
    """struct ct_notify_rec carries an IPv4 tuple: deleted IPv6 entries have no DESTROY
    record yet (and never a mangled one), the flush still deletes them."""
    fill(pin_root, [("10.1.0.1", "10.2.0.1", 80, 2, 0)])
    with Map.from_pin(f"{pin_root}/{abi.CT6_MAP_TCP}") as m:
        m.update(CtTuple6.make("f00d::1", "f00d::2", 80, 1000, 6, 0), CtEntry(lifetime=clock.monotonic_now() + 100))
    with Listener(pin_root, CtFilter()) as lis:
        res = flush_pinned(pin_root)
        recs = lis.poll_raw(100)
    assert res.deleted[CT_MAP_TCP] == 2 and res.deleted[abi.CT6_MAP_TCP] == 1
    assert len(recs) == 2 and set(recs["type"]) == {abi.CT_NOTIFY_DESTROY}
