"""The service control plane (tuplet.lb, tuplet.services) against the real programs:
what each change writes, that a change is atomic for packets running meanwhile, that a
failed change leaves nothing behind, and that removed backends drain."""
from __future__ import annotations

import socket

import numpy as np
import pytest

from lb_harness import LbHarness, cli_service, flipping, l4_of, new_flows, pinned_maps, service_keys, slot0, tcp4
from lxc_harness import TC_ACT_OK
from tuplet.core.errors import ConfigError, NotFoundError
from tuplet.datapath import abi
from tuplet.datapath.abi import (
    CT_MAP_ANY,
    CT_MAP_SYN,
    CT_MAP_TCP,
    LB_BANK_STRIDE,
    LB_SVC_F_EXTERNAL,
    LB_SVC_F_LOADBALANCER,
)
from tuplet.datapath.layouts import Lb4Backend, Lb4MaglevKey, be32_to_ip
from tuplet.lb import writer as lb
from tuplet.lb.model import Backend, Service, ServiceType, parse_backend, parse_services

POD1, VIP, PORT = "10.64.0.36", "10.68.174.146", 80
A, B, C3 = "10.64.0.98", "10.64.0.64", "10.64.0.116"
LOCAL = {POD1, A, B, C3}


def svc(*backends: str, name: str = "web", **kw) -> Service:
    return cli_service(kw.pop("address", VIP), kw.pop("port", PORT), *backends, name=name, **kw)


@pytest.fixture
def pinned(pin_root):
    """Both programs loaded on shared maps, the service and CT maps pinned under pin_root."""
    h = LbHarness.load_both()
    with pinned_maps(h, pin_root, (*abi.LB_MAPS, abi.EXTERNAL_MAP, CT_MAP_TCP, CT_MAP_ANY, CT_MAP_SYN)):
        yield h, pin_root


def table(pin_root: str) -> lb.ServiceTable:
    return lb.ServiceTable(pin_root, local_addrs=LOCAL)


def new_flow(h: LbHarness, sport: int) -> str:
    """A SYN from POD1 to the VIP; the backend address it was DNATed to."""
    res = h.coll.programs["cil_from_container"].test_run(tcp4(POD1, sport, VIP, PORT, "S"))
    assert res.retval == TC_ACT_OK
    return l4_of(res.data)[2]


def test_upsert_writes_service_slots_maglev_and_flips_banks(pinned) -> None:
    h, root = pinned
    with table(root) as t:
        v = t.upsert(svc(f"{A}:8000", f"{B}:8000"))
    s0 = slot0(h, v.service)
    assert (s0.count, s0.bank, s0.maglev_size, s0.rev_nat_index) == (2, 0, 251, v.rev_nat)
    slots = sorted(k.backend_slot for k in service_keys(h) if k.backend_slot)
    assert slots == [1, 2]
    assert sum(b.slots for b in v.backends) == 251 and all(b.slots in (125, 126) for b in v.backends)
    assert {new_flow(h, 30000 + i) for i in range(40)} == {A, B}

    with table(root) as t:
        v2 = t.upsert(svc(f"{B}:8000", f"{C3}:8000", f"{A}:8000,weight=2", m=257))
    s0 = slot0(h, v2.service)
    assert (s0.count, s0.bank, s0.maglev_size, s0.rev_nat_index) == (3, 1, 257, v.rev_nat)
    # Only the new bank's slots remain, and only its Maglev table.
    assert sorted(k.backend_slot for k in service_keys(h) if k.backend_slot) == [LB_BANK_STRIDE + i for i in (1, 2, 3)]
    mg = h.coll.maps[abi.MAGLEV_MAP]
    assert mg.lookup(Lb4MaglevKey(v.rev_nat, 1, 0)) is not None and mg.lookup(Lb4MaglevKey(v.rev_nat, 0, 0)) is None
    share = {b.backend.address: b.slots for b in v2.backends}
    assert sum(share.values()) == 257 and abs(share[A] - 257 / 2) <= 2          # weight 2 of 4
    # Backend ids are kept for backends that stay.
    assert {b.backend.address: b.id for b in v2.backends}[A] == {b.backend.address: b.id for b in v.backends}[A]


def test_delete_removes_everything_it_wrote(pinned) -> None:
    h, root = pinned
    with table(root) as t:
        t.upsert(svc(f"{A}:8000", f"{B}:8000", affinity_timeout=60))
        t.upsert(svc(f"{A}:8000", name="dns", protocol="udp", port=53))
        t.delete("web")
        t.delete("dns")
        with pytest.raises(NotFoundError):
            t.delete("web")
    for name in (abi.SERVICES_MAP, abi.BACKENDS_MAP, abi.REV_NAT_MAP, abi.MAGLEV_MAP):
        assert list(h.coll.maps[name].keys()) == [], name


def test_failed_change_leaves_the_service_as_it_was(pinned, monkeypatch) -> None:
    h, root = pinned
    with table(root) as t:
        t.upsert(svc(f"{A}:8000"))
    before = {n: sorted(h.coll.maps[n].items()) for n in (abi.SERVICES_MAP, abi.BACKENDS_MAP, abi.REV_NAT_MAP)}

    def boom(*a, **kw):
        raise OSError("injected failure while writing the Maglev table")

    monkeypatch.setattr(lb.ServiceTable, "_put_maglev", boom)
    with table(root) as t, pytest.raises(OSError, match="injected"):
        t.upsert(svc(f"{B}:8000", f"{C3}:8000"))
    after = {n: sorted(h.coll.maps[n].items()) for n in before}
    assert after == before
    with table(root) as t:
        assert [b.address for b in t.get("web").backends] == [A]
    assert {new_flow(h, 31000 + i) for i in range(10)} == {A}


def test_packets_never_see_a_half_written_service(pinned) -> None:
    """Flows start continuously while the backend set and table size flip back and forth."""
    h, root = pinned
    sets = [(svc(f"{A}:8000", f"{B}:8000", m=251), {A, B}), (svc(f"{C3}:8000", m=257), {C3})]
    with flipping(lambda: table(root), [s for s, _ in sets]):
        seen = new_flows(h, (tcp4(POD1, 1024 + i, VIP, PORT, "S") for i in range(3000)))
    assert set(seen) <= {A, B, C3} and len(seen) >= 2, seen


def test_removed_backend_drains_while_a_flow_uses_it(pinned) -> None:
    h, root = pinned
    with table(root) as t:
        t.upsert(svc(f"{A}:8000", f"{B}:8000"))
    owner = {new_flow(h, 32000 + i): 32000 + i for i in range(40)}
    assert set(owner) == {A, B}
    with table(root) as t:
        t.upsert(svc(f"{A}:8000"))
        assert list(t.draining()) == [f"{B}:8000/tcp"]
    # The flow on B keeps B (its backend entry is still there); new flows only get A.
    res = h.coll.programs["cil_from_container"].test_run(tcp4(POD1, owner[B], VIP, PORT, "A"))
    assert l4_of(res.data)[2] == B
    assert {new_flow(h, 33000 + i) for i in range(20)} == {A}
    # Once no conntrack entry names it, the next change deletes it.
    h.coll.maps[CT_MAP_TCP].clear()
    h.coll.maps[CT_MAP_SYN].clear()
    with table(root) as t:
        t.upsert(svc(f"{A}:8000", affinity_timeout=5))
        assert t.draining() == {}
    addrs = {be32_to_ip(Lb4Backend.from_buffer_copy(v).address) for _, v in h.coll.maps[abi.BACKENDS_MAP].items()}
    assert addrs == {A}


def test_flags_and_remote_backends(pinned) -> None:
    h, root = pinned
    lbs = svc(f"{A}:8000", "10.65.0.9:8000,node=192.168.7.2", name="lb", type=ServiceType.LOAD_BALANCER,
              address="172.190.0.17")
    external = h.coll.maps[abi.EXTERNAL_MAP]
    with table(root) as t:
        t.upsert(svc(f"{A}:8000", name="cip"))
        assert external.lookup(0) == bytes(4)          # ClusterIP only: cil_to_netdev probes nothing
        v = t.upsert(lbs)
    assert slot0(h, lbs).flags == LB_SVC_F_EXTERNAL | LB_SVC_F_LOADBALANCER
    assert external.lookup(0) == (1).to_bytes(4, "little")   # replies of NIC flows are probed now
    remote = {b.backend.address: b.remote for b in v.backends}
    assert remote == {A: False, "10.65.0.9": True}
    be = {be32_to_ip(Lb4Backend.from_buffer_copy(v).address): Lb4Backend.from_buffer_copy(v)
          for _, v in h.coll.maps[abi.BACKENDS_MAP].items()}
    assert be["10.65.0.9"].flags == 1 and be32_to_ip(be["10.65.0.9"].node_addr) == "192.168.7.2"
    assert socket.ntohs(be[A].port) == 8000 and be[A].flags == 0


def test_frontend_conflicts_and_address_changes_are_refused(pinned) -> None:
    h, root = pinned
    with table(root) as t:
        t.upsert(svc(f"{A}:8000"))
        with pytest.raises(ConfigError, match="already service 'web'"):
            t.upsert(svc(f"{B}:8000", name="other"))
        with pytest.raises(ConfigError, match="cannot change"):
            t.upsert(svc(f"{B}:8000", port=81))


def test_sync_keeps_cli_services_and_skips_unchanged(pinned) -> None:
    h, root = pinned
    cfg = parse_services([{"name": "web", "address": VIP, "port": 80, "backends": [f"{A}:8000"]}])
    with table(root) as t:
        t.upsert(svc(f"{B}:8000", name="added", port=8080))
    with lb.ServiceTable(root, local_addrs=LOCAL, default_maglev_size=251) as t:
        assert t.sync(cfg)["added"] == ["web"]
        assert t.sync(cfg)["unchanged"] == ["web"]
        assert t.sync(())["deleted"] == ["web"]
        assert t.names() == ["added"]


def test_inner_tables_carry_btf(pinned) -> None:
    h, root = pinned
    with table(root) as t:
        v = t.upsert(svc(f"{A}:8000"))
    raw = h.coll.maps[abi.MAGLEV_MAP].lookup(Lb4MaglevKey(v.rev_nat, 0, 0))
    from tuplet.bpf.maps import Map

    with Map.from_id(int.from_bytes(raw[:4], "little")) as inner:
        assert inner.info.btf_id and inner.info.btf_value_type_id and inner.max_entries == 251
        assert np.unique(np.frombuffer(b"".join(v for _, v in inner.items()), np.uint32)).size == 1


@pytest.mark.parametrize("text,key", [
    ('backends = ["10.0.0.1"]', "services[0].backends[0]"),
    ('backends = ["10.0.0.1:0"]', "services[0].backends[0]"),
    ('backends = ["10.0.0.1:80,weight=x"]', "services[0].backends[0]"),
    ('backends = ["10.0.0.1:80", "10.0.0.1:80"]', "services[0].backends[1]"),
    ('backends = [{ address = "10.0.0.1" }]', "services[0].backends[0].port"),
    ('maglev_size = 1000', "services[0].maglev_size"),
    ('maglev_size = 131', "services[0].maglev_size"),
    ('type = "ExternalName"', "services[0].type"),
    ('protocol = "sctp"', "services[0].protocol"),
    ('affinity_timeout = "soon"', "services[0].affinity_timeout"),
    ('colour = "red"', "services[0].colour"),
])
def test_bad_service_config_names_the_key(text: str, key: str) -> None:
    from tuplet.node import config

    doc = f'[[services]]\nname = "web"\naddress = "{VIP}"\nport = 80\n{text}\n'
    with pytest.raises(ConfigError) as e:
        config.parse(doc)
    assert e.value.key == key, str(e.value)


def test_backend_strings_and_tables() -> None:
    assert parse_backend("10.0.0.1:80,weight=3,node=192.168.1.2", "b") == Backend("10.0.0.1", 80, 3, "192.168.1.2")
    assert parse_backend({"address": "10.0.0.1", "port": 80}, "b") == Backend("10.0.0.1", 80)
    with pytest.raises(ConfigError, match="duplicate service name"):
        parse_services([{"name": "a", "address": VIP, "port": 80}, {"name": "a", "address": VIP, "port": 81}])
