"""Crash safety: `endpoint add` / `delete` killed with SIGKILL between any two steps
leaves the node consistent for the next command, which repairs and reports it."""
from __future__ import annotations

import os
import signal
import socket

import pytest

from endpoint_harness import POD3, records, tcp_exchange, three_pods_applied, tuplet, with_addr
from tuplet.bpf.links import Hook, tc_has_filter
from tuplet.core import crashpoints
from tuplet.datapath import abi, paths
from tuplet.node import netns, state
from two_pods import POD1

pytestmark = pytest.mark.netns

ADD_POINTS = ["endpoint.add-recorded", "endpoint.add-mapped", "endpoint.add-attached-ingress",
              "endpoint.add-attached-egress"]
DELETE_POINTS = ["endpoint.delete-marked", "endpoint.delete-detached", "endpoint.delete-flushed"]


@pytest.fixture
def topo(pin_root):
    yield from three_pods_applied(pin_root)


def add_args(topo) -> tuple[str, ...]:
    return ("endpoint", "add", "pod3", "--ifname", topo.p3.host_ifname, "--ipv4", POD3)


def hooks_on(pin_root: str, topo) -> int:
    with netns.enter(topo.node.netns):
        n = sum(os.path.exists(os.path.join(pin_root, "links", f"{topo.p3.host_ifname}-{h.value}")) for h in Hook)
        return n + sum(tc_has_filter(topo.p3.host_ifname, h) for h in Hook)


def in_map(pin_root: str) -> bool:
    with paths.open_pinned(pin_root, abi.EP_MAP) as m:
        return m.lookup(socket.inet_aton(POD3)) is not None


@pytest.mark.parametrize("point", ADD_POINTS)
def test_killed_add(topo, pin_root, point) -> None:
    r = tuplet(pin_root, *add_args(topo), env={crashpoints.ENV: point}, check=False)
    assert r.returncode == -signal.SIGKILL
    assert state.load(pin_root).live["pod3"].phase == "adding"
    out = tuplet(pin_root, *add_args(topo)).stdout      # the next command repairs, then adds
    assert "add undone" in out and "added endpoint pod3" in out
    assert hooks_on(pin_root, topo) == 2 and in_map(pin_root)
    assert sum(a.ifname == topo.p3.host_ifname for a in state.load(pin_root).attachments) == 2
    tuplet(pin_root, "endpoint", "delete", "pod3")
    assert hooks_on(pin_root, topo) == 0 and not in_map(pin_root)


@pytest.mark.parametrize("point", DELETE_POINTS)
def test_killed_delete(topo, pin_root, point) -> None:
    tuplet(pin_root, *add_args(topo))
    tcp_exchange(topo, topo.p3, POD1)
    assert with_addr(records(pin_root), POD3)
    r = tuplet(pin_root, "endpoint", "delete", "pod3", env={crashpoints.ENV: point}, check=False)
    assert r.returncode == -signal.SIGKILL
    assert state.load(pin_root).live["pod3"].phase == "deleting"
    listed = tuplet(pin_root, "endpoint", "list").stdout
    assert "deleting, interrupted" in listed                  # reported until repaired
    out = tuplet(pin_root, "endpoint", "delete", "pod3").stdout
    assert "delete finished" in out and "deleted endpoint pod3" in out
    assert hooks_on(pin_root, topo) == 0 and not in_map(pin_root)
    assert not with_addr(records(pin_root), POD3)
    assert "pod3" not in state.load(pin_root).live
