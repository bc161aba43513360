"""Services with real sockets: pods reach a ClusterIP (IPv4 and IPv6, per packet: socket LB
is off), an external host reaches NodePort and LoadBalancer addresses, and backend changes
leave established connections alone. The pods are dual-stack; the ClusterIP tests run once
per family (one body, parametrized), with a dual-stack service pair on the same backends."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest

from lb_harness import cli_service, flipping
from test_netns_datapath import ct_lines
from traffic import LiveConnection, ask, start_server
from tuplet.conntrack import records as ct
from tuplet.datapath import abi, metrics, paths
from tuplet.lab.topology import Topology
from tuplet.lb import families
from tuplet.lb import writer as lb
from tuplet.lb.model import host_port
from tuplet.node import apply as node_apply
from tuplet.node import config

pytestmark = pytest.mark.netns

CLIENT, BACK1, BACK2, BACK3 = "10.64.0.36", "10.64.0.98", "10.64.0.64", "10.64.0.116"
CLIENT6, BACK1_6, BACK2_6, BACK3_6 = "fd00:10:244::24", "fd00:10:244::62", "fd00:10:244::40", "fd00:10:244::74"
VIP, LB_VIP, NODE_IP, EXT = "10.68.174.146", "172.190.0.17", "172.191.0.254", "172.191.0.1"
VIP6 = "fd00:10:96::a"
NODE_PORT = 30080
BULK_PORT = 8001     # a plain echo server on back1 (no name prefix): the bulk transfer
CLOSED_PORT = 9      # nothing listens there: the backend answers port unreachable
PODS = {"client": (CLIENT, CLIENT6), "back1": (BACK1, BACK1_6), "back2": (BACK2, BACK2_6),
        "back3": (BACK3, BACK3_6)}
LOCAL = {a for pair in PODS.values() for a in pair}


@dataclass(frozen=True)
class Fam:
    """One address family's side of the dual-stack setup."""

    vip: str
    back1: str
    back2: str
    back3: str
    ct_maps: tuple[str, ...]
    suffix: str          # of its service names: web, dns (IPv4); web6, dns6 (IPv6)


FAMILY = {"ipv4": Fam(VIP, BACK1, BACK2, BACK3, abi.CT_MAPS, ""),
          "ipv6": Fam(VIP6, BACK1_6, BACK2_6, BACK3_6, abi.CT6_MAPS, "6")}
OTHER = {"ipv4": "ipv6", "ipv6": "ipv4"}


@pytest.fixture
def topo():
    with Topology() as t:
        node = t.add_node("node")
        t.client = t.add_pod(node, "client", CLIENT, ipv6=CLIENT6)
        t.b1 = t.add_pod(node, "back1", BACK1, ipv6=BACK1_6)
        t.b2 = t.add_pod(node, "back2", BACK2, ipv6=BACK2_6)
        t.b3 = t.add_pod(node, "back3", BACK3, ipv6=BACK3_6)
        t.ext = t.add_external(node, "ext", EXT, node_ip=NODE_IP, node_ifname="eth0")
        t.add_service_range(node, "10.68.0.0/16")
        t.run(t.ext, ["ip", "route", "add", f"{LB_VIP}/32", "via", NODE_IP], check=True)
        t.node = node
        for pod, name in ((t.b1, "back1"), (t.b2, "back2"), (t.b3, "back3")):
            start_server(t, pod, 8000, name, family6=True)     # on ::, IPv4 and IPv6
        start_server(t, t.b1, BULK_PORT, family6=True)
        yield t


def endpoint_toml(pod) -> str:
    """A pod of the topology as an [[endpoints]] table (the client with identity 3096)."""
    v6 = f'ipv6 = "{pod.ipv6}"\n' if pod.ipv6 else ""
    ident = "identity = 3096\n" if pod.name == "client" else ""
    return (f'[[endpoints]]\nname = "{pod.name}"\nifname = "{pod.host_ifname}"\nipv4 = "{pod.ipv4}"\n'
            f"{v6}{ident}\n")


def node_config(topo, pin_root: str, services: str) -> str:
    """The node with every pod of the topology an endpoint, eth0 its device, and services."""
    return textwrap.dedent(f"""
        [node]
        name = "svc-test"
        netns = "{topo.node.netns}"
        pin_root = "{pin_root}"

        [[devices]]
        ifname = "eth0"

        [conntrack]
        tcp_max = 8192
        any_max = 16384     # 3,000 UDP flows: a service, an egress and an ingress entry each

        [lb]
        maglev_table_size = 1021
        socket_lb = false   # per packet; tests never attach to the root cgroup
    """) + "".join(endpoint_toml(p) for p in topo.node.pods) + textwrap.dedent(services)


def services_toml(*services: tuple[str, str, str, int, str, list[str]]) -> str:
    """[[services]] tables from (name, type, address, port, protocol, backends)."""
    return "".join(f'[[services]]\nname = "{n}"\ntype = "{t}"\naddress = "{a}"\nport = {p}\nprotocol = "{proto}"\n'
                   f"backends = {json.dumps(b)}\n\n" for n, t, a, p, proto, b in services)


def cluster_ips(f: Fam) -> str:
    """The family's ClusterIPs on f.vip: web (TCP 80), dns (UDP 53) on back1 and back2, bulk
    (TCP, back1's plain echo) and closed (UDP, a port where nothing listens)."""
    both = [f.back1, f.back2]
    return services_toml(*((name + f.suffix, "ClusterIP", f.vip, port, proto, [host_port(b, bport) for b in backends])
                           for name, port, proto, backends, bport
                           in (("web", 80, "tcp", both, 8000), ("dns", 53, "udp", both, 8000),
                               ("bulk", BULK_PORT, "tcp", [f.back1], BULK_PORT),
                               ("closed", 54, "udp", [f.back1], CLOSED_PORT))))


SERVICES = cluster_ips(FAMILY["ipv4"]) + cluster_ips(FAMILY["ipv6"]) + services_toml(
    ("lb", "LoadBalancer", LB_VIP, 80, "tcp", [f"{BACK1}:8000", f"{BACK2}:8000"]),
    ("np", "NodePort", NODE_IP, NODE_PORT, "udp", [f"{BACK2}:8000"]),
)


@pytest.fixture
def applied(topo, pin_root):
    done = []

    def apply(services: str = SERVICES) -> config.NodeConfig:
        cfg = config.parse(node_config(topo, pin_root, services))
        node_apply.apply(cfg)
        done.append(cfg)
        return cfg

    yield apply
    if done:
        node_apply.teardown(pin_root)


def tuplet(pin_root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, *args],
                          capture_output=True, text=True, timeout=60)


def drops(pin_root: str) -> dict[str, int]:
    obj = str(paths.object_dir() / abi.OBJ_LXC)
    with paths.open_pinned(pin_root, abi.METRICS_MAP) as m:
        return {c.reason: c.packets for c in metrics.read(m, metrics.reason_names(obj), metrics.direction_names(obj))
                if c.dropped}


@pytest.mark.parametrize("fam", FAMILY)
def test_pod_reaches_clusterip_over_tcp_and_udp(topo, applied, fam) -> None:
    f = FAMILY[fam]
    applied()
    answers = ask(topo, topo.client, "tcp", f.vip, 80, n=16)
    assert {peer for _, peer in answers} == {host_port(f.vip, 80)}        # replies come from the VIP
    assert Counter(name for name, _ in answers).keys() == {"back1", "back2"}
    answers = ask(topo, topo.client, "udp", f.vip, 53, n=12)
    assert {peer for _, peer in answers} == {host_port(f.vip, 53)}
    assert Counter(name for name, _ in answers).keys() == {"back1", "back2"}


def test_external_client_reaches_loadbalancer_and_nodeport(topo, applied) -> None:
    applied()
    answers = ask(topo, topo.ext, "tcp", LB_VIP, 80, n=12)
    assert {peer for _, peer in answers} == {f"{LB_VIP}:80"}
    assert {name for name, _ in answers} <= {"back1", "back2"} and "error" not in dict(answers)
    answers = ask(topo, topo.ext, "udp", NODE_IP, NODE_PORT, n=4)
    assert answers == [("back2", f"{NODE_IP}:{NODE_PORT}")] * 4
    # A ClusterIP is not reachable from outside the node.
    assert ask(topo, topo.ext, "tcp", VIP, 80)[0][0] == "error"


def test_backend_changes_keep_established_connections(topo, applied, pin_root) -> None:
    applied()
    conns = [LiveConnection(topo, topo.client, VIP, 80) for _ in range(8)]
    owner = [c.roundtrip("hello").split()[0] for c in conns]
    assert set(owner) == {"back1", "back2"}
    # Remove back2 from every service: all connections go on, new ones only reach back1.
    only1 = SERVICES.replace(f'backends = ["{BACK1}:8000", "{BACK2}:8000"]', f'backends = ["{BACK1}:8000"]')
    assert only1 != SERVICES
    applied(only1)
    # Every established connection goes on, back2's included: back2 drains.
    for c, o in zip(conns, owner):
        assert c.roundtrip("again") == f"{o} again"
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=8)} == {"back1"}
    listing = tuplet(pin_root, "svc", "list")
    assert f"draining backends (removed, still used by established flows): {BACK2}:8000/tcp" in listing.stdout
    # Add it back: established connections stay where they are.
    applied()
    for c, o in zip(conns, owner):
        assert c.roundtrip("still") == f"{o} still"
        c.close()
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=16)} == {"back1", "back2"}


def test_remote_nodeport_backend_is_a_counted_drop(topo, applied, pin_root) -> None:
    applied(SERVICES + f"""
    [[services]]
    name = "remote"
    type = "LoadBalancer"
    address = "{LB_VIP}"
    port = 443
    backends = [{{ address = "10.65.0.9", port = 8443, node = "192.168.7.2" }}]
""")
    assert ask(topo, topo.ext, "tcp", LB_VIP, 443)[0][0] == "error"
    assert drops(pin_root).get("DROP_REMOTE_BACKEND", 0) >= 1


def test_svc_cli_add_list_update_delete(topo, applied, pin_root) -> None:
    applied("")
    r = tuplet(pin_root, "svc", "add", "web", "--type", "ClusterIP", "--address", VIP, "--port", "80",
               "--backend", f"{BACK1}:8000", "--backend", f"{BACK2}:8000")
    assert r.returncode == 0, r.stderr
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=12)} == {"back1", "back2"}
    r = tuplet(pin_root, "svc", "list")
    assert r.returncode == 0 and "web" in r.stdout and BACK1 in r.stdout and "%" in r.stdout
    bad = tuplet(pin_root, "svc", "update", "web", "--backend", "10.64.0.300:8000")
    assert bad.returncode == 2 and "10.64.0.300" in bad.stderr
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=12)} == {"back1", "back2"}
    r = tuplet(pin_root, "svc", "update", "web", "--backend", f"{BACK2}:8000")
    assert r.returncode == 0, r.stderr
    assert {name for name, _ in ask(topo, topo.client, "tcp", VIP, 80, n=6)} == {"back2"}
    r = tuplet(pin_root, "svc", "delete", "web")
    assert r.returncode == 0, r.stderr
    assert ask(topo, topo.client, "tcp", VIP, 80)[0][0] == "error"
    assert tuplet(pin_root, "svc", "delete", "web").returncode == 1


def flow_entries(pin_root: str, f: Fam, proto: str, vport: int) -> dict[str, ct.CtRecord]:
    """The client's one flow to the VIP's vport by direction (SVC, OUT, IN) in the family's tables."""
    recs = ct_lines(pin_root, f.ct_maps)
    (sport,) = [r.src[1] for r in recs if r.proto == proto and r.direction == "SVC" and r.dst == (f.vip, vport)]
    hits = [r for r in recs if r.proto == proto and r.src[1] == sport and not r.related]
    by_dir = {r.direction: r for r in hits}
    assert len(by_dir) == len(hits) == 3, [r.line() for r in hits]
    return by_dir


@pytest.mark.parametrize("fam", FAMILY)
def test_clusterip_flow_entries(topo, applied, pin_root, fam) -> None:
    """A TCP and a UDP flow to the ClusterIP: CT_SERVICE (client to the VIP, naming the backend),
    CT_EGRESS to the backend inheriting the reverse-NAT index, the backend's CT_INGRESS without
    one; all in the family's tables, none in the other family's."""
    f = FAMILY[fam]
    applied()
    conn = LiveConnection(topo, topo.client, f.vip, 80)
    owner = conn.roundtrip("hello").split()[0]
    ((udp_owner, peer),) = ask(topo, topo.client, "udp", f.vip, 53)
    assert peer == host_port(f.vip, 53)
    conn.close()
    addr = {"back1": f.back1, "back2": f.back2}
    for proto, vport, backend in (("TCP", 80, addr[owner]), ("UDP", 53, addr[udp_owner])):
        e = flow_entries(pin_root, f, proto, vport)
        svc, out, inn = e["SVC"], e["OUT"], e["IN"]
        assert svc.dst == (f.vip, vport) and svc.entry.rev_nat_index != 0 and svc.entry.backend_id != 0
        assert out.dst == (backend, 8000) and out.src == svc.src
        assert out.entry.rev_nat_index == svc.entry.rev_nat_index, out.line()
        assert inn.dst == out.dst and inn.entry.rev_nat_index == 0, inn.line()
        assert f"RevNAT={svc.entry.rev_nat_index} " in out.line()
    assert ct_lines(pin_root, FAMILY[OTHER[fam]].ct_maps) == []


@pytest.mark.parametrize("fam", FAMILY)
def test_icmp_error_of_a_service_flow_reaches_the_client(topo, applied, fam) -> None:
    """UDP to a ClusterIP whose backend has nothing on the port: the backend's port unreachable
    (ICMP or ICMPv6) is reverse-NATed (outer source and the quoted packet's destination back to
    the VIP, checksums right, or the kernel drops it) so the client's connected socket sees
    ECONNREFUSED, not a timeout."""
    f = FAMILY[fam]
    applied()
    assert ask(topo, topo.client, "udpc", f.vip, 54, n=3) == [("error", "ConnectionRefusedError")] * 3


def csum_errors(topo, host) -> int:
    """The host's TCP InCsumErrors (one counter for both families)."""
    text = topo.run(host, ["cat", "/proc/net/snmp"], check=True, capture_output=True, text=True).stdout
    names, values = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(values[names.index("InCsumErrors")])


# argv: dst, port, bytes. Sends that many bytes (a thread) while reading the echo; prints the
# peer as the socket sees it and whether what came back is what was sent.
BULK = textwrap.dedent("""
    import hashlib, os, socket, sys, threading
    dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = os.urandom(n)
    s = socket.create_connection((dst, port), timeout=20)
    peer = s.getpeername()
    def send():
        s.sendall(data); s.shutdown(socket.SHUT_WR)
    threading.Thread(target=send).start()
    got = hashlib.sha256()
    while (d := s.recv(1 << 20)):
        got.update(d)
    print(("[%s]:%d" if ":" in peer[0] else "%s:%d") % peer[:2], got.digest() == hashlib.sha256(data).digest())
""")


@pytest.mark.parametrize("fam", FAMILY)
def test_large_tcp_transfer_through_the_clusterip(topo, applied, fam) -> None:
    """32 MiB each way through the VIP: GSO segments and non-linear skbs rewritten in both
    directions with the checksums kept right (a wrong one is an InCsumErrors drop and a stall)."""
    f = FAMILY[fam]
    applied()
    before = {h.name: csum_errors(topo, h) for h in (topo.client, topo.b1)}
    r = topo.run(topo.client, [sys.executable, "-c", BULK, f.vip, str(BULK_PORT), str(32 << 20)],
                 capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [host_port(f.vip, BULK_PORT), "True"]
    assert {h.name: csum_errors(topo, h) for h in (topo.client, topo.b1)} == before


def web(*fams: str) -> str:
    """[[services]] of the dual-stack pair: web (IPv4) and web6 (IPv6) on back1 and back2, or one of them."""
    return services_toml(*(("web" + FAMILY[fam].suffix, "ClusterIP", FAMILY[fam].vip, 80, "tcp",
                            [host_port(FAMILY[fam].back1, 8000), host_port(FAMILY[fam].back2, 8000)]) for fam in fams))


@pytest.mark.parametrize("how", ["apply", "svc"])
def test_dual_stack_service_pair(topo, applied, pin_root, tmp_path, how) -> None:
    """One IPv4 and one IPv6 ClusterIP on the same (dual-stack) backend pods, made by `tuplet
    apply` from [[services]] or by `tuplet svc add`: both answer at once, each family's flows
    only in its own CT tables, `svc list` shows both, and deleting one (web6 by a re-apply
    without it; web by `svc delete`) leaves the other working."""
    applied("")
    cfg = tmp_path / "node.toml"
    if how == "apply":
        cfg.write_text(node_config(topo, pin_root, web(*FAMILY)))
        r = tuplet(pin_root, "apply", str(cfg))
        assert r.returncode == 0, r.stderr
    else:
        for f in FAMILY.values():
            r = tuplet(pin_root, "svc", "add", "web" + f.suffix, "--address", f.vip, "--port", "80",
                       "--backend", host_port(f.back1, 8000), "--backend", host_port(f.back2, 8000))
            assert r.returncode == 0, r.stderr
    answers: dict[str, list[tuple[str, str]]] = {}
    askers = [threading.Thread(target=lambda fam=fam: answers.__setitem__(
        fam, ask(topo, topo.client, "tcp", FAMILY[fam].vip, 80, n=16))) for fam in FAMILY]
    for t in askers:
        t.start()
    for t in askers:
        t.join()
    for fam, f in FAMILY.items():
        assert {peer for _, peer in answers[fam]} == {host_port(f.vip, 80)}, answers
        assert {name for name, _ in answers[fam]} == {"back1", "back2"}, answers
        recs = ct_lines(pin_root, f.ct_maps)
        assert {r.dst for r in recs if r.direction == "SVC"} == {(f.vip, 80)}
        assert len([r for r in recs if r.direction == "SVC"]) == 16
        assert all((":" in r.src[0]) == (fam == "ipv6") for r in recs)
    listing = tuplet(pin_root, "svc", "list").stdout
    for f in FAMILY.values():
        assert f"web{f.suffix} " in listing and host_port(f.vip, 80) in listing, listing
        assert host_port(f.back1, 8000) in listing and host_port(f.back2, 8000) in listing, listing

    gone, kept = ("ipv6", "ipv4") if how == "apply" else ("ipv4", "ipv6")
    if how == "apply":
        cfg.write_text(node_config(topo, pin_root, web(kept)))
        r = tuplet(pin_root, "apply", str(cfg))
    else:
        r = tuplet(pin_root, "svc", "delete", "web")
    assert r.returncode == 0, r.stderr
    with paths.open_pinned(pin_root, families.of(FAMILY[gone].vip).services_map) as m:
        assert list(m.keys()) == []
    assert ask(topo, topo.client, "tcp", FAMILY[gone].vip, 80)[0][0] == "error"
    assert {name for name, _ in ask(topo, topo.client, "tcp", FAMILY[kept].vip, 80, n=8)} == {"back1", "back2"}
    names = [s["name"] for s in json.loads(tuplet(pin_root, "svc", "list", "-o", "json").stdout)["services"]]
    assert names == ["web" + FAMILY[kept].suffix]


N_FLOWS = 3000
# argv: dst, port, flows, established. Opens `established` connected UDP sockets and prints
# their backends (JSON), waits for a line on stdin, then makes `flows` new flows (a connected
# socket, one request, one answer each) asking the established ones again every 100; prints
# the backends of the new flows, how many failed and how many established ones moved (JSON).
FLOWS = textwrap.dedent("""
    import json, select, socket, sys
    dst, port, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    def sock():
        s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(2); s.connect((dst, port)); return s
    def ask(s):
        s.send(b"hi"); return s.recv(100).decode().split()[0]
    est = [sock() for _ in range(k)]
    owner = [ask(s) for s in est]
    print(json.dumps(owner), flush=True)
    sys.stdin.readline()
    seen, failed, moved = {}, 0, 0
    i = 0
    # At least n flows, and on until told to stop (a line on stdin): the flows span the flips
    # however fast this machine makes them.
    while i < n or not select.select([sys.stdin], [], [], 0)[0]:
        i += 1
        s = sock()
        try:
            name = ask(s); seen[name] = seen.get(name, 0) + 1
        except OSError:
            failed += 1
        s.close()
        if i % 100 == 0:
            for e, o in zip(est, owner):
                try:
                    moved += ask(e) != o
                except OSError:
                    moved += 1
    print(json.dumps({"seen": seen, "failed": failed, "moved": moved}), flush=True)
""")


@pytest.mark.parametrize("fam", FAMILY)
def test_real_flows_never_see_a_half_written_service(topo, applied, pin_root, fam) -> None:
    """3,000 real UDP flows from a pod to the ClusterIP while another thread flips its backend
    set ({back1, back2}, Maglev 251 / {back3}, 257) back and forth, as `svc update` does: no
    flow fails, each reaches a backend of the old or the new set, and flows established before
    keep their backend throughout (back1 and back2 drain while back3 is the set)."""
    f = FAMILY[fam]
    applied()
    sets = [cli_service(f.vip, 53, host_port(f.back1, 8000), host_port(f.back2, 8000), name="dns" + f.suffix,
                        protocol="udp", m=251),
            cli_service(f.vip, 53, host_port(f.back3, 8000), name="dns" + f.suffix, protocol="udp", m=257)]
    client = topo.popen(topo.client, [sys.executable, "-c", FLOWS, f.vip, "53", str(N_FLOWS), "16"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    owner = json.loads(client.stdout.readline())
    assert set(owner) == {"back1", "back2"}, owner
    with flipping(lambda: lb.ServiceTable(pin_root, local_addrs=LOCAL), sets) as flips:
        client.stdin.write("go\n")
        client.stdin.flush()
        deadline = time.monotonic() + 120
        while flips[0] < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        client.stdin.write("stop\n")
        client.stdin.flush()
        res = json.loads(client.stdout.readline())
    assert client.wait(timeout=10) == 0
    assert res["failed"] == 0 and res["moved"] == 0, res
    assert sum(res["seen"].values()) >= N_FLOWS and set(res["seen"]) <= {"back1", "back2", "back3"}, res
    # The flows go on until at least 4 writes (two changes each way) happened while they ran.
    assert len(res["seen"]) >= 2 and flips[0] >= 4, (res, flips)
