"""The CNI plugin through its protocol alone: env + stdin as a runtime runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from endpoint_harness import POD3, ROOT, records, tcp_exchange, three_pods_applied, with_addr
from tuplet.node import state
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
