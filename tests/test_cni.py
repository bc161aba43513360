"""The CNI plugin through its protocol alone: env + stdin as a runtime runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from endpoint_harness import POD3, ROOT, records, tcp_exchange, three_pods_applied, with_addr
from tuplet.datapath import abi, paths
from tuplet.datapath.clock import monotonic_now
from tuplet.datapath.layouts import CtEntry, CtTuple6
from tuplet.node import endpoints, state
from two_pods import POD1

pytestmark = pytest.mark.netns


@pytest.fixture
def topo(pin_root):
    yield from three_pods_applied(pin_root)


def prev_result(host_if: str, ipv4: str) -> dict:
    return {"cniVersion": "1.0.0",
            "interfaces": [{"name": host_if, "mac": "02:00:00:00:00:01"},
                           {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": "/var/run/netns/x"}],
            "ips": [{"address": f"{ipv4}/32", "gateway": "10.64.0.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}


def cni(command: str, conf: dict | None, container: str = "c0ffee0123456789", ifname: str = "eth0"
        ) -> tuple[int, dict | None]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "loader"), "CNI_COMMAND": command, "CNI_CONTAINERID": container,
           "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": ifname, "CNI_PATH": "/opt/cni/bin"}
    r = subprocess.run([sys.executable, "-m", "tuplet.cni"], input=json.dumps(conf) if conf is not None else "",
                       env=env, capture_output=True, text=True, timeout=60)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else None)


def conf(pin_root: str, prev: dict | None, **extra) -> dict:
    c = {"cniVersion": "1.0.0", "name": "tpl", "type": "tuplet-cni", "pin_root": pin_root, "identity": 7000,
         **extra}
    if prev is not None:
        c["prevResult"] = prev
    return c


def test_add_check_del(topo, pin_root) -> None:
    prev = prev_result(topo.p3.host_ifname, POD3)
    rc, out = cni("ADD", conf(pin_root, prev))
    assert rc == 0 and out == prev
    assert cni("ADD", conf(pin_root, prev)) == (0, prev)     # repeated ADD: idempotent
    assert cni("CHECK", conf(pin_root, prev)) == (0, None)
    (rec,) = [e for e in state.load(pin_root).live.values()]
    assert (rec.source, rec.ifname, rec.ipv4, rec.identity) == ("cni", topo.p3.host_ifname, POD3, 7000)
    tcp_exchange(topo, topo.p3, POD1)
    mine = with_addr(records(pin_root), POD3)
    assert mine and {r.entry.src_sec_id for r in mine if r.src[0] == POD3 and r.direction == "OUT"} == {7000}
    assert cni("DEL", conf(pin_root, prev)) == (0, None)
    assert not with_addr(records(pin_root), POD3)
    assert not state.load(pin_root).live
    assert cni("DEL", conf(pin_root, prev)) == (0, None)      # nothing left: still success
    rc, out = cni("CHECK", conf(pin_root, prev))
    assert rc == 1 and out["code"] == 103


def test_bad_input(topo, pin_root) -> None:
    rc, out = cni("ADD", conf(pin_root, None))
    assert rc == 1 and out["code"] == 7 and "prevResult is missing" in out["msg"]
    rc, out = cni("ADD", conf(pin_root, prev_result("nosuchif0", POD3)))
    assert rc == 1 and out["code"] == 101 and "nosuchif0" in out["details"], out
    rc, out = cni("ADD", conf(pin_root, prev_result(topo.p3.host_ifname, POD1)))   # pod1's address
    assert rc == 1 and out["code"] == 102 and "pod1" in out["details"], out
    rc, out = cni("ADD", {"cniVersion": "9.9.9"})
    assert rc == 1 and out["code"] == 1
    env_missing = subprocess.run([sys.executable, "-m", "tuplet.cni"], input="{}", capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT / "loader")})
    assert env_missing.returncode == 1 and json.loads(env_missing.stdout)["code"] == 4
    rc, out = cni("ADD", "not json")   # type: ignore[arg-type]
    assert rc == 1 and out["code"] == 6
    assert not state.load(pin_root).live     # nothing half done
    rc, out = cni("VERSION", None)
    assert rc == 0 and "1.0.0" in out["supportedVersions"]


def test_not_applied(pin_root) -> None:
    rc, out = cni("ADD", conf(pin_root, prev_result("lo", POD3)))
    assert rc == 1 and out["code"] == 100 and "not applied" in out["msg"]
    assert cni("DEL", conf(pin_root, prev_result("lo", POD3))) == (0, None)
    rc, out = cni("STATUS", conf(pin_root, None, cniVersion="1.1.0"))
    assert rc == 1 and out["code"] == 50


def test_gc_removes_endpoints_the_runtime_no_longer_has(topo, pin_root) -> None:
    prev = prev_result(topo.p3.host_ifname, POD3)
    assert cni("ADD", conf(pin_root, prev), container="aaaa") == (0, prev)
    gc = conf(pin_root, None, cniVersion="1.1.0")
    gc["cni.dev/valid-attachments"] = [{"containerID": "aaaa", "ifname": "eth0"}]
    assert cni("GC", gc) == (0, None)
    assert len(state.load(pin_root).live) == 1
    gc["cni.dev/valid-attachments"] = []
    assert cni("GC", gc) == (0, None)
    assert not state.load(pin_root).live


POD3_V6 = "fd00:64::3"


def test_ipv6_prev_result(topo, pin_root) -> None:
    """A dual-stack prevResult gives the endpoint both addresses (the first of each family),
    an IPv6-only one its IPv6 address; DEL flushes the IPv6 entries too; a prevResult
    without any address is refused with nothing done."""
    prev = prev_result(topo.p3.host_ifname, POD3)
    prev["ips"] += [{"address": f"{POD3_V6}/128", "gateway": "fd00:64::1", "interface": 1},
                    {"address": "fd00:64::99/128", "interface": 1}]
    assert cni("ADD", conf(pin_root, prev)) == (0, prev)
    assert cni("CHECK", conf(pin_root, prev)) == (0, None)
    (rec,) = state.load(pin_root).live.values()
    assert (rec.ipv4, rec.ipv6) == (POD3, POD3_V6)
    assert endpoints.map_entries(pin_root)[POD3_V6].sec_id == 7000
    key = CtTuple6.make(POD3_V6, "fd00:64::1", 80, 1000, 6, abi.TUPLE_F_OUT)
    with paths.open_pinned(pin_root, abi.CT6_MAP_TCP) as m:
        m.update(key, CtEntry(lifetime=monotonic_now() + 100))
    # CHECK compares every address: a prevResult with another IPv6 address fails.
    other = {**prev, "ips": [prev["ips"][0], {"address": "fd00:64::7/128", "interface": 1}]}
    rc, out = cni("CHECK", conf(pin_root, other))
    assert rc == 1 and out["code"] == 103 and "fd00:64::7" in out["msg"], out
    assert cni("DEL", conf(pin_root, prev)) == (0, None)
    assert POD3_V6 not in endpoints.map_entries(pin_root) and not state.load(pin_root).live
    with paths.open_pinned(pin_root, abi.CT6_MAP_TCP) as m:
        assert m.lookup(key) is None

    only6 = {**prev, "ips": [{"address": f"{POD3_V6}/64", "interface": 1}]}
    assert cni("ADD", conf(pin_root, only6, identity=7001)) == (0, only6)
    (rec,) = state.load(pin_root).live.values()
    assert (rec.ipv4, rec.ipv6, rec.identity) == ("", POD3_V6, 7001)
    assert POD3 not in endpoints.map_entries(pin_root)
    assert cni("DEL", conf(pin_root, only6)) == (0, None)

    rc, out = cni("ADD", conf(pin_root, {**prev, "ips": [{"address": "nonsense"}]}))
    assert rc == 1 and out["code"] == 7 and "no IPv4 or IPv6 address" in out["msg"], out
    assert not state.load(pin_root).live
