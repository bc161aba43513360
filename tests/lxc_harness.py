"""Run the pod-side programs on crafted packets (BPF_PROG_TEST_RUN) and read their maps."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    ICMPv6ParamProblem,
    ICMPv6TimeExceeded,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from tuplet.bpf.objects import Collection
from tuplet.conntrack.records import CtRecord, records
from tuplet.datapath import clock, metrics
from tuplet.datapath.abi import (
    CT6_MAP_ANY,
    CT6_MAP_SYN,
    CT6_MAP_TCP,
    CT6_MAPS,
    CT_MAP_ANY,
    CT_MAP_SYN,
    CT_MAP_TCP,
    CT_MAPS,
    EP6_MAP,
    EP_MAP,
    METRICS_MAP,
    NAT6_MAP,
    NAT_MAP,
    OBJ_LXC,
)
from tuplet.datapath.layouts import CtEntry, CtTuple4, CtTuple6, EndpointInfo, ip6_to_bytes, ip_to_be32
from tuplet.datapath.paths import object_dir
from tuplet.node.apply import open_object
from tuplet.node.config import NodeConfig

TC_ACT_OK = 0
TC_ACT_SHOT = 2

MAC_A = "02:00:00:00:00:01"
MAC_B = "02:00:00:00:00:02"


# ICMPv6 errors by type (1 destination unreachable, 2 packet too big, 3 time exceeded, 4 parameter problem).
ICMP6_ERRORS = {1: ICMPv6DestUnreach, 2: ICMPv6PacketTooBig, 3: ICMPv6TimeExceeded, 4: ICMPv6ParamProblem}


def is6(addr: str) -> bool:
    return ":" in addr


def ip_layer(src: str, dst: str) -> Packet:
    """IPv4 or IPv6 by the addresses' family."""
    return IPv6(src=src, dst=dst) if is6(src) else IP(src=src, dst=dst)


def tcp(src: str, sport: int, dst: str, dport: int, flags: str, payload: bytes = b"") -> bytes:
    p: Packet = Ether(src=MAC_A, dst=MAC_B) / ip_layer(src, dst) / TCP(sport=sport, dport=dport, flags=flags)
    if payload:
        p = p / Raw(payload)
    return bytes(p)


def udp(src: str, sport: int, dst: str, dport: int, payload: bytes = b"x") -> bytes:
    return bytes(Ether(src=MAC_A, dst=MAC_B) / ip_layer(src, dst) / UDP(sport=sport, dport=dport) / Raw(payload))


def icmp_echo(src: str, dst: str, ident: int, reply: bool = False) -> bytes:
    """An ICMP (IPv6: ICMPv6) echo request or reply."""
    if is6(src):
        echo: Packet = (ICMPv6EchoReply if reply else ICMPv6EchoRequest)(id=ident, seq=1)
    else:
        echo = ICMP(type=0 if reply else 8, id=ident, seq=1)
    return bytes(Ether(src=MAC_A, dst=MAC_B) / ip_layer(src, dst) / echo / Raw(b"ping"))


def icmp_error(src: str, dst: str, inner: bytes, type_: int | None = None, code: int = 3) -> bytes:
    """An ICMP error from src to dst quoting ``inner`` (an Ethernet frame; its IP part is
    quoted). IPv6: an ICMPv6 error of type_ (ICMP6_ERRORS; default destination unreachable)."""
    if is6(src):
        err: Packet = ICMP6_ERRORS[type_ or 1](code=code) / Raw(bytes(Ether(inner)[IPv6])[:48])
    else:
        err = ICMP(type=type_ or 3, code=code) / Raw(bytes(Ether(inner)[IP])[:28])
    return bytes(Ether(src=MAC_A, dst=MAC_B) / ip_layer(src, dst) / err)


@dataclass
class Verdict:
    retval: int
    reason: str


class LxcHarness:
    """bpf_lxc.o loaded without pins; ``egress``/``ingress`` run one packet and say why."""

    def __init__(self, coll: Collection) -> None:
        self.coll = coll
        self.names = metrics.reason_names(str(object_dir() / OBJ_LXC))
        self._last: dict[tuple[str, str], int] = {}

    @classmethod
    def load(cls, cfg: NodeConfig | None = None, consts: dict[str, int] | None = None,
             obj_dir: Path | None = None, sizes: dict[str, int] | None = None) -> "LxcHarness":
        """bpf_lxc.o from obj_dir (default: the build under test), small tables unless ``sizes``."""
        cfg = cfg or NodeConfig()
        spec = open_object(OBJ_LXC, cfg, pin_root=None, obj_dir=obj_dir)
        small = {name: 1024 if name in (CT_MAP_SYN, CT6_MAP_SYN) else 4096 for name in (*CT_MAPS, *CT6_MAPS, NAT_MAP, NAT6_MAP)}
        for name, n in {**small, **(sizes or {})}.items():
            if name in spec.maps:   # an older build (--compare) may lack the IPv6 tables
                spec.set_max_entries(name, n)
        for k, v in (consts or {}).items():
            spec.set_const(k, v)
        return cls(spec.load())

    def close(self) -> None:
        self.coll.close()

    # --- running packets -------------------------------------------------------------------

    def run(self, prog: str, packet: bytes) -> Verdict:
        before = self._counts()
        res = self.coll.programs[prog].test_run(packet)
        after = self._counts()
        changed = [k for k in after if after[k] != before.get(k, 0)]
        assert len(changed) == 1, f"expected exactly one counter to move, got {changed}"
        return Verdict(res.retval, changed[0][0])

    def egress(self, packet: bytes) -> Verdict:
        """A packet the pod sends (cil_from_container)."""
        return self.run("cil_from_container", packet)

    def ingress(self, packet: bytes) -> Verdict:
        """A packet the pod receives (cil_to_container)."""
        return self.run("cil_to_container", packet)

    def _counts(self) -> dict[tuple[str, str], int]:
        return {(c.reason, c.direction): c.packets
                for c in metrics.read(self.coll.maps[METRICS_MAP], self.names)}

    # --- clock and maps --------------------------------------------------------------------

    def now(self) -> int:
        """The datapath's clock as the programs see it (with the test offset; a u32, it may wrap)."""
        return (int(time.clock_gettime(time.CLOCK_MONOTONIC)) + self.coll.get_global(".bss", clock.OFFSET_VAR)) \
            % clock.U32

    def advance(self, seconds: int) -> None:
        off = self.coll.get_global(".bss", clock.OFFSET_VAR)
        self.coll.set_global(".bss", clock.OFFSET_VAR, (off + seconds) % clock.U32)

    def entries(self) -> list[CtRecord]:
        """Every entry, established TCP, handshake-table TCP and non-TCP (as `ct list`)."""
        return [*records(self.coll.maps[CT_MAP_TCP]), *records(self.coll.maps[CT_MAP_SYN]),
                *records(self.coll.maps[CT_MAP_ANY])]

    def entries6(self) -> list[CtRecord]:
        """entries() of the IPv6 tables."""
        return [r for name in (CT6_MAP_TCP, CT6_MAP_SYN, CT6_MAP_ANY) for r in records(self.coll.maps[name])]

    def table_of(self, daddr: str, saddr: str, dport: int, sport: int, proto: int, flags: int) -> str | None:
        """Which table holds the entry under this key (None: none); IPv6 addresses: the IPv6 tables."""
        key = (CtTuple6 if is6(daddr) else CtTuple4).make(daddr, saddr, dport, sport, proto, flags)
        if is6(daddr):
            names = (CT6_MAP_TCP, CT6_MAP_SYN) if proto == 6 else (CT6_MAP_ANY,)
        else:
            names = (CT_MAP_TCP, CT_MAP_SYN) if proto == 6 else (CT_MAP_ANY,)
        for name in names:
            if self.coll.maps[name].lookup(key):
                return name
        return None

    def entry(self, daddr: str, saddr: str, dport: int, sport: int, proto: int, flags: int) -> CtEntry | None:
        """The entry under a key given in the map's own naming (see CtTuple4, CtTuple6)."""
        table = self.table_of(daddr, saddr, dport, sport, proto, flags)
        if table is None:
            return None
        key = (CtTuple6 if is6(daddr) else CtTuple4).make(daddr, saddr, dport, sport, proto, flags)
        raw = self.coll.maps[table].lookup(key)
        return CtEntry.from_buffer_copy(raw) if raw else None

    def add_endpoint(self, ip: str, identity: int, ifindex: int = 1) -> None:
        key = bytes(ip6_to_bytes(ip)) if is6(ip) else ip_to_be32(ip).to_bytes(4, "little")
        self.coll.maps[EP6_MAP if is6(ip) else EP_MAP].update(key, EndpointInfo(ifindex=ifindex, sec_id=identity))
