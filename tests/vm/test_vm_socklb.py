"""Socket LB on Debian's 6.1 kernel: all eight cgroup programs (IPv4 and IPv6) attached; a
connect() and a sendto() to an IPv4 or IPv6 ClusterIP (and to an IPv4 one through AF_INET6
sockets) from a process in the test's cgroup reach a backend directly, and getpeername()/recvfrom()
show the service address. A backend removed: without bpf_sock_destroy (6.5+) connected UDP sockets
keep it. The guest script mounts cgroup v2 when the guest has none mounted."""
from __future__ import annotations

import pytest

from test_netns_datapath import ct_lines
from test_netns_socklb import ALL, applied, cg, net, through_socket_lb, topo  # noqa: F401 (fixtures)
from test_netns_socklb import test_udp_backend_removed as udp_backend_removed
from tuplet.bpf.links import cgroup_id
from tuplet.bpf.objects import ObjectSpec
from tuplet.core.errors import TupletError
from tuplet.datapath import abi, paths
from tuplet.node import socklb

pytestmark = pytest.mark.vm


@ALL
def test_connect_and_sendto_through_socket_lb(topo, applied, pin_root, cg, net) -> None:  # noqa: F811
    applied()
    assert socklb.attached_cgroup_ids(pin_root) == {cgroup_id(str(cg))}
    assert all(link.link_id for _prog, link in socklb.links(pin_root)), socklb.links(pin_root)
    through_socket_lb(topo, cg, net)
    # Read in this process: `tuplet ct list`'s interpreter start-up takes most of a minute here.
    assert not [r.line() for r in ct_lines(pin_root, abi.CT_MAPS + abi.CT6_MAPS) if r.direction == "SVC"]


@ALL
def test_udp_backend_removed_without_sock_destroy(topo, applied, pin_root, cg, net) -> None:  # noqa: F811
    """6.1 has no bpf_sock_destroy: the kernel refuses sock_destroy.o, so tuplet does not load it
    (it checks the kernel's BTF), and connected UDP sockets keep the removed backend until they
    reconnect; apply still succeeds."""
    assert not socklb.can_destroy_sockets()
    with ObjectSpec.open(paths.object_dir() / abi.OBJ_SOCK_DESTROY) as spec:
        with pytest.raises(TupletError):
            spec.load().close()
    udp_backend_removed(topo, applied, pin_root, cg, net)
