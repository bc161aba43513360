"""Shared by the endpoint, lock, crash and ipcache tests: two configured pods and a third
pod the tests add live, the CLI run in-process or as a separate process."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from traffic import start_server, tcp_once
from tuplet.conntrack import records as ct
from tuplet.datapath import cttables, paths
from tuplet.lab.topology import Topology
from tuplet.node import apply as node_apply
from tuplet.node import config
from two_pods import POD1, POD2, node_config_text

POD3 = "10.64.0.80"
ROOT = Path(__file__).resolve().parents[1]


def three_pods_applied(pin_root: str, conntrack: str = "tcp_max = 8192\nany_max = 4096",
                       extra: str = "") -> Iterator[Topology]:
    """pod1 and pod2 in the node file (applied), pod3 on a veth the datapath does not know."""
    with Topology() as t:
        node = t.add_node("node")
        t.add_pod(node, "pod1", POD1)
        t.add_pod(node, "pod2", POD2)
        t.add_pod(node, "pod3", POD3)
        t.node = node
        t.p1, t.p2, t.p3 = node.pods
        cfg = config.parse(node_config_text(t, pin_root, conntrack=conntrack) + extra)
        node_apply.apply(cfg)
        t.cfg = cfg
        try:
            yield t
        finally:
            node_apply.teardown(pin_root)


def tuplet(pin_root: str, *argv: str, env: dict[str, str] | None = None,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    """`tuplet --pin-root R ARGV...` as its own process."""
    e = {**os.environ, "PYTHONPATH": str(ROOT / "loader"), **(env or {})}
    r = subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, *argv], env=e,
                       capture_output=True, text=True, timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"tuplet {' '.join(argv)} failed ({r.returncode}): {r.stderr}")
    return r


def records(pin_root: str) -> list[ct.CtRecord]:
    out = []
    for name in cttables.NAMES:
        with paths.open_pinned(pin_root, name) as m:
            out.extend(ct.records(m))
    return out


def with_addr(recs: list[ct.CtRecord], addr: str) -> list[ct.CtRecord]:
    return [r for r in recs if addr in (r.src[0], r.dst[0])]


def tcp_exchange(topo: Topology, pod, addr: str, port: int = 8000) -> None:
    """One TCP connection from ``pod`` to a server started on pod1 for it."""
    srv = start_server(topo, topo.p1, port)
    try:
        tcp_once(topo, pod, addr, port)
    finally:
        srv.kill()
        srv.wait()
