"""`tuplet ct list` filters and `tuplet ct delete` on real pod traffic between namespaces."""
from __future__ import annotations

import json
import time

import pytest

from traffic import LiveConnection, start_server, udp_once
from tuplet.cli import main as cli
from tuplet.node import apply as node_apply
from tuplet.node import config
from two_pods import COUNTING, POD1, POD2, node_config_text, two_pods

pytestmark = pytest.mark.netns


@pytest.fixture
def topo():
    yield from two_pods()


@pytest.fixture
def traffic(topo, pin_root):
    node_apply.apply(config.parse(node_config_text(topo, pin_root, conntrack=COUNTING)))   # -o extended shows packets=
    srv = start_server(topo, topo.p2, 8000)
    srv1 = start_server(topo, topo.p1, 9000)
    conn = LiveConnection(topo, topo.p1, POD2, 8000)
    assert conn.roundtrip("hello") == "hello"
    udp_once(topo, topo.p1, POD2, 8000, 40001)
    udp_once(topo, topo.p2, POD1, 9000, 40002)
    time.sleep(0.2)
    yield conn
    conn.close()
    srv.kill()
    srv1.kill()
    node_apply.teardown(pin_root)


def run(capsys, pin_root: str, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["--pin-root", pin_root, "ct", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_list_filters_on_live_traffic(traffic, pin_root, capsys) -> None:
    conn = traffic
    rc, out, _ = run(capsys, pin_root, "list", "-o", "json")
    every = json.loads(out)
    assert rc == 0 and len(every) >= 6

    rc, out, _ = run(capsys, pin_root, "list", "-p", "udp", "-o", "json")
    udp = json.loads(out)
    assert {(r["src"], r["sport"], r["direction"]) for r in udp} == {
        (POD1, 40001, "OUT"), (POD1, 40001, "IN"), (POD2, 40002, "OUT"), (POD2, 40002, "IN")}

    rc, out, _ = run(capsys, pin_root, "list", "-s", POD2, "-p", "udp", "--type", "OUT", "-o", "extended")
    assert out.splitlines() == [out.splitlines()[0]] and out.startswith(
        "ipv4     2 udp      17 ") and f"src={POD2} dst={POD1} sport=40002 dport=9000 packets=2 " in out

    rc, out, _ = run(capsys, pin_root, "list", "--sport", str(conn.sport), "--state", "established")
    lines = out.splitlines()
    assert {ln.split(" ")[1] for ln in lines} == {"OUT", "IN"}
    assert all(ln.startswith("TCP ") and f"{POD1}:{conn.sport} -> {POD2}:8000" in ln for ln in lines)

    rc, out, _ = run(capsys, pin_root, "list", "-d", "10.64.0.0/26", "-c")    # POD2 (.64) is outside /26
    expected = len([r for r in every if r["dst"] == POD1])
    assert rc == 0 and out.strip() == str(expected) and expected >= 2

    rc, out, _ = run(capsys, pin_root, "list", "--endpoint", "pod1", "-c")
    assert int(out) == len(every)              # every flow here has pod1 on one side
    rc, _, err = run(capsys, pin_root, "list", "--endpoint", "nosuch")
    assert rc == 2 and "--endpoint: no endpoint named 'nosuch'" in err and "pod1" in err
    rc, _, err = run(capsys, pin_root, "list", "--service", "web")
    assert rc == 2 and "--service: no service named 'web'" in err
    rc, _, err = run(capsys, pin_root, "list", "--dport", "eighty")
    assert rc == 2 and "--dport: must be a port number" in err


def test_delete_by_filter_keeps_the_rest(traffic, pin_root, capsys) -> None:
    conn = traffic
    rc, _, err = run(capsys, pin_root, "delete")
    assert rc == 2 and "--all" in err
    rc, out, _ = run(capsys, pin_root, "list", "-c")
    total = int(out)

    rc, out, _ = run(capsys, pin_root, "delete", "-p", "udp", "-s", POD1)
    assert rc == 0 and out.startswith("deleted 2 conntrack entries") and "and 0 NAT entries" in out
    rc, out, _ = run(capsys, pin_root, "list", "-p", "udp", "-o", "json")
    assert {(r["src"], r["sport"]) for r in json.loads(out)} == {(POD2, 40002)}
    # the TCP connection is untouched and still answers
    rc, out, _ = run(capsys, pin_root, "list", "-c", "--sport", str(conn.sport), "-p", "tcp")
    assert int(out) == 2
    assert conn.roundtrip("again") == "again"

    rc, out, _ = run(capsys, pin_root, "list", "-c")
    assert int(out) == total - 2
    rc, out, _ = run(capsys, pin_root, "delete", "--all", "-o", "json")
    assert rc == 0 and json.loads(out)["ct_deleted"] >= total - 2


def test_stats_on_live_traffic(traffic, pin_root, capsys) -> None:
    rc, out, _ = run(capsys, pin_root, "stats", "-o", "json")
    d = json.loads(out)
    t = d["total"]
    # 1 TCP connection + 2 UDP flows, each new on the sender's and the receiver's program
    assert rc == 0 and t["new"] >= 6 and t["found"] > 0 and t["promoted"] >= 2 and t["insert"] >= 6
    assert sum(c["found"] for c in d["cpus"]) == t["found"]
    assert d["evicted_estimate"] is None      # no agent here
    rc, out, _ = run(capsys, pin_root, "stats")
    assert rc == 0 and "cpu=0" in out and "\ntotal  found=" in out and "evicted: no estimate" in out
