"""Socket LB on Debian's 6.1 kernel: a connect() and a sendto() to a ClusterIP from a process in
the test's cgroup reach a backend directly, and getpeername()/recvfrom() show the service address.
The guest script mounts cgroup v2 when the guest has none mounted."""
from __future__ import annotations

import pytest

from socklb_harness import ask
from test_netns_socklb import CLIENT, VIP, applied, cg, ct_list, topo  # noqa: F401 (fixtures)
from tuplet.bpf.links import cgroup_id
from tuplet.node import socklb

pytestmark = pytest.mark.vm


def test_connect_and_sendto_through_socket_lb(topo, applied, pin_root, cg) -> None:  # noqa: F811
    applied()
    assert socklb.attached_cgroup_ids(pin_root) == {cgroup_id(str(cg))}
    for mode, port in (("tcp", 80), ("udp", 53)):
        answers = ask(topo, topo.client, mode, VIP, port, n=16, cg=cg)
        assert {a[0] for a in answers} == {"back1", "back2"}, answers
        assert {a[2] for a in answers} == {f"{VIP}:{port}"}
        assert {a[1].split(":")[0] for a in answers} == {CLIENT}
    assert not [ln for ln in ct_list(pin_root) if " SVC " in ln]
