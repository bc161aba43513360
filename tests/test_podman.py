"""`tuplet-cni` under a real runtime: podman (CNI backend) runs containers from a local
busybox rootfs on a ptp + host-local network with tuplet-cni chained after ptp.

Everything podman needs is the test's own: a CONTAINERS_CONF file, a CNI config dir with
the conflist, a plugin dir (the reference plugins linked, tuplet-cni a wrapper around
this checkout), podman's --root/--runroot and host-local's dataDir, all in a temp dir;
the machine's /etc/cni and /etc/containers are not touched.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from endpoint_harness import ROOT, records, with_addr
from traffic import ECHO_SERVER
from tuplet.conntrack.records import CtRecord
from tuplet.datapath import abi, paths
from tuplet.datapath.clock import monotonic_now
from tuplet.datapath.layouts import CtEntry, CtTuple4
from tuplet.node import apply as node_apply
from tuplet.node import config, state

pytestmark = pytest.mark.netns

CNI_DIR = Path("/usr/lib/cni")
BUSYBOX = Path("/bin/busybox")
IDENTITY = 7001
NETWORK = "tpltest"
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]

CLIENT = textwrap.dedent("""
    import socket, sys
    dst, port = sys.argv[1], int(sys.argv[2])
    with socket.create_connection((dst, port), timeout=5) as s:
        s.sendall(b"hello"); assert s.recv(16) == b"hello"
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
    u.sendto(b"ping", (dst, port)); assert u.recvfrom(16)[0] == b"ping"
""")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "podman tests need root"
    for tool in ("podman", "runc", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (make cni-deps)"
    for p in (CNI_DIR / "ptp", CNI_DIR / "host-local", BUSYBOX):
        if not p.exists():
            return f"{p} is missing (make cni-deps: containernetworking-plugins, busybox-static)"
    return None


@dataclass
class Podman:
    """podman with the test's own config, storage and CNI network."""

    tmp: Path
    pin_root: str
    subnet: str                          # e.g. 10.99.37
    env: dict[str, str] = field(default_factory=dict)

    def cmd(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["podman", "--root", str(self.tmp / "root"), "--runroot", str(self.tmp / "runroot"),
                            *argv], env=self.env, capture_output=True, text=True, timeout=120)
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(argv)} failed ({r.returncode}): {r.stderr}")
        return r

    def run(self, name: str, network: str = NETWORK, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.cmd("run", "-d", "--name", name, *ULIMITS, "--network", network,
                        "--rootfs", str(self.tmp / "rootfs"), "/bin/sleep", "3600", check=check)

    def rm(self, name: str) -> None:
        self.cmd("rm", "-f", "-t", "0", name)

    def pid(self, name: str) -> int:
        return int(self.cmd("inspect", "-f", "{{.State.Pid}}", name).stdout)

    def ipv4(self, name: str) -> str:
        nets = json.loads(self.cmd("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout)
        return str(nets[NETWORK]["IPAddress"])

    def in_netns(self, name: str, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid(name)}/ns/net", *argv]


def host_veth(ipv4: str) -> str:
    """The host-side veth ptp routes the container's address to."""
    out = subprocess.run(["ip", "-j", "route", "get", ipv4], capture_output=True, text=True, check=True).stdout
    return str(json.loads(out)[0]["dev"])


def _write_files(tmp: Path, pin_root: str, subnet: str) -> None:
    (tmp / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, tmp / "rootfs" / "bin" / "busybox")
    for applet in ("sh", "sleep", "ip", "ping", "nc"):
        (tmp / "rootfs" / "bin" / applet).symlink_to("busybox")
    plugins = tmp / "plugins"
    plugins.mkdir()
    for p in CNI_DIR.iterdir():
        (plugins / p.name).symlink_to(p)
    wrapper = plugins / "tuplet-cni"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={ROOT / 'loader'} exec {sys.executable} -m tuplet.cni \"$@\"\n")
    wrapper.chmod(0o755)
    (tmp / "net").mkdir()
    # Three addresses only: after one container goes, host-local must hand its address
    # to the next one (the stale-entry case).
    ipam = {"type": "host-local", "dataDir": str(tmp / "ipam"),
            "ranges": [[{"subnet": f"{subnet}.0/24", "rangeStart": f"{subnet}.2", "rangeEnd": f"{subnet}.4"}]]}
    conflist = {"cniVersion": "1.0.0", "name": NETWORK, "plugins": [
        {"type": "ptp", "ipMasq": False, "ipam": ipam},
        {"type": "tuplet-cni", "pin_root": pin_root, "identity": IDENTITY}]}
    (tmp / "net" / f"{NETWORK}.conflist").write_text(json.dumps(conflist))
    plain = {"cniVersion": "1.0.0", "name": "tplplain", "plugins": [{"type": "ptp", "ipMasq": False, "ipam": {
        **ipam, "ranges": [[{"subnet": f"{subnet}.0/24", "rangeStart": f"{subnet}.200",
                             "rangeEnd": f"{subnet}.210"}]]}}]}
    (tmp / "net" / "tplplain.conflist").write_text(json.dumps(plain))
    (tmp / "containers.conf").write_text(textwrap.dedent(f"""
        [network]
        network_backend = "cni"
        network_config_dir = "{tmp / 'net'}"
        cni_plugin_dirs = ["{plugins}"]
        [engine]
        runtime = "runc"
        events_logger = "file"
        cgroup_manager = "cgroupfs"
    """))


@pytest.fixture
def pod(pin_root: str) -> Iterator[Podman]:
    why = _missing()
    if why:
        pytest.skip(why)
    tmp = Path(tempfile.mkdtemp(prefix="tplpodman."))
    pm = Podman(tmp, pin_root, f"10.99.{random.randint(10, 250)}")
    pm.env = {**os.environ, "CONTAINERS_CONF": str(tmp / "containers.conf")}
    applied = False
    try:
        _write_files(tmp, pin_root, pm.subnet)
        probe = pm.run("probe", network="tplplain", check=False)     # podman alone, no tuplet
        if probe.returncode != 0:
            pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-300:]}")
        pm.rm("probe")
        node_apply.apply(config.parse(f'[node]\nname = "podnode"\npin_root = "{pin_root}"\n'
                                      "[lb]\nsocket_lb = false\n[conntrack]\ntcp_max = 8192\nany_max = 4096\n"
                                      "accounting = true\n"))   # Packets show traffic
        applied = True
        yield pm
    finally:
        pm.cmd("rm", "-a", "-f", "-t", "0", check=False)
        if applied:
            node_apply.teardown(pin_root)
        subprocess.run(["umount", "-R", str(tmp / "runroot")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def kinds(recs: list[CtRecord]) -> set[tuple[str, str, bool]]:
    return {(r.proto, r.direction, r.related) for r in recs}


def flows_between(recs: list[CtRecord], a: str, b: str) -> list[CtRecord]:
    return [r for r in recs if {r.src[0], r.dst[0]} == {a, b}]


def talk(pm: Podman, client: str, server_addr: str) -> None:
    """TCP and UDP echo and one ping from container ``client`` to ``server_addr``."""
    subprocess.run(pm.in_netns(client, [sys.executable, "-c", CLIENT, server_addr, "8000"]), check=True,
                   timeout=30)
    subprocess.run(pm.in_netns(client, ["ping", "-c", "1", "-W", "2", server_addr]), check=True,
                   capture_output=True, timeout=30)


def test_podman_containers_tracked_rm_flushes_only_its_entries_reused_address_clean(pod: Podman) -> None:
    for name in ("a", "b", "c"):
        pod.run(name)
    addr = {n: pod.ipv4(n) for n in ("a", "b", "c")}
    veth = {n: host_veth(addr[n]) for n in addr}
    # Tracked the moment they start: a live endpoint of the CNI plugin on each host-side veth.
    live = {(r.ifname, r.ipv4, r.identity, r.source) for r in state.load(pod.pin_root).live.values()}
    assert live == {(veth[n], addr[n], IDENTITY, "cni") for n in addr}
    with paths.open_pinned(pod.pin_root, abi.EP_MAP) as m:
        assert all(m.lookup(socket.inet_aton(a)) is not None for a in addr.values())

    srv = subprocess.Popen(pod.in_netns("a", [sys.executable, "-c", ECHO_SERVER, "8000"]), stdout=subprocess.PIPE,
                           text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        talk(pod, "b", addr["a"])
        talk(pod, "c", addr["a"])
    finally:
        srv.kill()
        srv.wait()

    recs = records(pod.pin_root)
    for client in ("b", "c"):
        flows = flows_between(recs, addr[client], addr["a"])
        out = [r for r in flows if r.direction == "OUT" and r.src[0] == addr[client]]
        inn = [r for r in flows if r.direction == "IN" and r.src[0] == addr[client]]
        # The seed's entries: the client's veth tracks OUT, the server's IN, each with
        # its related-ICMP entry, for TCP, UDP and ICMP.
        want = {(p, d, rel) for p in ("TCP", "UDP", "ICMP") for d in ("OUT", "IN") for rel in (False,)}
        assert want <= kinds(flows), [r.line() for r in flows]
        assert any(r.related for r in out) and any(r.related for r in inn), [r.line() for r in flows]
        assert all(r.entry.src_sec_id == IDENTITY for r in out + inn), [r.line() for r in flows]
        assert all(r.entry.packets > 0 for r in out + inn if not r.related)

    # An expired entry of an unrelated flow: GC's business, the flush must leave it.
    stale = CtTuple4.make(addr["c"], "10.99.255.9", 9999, 40000, socket.IPPROTO_TCP, abi.TUPLE_F_OUT)
    with paths.open_pinned(pod.pin_root, abi.CT_MAP_TCP) as m:
        m.update(stale, CtEntry(lifetime=max(1, monotonic_now() - 100), src_sec_id=IDENTITY))
    before = records(pod.pin_root)
    b_entries = with_addr(before, addr["b"])
    assert b_entries

    pod.rm("b")
    after = records(pod.pin_root)
    assert not with_addr(after, addr["b"]), [r.line() for r in with_addr(after, addr["b"])]
    assert sorted(r.line() for r in after) == sorted(r.line() for r in before if r not in b_entries)
    with paths.open_pinned(pod.pin_root, abi.CT_MAP_TCP) as m:
        assert m.lookup(stale) is not None
    with paths.open_pinned(pod.pin_root, abi.EP_MAP) as m:
        assert m.lookup(socket.inet_aton(addr["b"])) is None
    assert {r.ipv4 for r in state.load(pod.pin_root).live.values()} == {addr["a"], addr["c"]}

    # host-local has one free address left: b's. The new container starts clean.
    pod.run("d")
    assert pod.ipv4("d") == addr["b"]
    assert not with_addr(records(pod.pin_root), addr["b"])
    live = {r.ipv4: r.ifname for r in state.load(pod.pin_root).live.values()}
    assert live[addr["b"]] == host_veth(addr["b"])
    t0 = time.monotonic()
    srv = subprocess.Popen(pod.in_netns("a", [sys.executable, "-c", ECHO_SERVER, "8000"]), stdout=subprocess.PIPE,
                           text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        talk(pod, "d", addr["a"])
    finally:
        srv.kill()
        srv.wait()
    fresh = flows_between(records(pod.pin_root), addr["b"], addr["a"])
    assert {("TCP", "OUT", False), ("UDP", "OUT", False), ("ICMP", "OUT", False)} <= kinds(fresh)
    assert time.monotonic() - t0 < 60
