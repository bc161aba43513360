"""Both datapath objects (pod side and node NIC side) loaded without pins, sharing
their maps, for running service packets through BPF_PROG_TEST_RUN."""
from __future__ import annotations

import os
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from lxc_harness import MAC_A, MAC_B, TC_ACT_OK, LxcHarness, Verdict
from tuplet.bpf import _libbpf as C
from tuplet.bpf.libbpf import check, cstr
from tuplet.bpf.objects import Collection
from tuplet.bpf.programs import Program
from tuplet.datapath import metrics
from tuplet.datapath.abi import EXTERNAL_MAP, OBJ_HOST, OBJ_LXC
from tuplet.datapath.layouts import Lb4Key, Lb4Service, Lb6Key
from tuplet.datapath.paths import object_dir
from tuplet.lb import families, maglev
from tuplet.lb.families import Family
from tuplet.lb.model import Service, ServiceType, parse_backend
from tuplet.lb.writer import ServiceTable
from tuplet.node import state
from tuplet.node.apply import open_object
from tuplet.node.config import NodeConfig

SERVICES = "tpl_lb4_services_v1"
BACKENDS = "tpl_lb4_backends_v1"
REV_NAT = "tpl_lb4_reverse_nat_v1"
MAGLEV = "tpl_lb4_maglev_v2"
AFFINITY = "tpl_lb4_affinity_v1"

F_EXTERNAL, F_NODEPORT, F_LOADBALANCER, F_AFFINITY = 1, 2, 4, 8
BACKEND_F_REMOTE = 1
BANK_STRIDE = 0x8000


@contextmanager
def pinned_maps(h: LxcHarness, pin_root: str, names: Iterable[str]) -> Iterator[None]:
    """Pin the harness's maps ``names`` under pin_root (as apply would) for the control
    plane to open; closes the harness and removes the pins and node state after."""
    try:
        os.makedirs(pin_root, exist_ok=True)
        for name in names:
            check(C.bpf_obj_pin(h.coll.maps[name].fd, cstr(f"{pin_root}/{name}")), name, "pin")
        yield
    finally:
        h.close()
        state.remove(pin_root)


@contextmanager
def flipping(open_table: Callable[[], ServiceTable], services: Sequence[Service]) -> Iterator[None]:
    """services[0] written, then, while the block runs, a thread writing services[1],
    services[0], services[1], ... (one table, opened once); what the writer raised is
    raised after the block."""
    with open_table() as t:
        t.upsert(services[0])
    stop = threading.Event()
    errors: list[BaseException] = []

    def flip() -> None:
        try:
            i = 1
            with open_table() as t:
                while not stop.is_set():
                    t.upsert(services[i % len(services)])
                    i += 1
        except BaseException as e:   # reported below
            errors.append(e)

    writer = threading.Thread(target=flip)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()
    assert not errors, errors


def new_flows(h: LxcHarness, frames: Iterable[bytes]) -> Counter[str]:
    """Run each frame (a pod's first packet to a service) through cil_from_container:
    how many went to each destination. None may be dropped."""
    seen: Counter[str] = Counter()
    prog = h.coll.programs["cil_from_container"]
    for i, frame in enumerate(frames):
        res = prog.test_run(frame)
        assert res.retval == TC_ACT_OK, f"packet {i} dropped during a service change"
        seen[l4_of(res.data)[2]] += 1
    return seen


def cli_service(address: str, port: int, *backends: str, name: str, m: int | None = 251, **kw: Any) -> Service:
    """A service as `tuplet svc add` makes it (a ClusterIP unless type= says otherwise)."""
    return Service(name=name, type=kw.pop("type", ServiceType.CLUSTER_IP), address=address, port=port,
                   backends=tuple(parse_backend(b, "b") for b in backends), maglev_size=m, source="cli", **kw)


def slot0(h: LxcHarness, s: Service) -> Lb4Service:
    """Slot 0 of service s, read from its family's service map."""
    fam = families.of(s.address)
    raw = h.coll.maps[fam.services_map].lookup(fam.key(s.address, s.port, s.proto))
    assert raw is not None
    return Lb4Service.from_buffer_copy(raw)


def service_keys(h: LxcHarness, fam: Family = families.V4) -> list[Lb4Key | Lb6Key]:
    return [fam.key_cls.from_buffer_copy(k) for k in h.coll.maps[fam.services_map].keys()]


@dataclass(frozen=True)
class Svc:
    """What a test programs: a service and its backends ((address, port, remote) by id)."""

    address: str
    port: int
    proto: int
    rev_nat: int
    backends: dict[int, tuple[str, int, bool]]
    flags: int = 0
    affinity_timeout: int = 0
    maglev_size: int = 251
    bank: int = 0


def load_on_maps(coll: Collection, obj: str, consts: dict[str, int], obj_dir: Path | None = None) -> Collection:
    """Object obj (from obj_dir, default the build under test) loaded on coll's maps, with consts."""
    spec = open_object(obj, NodeConfig(), pin_root=None, obj_dir=obj_dir)
    try:
        for name in spec.maps:
            if name in coll.maps and not name.startswith("."):
                spec.reuse_map(name, coll.maps[name])
        for k, v in consts.items():
            spec.set_const(k, v)
        return spec.load()
    finally:
        spec.close()


class LbHarness(LxcHarness):
    """The pod-side harness plus bpf_host.o on the same maps, and a raw service writer."""

    def __init__(self, coll: Collection, host: Collection) -> None:
        super().__init__(coll)
        self.host = host
        obj = str(object_dir() / OBJ_LXC)
        self.dirs = metrics.direction_names(obj)

    @classmethod
    def load_both(cls, consts: dict[str, int] | None = None, obj_dir: Path | None = None,
                  sizes: dict[str, int] | None = None) -> "LbHarness":
        """Both objects (from obj_dir, default the build under test) on shared maps."""
        lxc = LxcHarness.load(consts={"ct_accounting": 0, **(consts or {})}, obj_dir=obj_dir, sizes=sizes)
        try:
            host = load_on_maps(lxc.coll, OBJ_HOST, {"ct_accounting": 0, **(consts or {})}, obj_dir)
        except BaseException:
            lxc.close()
            raise
        return cls(lxc.coll, host)

    def close(self) -> None:
        self.host.close()
        super().close()

    def _counts(self) -> dict[tuple[str, str], int]:
        return {(c.reason, c.direction): c.packets
                for c in metrics.read(self.coll.maps["tpl_metrics_v2"], self.names, self.dirs)}

    def run_raw(self, prog: str, packet: bytes) -> bytes:
        """Run one packet, nothing else (no counter reads): the packet as the program left it.
        For steps that must be quick (tests/test_gc_race.py's refresh inside the GC stall)."""
        coll = self.host if prog in self.host.programs else self.coll
        return coll.programs[prog].test_run(packet).data

    def run_out(self, prog: str, packet: bytes) -> tuple[Verdict, bytes]:
        """Run one packet; the verdict and the packet as the program left it."""
        coll = self.host if prog in self.host.programs else self.coll
        return self.run_program(coll.programs[prog], packet)

    def run_program(self, program: Program, packet: bytes) -> tuple[Verdict, bytes]:
        """run_out for a program of any object on these maps (one that counts its verdict)."""
        before = self._counts()
        res = program.test_run(packet)
        after = self._counts()
        changed = [k for k in after if after[k] != before.get(k, 0)]
        assert len(changed) == 1, f"expected exactly one counter to move, got {changed}"
        return Verdict(res.retval, changed[0][0]), res.data

    # --- services, written the way the agent does: slots, then the Maglev table, then slot 0 ---

    def program(self, s: Svc) -> None:
        """Service s in its family's maps (an IPv6 address: the tpl_lb6_* ones)."""
        m = self.coll.maps
        fam = families.of(s.address)
        for bid, (addr, port, remote) in s.backends.items():
            m[fam.backends_map].update(bid, fam.backend(addr, port, s.proto, BACKEND_F_REMOTE if remote else 0, None))
        base = BANK_STRIDE if s.bank else 0
        for i, bid in enumerate(s.backends, start=1):
            m[fam.services_map].update(fam.key(s.address, s.port, s.proto, base + i), Lb4Service(backend_id=bid))
        ids = list(s.backends)
        if ids:
            table = maglev.build_table([str(i) for i in ids], s.maglev_size)
            inner = self._inner_map([ids[i] for i in table])
            m[MAGLEV].update(struct.pack("<HBB", s.rev_nat, s.bank, 0), inner.fd.to_bytes(4, "little"))
            inner.close()
        m[fam.rev_nat_map].update(s.rev_nat.to_bytes(2, "little"), fam.rev_nat(s.address, s.port))
        if s.flags & F_EXTERNAL:   # as the writer: cil_to_netdev probes for replies from now on
            m[EXTERNAL_MAP].update(0, struct.pack("<I", 1))
        m[fam.services_map].update(fam.key(s.address, s.port, s.proto),
                                   Lb4Service(backend_id=0, affinity_timeout=s.affinity_timeout,
                                              maglev_size=s.maglev_size, count=len(s.backends),
                                              rev_nat_index=s.rev_nat,
                                              flags=s.flags | (F_AFFINITY if s.affinity_timeout else 0),
                                              bank=s.bank))

    def remove_backend(self, bid: int) -> None:
        self.coll.maps[BACKENDS].delete(bid)

    def _inner_map(self, ids: list[int]):
        import ctypes

        from tuplet.bpf import _libbpf as C
        from tuplet.bpf.libbpf import check, opts
        from tuplet.bpf.maps import Map

        o = opts(C.bpf_map_create_opts, map_flags=4096)
        fd = check(C.bpf_map_create(C.BPF_MAP_TYPE_ARRAY, b"test_maglev", 4, 4, len(ids), ctypes.byref(o)),
                   "test Maglev table", "create")
        inner = Map(fd, "test_maglev")
        keys = struct.pack(f"<{len(ids)}I", *range(len(ids)))
        inner.update_batch(keys, struct.pack(f"<{len(ids)}I", *ids), len(ids))
        return inner


def tcp4(src: str, sport: int, dst: str, dport: int, flags: str, payload: bytes = b"") -> bytes:
    p: Packet = Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst) / TCP(sport=sport, dport=dport, flags=flags)
    return bytes(p / Raw(payload)) if payload else bytes(p)


def udp4(src: str, sport: int, dst: str, dport: int, payload: bytes = b"x", csum: int | None = None) -> bytes:
    u = UDP(sport=sport, dport=dport) if csum is None else UDP(sport=sport, dport=dport, chksum=csum)
    return bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=src, dst=dst) / u / Raw(payload))


def ip_of(frame: bytes) -> Packet:
    """The IP (IPv4 or IPv6) layer of a frame."""
    p = Ether(frame)
    return p[IPv6] if IPv6 in p else p[IP]


def l4_of(frame: bytes) -> tuple[str, int, str, int]:
    """(source, source port, destination, destination port) of a frame."""
    p = ip_of(frame)
    return p.src, p.payload.sport, p.dst, p.payload.dport


def checksums_ok(frame: bytes) -> bool:
    """Recompute IP (IPv4: IPv6 has no header checksum) and L4 checksums with scapy,
    independently of the datapath."""
    ip = ip_of(frame)
    fresh = type(ip)(bytes(ip))
    if isinstance(fresh, IP):
        del fresh.chksum
    l4 = fresh.payload
    if isinstance(l4, (TCP, UDP)):
        if isinstance(l4, UDP) and ip[UDP].chksum == 0:
            l4 = None
        else:
            del l4.chksum
    rebuilt = type(ip)(bytes(fresh))
    ok = not isinstance(ip, IP) or rebuilt.chksum == ip.chksum
    if l4 is not None and isinstance(rebuilt.payload, (TCP, UDP)):
        ok = ok and rebuilt.payload.chksum == ip.payload.chksum
    return ok
