"""The namespace plumbing of the demo and the tests: tuplet.netns and tuplet.topology.

Needs root. Every test uses its own random prefix and removes what it creates.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

try:
    import tuplet  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loader"))

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns

from tuplet.core.errors import TupletError
from tuplet.lab.topology import Topology
from tuplet.node import netns
from tuplet.node.netns import NetnsError, enter

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="creates network namespaces: needs root"),
]

LOADER = str(Path(__file__).resolve().parents[1] / "loader")
POD1, POD2 = "10.64.0.36", "10.64.0.64"
CLIENT, NODE_IP = "172.191.0.1", "172.191.0.254"


def ip_netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def root_links() -> set[str]:
    with IPRoute() as ipr:
        return {link.get("ifname") for link in ipr.get_links()}


def own_netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def sleeper_in(ns: str) -> subprocess.Popen[str]:
    """A process started behind any topology's back, already inside ``ns`` when this returns."""
    p = subprocess.Popen(["ip", "netns", "exec", ns, "sh", "-c", "echo in; exec sleep 600"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "in"
    return p


def leftovers(prefix: str) -> list[str]:
    return [n for n in set(ip_netns_list()) | set(pr_netns.listnetns()) if n.startswith(prefix)]


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A unique prefix; whatever is left with it at the end is removed (and fails the test)."""
    p = "tpl-t" + secrets.token_hex(3)
    links = root_links()

    def finalize() -> None:
        left = leftovers(p)
        Topology.cleanup_stale(p)
        assert not left, f"namespaces left behind: {left}"
        assert root_links() == links, "interfaces appeared in the root namespace"

    request.addfinalizer(finalize)
    return p


@pytest.fixture
def topo(prefix: str, request: pytest.FixtureRequest) -> Topology:
    """node + pod1 + pod2 + an external client on the node's eth0."""
    t = Topology(prefix=prefix)
    request.addfinalizer(t.close)
    node = t.add_node("node")
    t.add_pod(node, "pod1", POD1)
    t.add_pod(node, "pod2", POD2)
    t.add_external(node, "client", CLIENT, node_ip=NODE_IP, node_ifname="eth0")
    return t


def hosts(t: Topology):
    node = t.nodes[0]
    return node, node.pods[0], node.pods[1], node.externals[0]


def ping(t: Topology, host, dst: str) -> None:
    t.run(host, ["ping", "-c1", "-W2", dst], check=True, timeout=10, capture_output=True)


# --- building ---------------------------------------------------------------------------------


def test_names_addresses_and_ifindexes(topo: Topology, prefix: str) -> None:
    node, p1, p2, client = hosts(topo)
    assert (node.netns, p1.netns, p2.netns, client.netns) == (
        f"{prefix}-node", f"{prefix}-pod1", f"{prefix}-pod2", f"{prefix}-client")
    assert sorted(topo.namespaces) == sorted(n for n in ip_netns_list() if n.startswith(prefix))
    assert (p1.host_ifname, p2.host_ifname, client.node_ifname) == ("lxc-pod1", "lxc-pod2", "eth0")
    assert (p1.ipv4, p1.ifname, client.ipv4, client.node_ip) == (POD1, "eth0", CLIENT, NODE_IP)
    with enter(node.netns), IPRoute() as ipr:
        by_name = {link.get("ifname"): link for link in ipr.get_links()}
        assert by_name["lxc-pod1"]["index"] == p1.ifindex_host
        assert by_name["lxc-pod2"]["index"] == p2.ifindex_host
        assert by_name["eth0"]["index"] == client.ifindex_node
        assert by_name["lxc-pod1"].get("address") == p1.host_mac
        routes = {(r.get("dst"), r["dst_len"]): r.get("oif") for r in ipr.get_routes(family=2, table=254)}
        assert routes[(POD1, 32)] == p1.ifindex_host and routes[(POD2, 32)] == p2.ifindex_host
        assert netns.read_sysctl("net.ipv4.ip_forward") == "1"
        assert netns.read_sysctl("net.ipv4.conf.lxc-pod1.proxy_arp") == "1"
        assert netns.read_sysctl("net.ipv6.conf.lxc-pod1.disable_ipv6") == "1"
        assert netns.read_sysctl("net.ipv6.conf.eth0.disable_ipv6") == "1"
    with enter(p1.netns), IPRoute() as ipr:
        (eth0,) = ipr.link("get", ifname="eth0")
        assert eth0["index"] == p1.ifindex and eth0.get("address") == p1.mac
        assert [a.get("address") for a in ipr.get_addr(index=p1.ifindex)] == [POD1]
        assert netns.read_sysctl("net.ipv6.conf.eth0.disable_ipv6") == "1"


def test_duplicate_namespace_is_refused(topo: Topology, prefix: str) -> None:
    with pytest.raises(NetnsError, match="already exists"):
        topo.add_pod(topo.nodes[0], "pod1", "10.64.0.99", host_ifname="lxc-other")


def test_long_host_ifname_needs_an_explicit_name(topo: Topology, prefix: str) -> None:
    with pytest.raises(ValueError, match="host_ifname"):
        topo.add_pod(topo.nodes[0], "a-very-long-pod-name", "10.64.0.99")
    assert f"{prefix}-a-very-long-pod-name" not in ip_netns_list()


# --- traffic across the node -----------------------------------------------------------------


def test_ping_between_pods(topo: Topology) -> None:
    _, p1, p2, _ = hosts(topo)
    ping(topo, p1, p2.ipv4)
    ping(topo, p2, p1.ipv4)


def test_ping_from_external_client_to_pods(topo: Topology) -> None:
    _, p1, p2, client = hosts(topo)
    ping(topo, client, p1.ipv4)
    ping(topo, client, p2.ipv4)
    ping(topo, p1, client.ipv4)


def test_dual_stack_pods_and_external(prefix: str) -> None:
    """IPv6 beside IPv4 where asked for: pods reach each other and the external host at once (no DAD
    wait); a pod without ipv6 and the other namespaces keep IPv6 disabled."""
    with Topology(prefix=prefix) as t:
        node = t.add_node("node")
        p1 = t.add_pod(node, "pod1", POD1, ipv6="fd00:10:244::24")
        p2 = t.add_pod(node, "pod2", POD2, ipv6="fd00:10:244:0:0::40")
        p3 = t.add_pod(node, "pod3", "10.64.0.65")
        ext = t.add_external(node, "client", CLIENT, node_ip=NODE_IP, ipv6="fd00:77::2", node_ipv6="fd00:77::1")
        assert (p1.ipv6, p2.ipv6, p3.ipv6) == ("fd00:10:244::24", "fd00:10:244::40", None)
        addrs = t.run(p1, ["ip", "-6", "-o", "addr", "show", "dev", "eth0"], capture_output=True, text=True).stdout
        assert "fd00:10:244::24/128" in addrs and "tentative" not in addrs
        for src, dst in ((p1, p2.ipv6), (p2, p1.ipv6), (ext, p1.ipv6), (p1, ext.ipv6)):
            t.run(src, ["ping", "-6", "-c1", "-W2", dst], check=True, timeout=10, capture_output=True)
        ping(t, p1, p3.ipv4)
        with enter(p3.netns):
            assert Path("/proc/sys/net/ipv6/conf/eth0/disable_ipv6").read_text().strip() == "1"


@pytest.mark.parametrize(("kw", "match"), [
    ({"ipv6": "10.0.0.1"}, "not an IPv6 address"),
    ({"ipv6": "fe80::5"}, "not a unicast address"),
    ({"ipv6": "ff02::1"}, "not a unicast address"),
])
def test_bad_pod_ipv6_is_refused_before_anything_is_made(prefix: str, kw: dict[str, str], match: str) -> None:
    with Topology(prefix=prefix) as t:
        node = t.add_node("node")
        with pytest.raises(ValueError, match=match):
            t.add_pod(node, "pod1", POD1, **kw)
        assert t.namespaces == [node.netns]


def test_external_ipv6_needs_the_node_side_in_its_prefix(prefix: str) -> None:
    with Topology(prefix=prefix) as t:
        node = t.add_node("node")
        with pytest.raises(ValueError, match="go together"):
            t.add_external(node, "c", CLIENT, node_ip=NODE_IP, ipv6="fd00:77::2")
        with pytest.raises(ValueError, match="must be another address in fd00:77::/64"):
            t.add_external(node, "c", CLIENT, node_ip=NODE_IP, ipv6="fd00:77::2", node_ipv6="fd00:78::1")
        assert t.namespaces == [node.netns]


ECHO_SERVER = textwrap.dedent("""
    import socket
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7007)); s.listen(1)
    print("ready", flush=True)
    c, peer = s.accept()
    c.sendall(c.recv(1024)); c.close()
    print(peer[0], flush=True)
""")

ECHO_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], 7007), timeout=5)
    s.sendall(b"hello tuplet"); print(s.recv(1024).decode())
""")


def test_tcp_echo_between_pods(topo: Topology) -> None:
    _, p1, p2, _ = hosts(topo)
    server = topo.popen(p2, [sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    r = topo.run(p1, [sys.executable, "-c", ECHO_CLIENT, p2.ipv4], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello tuplet"
    assert server.stdout.readline().strip() == p1.ipv4  # no NAT: the server sees the pod's address
    assert server.wait(timeout=5) == 0


# --- cleanup ----------------------------------------------------------------------------------


def test_close_removes_namespaces_and_kills_processes(prefix: str) -> None:
    links = root_links()
    t = Topology(prefix=prefix)
    node = t.add_node("node")
    pod = t.add_pod(node, "pod1", POD1)
    t.add_external(node, "client", CLIENT, node_ip=NODE_IP)
    created = t.namespaces
    assert len(created) == 3 and all(n in ip_netns_list() for n in created)
    sleeper = t.popen(pod, ["sleep", "600"])
    # A process started behind the topology's back also keeps a namespace alive.
    stray = sleeper_in(node.netns)
    try:
        t.close()
        assert t.closed and t.namespaces == []
        assert not leftovers(prefix)
        assert not any(n.startswith(prefix) for n in pr_netns.listnetns())
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        assert stray.wait(timeout=5) == -signal.SIGKILL
        assert root_links() == links
        t.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            t.add_node("again")
    finally:
        if stray.poll() is None:
            stray.kill()
        stray.wait()
        stray.stdout.close()


def test_context_manager_closes_on_error(prefix: str) -> None:
    with pytest.raises(ZeroDivisionError):
        with Topology(prefix=prefix) as t:
            t.add_pod(t.add_node("node"), "pod1", POD1)
            1 / 0
    assert not leftovers(prefix)


def test_cleanup_stale(prefix: str) -> None:
    other = prefix + "x"  # shares the characters, not the prefix
    pr_netns.create(f"{prefix}-stale")
    pr_netns.create(f"{other}-keep")
    live = Topology(prefix=prefix)
    try:
        live.add_node("live")
        orphan = sleeper_in(f"{prefix}-stale")
        assert Topology.cleanup_stale(prefix) == [f"{prefix}-stale"]
        assert orphan.wait(timeout=5) == -signal.SIGKILL
        names = pr_netns.listnetns()
        assert f"{prefix}-stale" not in names
        assert f"{other}-keep" in names and f"{prefix}-live" in names  # live topologies are spared
        assert Topology.cleanup_stale(prefix) == []
        orphan.stdout.close()
    finally:
        live.close()
        Topology.cleanup_stale(other)
    assert not leftovers(other)


SIGNALLED = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[1])
    from tuplet.lab.topology import Topology
    t = Topology(prefix=sys.argv[2])
    node = t.add_node("node")
    pod = t.add_pod(node, "pod1", "10.64.0.36")
    t.popen(pod, ["sleep", "600"])
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_removes_namespaces(prefix: str, sig: signal.Signals, tmp_path: Path) -> None:
    err = (tmp_path / "stderr").open("w+")
    p = subprocess.Popen([sys.executable, "-c", SIGNALLED, LOADER, prefix],
                         stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert p.stdout is not None
        for line in p.stdout:  # structlog's default logger prints its events here too
            if line.strip() == "ready":
                break
        else:
            pytest.fail(f"the topology did not come up: {(tmp_path / 'stderr').read_text()}")
        assert len(leftovers(prefix)) == 2
        p.send_signal(sig)
        rc = p.wait(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        err.close()
    # SIGTERM: cleaned up by the handler, then the process still dies of SIGTERM.
    # SIGINT: KeyboardInterrupt, cleaned up at exit, and Python dies of SIGINT.
    assert rc == -sig, (tmp_path / "stderr").read_text()
    assert not leftovers(prefix)


# --- netns.enter ------------------------------------------------------------------------------


def test_enter_shows_node_interfaces_and_restores(topo: Topology) -> None:
    node, p1, _, _ = hosts(topo)
    before = own_netns()
    with enter(node.netns):
        assert own_netns() != before
        with IPRoute() as ipr:
            names = {link.get("ifname") for link in ipr.get_links()}
        assert {"lo", "lxc-pod1", "lxc-pod2", "eth0"} <= names
        with enter(p1.netns):  # nesting restores the node, not the original
            with IPRoute() as ipr:
                assert {link.get("ifname") for link in ipr.get_links()} == {"lo", "eth0"}
        with IPRoute() as ipr:
            assert "lxc-pod1" in {link.get("ifname") for link in ipr.get_links()}
    assert own_netns() == before
    assert "lxc-pod1" not in root_links()


def test_enter_restores_after_exception(topo: Topology) -> None:
    before = own_netns()
    with pytest.raises(KeyError):
        with enter(topo.nodes[0].netns):
            raise KeyError("x")
    assert own_netns() == before


def test_enter_is_per_thread(topo: Topology) -> None:
    node = topo.nodes[0]
    main_before = own_netns()
    seen: dict[str, int] = {}
    inside = threading.Event()
    release = threading.Event()

    def worker() -> None:
        seen["thread_before"] = own_netns()
        with enter(node.netns):
            seen["thread_inside"] = own_netns()
            inside.set()
            release.wait(5)
        seen["thread_after"] = own_netns()

    th = threading.Thread(target=worker)
    th.start()
    assert inside.wait(5)
    assert own_netns() == main_before  # the main thread did not move
    release.set()
    th.join(5)
    assert seen["thread_inside"] != main_before
    assert seen["thread_after"] == seen["thread_before"] == main_before


def test_missing_netns_raises(prefix: str) -> None:
    name = f"{prefix}-missing"
    assert not netns.exists(name)
    with pytest.raises(NetnsError) as ei:
        with enter(name):
            pytest.fail("entered a namespace that does not exist")
    assert str(ei.value) == f"network namespace '{name}' does not exist (ip netns list)"
    assert isinstance(ei.value, TupletError)
    assert name not in pr_netns.listnetns()  # nothing was created as a side effect


def test_exists(topo: Topology) -> None:
    assert netns.exists(topo.nodes[0].netns)
    assert not netns.exists("")
    assert not netns.exists("../etc")


def test_exists_ignores_unmounted_placeholder(prefix: str) -> None:
    name = f"{prefix}-placeholder"
    Path(netns.path(name)).parent.mkdir(parents=True, exist_ok=True)
    Path(netns.path(name)).touch()
    try:
        assert not netns.exists(name)
        with pytest.raises(NetnsError, match="does not exist"):
            with enter(name):
                pass
    finally:
        os.unlink(netns.path(name))
