"""`tuplet agent` as systemd runs it: a subprocess with NOTIFY_SOCKET and WATCHDOG_USEC,
against namespaces with live connections."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent_harness import AgentProc
from traffic import LiveConnection, start_server
from tuplet.agent import report
from tuplet.bpf.links import pinned_link_prog_id
from tuplet.bpf.maps import Map
from tuplet.conntrack import records as ct
from tuplet.datapath import abi, paths
from tuplet.lab.topology import Topology
from tuplet.node import apply as node_apply
from tuplet.node import state

pytestmark = pytest.mark.netns

from two_pods import POD1, POD2, node_config_text


@pytest.fixture
def topo():
    with Topology() as t:
        node = t.add_node("node")
        t.p1 = t.add_pod(node, "pod1", POD1)
        t.p2 = t.add_pod(node, "pod2", POD2)
        t.node = node
        start_server(t, t.p2, 8000)
        yield t


def config_text(topo, pin_root: str, tcp_max: int = 8192, extra: str = "") -> str:
    return node_config_text(topo, pin_root, name="agent-test", mode=None, identities=False,
                            conntrack=f'tcp_max = {tcp_max}\nany_max = 4096\ngc_interval = "1h"\n'
                                      f'accounting = true\n{extra}')   # the tests read Packets


@pytest.fixture
def agents(tmp_path, pin_root):
    made: list[AgentProc] = []

    def start(cfg: Path, **kw) -> AgentProc:
        a = AgentProc(cfg, tmp_path, **kw)
        made.append(a)
        return a

    yield start
    for a in made:
        a.close()
    node_apply.teardown(pin_root)


def ct_entry_of(pin_root: str, sport: int):
    with paths.open_pinned(pin_root, abi.CT_MAP_TCP) as m:
        hits = [r for r in ct.records(m) if r.direction == "OUT" and r.src[1] == sport]
    return hits[0] if hits else None


def drops(a: AgentProc) -> float:
    return sum(v for (name, _), v in a.scrape().items() if name == "tuplet_drop_count_total")


def test_ready_watchdog_metrics_reload_and_stop(topo, agents, pin_root, tmp_path) -> None:
    cfg = tmp_path / "tuplet.toml"
    cfg.write_text(config_text(topo, pin_root))
    a = agents(cfg)
    a.wait_for("READY=1")
    a.wait_for("WATCHDOG=1", timeout=5)
    conn = LiveConnection(topo, topo.p1, POD2, 8000)
    assert conn.roundtrip("one") == "one"

    m = a.scrape()
    assert m[("tuplet_bpf_map_capacity", (("map_name", abi.CT_MAP_TCP),))] == 8192
    assert m[("tuplet_bpf_map_entries", (("map_name", abi.CT_MAP_TCP),))] >= 2
    assert any(n == "tuplet_datapath_conntrack_gc_runs_total" and v >= 1 for (n, _), v in m.items())

    # `tuplet status` sees the agent.
    st = subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "status", "--verbose"],
                        capture_output=True, text=True, timeout=30)
    assert f"running, pid {a.proc.pid}" in st.stdout and "last pass:" in st.stdout, st.stdout

    # A good reload: a service appears, the connection goes on.
    cfg.write_text(config_text(topo, pin_root) + textwrap.dedent(f"""
        [[services]]
        name = "web"
        address = "10.68.0.10"
        port = 80
        backends = ["{POD2}:8000"]
    """))
    a.proc.send_signal(signal.SIGHUP)
    got = a.wait_for("READY=1")
    assert any("RELOADING=1" in g for g in got)
    assert conn.roundtrip("two") == "two"
    assert any(e.get("event") == "reloaded" for e in a.events())
    assert Path(pin_root, "tpl_lb4_services_v1").exists()

    # A bad reload: rejected with the key named, the datapath untouched.
    cfg.write_text(config_text(topo, pin_root, extra="timeout_regular_tcp = \"never\""))
    a.proc.send_signal(signal.SIGHUP)
    a.wait_for("READY=1")
    rejected = [e for e in a.events() if e.get("event") == "reload rejected"]
    assert rejected and rejected[-1]["key"] == "conntrack.timeout_regular_tcp"
    assert a.proc.poll() is None
    assert conn.roundtrip("three") == "three"

    # Stop: the agent exits 0, the datapath stays and keeps tracking.
    a.proc.send_signal(signal.SIGTERM)
    a.wait_for("STOPPING=1")
    assert a.proc.wait(timeout=30) == 0
    assert conn.roundtrip("four") == "four"
    entry = ct_entry_of(pin_root, conn.sport)
    assert entry is not None and entry.entry.packets >= 8
    assert report.read_agent_state(pin_root) is None
    conn.close()


def test_sigkill_restart_loses_no_entry_and_no_packet(topo, agents, pin_root, tmp_path) -> None:
    cfg = tmp_path / "tuplet.toml"
    cfg.write_text(config_text(topo, pin_root))
    first = agents(cfg)
    first.wait_for("READY=1")
    conn = LiveConnection(topo, topo.p1, POD2, 8000)
    assert conn.roundtrip("hello") == "hello"
    before = ct_entry_of(pin_root, conn.sport)
    map_id = Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}").info.id
    links = sorted(os.listdir(f"{pin_root}/links"))
    progs = {n: pinned_link_prog_id(f"{pin_root}/links/{n}") for n in links}

    # Traffic keeps flowing through the kill and the restart.
    stop = threading.Event()
    answers: list[str] = []

    def chat() -> None:
        i = 0
        while not stop.is_set():
            answers.append(conn.roundtrip(f"m{i}") == f"m{i}" and "ok" or "bad")
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=chat)
    t.start()
    try:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        time.sleep(0.3)
        second = agents(cfg)
        second.wait_for("READY=1")
        time.sleep(0.3)
    finally:
        stop.set()
        t.join()
    assert answers and set(answers) == {"ok"}, answers.count("bad")
    assert drops(second) == 0
    assert Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}").info.id == map_id      # the same table, adopted
    assert sorted(os.listdir(f"{pin_root}/links")) == links
    # Same links, new programs: this build's, swapped in through the links.
    assert all(pinned_link_prog_id(f"{pin_root}/links/{n}") not in (0, progs[n]) for n in links)
    after = ct_entry_of(pin_root, conn.sport)
    assert after is not None and after.entry.packets > before.entry.packets
    adopted = [e for e in second.events() if e.get("event") == "applied"]
    assert adopted and adopted[-1]["reused_pins"] > 0
    conn.close()


def test_bad_config_on_start_exits_2_naming_the_key(topo, pin_root, tmp_path) -> None:
    cfg = tmp_path / "tuplet.toml"
    cfg.write_text(config_text(topo, pin_root, extra="colour = 1"))
    r = subprocess.run([sys.executable, "-m", "tuplet.cli", "--config", str(cfg), "agent",
                        "--prometheus-serve-addr", ""], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "conntrack.colour" in r.stderr, r.stderr
    assert not Path(pin_root).exists() and state.load(pin_root) is None
    missing = subprocess.run([sys.executable, "-m", "tuplet.cli", "--config", str(tmp_path / "nope.toml"), "agent"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "nope.toml" in missing.stderr
    bad_addr = subprocess.run([sys.executable, "-m", "tuplet.cli", "--config", str(cfg), "agent",
                               "--prometheus-serve-addr", "here:port"], capture_output=True, text=True, timeout=60)
    assert bad_addr.returncode == 2 and "--prometheus-serve-addr" in bad_addr.stderr


def test_reload_resizes_tables_under_live_connections(topo, agents, pin_root, tmp_path) -> None:
    cfg = tmp_path / "tuplet.toml"
    cfg.write_text(config_text(topo, pin_root, tcp_max=8192))
    a = agents(cfg)
    a.wait_for("READY=1")
    conns = [LiveConnection(topo, topo.p1, POD2, 8000) for _ in range(4)]
    assert all(c.roundtrip("x") == "x" for c in conns)
    cap = ("tuplet_bpf_map_capacity", (("map_name", abi.CT_MAP_TCP),))
    for size in (32768, 4096):
        cfg.write_text(config_text(topo, pin_root, tcp_max=size))
        a.proc.send_signal(signal.SIGHUP)
        a.wait_for("READY=1")
        done = [e for e in a.events() if e.get("event") == "reloaded"][-1]
        # The handshake table's default size follows (an eighth of the TCP table, 1024 at least);
        # the IPv6 tables are sized as their IPv4 twins.
        syn = max(1024, size // 8)
        assert sorted((r["map"], r["new_entries"], r["dropped"]) for r in done["resized"]) == \
            sorted([(abi.CT_MAP_TCP, size, 0), (abi.CT_MAP_SYN, syn, 0), (abi.CT6_MAP_TCP, size, 0),
                    (abi.CT6_MAP_SYN, syn, 0)])
        assert Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}").info.max_entries == size
        assert all(c.roundtrip(f"after {size}") == f"after {size}" for c in conns)
        assert all(ct_entry_of(pin_root, c.sport) is not None for c in conns)
        assert a.scrape()[cap] == size            # metrics follow the new map behind the pin
        assert drops(a) == 0
    # GC runs on the new map after the reload.
    assert a.proc.poll() is None
    for c in conns:
        c.close()
