"""The agent and a `tuplet apply` beside it: apply waits for the node lock, and a table
apply resized (a new pinned map) is collected by the agent's next GC pass."""
from __future__ import annotations

import socket
import time

import pytest

from endpoint_harness import tuplet
from test_agent import agents, config_text, topo  # noqa: F401  (fixtures)
from tuplet.datapath import abi, paths
from tuplet.datapath.clock import monotonic_now
from tuplet.datapath.layouts import CtEntry, CtTuple4

pytestmark = pytest.mark.netns


def test_agent_collects_the_table_apply_resized(topo, agents, pin_root, tmp_path) -> None:  # noqa: F811
    cfg = tmp_path / "node.toml"
    cfg.write_text(config_text(topo, pin_root).replace('gc_interval = "1h"', 'gc_interval = "2s"'))
    a = agents(cfg)
    a.wait_for("READY=1")
    with paths.open_pinned(pin_root, abi.CT_MAP_TCP) as m:
        old_id = m.info.id
    cfg.write_text(config_text(topo, pin_root, tcp_max=16384).replace('gc_interval = "1h"', 'gc_interval = "2s"'))
    out = tuplet(pin_root, "apply", str(cfg)).stdout
    assert "resized tpl_ct4_v1: 8192 -> 16384" in out
    keys = [CtTuple4.make("10.1.0.1", "10.1.0.2", 80, 1000 + i, socket.IPPROTO_TCP, abi.TUPLE_F_OUT)
            for i in range(50)]
    with paths.open_pinned(pin_root, abi.CT_MAP_TCP) as m:
        assert m.info.id != old_id
        for k in keys:
            m.update(k, CtEntry(lifetime=max(1, monotonic_now() - 10)))
        deadline = time.time() + 20
        while time.time() < deadline and any(m.lookup(k) is not None for k in keys):
            a.drain()
            time.sleep(0.2)
        left = sum(m.lookup(k) is not None for k in keys)
    assert left == 0, f"{left} expired entries left in the new table; log:\n{a.logs()[-3000:]}"
    assert any(e.get("event") == "gc: pinned map replaced, collecting the new one" for e in a.events())
