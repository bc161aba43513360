"""Service updates are atomic for socket LB too: connect() calls from a process in the test's
cgroup run while the backend set flips back and forth; none fails (a half-written service
would leave a slot without a backend: EPERM) and every socket got a backend of the old or the
new set (read from the reverse-NAT map, one entry per socket cookie). For an IPv4 and an IPv6
service."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from typing import NamedTuple

import pytest

from socklb_harness import make_cgroup, remove_cgroup
from tuplet.datapath import abi, paths
from tuplet.datapath.layouts import Lb4SockRevKey, Lb6SockRevKey, be32_to_ip, bytes_to_ip6
from tuplet.lb import writer as lb
from tuplet.lb.model import Service, ServiceType, parse_backend
from tuplet.node import apply as node_apply
from tuplet.node import config, socklb, state

pytestmark = pytest.mark.netns

N = 3000


class Net(NamedTuple):
    vip: str
    backends: tuple[str, str, str]
    client: str                  # the client namespace's address, with its prefix
    socket_family: str
    rev_map: str
    rev_key: type[Lb4SockRevKey] | type[Lb6SockRevKey]

    def endpoint(self, address: str) -> str:
        return f"[{address}]:8000" if ":" in address else f"{address}:8000"

    def backend_of(self, raw_key: bytes) -> str:
        """The backend address of a raw reverse-map key."""
        k = self.rev_key.from_buffer_copy(raw_key)
        return be32_to_ip(k.address) if isinstance(k, Lb4SockRevKey) else bytes_to_ip6(k.address)


V4 = Net("10.68.174.146", ("10.64.0.98", "10.64.0.64", "10.64.0.116"), "10.64.0.36/16", "AF_INET",
         abi.SOCK_REV_NAT_MAP, Lb4SockRevKey)
V6 = Net("fd00:10:96::a", ("fd00:10:244::62", "fd00:10:244::40", "fd00:10:244::74"), "fd00:10:244::24/64",
         "AF_INET6", abi.SOCK6_REV_NAT_MAP, Lb6SockRevKey)


def client(net: Net) -> str:
    """In a network namespace of its own (a route to the backends, so UDP connect() succeeds
    without sending anything): N UDP sockets connect to VIP:53 over a few seconds; prints how
    many connect() calls failed."""
    return textwrap.dedent(f"""
        import socket, time
        failed = 0
        for i in range({N}):
            s = socket.socket(socket.{net.socket_family}, socket.SOCK_DGRAM)
            try:
                s.connect(("{net.vip}", 53))
            except OSError:
                failed += 1
            s.close()
            time.sleep(0.001)   # spread over a few seconds: many service changes meanwhile
        print(failed, flush=True)
    """)


def setup(net: Net) -> str:
    return ("ip link add v0 type veth peer name v1 && ip link set v1 up && ip link set v0 up "
            f"&& ip addr add {net.client} dev v0 nodad && exec \"$@\"")


def svc(net: Net, *backends: str, m: int) -> Service:
    return Service(name="dns", type=ServiceType.CLUSTER_IP, address=net.vip, port=53, protocol="udp",
                   backends=tuple(parse_backend(net.endpoint(b), "b") for b in backends), maglev_size=m,
                   source="cli")


@pytest.fixture
def sock_lb(pin_root):
    cg = make_cgroup()
    cfg = config.parse("[conntrack]\ntcp_max = 4096\nany_max = 4096\nnat_max = 4096\n")
    spec = node_apply.open_object(abi.OBJ_LXC, cfg, pin_root)   # the service and CT maps, pinned
    try:
        lxc = spec.load()
    finally:
        spec.close()
    socklb.attach(pin_root, str(cg)).commit()
    try:
        yield pin_root, cg
    finally:
        socklb.detach(pin_root)
        lxc.close()
        remove_cgroup(cg)
        state.remove(pin_root)


@pytest.mark.parametrize("net", [V4, V6], ids=["v4", "v6"])
def test_connects_never_see_a_half_written_service(sock_lb, net) -> None:
    root, cg = sock_lb
    a, b, c3 = net.backends
    sets = [svc(net, a, b, m=251), svc(net, c3, m=257)]
    with lb.ServiceTable(root, local_addrs={a, b, c3}) as t:
        t.upsert(sets[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    flips = [0]

    def flip() -> None:
        try:
            with lb.ServiceTable(root, local_addrs={a, b, c3}) as t:
                while not stop.is_set():
                    flips[0] += 1
                    t.upsert(sets[flips[0] % 2])
        except BaseException as e:   # reported below
            errors.append(e)

    writer = threading.Thread(target=flip)
    writer.start()
    try:
        r = subprocess.run(["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", str(cg),
                            "unshare", "-n", "sh", "-c", setup(net), "sh", sys.executable, "-c", client(net)],
                           capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        writer.join()
    assert not errors, errors
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0"], "connect() failed during a service change"
    assert flips[0] >= 10, flips
    with paths.open_pinned(root, net.rev_map) as m:
        backends = [net.backend_of(k) for k in m.keys()]
    assert len(backends) == N
    assert set(backends) <= {a, b, c3} and len(set(backends)) >= 2, set(backends)
