"""Live endpoints survive agent restarts: an endpoint added with `tuplet endpoint add`
while the agent runs keeps its attachments, its endpoint-map entry, its conntrack entries
and its traffic through a SIGKILL of the agent and a new start, and through a SIGTERM
stop and start."""
from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from agent_harness import AgentProc
from endpoint_harness import POD3, records, tuplet, with_addr
from traffic import LiveConnection, start_server
from tuplet.bpf.links import Hook, attached_prog_id
from tuplet.datapath import abi, paths
from tuplet.lab.topology import Topology
from tuplet.node import apply as node_apply
from tuplet.node import netns, state
from two_pods import POD1, POD2, node_config_text

pytestmark = pytest.mark.netns


@pytest.fixture
def topo():
    with Topology() as t:
        t.node = t.add_node("node")
        t.p1 = t.add_pod(t.node, "pod1", POD1)
        t.p2 = t.add_pod(t.node, "pod2", POD2)
        t.p3 = t.add_pod(t.node, "pod3", POD3)
        start_server(t, t.p2, 8000)
        yield t


def live_view(pin_root: str, topo) -> tuple[object, set[tuple[str, str]], bool]:
    """pod3's state record, its attached hooks (with a program), and its endpoint-map entry."""
    st = state.load(pin_root)
    with netns.enter(topo.node.netns):
        hooks = {(a.ifname, a.hook.value) for a in st.attachments
                 if a.ifname == topo.p3.host_ifname and attached_prog_id(a)}
    with paths.open_pinned(pin_root, abi.EP_MAP) as m:
        in_map = m.lookup(socket.inet_aton(POD3)) is not None
    rec = st.live.get("pod3")
    return (rec.source, rec.ifname, rec.ipv4, rec.identity) if rec else None, hooks, in_map


def test_live_endpoint_survives_agent_restarts(topo, pin_root, tmp_path: Path) -> None:
    cfg = tmp_path / "tuplet.toml"
    cfg.write_text(node_config_text(topo, pin_root, name="restart-test", mode=None, identities=False,
                                    conntrack='tcp_max = 8192\nany_max = 4096\ngc_interval = "1h"'))
    agents: list[AgentProc] = []
    try:
        agents.append(AgentProc(cfg, tmp_path))
        agents[-1].wait_for("READY=1")
        tuplet(pin_root, "endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, "--ipv4", POD3,
               "--identity", "5000")
        conn = LiveConnection(topo, topo.p3, POD2, 8000)
        assert conn.roundtrip("hello") == "hello"
        want = (("cli", topo.p3.host_ifname, POD3, 5000), {(topo.p3.host_ifname, h.value) for h in Hook}, True)
        assert live_view(pin_root, topo) == want
        entries = {r.line().split(" expires=")[0] for r in with_addr(records(pin_root), POD3)}
        assert entries

        for how in (signal.SIGKILL, signal.SIGTERM):
            agents[-1].proc.send_signal(how)
            agents[-1].proc.wait(timeout=20)
            agents.append(AgentProc(cfg, tmp_path))
            agents[-1].wait_for("READY=1")
            time.sleep(0.3)
            assert live_view(pin_root, topo) == want, how
            assert entries <= {r.line().split(" expires=")[0] for r in with_addr(records(pin_root), POD3)}, how
            assert conn.roundtrip(f"after {how.name}") == f"after {how.name}"
            st = [e for e in tuplet(pin_root, "endpoint", "list").stdout.splitlines() if "pod3" in e]
            assert st and "from cli" in st[0]
        conn.close()
        tuplet(pin_root, "endpoint", "delete", "pod3")
        assert live_view(pin_root, topo) == (None, set(), False)
    finally:
        for a in agents:
            a.close()
        node_apply.teardown(pin_root)
