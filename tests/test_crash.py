"""Crash safety (issue 15, item 4): a `tuplet` command SIGKILLed at a chosen step (the test-only
TUPLET_TEST_KILL_AT=<point>, tuplet.core.crashpoints) leaves a node the next command finds
consistent: no temporary pins, no half-written service, no established entry lost, the state
file naming what is attached."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuplet.bpf.links import attached_prog_id
from tuplet.bpf.maps import Map
from tuplet.conntrack import resize
from tuplet.conntrack.sizing import Sizing
from tuplet.core import crashpoints
from tuplet.datapath import abi, clock, paths
from tuplet.datapath.layouts import CtEntry, CtTuple4, Lb4Key, Lb4Service
from tuplet.node import apply as node_apply
from tuplet.node import state
from two_pods import node_config_text, two_pods

pytestmark = pytest.mark.netns

VIP = "10.96.0.10"
BACKENDS = ("10.64.0.36:8000", "10.64.0.64:8000")
ESTABLISHED = CtTuple4.make("10.99.0.1", "10.98.0.1", 80, 40000, 6, 0)


@pytest.fixture
def topo():
    yield from two_pods()


def tuplet(*args: str, kill: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
    if kill:
        env[crashpoints.ENV] = kill
    return subprocess.run([sys.executable, "-m", "tuplet.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def config(topo, pin_root: str, tmp_path: Path, tcp_max: int) -> str:
    p = tmp_path / f"node-{tcp_max}.toml"
    p.write_text(node_config_text(topo, pin_root, conntrack=f"tcp_max = {tcp_max}\nany_max = 4096"))
    return str(p)


def check_node(topo, pin_root: str, tcp_max: int) -> None:
    assert not [p for p in os.listdir(pin_root) if p.startswith(resize.TMP_PREFIX)]
    with Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}") as m:
        assert m.max_entries == tcp_max
        assert m.lookup(ESTABLISHED) is not None, "an established entry was lost"
    st = state.load(pin_root)
    assert st is not None and Sizing.from_json(st.sizing).tcp.entries == tcp_max
    assert len(st.attachments) == 4
    with node_apply.in_node_netns(topo.node.netns):
        assert all(attached_prog_id(a) for a in st.attachments), st.attachments


@pytest.mark.parametrize("again", [16384, 8192], ids=["retry", "back"])
@pytest.mark.parametrize("point", ["apply.loaded", "apply.attached", "apply.swapped", "resize.tmp-pinned",
                                   "apply.before-state"])
def test_apply_with_resize_killed_then_apply_again(topo, pin_root, tmp_path, point, again) -> None:
    """A resize (8192 -> 16384) killed at each step, then apply again: the same change, or the old size."""
    r = tuplet("apply", config(topo, pin_root, tmp_path, 8192))
    assert r.returncode == 0, r.stderr
    with Map.from_pin(f"{pin_root}/{abi.CT_MAP_TCP}") as m:
        m.update(ESTABLISHED, CtEntry(lifetime=(clock.monotonic_now() + 10_000) % clock.U32, packets=1,
                                      seen_non_syn=1))
    grown = config(topo, pin_root, tmp_path, 16384)
    r = tuplet("apply", grown, kill=point)
    assert r.returncode == -9, (r.returncode, r.stderr)
    r = tuplet("apply", config(topo, pin_root, tmp_path, again))
    assert r.returncode == 0, r.stderr
    check_node(topo, pin_root, again)
    node_apply.teardown(pin_root)


def services(pin_root: str) -> dict[str, list[str]]:
    r = tuplet("--pin-root", pin_root, "svc", "list", "-o", "json")
    assert r.returncode == 0, r.stderr
    return {s["name"]: sorted(f"{b['address']}:{b['port']}" for b in s["backends"]) for s in json.loads(r.stdout)["services"]}


@pytest.mark.parametrize("point", ["lb.bank-written", "lb.committed"])
def test_service_writes_killed_then_list(topo, pin_root, tmp_path, point) -> None:
    assert tuplet("apply", config(topo, pin_root, tmp_path, 8192)).returncode == 0
    add = ["--pin-root", pin_root, "svc", "add", "web", "--address", VIP, "--port", "80"]
    r = tuplet(*add, *[a for b in BACKENDS for a in ("--backend", b)])
    assert r.returncode == 0, r.stderr
    r = tuplet("--pin-root", pin_root, "svc", "update", "web", "--backend", "10.64.0.99:8000", kill=point)
    assert r.returncode == -9, r.stderr
    r = tuplet("--pin-root", pin_root, "svc", "add", "new", "--address", VIP, "--port", "81",
               "--backend", "10.64.0.98:8000", kill=point)
    assert r.returncode == -9, r.stderr

    # The killed commands did not complete: the node is as the last completed one left it.
    assert services(pin_root) == {"web": sorted(BACKENDS)}
    assert not paths.services_path(pin_root).with_suffix(".dirty").exists()
    with Map.from_pin(f"{pin_root}/{abi.SERVICES_MAP}") as svc_map:
        keys = [Lb4Key.from_buffer_copy(k) for k in svc_map.keys()]
        assert {k.dport for k in keys} == {Lb4Key.make(VIP, 80, 6).dport}, "a half-written service is left"
        slot0 = Lb4Service.from_buffer_copy(svc_map.lookup(Lb4Key.make(VIP, 80, 6)))
        assert slot0.count == 2 and len(keys) == 1 + 2, "the other bank was not cleared"
    reg = json.loads(paths.services_path(pin_root).read_text())
    with Map.from_pin(f"{pin_root}/{abi.BACKENDS_MAP}") as be:
        ids = {int.from_bytes(k, "little") for k in be.keys()}
    assert ids == set(reg["backends"].values()), "backend entries the registry does not know"
    node_apply.teardown(pin_root)
