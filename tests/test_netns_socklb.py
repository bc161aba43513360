"""Socket LB (bpf_sock.o on a cgroup of the test's own): a ClusterIP translated at connect()
and sendto(), the service address shown by getpeername() and recvfrom(), no CT_SERVICE entry,
affinity by network namespace, both modes at once, socket LB off, and UDP backend removal; for
IPv4 and IPv6 services (the pods are dual stack), and an IPv4 service through AF_INET6 sockets
(IPv4-mapped addresses, V4_MAPPED)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

from socklb_harness import PEER_SERVER, ask, host, in_cgroup, make_cgroup, port_of, remove_cgroup, show
from tuplet.bpf.links import CgroupHook, cgroup_detach, cgroup_id, cgroup_link_pin_path
from tuplet.core import crashpoints
from tuplet.core.errors import TupletError
from tuplet.datapath import abi, paths
from tuplet.lab.topology import Topology
from tuplet.node import apply as node_apply
from tuplet.node import config, socklb

pytestmark = pytest.mark.netns

CLIENT, CLIENT2, BACK1, BACK2 = "10.64.0.36", "10.64.0.37", "10.64.0.98", "10.64.0.64"
VIP = "10.68.174.146"
CLIENT_V6, CLIENT2_V6, BACK1_V6, BACK2_V6 = ("fd00:10:244::24", "fd00:10:244::25", "fd00:10:244::62",
                                             "fd00:10:244::40")
VIP6 = "fd00:10:96::a"


class Net(NamedTuple):
    """The addresses one family's tests use."""

    client: str
    client2: str
    back1: str
    back2: str
    vip: str            # the service's address
    dial: str           # what clients connect and send to: the VIP, or its IPv4-mapped form
    affinity_map: str   # the per-packet path's


V4 = Net(CLIENT, CLIENT2, BACK1, BACK2, VIP, VIP, abi.AFFINITY_MAP)
V6 = Net(CLIENT_V6, CLIENT2_V6, BACK1_V6, BACK2_V6, VIP6, VIP6, abi.AFFINITY6_MAP)
#: The IPv4 service through AF_INET6 sockets, at ::ffff:VIP: connect6/sendmsg6/recvmsg6/getpeername6
#: translate it as IPv4 (IPv4 maps), and the backends see IPv4 from the client.
V4_MAPPED = V4._replace(dial=f"::ffff:{VIP}")
BOTH = pytest.mark.parametrize("net", [V4, V6], ids=["v4", "v6"])
ALL = pytest.mark.parametrize("net", [V4, V6, V4_MAPPED], ids=["v4", "v6", "v4-mapped"])


@pytest.fixture
def net() -> Net:
    """IPv4 unless a test is parametrized (BOTH, ALL)."""
    return V4


@pytest.fixture
def cg():
    c = make_cgroup()
    yield c
    remove_cgroup(c)


@pytest.fixture
def topo(cg):   # after cg: torn down (its processes killed) before the cgroup is removed
    with Topology() as t:
        node = t.add_node("node")
        t.client = t.add_pod(node, "client", CLIENT, ipv6=CLIENT_V6)
        t.client2 = t.add_pod(node, "client2", CLIENT2, ipv6=CLIENT2_V6)
        t.b1 = t.add_pod(node, "back1", BACK1, ipv6=BACK1_V6)
        t.b2 = t.add_pod(node, "back2", BACK2, ipv6=BACK2_V6)
        t.add_service_range(node, "10.68.0.0/16")
        t.node = node
        t.servers = {}
        for pod, name in ((t.b1, "back1"), (t.b2, "back2")):
            p = t.popen(pod, [sys.executable, "-c", PEER_SERVER, "8000", name, "6"], stdout=subprocess.PIPE,
                        text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            t.servers[name] = p
        yield t


def services(affinity: bool = False, backends: tuple[str, ...] | None = None, net: Net = V4) -> str:
    bs = ", ".join(f'"{show(b, 8000)}"' for b in ((net.back1, net.back2) if backends is None else backends))
    aff = "affinity_timeout = 600" if affinity else ""
    return f"""
    [[services]]
    name = "web"
    type = "ClusterIP"
    address = "{net.vip}"
    port = 80
    backends = [{bs}]
    {aff}

    [[services]]
    name = "dns"
    type = "ClusterIP"
    address = "{net.vip}"
    port = 53
    protocol = "udp"
    backends = [{bs}]
    {aff}
"""


def node_config(topo, pin_root: str, cg: Path, svc: str, socket_lb: bool = True) -> str:
    eps = "".join(f"""
        [[endpoints]]
        name = "{pod.name}"
        ifname = "{pod.host_ifname}"
        ipv4 = "{ip}"
        ipv6 = "{pod.ipv6}"
        """ for pod, ip in ((topo.client, CLIENT), (topo.client2, CLIENT2), (topo.b1, BACK1), (topo.b2, BACK2)))
    return textwrap.dedent(f"""
        [node]
        name = "socklb-test"
        netns = "{topo.node.netns}"
        pin_root = "{pin_root}"
        """) + textwrap.dedent(eps) + textwrap.dedent(f"""
        [conntrack]
        tcp_max = 8192
        any_max = 4096

        [lb]
        maglev_table_size = 251
        socket_lb = {str(socket_lb).lower()}
        socket_lb_cgroup = "{cg}"
    """) + textwrap.dedent(svc)


@pytest.fixture
def applied(topo, pin_root, cg, net):
    done = []

    def apply(svc: str | None = None, socket_lb: bool = True, cgroup: Path | None = None) -> config.NodeConfig:
        cfg = config.parse(node_config(topo, pin_root, cgroup or cg, svc if svc is not None else services(net=net),
                                       socket_lb))
        node_apply.apply(cfg)
        done.append(cfg)
        return cfg

    yield apply
    if done:
        node_apply.teardown(pin_root)
        assert socklb.attached_cgroup_ids(pin_root) == set()


def family(net: Net) -> str:
    """The socket family clients use to reach net's VIP, as a client script names it."""
    return "socket.AF_INET6" if ":" in net.dial else "socket.AF_INET"


def ct_list(pin_root: str) -> list[str]:
    r = subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "ct", "list"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def flows(lines: list[str], proto: str, kind: str) -> list[str]:
    return [ln for ln in lines if ln.startswith(f"{proto} {kind} ")]


def through_socket_lb(topo, cg, net: Net) -> None:
    """TCP, UDP and connected UDP from the client in cg to net.dial: both backends serve, each
    saw the client itself, and getpeername()/recvfrom() show net.dial."""
    for mode, port in (("tcp", 80), ("udp", 53), ("cudp", 53)):
        answers = ask(topo, topo.client, mode, net.dial, port, n=16, cg=cg)
        assert len(answers) == 16 and all(len(a) == 4 for a in answers), answers
        assert {a[0] for a in answers} == {"back1", "back2"}, (mode, answers)
        assert {a[2] for a in answers} == {show(net.dial, port)}, mode   # getpeername / recvfrom: the VIP
        for server, seen, _peer, own in answers:                         # the backend sees the client itself
            assert host(seen) == net.client and port_of(seen) == port_of(own), (mode, seen, own)


@ALL
def test_tcp_and_udp_through_socket_lb(topo, applied, pin_root, cg, net) -> None:
    applied()
    assert socklb.attached_cgroup_ids(pin_root) == {cgroup_id(str(cg))}
    through_socket_lb(topo, cg, net)
    lines = ct_list(pin_root)
    assert not [ln for ln in lines if " SVC " in ln], lines
    assert flows(lines, "TCP", "OUT") and flows(lines, "UDP", "OUT") and flows(lines, "TCP", "IN")
    for ln in flows(lines, "TCP", "OUT") + flows(lines, "UDP", "OUT"):
        if host(ln.split()[2]) in (CLIENT, CLIENT_V6):   # (IPv6: not neighbour discovery's)
            assert host(ln.split()[2]) == net.client and host(ln.split()[4]) in (net.back1, net.back2), ln
        assert net.vip not in ln
    # Per socket: the reverse entries of the service's family, keyed by socket cookie.
    for m_name in (abi.SOCK_REV_NAT_MAP, abi.SOCK6_REV_NAT_MAP):
        with paths.open_pinned(pin_root, m_name) as m:
            n = len(list(m.keys()))
        assert n >= 2 if (m_name == abi.SOCK6_REV_NAT_MAP) == (net is V6) else n == 0, (m_name, n)


@BOTH
def test_affinity_is_per_network_namespace(topo, applied, pin_root, cg, net) -> None:
    applied(services(affinity=True, net=net))
    for mode, port in (("tcp", 80), ("udp", 53)):
        answers = ask(topo, topo.client, mode, net.vip, port, n=12, cg=cg)
        assert len({a[0] for a in answers}) == 1 and answers[0][0] in ("back1", "back2"), answers
        assert {a[2] for a in answers} == {show(net.vip, port)}
    with paths.open_pinned(pin_root, abi.SOCK_AFFINITY_MAP) as m:
        assert len(list(m.keys())) == 2            # one per service, for the client's namespace
    with paths.open_pinned(pin_root, net.affinity_map) as m:
        assert list(m.keys()) == []                # the per-packet path (client address) saw nothing


def test_socket_lb_and_per_packet_at_once_then_off(topo, applied, pin_root, cg) -> None:
    applied()
    # client: in the cgroup (socket LB); client2: outside it (per-packet LB).
    a1 = ask(topo, topo.client, "tcp", VIP, 80, n=6, cg=cg)
    a2 = ask(topo, topo.client2, "tcp", VIP, 80, n=6)
    for answers, client in ((a1, CLIENT), (a2, CLIENT2)):
        assert {a[2] for a in answers} == {f"{VIP}:80"} and {a[1].split(":")[0] for a in answers} == {client}
    lines = ct_list(pin_root)
    svc = flows(lines, "TCP", "SVC")
    assert len(svc) == 6 and all(ln.split()[2].startswith(f"{CLIENT2}:") and ln.split()[4] == f"{VIP}:80"
                                 for ln in svc), svc
    outs = flows(lines, "TCP", "OUT")
    assert sum(ln.split()[2].startswith(f"{CLIENT}:") for ln in outs) == 6
    assert all("RevNAT=0" in ln for ln in outs if ln.split()[2].startswith(f"{CLIENT}:"))
    assert all("RevNAT=0" not in ln for ln in outs if ln.split()[2].startswith(f"{CLIENT2}:"))
    # Off: the links go, and the client in the cgroup is load-balanced per packet again.
    applied(socket_lb=False)
    assert socklb.attached_cgroup_ids(pin_root) == set()
    assert not any(Path(cgroup_link_pin_path(pin_root, h)).exists() for h in CgroupHook)
    ask(topo, topo.client, "tcp", VIP, 80, n=3, cg=cg)
    svc = flows(ct_list(pin_root), "TCP", "SVC")
    assert sum(ln.split()[2].startswith(f"{CLIENT}:") for ln in svc) == 3, svc
    # And on again: re-apply attaches to the same cgroup, links updated in place.
    applied()
    applied()
    assert socklb.attached_cgroup_ids(pin_root) == {cgroup_id(str(cg))}


@ALL
def test_service_without_backends_refuses_connect(topo, applied, cg, net) -> None:
    applied(services(backends=(), net=net))
    for mode in ("tcp", "udp"):
        assert ask(topo, topo.client, mode, net.dial, 80 if mode == "tcp" else 53, n=1, cg=cg) == [
            ["error", "PermissionError"]], mode


@ALL
def test_udp_backend_removed(topo, applied, pin_root, cg, net) -> None:
    """A backend removed from a UDP service. With bpf_sock_destroy (Linux 6.5+) the connected
    sockets socket LB pointed at it are destroyed, in the client's own network namespace: the
    next recv() fails with ECONNABORTED, the other backend's sockets keep working, a new socket
    gets a live backend. Without it (6.1) they keep the removed backend (draining) until they
    reconnect. Either way an unconnected socket's next sendto() picks a current backend, and a
    TCP connection to the removed backend keeps working."""
    applied()
    script = textwrap.dedent(f"""
        import socket, sys
        FAM, VIP = {family(net)}, "{net.dial}"
        socks = []
        for i in range(16):
            s = socket.socket(FAM, socket.SOCK_DGRAM); s.settimeout(3)
            s.connect((VIP, 53)); socks.append(s)
        tcp = [socket.create_connection((VIP, 80), timeout=3) for i in range(8)]
        u = socket.socket(FAM, socket.SOCK_DGRAM); u.settimeout(3)
        def rt(s):
            try:
                s.send(b"x"); return s.recv(100).decode().split()[0]
            except OSError as e:
                return type(e).__name__
        def first_recv(s):   # an error the kernel left on the socket, else a round trip
            s.settimeout(0.2)
            try:
                s.recv(100)
                return "data?"
            except TimeoutError:
                s.settimeout(3)
                return rt(s)
            except OSError as e:
                return type(e).__name__
        print(" ".join(rt(s) for s in socks), flush=True)
        print(" ".join(rt(s) for s in tcp), flush=True)
        sys.stdin.readline()
        print(" ".join(first_recv(s) for s in socks), flush=True)
        print(" ".join(rt(s) for s in tcp), flush=True)
        fresh = []
        for i in range(8):
            s = socket.socket(FAM, socket.SOCK_DGRAM); s.settimeout(3)
            s.connect((VIP, 53)); fresh.append(rt(s))
        print(" ".join(fresh), flush=True)
        answers = set()
        for i in range(8):
            u.sendto(b"x", (VIP, 53)); answers.add(u.recvfrom(100)[0].decode().split()[0])
        print(" ".join(sorted(answers)), flush=True)
    """)
    argv = in_cgroup(cg, topo.client.netns, [sys.executable, "-c", script])
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdin is not None and p.stdout is not None
        before, tcp_before = p.stdout.readline().split(), p.stdout.readline().split()
        assert set(before) == {"back1", "back2"} and set(tcp_before) == {"back1", "back2"}, (before, tcp_before)
        applied(services(backends=(net.back1,), net=net))
        p.stdin.write("\n")
        p.stdin.flush()
        after = p.stdout.readline().split()
        if socklb.can_destroy_sockets():
            assert after == ["back1" if b == "back1" else "ConnectionAbortedError" for b in before], after
            assert socklb.stale_udp_sockets(pin_root) == []   # their reverse entries went with them
        else:
            assert after == before, after                     # they keep the removed backend
        assert p.stdout.readline().split() == tcp_before      # TCP to the removed backend: still served
        assert set(p.stdout.readline().split()) == {"back1"}  # new connected sockets: live backends only
        assert p.stdout.readline().split() == ["back1"]       # a new datagram: current backends only
    finally:
        p.kill()
        p.wait()


@ALL
def test_svc_update_and_delete_destroy_connected_udp_sockets(topo, applied, pin_root, cg, net) -> None:
    """`tuplet svc update --remove-backend` and `tuplet svc delete` destroy the connected UDP sockets
    of what they removed, as apply does (needs bpf_sock_destroy, Linux 6.5+)."""
    if not socklb.can_destroy_sockets():
        pytest.skip("the kernel has no bpf_sock_destroy (Linux 6.5+)")
    applied()
    script = textwrap.dedent(f"""
        import socket, sys
        socks = []
        for i in range(16):
            s = socket.socket({family(net)}, socket.SOCK_DGRAM); s.settimeout(3)
            s.connect(("{net.dial}", 53)); s.send(b"x"); socks.append((s, s.recv(100).decode().split()[0]))
        print(" ".join(b for _s, b in socks), flush=True)
        for step in range(2):
            sys.stdin.readline()
            out = []
            for s, b in socks:
                s.setblocking(False)
                try:
                    s.recv(100); out.append("data?")
                except BlockingIOError:
                    out.append(b)
                except OSError as e:
                    out.append(type(e).__name__)
            print(" ".join(out), flush=True)
    """)
    p = subprocess.Popen(in_cgroup(cg, topo.client.netns, [sys.executable, "-c", script]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdin is not None and p.stdout is not None
        before = p.stdout.readline().split()
        assert set(before) == {"back1", "back2"}, before
        for argv in (["update", "dns", "--remove-backend", show(net.back2, 8000)], ["delete", "dns"]):
            r = subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "svc", *argv],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            p.stdin.write("\n")
            p.stdin.flush()
            after = p.stdout.readline().split()
            if argv[0] == "update":
                assert after == [b if b == "back1" else "ConnectionAbortedError" for b in before], after
            else:   # the rest went with the service (an aborted socket reports its error once)
                assert after == ["ConnectionAbortedError" if b == "back1" else "back2" for b in before], after
    finally:
        p.kill()
        p.wait()


def test_a_failed_apply_leaves_the_old_cgroups_links(topo, applied, pin_root, cg, monkeypatch,
                                                      tmp_path) -> None:
    """Moving socket_lb_cgroup, re-applying on the same one, or turning socket LB off, and failing
    midway (after some links, after all of them): the links are the ones before, on the old cgroup,
    running the old programs, and the client there is still load-balanced at the socket. Killed
    midway, the same; the next apply completes the move."""
    applied()
    before = socklb.links(pin_root)
    cg2 = make_cgroup()
    try:
        for where, point in (("moved", "socklb.attached-sendmsg4"), ("moved", "socklb.attached-getpeername6"),
                             ("moved", "apply.attached"), ("same", "socklb.attached-recvmsg4"),
                             ("same", "socklb.attached-connect6"), ("same", "apply.attached"),
                             ("off", "apply.attached")):
            monkeypatch.setenv(crashpoints.FAIL_ENV, point)
            with pytest.raises(TupletError, match="injected failure"):
                applied(socket_lb=where != "off", cgroup=cg2 if where == "moved" else cg)
            monkeypatch.delenv(crashpoints.FAIL_ENV)
            assert socklb.links(pin_root) == before, (where, point)
            assert not any(Path(cgroup_link_pin_path(pin_root, h, staged=True)).exists() for h in CgroupHook)
            assert {a[0] for a in ask(topo, topo.client, "tcp", VIP, 80, n=4, cg=cg)} <= {"back1", "back2"}
            assert not flows(ct_list(pin_root), "TCP", "SVC"), (where, point)
        # Killed (SIGKILL) after the new cgroup's links were made: the old ones are in place, and
        # the next apply detaches the staged ones before it moves.
        cfg = tmp_path / "moved.toml"
        cfg.write_text(node_config(topo, pin_root, cg2, services()))
        r = subprocess.run([sys.executable, "-m", "tuplet.cli", "apply", str(cfg)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, crashpoints.ENV: "apply.attached"})
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert socklb.links(pin_root) == before
        assert all(Path(cgroup_link_pin_path(pin_root, h, staged=True)).exists() for h in CgroupHook)
        # The move itself: the new cgroup's client at the socket, the old one's per packet.
        applied(cgroup=cg2)
        assert not any(Path(cgroup_link_pin_path(pin_root, h, staged=True)).exists() for h in CgroupHook)
        assert socklb.attached_cgroup_ids(pin_root) == {cgroup_id(str(cg2))}
        ask(topo, topo.client, "tcp", VIP, 80, n=2, cg=cg2)
        assert not flows(ct_list(pin_root), "TCP", "SVC")
        ask(topo, topo.client, "tcp", VIP, 80, n=2, cg=cg)
        assert len(flows(ct_list(pin_root), "TCP", "SVC")) == 2
    finally:
        node_apply.teardown(pin_root)
        remove_cgroup(cg2)


def status(pin_root: str, *extra: str) -> str:
    r = subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", pin_root, "status", *extra],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_status_shows_socket_lb(topo, applied, pin_root, cg) -> None:
    applied()
    links = {prog: link for prog, link in socklb.links(pin_root)}
    text = status(pin_root)
    assert f"Socket LB:    on, cgroup {cg} (id {cgroup_id(str(cg))})" in text, text
    for prog, link in links.items():
        assert link.link_id and f"{prog}" in text and f"link {link.link_id} " in text, text
    assert "MISSING" not in text
    js = json.loads(status(pin_root, "-o", "json"))["socket_lb"]
    assert js["configured"] and js["cgroup"] == str(cg) and js["missing"] == []
    assert {(ln["program"], ln["link_id"]) for ln in js["links"]} == {(p, ln.link_id) for p, ln in links.items()}
    # A link gone behind tuplet's back: named, with what to do.
    cgroup_detach(cgroup_link_pin_path(pin_root, CgroupHook.CONNECT4))
    text = status(pin_root)
    assert "MISSING:    connect4 not attached" in text and "tuplet apply" in text, text
    assert json.loads(status(pin_root, "-o", "json"))["socket_lb"]["missing"] == ["connect4"]
    applied(socket_lb=False)
    text = status(pin_root)
    assert "Socket LB:    off ([lb] socket_lb = false)" in text and "MISSING" not in text, text
    assert json.loads(status(pin_root, "-o", "json"))["socket_lb"] == {
        "configured": False, "cgroup": "", "cgroup_id": 0, "links": [], "missing": []}
