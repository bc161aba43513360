"""IPv6 services through the one service writer, against the real maps of bpf_lxc.o: what
a change writes to the tpl_lb6_* maps and the shared Maglev outer map, that a reader of
the maps never sees a half-written service, that a failed or killed change leaves nothing
behind, draining through the IPv6 conntrack tables, dual-stack services side by side, and
the IPv6 forms of the configuration and of `tuplet svc` (the packet path comes later)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lb_harness import cli_service, flipping, pinned_maps, service_keys, slot0
from lxc_harness import LxcHarness
from tuplet.core import crashpoints
from tuplet.core.errors import ConfigError, NotFoundError
from tuplet.datapath import abi, paths
from tuplet.datapath.layouts import (
    CtEntry,
    CtTuple6,
    Lb4Key,
    Lb4MaglevKey,
    Lb4Service,
    Lb6AffinityKey,
    Lb6Backend,
    Lb6Key,
    Lb6ReverseNat,
    LbAffinityVal,
    be16,
    bytes_to_ip6,
    ip6_to_bytes,
)
from tuplet.lb import families, maglev, maglev_map
from tuplet.lb import writer as lb
from tuplet.lb.model import Service, ServiceType, parse_backend, parse_services
from tuplet.node import config

ROOT = Path(__file__).resolve().parent.parent
VIP6, VIP4, PORT = "2001:db8:68::a", "10.68.174.146", 80
A, B, C3 = "2001:db8:64::62", "2001:db8:64::40", "2001:db8:64::74"
A4 = "10.64.0.98"
LOCAL = {A, B, C3, A4}
LB6_MAPS = (abi.SERVICES6_MAP, abi.BACKENDS6_MAP, abi.REV_NAT6_MAP, abi.AFFINITY6_MAP)
LB4_MAPS = (abi.SERVICES_MAP, abi.BACKENDS_MAP, abi.REV_NAT_MAP, abi.AFFINITY_MAP)


def svc(*backends: str, name: str = "web6", **kw) -> Service:
    return cli_service(kw.pop("address", VIP6), kw.pop("port", PORT), *backends, name=name, **kw)


@pytest.fixture
def pinned(pin_root):
    """bpf_lxc.o loaded, its service, CT (both families) and IPv6 endpoint maps pinned."""
    h = LxcHarness.load()
    with pinned_maps(h, pin_root, (*abi.LB_MAPS, abi.EXTERNAL_MAP, *abi.CT_MAPS, *abi.CT6_MAPS, abi.EP6_MAP)):
        yield h, pin_root


def table(pin_root: str) -> lb.ServiceTable:
    return lb.ServiceTable(pin_root, local_addrs=LOCAL)


def keys6(h: LxcHarness) -> list[Lb4Key | Lb6Key]:
    return service_keys(h, families.V6)


def backends6(h: LxcHarness) -> dict[int, Lb6Backend]:
    return {int.from_bytes(k, "little"): Lb6Backend.from_buffer_copy(v)
            for k, v in h.coll.maps[abi.BACKENDS6_MAP].items()}


def dump(h: LxcHarness, names: tuple[str, ...]) -> dict[str, list[tuple[bytes, bytes]]]:
    return {n: sorted(h.coll.maps[n].items()) for n in names}


def test_upsert_writes_the_ipv6_maps_and_flips_banks(pinned) -> None:
    h, root = pinned
    with table(root) as t:
        v = t.upsert(svc(f"[{A}]:8000", f"[{B}]:8000", affinity_timeout=30))
    s0 = slot0(h, v.service)
    assert (s0.count, s0.bank, s0.maglev_size, s0.rev_nat_index) == (2, 0, 251, v.rev_nat)
    assert s0.flags == abi.LB_SVC_F_AFFINITY and s0.affinity_timeout == 30
    slots = {k.backend_slot: Lb4Service.from_buffer_copy(h.coll.maps[abi.SERVICES6_MAP].lookup(k)).backend_id
             for k in keys6(h) if k.backend_slot}
    be = backends6(h)
    assert sorted(slots) == [1, 2] and set(slots.values()) == set(be)
    assert {bytes_to_ip6(b.address) for b in be.values()} == {A, B}
    assert all(be16(b.port) == 8000 and b.proto == 6 and b.flags == 0 for b in be.values())
    rn = Lb6ReverseNat.from_buffer_copy(h.coll.maps[abi.REV_NAT6_MAP].lookup(v.rev_nat.to_bytes(2, "little")))
    assert (bytes_to_ip6(rn.address), be16(rn.port)) == (VIP6, PORT)
    # The Maglev table is in the shared outer map, filled with the IPv6 backends' ids.
    table0 = maglev_map.read_table(h.coll.maps[abi.MAGLEV_MAP], v.rev_nat, 0)
    assert len(table0) == 251 and set(np.unique(table0).tolist()) == set(be)
    assert sum(b.slots for b in v.backends) == 251 and all(b.slots in (125, 126) for b in v.backends)
    # Nothing went to the IPv4 maps.
    assert all(list(h.coll.maps[n].keys()) == [] for n in LB4_MAPS)

    with table(root) as t:
        v2 = t.upsert(svc(f"[{B}]:8000", f"[{C3}]:8000", f"[{A}]:8000,weight=2", m=257))
    s0 = slot0(h, v2.service)
    assert (s0.count, s0.bank, s0.maglev_size, s0.rev_nat_index) == (3, 1, 257, v.rev_nat)
    assert sorted(k.backend_slot for k in keys6(h) if k.backend_slot) == \
        [abi.LB_BANK_STRIDE + i for i in (1, 2, 3)]
    mg = h.coll.maps[abi.MAGLEV_MAP]
    assert mg.lookup(Lb4MaglevKey(v.rev_nat, 1, 0)) is not None and mg.lookup(Lb4MaglevKey(v.rev_nat, 0, 0)) is None
    share = {b.backend.address: b.slots for b in v2.backends}
    assert sum(share.values()) == 257 and abs(share[A] - 257 / 2) <= 2
    assert {b.backend.address: b.id for b in v2.backends}[A] == {b.backend.address: b.id for b in v.backends}[A]


def test_dual_stack_services_share_one_index_space_and_delete_cleanly(pinned) -> None:
    h, root = pinned
    v4 = Service(name="web4", type=ServiceType.CLUSTER_IP, address=VIP4, port=PORT,
                 backends=(parse_backend(f"{A4}:8000", "b"),), maglev_size=251)
    with table(root) as t:
        r4 = t.upsert(v4)
        r6 = t.upsert(svc(f"[{A}]:8000"))
    assert r4.rev_nat != r6.rev_nat                       # one reverse-NAT space
    assert r4.backends[0].id != r6.backends[0].id         # one backend-id space
    mg = h.coll.maps[abi.MAGLEV_MAP]
    assert {Lb4MaglevKey.from_buffer_copy(k).rev_nat_index for k in mg.keys()} == {r4.rev_nat, r6.rev_nat}
    assert h.coll.maps[abi.SERVICES_MAP].lookup(Lb4Key.make(VIP4, PORT, 6)) is not None
    # Affinity entries of the IPv6 service go with it.
    aff = h.coll.maps[abi.AFFINITY6_MAP]
    aff.update(Lb6AffinityKey(ip6_to_bytes("2001:db8:64::99"), r6.rev_nat, 0), LbAffinityVal(1, r6.backends[0].id))
    before4 = dump(h, LB4_MAPS)
    with table(root) as t:
        t.delete("web6")
    assert all(list(h.coll.maps[n].keys()) == [] for n in LB6_MAPS)
    assert dump(h, LB4_MAPS) == before4
    assert [Lb4MaglevKey.from_buffer_copy(k).rev_nat_index for k in mg.keys()] == [r4.rev_nat]
    with table(root) as t:
        t.delete("web4")
    assert all(list(h.coll.maps[n].keys()) == [] for n in (*LB4_MAPS, abi.MAGLEV_MAP))


def test_failed_change_leaves_the_ipv6_service_as_it_was(pinned, monkeypatch) -> None:
    h, root = pinned
    with table(root) as t:
        t.upsert(svc(f"[{A}]:8000"))
    names = (*LB6_MAPS, abi.MAGLEV_MAP)
    before = dump(h, names)

    def boom(*a, **kw):
        raise OSError("injected failure while writing the Maglev table")

    monkeypatch.setattr(lb.ServiceTable, "_put_maglev", boom)
    with table(root) as t, pytest.raises(OSError, match="injected"):
        t.upsert(svc(f"[{B}]:8000", f"[{C3}]:8000"))
    assert dump(h, names) == before
    with table(root) as t:
        assert [b.address for b in t.get("web6").backends] == [A]


def test_map_readers_never_see_a_half_written_ipv6_service(pinned) -> None:
    """While the backend set and table size flip, every stable read of the maps (slot 0 and
    the Maglev inner map the same before and after) finds slot 0's bank complete: its
    slots, a Maglev table of slot 0's size naming only those slots' backends, all present."""
    h, root = pinned
    sets = [svc(f"[{A}]:8000", f"[{B}]:8000", m=251), svc(f"[{C3}]:8000", m=257)]
    svc_map, be_map, mg = (h.coll.maps[n] for n in (abi.SERVICES6_MAP, abi.BACKENDS6_MAP, abi.MAGLEV_MAP))
    rev_nat = 0

    def snapshot() -> tuple[bytes | None, bytes | None]:
        raw = svc_map.lookup(Lb6Key.make(VIP6, PORT, 6))
        bank = Lb4Service.from_buffer_copy(raw).bank if raw else 0
        return raw, mg.lookup(Lb4MaglevKey(rev_nat, bank, 0))

    stable, sizes = 0, set()
    with flipping(lambda: table(root), sets):
        rev_nat = slot0(h, sets[0]).rev_nat_index
        for _ in range(3000):
            first = snapshot()
            s0 = Lb4Service.from_buffer_copy(first[0])
            base = abi.LB_BANK_STRIDE if s0.bank else 0
            slots = [svc_map.lookup(Lb6Key.make(VIP6, PORT, 6, base + i)) for i in range(1, s0.count + 1)]
            try:
                tab = maglev_map.read_table(mg, rev_nat, s0.bank)
            except NotFoundError:
                continue   # the table was replaced and freed while being read
            present = {i for i in np.unique(tab).tolist() if be_map.lookup(i) is not None}
            if snapshot() != first:
                continue   # the writer moved on meanwhile: this read proves nothing
            stable += 1
            ids = {Lb4Service.from_buffer_copy(x).backend_id for x in slots if x is not None}
            assert None not in slots, f"slot 0 names {s0.count} slots of bank {s0.bank}, some are missing"
            assert len(tab) == s0.maglev_size, "the Maglev table does not have slot 0's size"
            assert set(np.unique(tab).tolist()) == ids == present, "the table names backends not there"
            sizes.add(s0.maglev_size)
    assert stable >= 100 and sizes == {251, 257}, (stable, sizes)


def test_removed_ipv6_backend_drains_while_an_ipv6_flow_uses_it(pinned) -> None:
    h, root = pinned
    with table(root) as t:
        v = t.upsert(svc(f"[{A}]:8000", f"[{B}]:8000"))
    bid = {b.backend.address: b.id for b in v.backends}[B]
    flow = CtTuple6.make(VIP6, "2001:db8:64::24", PORT, 40000, 6, abi.TUPLE_F_OUT | abi.TUPLE_F_SERVICE)
    h.coll.maps[abi.CT6_MAP_TCP].update(flow, CtEntry(backend_id=bid, rev_nat_index=v.rev_nat, lifetime=99))
    with table(root) as t:
        t.upsert(svc(f"[{A}]:8000"))
        assert t.draining() == {f"[{B}]:8000/tcp": bid}
    assert bid in backends6(h)
    listing = run_cli(root, "svc", "list")
    assert f"draining backends (removed, still used by established flows): [{B}]:8000/tcp" in listing.stdout
    assert json.loads(run_cli(root, "svc", "list", "-o", "json").stdout)["draining_backends"] == \
        {f"[{B}]:8000/tcp": bid}
    h.coll.maps[abi.CT6_MAP_TCP].clear()
    with table(root) as t:
        t.upsert(svc(f"[{A}]:8000", affinity_timeout=5))
        assert t.draining() == {}
    assert {bytes_to_ip6(b.address) for b in backends6(h).values()} == {A}


def test_local_and_remote_ipv6_backends(pinned) -> None:
    h, root = pinned
    h.coll.maps[abi.EP6_MAP].update(ip6_to_bytes(A), bytes(16))
    lbs = svc(f"[{A}]:8000", "[2001:db8:65::9]:8000,node=2001:db8:7::2", name="lb6",
              type=ServiceType.LOAD_BALANCER, address="2001:db8:190::17")
    with lb.ServiceTable(root) as t:      # local addresses from the pinned endpoint maps
        v = t.upsert(lbs)
    assert slot0(h, lbs).flags == abi.LB_SVC_F_EXTERNAL | abi.LB_SVC_F_LOADBALANCER
    assert {b.backend.address: b.remote for b in v.backends} == {A: False, "2001:db8:65::9": True}
    be = {bytes_to_ip6(b.address): b for b in backends6(h).values()}
    assert be["2001:db8:65::9"].flags == abi.LB_BACKEND_F_REMOTE
    assert bytes_to_ip6(be["2001:db8:65::9"].node_addr) == "2001:db8:7::2"
    assert be[A].flags == 0 and bytes(be[A].node_addr) == bytes(16)
    # A node of an IPv4 underlay: stored IPv4-mapped, the datapath tunnels over IPv4 (dsr.h).
    with lb.ServiceTable(root) as t:
        t.upsert(svc(f"[{A}]:8000", "[2001:db8:65::9]:8000,node=192.168.7.2", name="lb6",
                     type=ServiceType.LOAD_BALANCER, address="2001:db8:190::17"))
    be = {bytes_to_ip6(b.address): b for b in backends6(h).values()}
    assert bytes(be["2001:db8:65::9"].node_addr) == bytes(10) + b"\xff\xff" + bytes([192, 168, 7, 2])


def test_ipv4_node_for_an_ipv6_service_only() -> None:
    """The one mix of families: an IPv6 service's backend on an IPv4 node; an IPv4 service's node is IPv4."""
    ok = config.parse(f'[[services]]\nname = "web6"\naddress = "{VIP6}"\nport = 80\n'
                      f'backends = ["[{A}]:80,node=192.168.7.2", {{ address = "{B}", port = 80, node = "10.0.0.1" }}]\n')
    assert [b.node for b in ok.services[0].backends] == ["192.168.7.2", "10.0.0.1"]
    with pytest.raises(ConfigError) as e:
        config.parse(f'[[services]]\nname = "web"\naddress = "{VIP4}"\nport = 80\n'
                     f'backends = ["{A4}:80,node=2001:db8:7::2"]\n')
    assert e.value.key == "services[0].backends[0]" and "node 2001:db8:7::2 is IPv6" in str(e.value)


def run_cli(root: str, *argv: str, kill: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != crashpoints.ENV}
    env["PYTHONPATH"] = str(ROOT / "loader")
    if kill:
        env[crashpoints.ENV] = kill
    return subprocess.run([sys.executable, "-m", "tuplet.cli", "--pin-root", root, *argv], env=env,
                          capture_output=True, text=True, timeout=120)


def test_svc_cli_with_ipv6_list_text_and_json(pinned) -> None:
    h, root = pinned
    r = run_cli(root, "svc", "add", "web6", "--address", "2001:DB8:68:0::A", "--port", "80", "--maglev-size", "251",
                "--backend", f"[{A}]:8000", "--backend", f"[{B}]:8000,weight=3")
    assert r.returncode == 0, r.stderr
    r = run_cli(root, "svc", "update", "web6", "--add-backend", f"[{C3}]:8000", "--remove-backend", f"[{A}]:8000")
    assert r.returncode == 0, r.stderr
    text = run_cli(root, "svc", "list").stdout
    assert f"[{VIP6}]:80/tcp" in text and f"[{B}]:8000" in text and f"[{C3}]:8000" in text, text
    assert f"[{A}]:8000" not in text and "weight 3" in text and "%" in text
    out = json.loads(run_cli(root, "svc", "list", "-o", "json").stdout)
    (s,) = out["services"]
    assert (s["address"], s["port"], s["live"], s["maglev_size"]) == (VIP6, 80, True, 251)
    assert {b["address"]: b["maglev_slots"] for b in s["backends"]}.keys() == {B, C3}
    assert sum(b["maglev_slots"] for b in s["backends"]) == 251
    assert abs(sum(b["share"] for b in s["backends"]) - 1.0) < 1e-9
    # Bad input: refused with the argument named, nothing written.
    before = dump(h, (*LB6_MAPS, *LB4_MAPS))
    for argv, needle in [
        (("update", "web6", "--add-backend", f"{A4}:8000"), "is IPv4, but the service address"),
        (("add", "x", "--address", VIP4, "--port", "81", "--backend", f"{A4}:8000,node=2001:db8:7::2"),
         "node 2001:db8:7::2 is IPv6"),
        (("update", "web6", "--add-backend", f"{A}:8000"), "must be bracketed"),
        (("update", "web6", "--add-backend", f"[{A}:8000"), "[ADDRESS]:PORT"),
        (("update", "web6", "--add-backend", f"[{A}]:65536"), "port number 1-65535"),
        (("add", "x", "--address", f"[{VIP6}]", "--port", "81"), "without brackets"),
        (("add", "x", "--address", VIP4, "--port", "81", "--backend", f"[{A}]:8000"), "is IPv6, but"),
    ]:
        r = run_cli(root, "svc", *argv)
        assert r.returncode == 2 and needle in r.stderr, (argv, r.stderr)
    assert dump(h, (*LB6_MAPS, *LB4_MAPS)) == before


@pytest.mark.parametrize("point", ["lb.bank-written", "lb.committed"])
def test_killed_ipv6_writes_are_undone_by_the_next_writer(pinned, point) -> None:
    h, root = pinned
    assert run_cli(root, "svc", "add", "web6", "--address", VIP6, "--port", "80",
                   "--backend", f"[{A}]:8000", "--backend", f"[{B}]:8000").returncode == 0
    r = run_cli(root, "svc", "update", "web6", "--backend", f"[{C3}]:8000", kill=point)
    assert r.returncode == -9, r.stderr
    check_services_as_registered(h, root)
    # A new service killed (nothing left to recover before it: the listing above recovered).
    r = run_cli(root, "svc", "add", "new6", "--address", VIP6, "--port", "81", "--backend", f"[{C3}]:8000",
                kill=point)
    assert r.returncode == -9, r.stderr
    check_services_as_registered(h, root)


def check_services_as_registered(h: LxcHarness, root: str) -> None:
    """After a killed write, the next command finds web6 as the last completed one left it."""
    out = json.loads(run_cli(root, "svc", "list", "-o", "json").stdout)
    assert {s["name"]: sorted(b["address"] for b in s["backends"]) for s in out["services"]} == {"web6": [B, A]}
    assert not paths.services_path(root).with_suffix(".dirty").exists()
    assert {k.dport for k in keys6(h)} == {Lb6Key.make(VIP6, 80, 6).dport}, "a half-written service is left"
    assert slot0(h, svc(name="web6")).count == 2 and len(keys6(h)) == 3, "the other bank was not cleared"
    reg = json.loads(paths.services_path(root).read_text())
    assert set(backends6(h)) == set(reg["backends"].values()), "backend entries the registry does not know"
    assert len(list(h.coll.maps[abi.REV_NAT6_MAP].keys())) == 1 and len(list(h.coll.maps[abi.MAGLEV_MAP].keys())) == 1


@pytest.mark.parametrize("backend,key,needle", [
    (f'"{A4}:80"', "services[0].backends[0]", "address 10.64.0.98 is IPv4, but the service address"),
    (f'"{A}:80"', "services[0].backends[0]", "must be bracketed"),
    (f'"[{A}:80"', "services[0].backends[0]", "[ADDRESS]:PORT"),
    (f'"[{A}]80"', "services[0].backends[0]", "[ADDRESS]:PORT"),
    (f'"[{A}]:80]"', "services[0].backends[0]", "[ADDRESS]:PORT"),
    (f'"[{A4}]:80"', "services[0].backends[0]", "only an IPv6 address is bracketed"),
    (f'"[{A}]:0"', "services[0].backends[0]", "port number 1-65535"),
    (f'"[{A}]:65536"', "services[0].backends[0]", "port number 1-65535"),
    ('"[ff02::1]:80"', "services[0].backends[0]", "cannot be used"),
    (f'{{ address = "[{A}]", port = 80 }}', "services[0].backends[0].address", "without brackets"),
])
def test_bad_ipv6_service_config_names_the_key(backend: str, key: str, needle: str) -> None:
    doc = f'[[services]]\nname = "web6"\naddress = "{VIP6}"\nport = 80\nbackends = [{backend}]\n'
    with pytest.raises(ConfigError) as e:
        config.parse(doc)
    assert e.value.key == key and needle in str(e.value), str(e.value)


def test_ipv6_config_round_trip_and_canonical_maglev_names() -> None:
    doc = """
[[services]]
name = "web6"
type = "LoadBalancer"
address = "2001:DB8:68:0:0:0:0:A"
port = 443
backends = ["[2001:db8:64:0::62]:8000,weight=2", { address = "2001:DB8:64::40", port = 8000, node = "2001:db8:7::2" }]
"""
    (s,) = config.parse(doc).services
    assert (s.address, s.family, s.describe_frontend()) == (VIP6, 6, f"[{VIP6}]:443/tcp")
    assert [b.endpoint for b in s.backends] == [f"[{A}]:8000", f"[{B}]:8000"]
    assert [b.describe() for b in s.backends] == [f"[{A}]:8000,weight=2", f"[{B}]:8000,node=2001:db8:7::2"]
    # What `svc list -o json` and the registry write parses back to the same service.
    assert Service.from_json(json.loads(json.dumps(s.to_json()))) == s
    back = parse_services([{"name": s.name, "type": s.type.value, "address": s.address, "port": s.port,
                            "backends": [b.describe() for b in s.backends]}])
    assert back == (s,)
    # The Maglev permutation hashes the canonical bracketed name: spelled differently, the same table.
    spelled = parse_backend("[2001:0db8:0064:0000:0000:0000:0000:0062]:8000", "b")
    assert spelled.endpoint == f"[{A}]:8000"
    names = [b.endpoint for b in s.backends]
    assert (maglev.build_index_table(names, 251, [1, 1]) ==
            maglev.build_index_table([spelled.endpoint, names[1]], 251, [1, 1])).all()
