"""Service updates are atomic for socket LB too: connect() calls from a process in the test's
cgroup run while the backend set flips back and forth; none fails (a half-written service
would leave a slot without a backend: EPERM) and every socket got a backend of the old or the
new set (read from the reverse-NAT map, one entry per socket cookie)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from socklb_harness import make_cgroup, remove_cgroup
from tuplet.datapath import abi, paths
from tuplet.datapath.layouts import be32_to_ip
from tuplet.lb import writer as lb
from tuplet.lb.model import Service, ServiceType, parse_backend
from tuplet.node import apply as node_apply
from tuplet.node import config, socklb, state

pytestmark = pytest.mark.netns

VIP, A, B, C3 = "10.68.174.146", "10.64.0.98", "10.64.0.64", "10.64.0.116"
N = 3000

# In a network namespace of its own (a route to the backends, so UDP connect() succeeds without
# sending anything): N UDP sockets connect to VIP:53 over a few seconds; prints how many connect() calls failed.
CLIENT = textwrap.dedent(f"""
    import socket, time
    failed = 0
    for i in range({N}):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(("{VIP}", 53))
        except OSError:
            failed += 1
        s.close()
        time.sleep(0.001)   # spread over a few seconds: many service changes meanwhile
    print(failed, flush=True)
""")
SETUP = ("ip link add v0 type veth peer name v1 && ip link set v1 up && ip link set v0 up "
         "&& ip addr add 10.64.0.36/16 dev v0 && exec \"$@\"")


def svc(*backends: str, m: int) -> Service:
    return Service(name="dns", type=ServiceType.CLUSTER_IP, address=VIP, port=53, protocol="udp",
                   backends=tuple(parse_backend(b, "b") for b in backends), maglev_size=m, source="cli")


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


def test_connects_never_see_a_half_written_service(sock_lb) -> None:
    root, cg = sock_lb
    sets = [svc(f"{A}:8000", f"{B}:8000", m=251), svc(f"{C3}:8000", m=257)]
    with lb.ServiceTable(root, local_addrs={A, B, C3}) as t:
        t.upsert(sets[0])
    stop = threading.Event()
    errors: list[BaseException] = []
    flips = [0]

    def flip() -> None:
        try:
            with lb.ServiceTable(root, local_addrs={A, B, C3}) as t:
                while not stop.is_set():
                    flips[0] += 1
                    t.upsert(sets[flips[0] % 2])
        except BaseException as e:   # reported below
            errors.append(e)

    writer = threading.Thread(target=flip)
    writer.start()
    try:
        r = subprocess.run(["sh", "-c", 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"', "sh", str(cg),
                            "unshare", "-n", "sh", "-c", SETUP, "sh", sys.executable, "-c", CLIENT],
                           capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        writer.join()
    assert not errors, errors
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0"], "connect() failed during a service change"
    assert flips[0] >= 10, flips
    with paths.open_pinned(root, abi.SOCK_REV_NAT_MAP) as m:
        backends = [be32_to_ip(int.from_bytes(k[8:12], "little")) for k in m.keys()]
    assert len(backends) == N
    assert set(backends) <= {A, B, C3} and len(set(backends)) >= 2, set(backends)
