"""Property-based fuzzing (hypothesis) of the datapath programs through BPF_PROG_TEST_RUN.

Random bytes, crafted Ethernet/IPv4 frames (TCP, UDP, ICMP echo and errors, IP options,
fragments, bad lengths, truncations, other ethertypes), Ethernet/IPv6 frames (TCP, UDP,
ICMPv6 echo, errors, neighbour discovery, extension-header chains, fragments, bad lengths,
truncations), mutations of valid frames, and
sequences of packets through all programs with the clock advanced between some of them,
with services programmed so the load-balancing paths run too.

Per packet: the test run succeeds (but for frames the kernel refuses before any program
runs: see refused_by_test_run), the verdict is TC_ACT_OK or TC_ACT_SHOT, exactly one verdict
counter moves and its reason is a name of enum tpl_reason, drops are the DROP_ reasons,
the frame keeps its length, what the programs say they leave untouched is untouched, and
a well-formed frame that was rewritten keeps correct checksums.

After every packet: every conntrack table of the object (found by name and value size)
and the NAT table hold only entries the code can make (see check_maps for each rule and
where in bpf/lib it comes from).
"""
from __future__ import annotations

import ctypes
import errno
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, ICMPv6Unknown, IPv6, IPv6ExtHdrDestOpt
from scapy.layers.l2 import Ether
from scapy.packet import Raw

import fuzz_packets as fp
from fuzz_packets import Pkt
from lb_harness import (
    AFFINITY,
    BACKENDS,
    F_EXTERNAL,
    F_LOADBALANCER,
    F_NODEPORT,
    REV_NAT,
    LbHarness,
    Svc,
    checksums_ok,
    load_on_maps,
    tcp4,
    udp4,
)
from lxc_harness import MAC_A, MAC_B, TC_ACT_OK, TC_ACT_SHOT, tcp, udp
from tuplet.core.errors import TupletError
from tuplet.datapath import abi, clock, metrics
from tuplet.datapath.abi import (
    CT_MAP_ANY,
    CT_MAP_SYN,
    METRICS_MAP,
    NAT_MAP,
    OBJ_HOST,
    OBJ_LXC,
    OBJ_OVERLAY,
    TUPLE_F_IN,
    TUPLE_F_OUT,
    TUPLE_F_RELATED,
    TUPLE_F_SERVICE,
)
from tuplet.datapath.layouts import (
    CtEntry,
    CtTuple4,
    CtTuple6,
    Lb4Backend,
    Lb4Service,
    LbAffinityVal,
    Nat4Entry,
    be16,
    be32_to_ip,
    bytes_to_ip6,
)
from tuplet.datapath.paths import object_dir
from tuplet.lb import families

pytestmark = pytest.mark.clock   # again with a near-zero clock in `make test`

# Every (object, program) fuzzed (the harness loads any further object on the same maps;
# the single-packet tests are parametrised over this list and the sequences' single-packet
# steps draw from it; a path through it can go in _PATHS). test_run gives cil_from_overlay no
# tunnel metadata, so it sees no Geneve option here: its option parsing is tested in the VM.
PROGRAMS = [
    (OBJ_LXC, "cil_from_container"),
    (OBJ_LXC, "cil_to_container"),
    (OBJ_HOST, "cil_from_netdev"),
    (OBJ_HOST, "cil_to_netdev"),
    (OBJ_OVERLAY, "cil_from_overlay"),
]

TCP_P, UDP_P, ICMP_P, ICMP6_P = 6, 17, 1, 58
ETH_HLEN = 14
SYN_MAPS = (CT_MAP_SYN, abi.CT6_MAP_SYN)
TUPLE_F_ALL = TUPLE_F_OUT | TUPLE_F_IN | TUPLE_F_RELATED | TUPLE_F_SERVICE
WORLD = abi.TPL_IDENTITY_WORLD   # the identity of a non-endpoint source
LIFETIMES = ("ct_lifetime_tcp", "ct_lifetime_nontcp", "ct_service_lifetime_tcp",
             "ct_service_lifetime_nontcp", "ct_syn_timeout", "ct_close_timeout")
# Reasons whose packets the programs promise to leave as they are (bpf_lxc.c, bpf_host.c).
UNTOUCHED = {"PASS_NOT_IPV4", "PASS_FRAGMENT", "PASS_UNTRACKED_PROTO", "PASS_ICMP6_UNTRACKED", "PASS_NETDEV_UNTRACKED",
             "PASS_OVERLAY_UNTRACKED"}
# Entry flag bits nothing in bpf/ ever sets (copied from entries or zero-initialised only).
NEVER_SET = ("reserved1", "lb_loopback", "proxy_redirect", "dsr_internal", "from_l7lb", "reserved2",
             "from_tunnel", "reserved3")
SLACK = 1            # seconds: the programs' coarse clock may lag the test's by a tick

SERVICES_PROGRAMMED = (
    Svc(fp.VIP, 80, TCP_P, 15, {19: (fp.POD2, 8000, False), 20: (fp.POD3, 8000, False)}),        # ClusterIP
    Svc(fp.VIP, 53, UDP_P, 7, {5: (fp.POD2, 5353, False)}),
    Svc(fp.LB_VIP, 80, TCP_P, 24, {24: (fp.LB_POD, 8000, False)}, flags=F_EXTERNAL | F_LOADBALANCER),
    Svc(fp.NODE_IP, 30080, UDP_P, 30, {31: (fp.LB_POD, 9000, False)}, flags=F_EXTERNAL | F_NODEPORT),
    Svc(fp.NODE_IP, 30080, TCP_P, 32, {33: (fp.LB_POD, 8000, False)}, flags=F_EXTERNAL | F_NODEPORT),
    Svc(fp.REMOTE_VIP, 80, TCP_P, 40, {41: (fp.REMOTE_BACKEND, 8000, True)}, flags=F_EXTERNAL | F_LOADBALANCER),
    Svc(fp.EMPTY_VIP, 80, TCP_P, 50, {}),                                                         # no backends
    Svc(fp.NOREV_VIP, 80, TCP_P, 60, {61: (fp.POD3, 9000, False)}),                               # rev-NAT deleted
    Svc(fp.AFF_VIP, 80, TCP_P, 70, {71: (fp.POD1, 8000, False), 72: (fp.POD2, 8000, False)},
        flags=F_EXTERNAL | F_LOADBALANCER, affinity_timeout=30),
    # IPv6 on the NIC: a LoadBalancer and a NodePort with a local backend, a LoadBalancer with a remote one.
    Svc(fp.LB_VIP_6, 80, TCP_P, 80, {81: (fp.LB_POD_6, 8000, False)}, flags=F_EXTERNAL | F_LOADBALANCER),
    Svc(fp.NODE_IP_6, 30080, UDP_P, 82, {83: (fp.LB_POD_6, 9000, False)}, flags=F_EXTERNAL | F_NODEPORT),
    Svc(fp.REMOTE_VIP_6, 80, TCP_P, 84, {85: (fp.REMOTE_BACKEND_6, 8000, True)}, flags=F_EXTERNAL | F_LOADBALANCER),
)
ENDPOINTS = {fp.POD1: 3096, fp.POD2: 4000, fp.POD3: 4001, fp.LB_POD: 4002,
             fp.POD1_6: 3096, fp.POD2_6: 4000, fp.POD3_6: 4001, fp.LB_POD_6: 4002}


def refused_by_test_run(data: bytes) -> bool:
    """Frames BPF_PROG_TEST_RUN refuses with EINVAL before any program runs: shorter than
    an Ethernet header, or an IPv4 (IPv6) ethertype without a whole IPv4 (IPv6) header
    behind it (net/bpf/test_run.c). Such frames can reach a real TC hook, but cannot be
    fuzzed this way."""
    if len(data) < ETH_HLEN:
        return True
    ethertype = data[12:14]
    return (ethertype == b"\x08\x00" and len(data) < ETH_HLEN + 20) or \
        (ethertype == b"\x86\xdd" and len(data) < ETH_HLEN + 40)


class FuzzHarness:
    """The objects of PROGRAMS loaded without pins on one set of maps, services and
    endpoints programmed; reset() empties the state tables and rewinds the clock."""

    def __init__(self, consts: dict[str, int] | None = None) -> None:
        # Per-entry counters on (the production default), so the counters are fuzzed too.
        self.consts = {"ct_accounting": 1, **(consts or {})}
        self.lb = LbHarness.load_both(consts=self.consts)
        self.colls = {OBJ_LXC: self.lb.coll, OBJ_HOST: self.lb.host}
        try:
            for obj in dict.fromkeys(o for o, _ in PROGRAMS):
                if obj not in self.colls:
                    self.colls[obj] = self._load_more(obj)
            for obj, prog in PROGRAMS:
                assert prog in self.colls[obj].programs, f"{obj} has no program {prog}"
            self.reasons = {obj: metrics.reason_names(str(object_dir() / obj)) for obj in self.colls}
            self.dirs: dict[int, str] = {}
            for obj in self.colls:
                self.dirs.update(metrics.direction_names(str(object_dir() / obj)))
            maps = self.lb.coll.maps
            self.metrics_map = maps[METRICS_MAP]
            # Every object's conntrack tables, both families (shared by name, so each is walked once).
            self.ct_maps = list({name: m for c in self.colls.values() for name, m in c.maps.items()
                                 if name.startswith("tpl_ct") and m.value_size == ctypes.sizeof(CtEntry)}.values())
            self.nat_map = maps.get(NAT_MAP)
            self.timeouts = {k: self.lb.coll.get_global(".rodata", k) for k in LIFETIMES}
            self.accounting = self.lb.coll.get_global(".rodata", "ct_accounting")
            self.syn_table = self.lb.coll.get_global(".rodata", "ct_syn_table")
            for ip, ident in ENDPOINTS.items():
                self.lb.add_endpoint(ip, ident)
            for s in SERVICES_PROGRAMMED:
                self.lb.program(s)
            maps[REV_NAT].delete((60).to_bytes(2, "little"))    # DROP_REV_NAT_MISSING on its replies
        except BaseException:
            self.close()
            raise
        self.runs = 0
        self.max_len = 0
        self.last = "no packet yet"
        self.t0 = self.now()

    def _load_more(self, obj: str):
        return load_on_maps(self.lb.coll, obj, self.consts)

    def close(self) -> None:
        for obj, c in self.colls.items():
            if obj not in (OBJ_LXC, OBJ_HOST):
                c.close()
        self.lb.close()

    # --- clock and state ------------------------------------------------------------------

    def now(self) -> int:
        return self.lb.now()

    def advance(self, seconds: int) -> None:
        """Every object has its own .bss clock offset: move them together."""
        for c in self.colls.values():
            c.set_global(".bss", clock.OFFSET_VAR, (c.get_global(".bss", clock.OFFSET_VAR) + seconds) % clock.U32)

    def reset(self) -> None:
        for m in [*self.ct_maps, self.lb.coll.maps[AFFINITY], *([self.nat_map] if self.nat_map else [])]:
            m.clear()
        for c in self.colls.values():
            c.set_global(".bss", clock.OFFSET_VAR, clock.test_offset())   # the session's clock
        self.runs = 0
        self.max_len = 0
        self.t0 = self.now()

    # --- running ----------------------------------------------------------------------------

    _RAW_REASONS = {i: i for i in range(abi.TPL_REASON_SLOTS)}

    def _counts(self) -> dict[tuple[int, str], int]:
        # Raw reason numbers: a name is checked against the running object's enum.
        return {(c.reason, c.direction): c.packets for c in metrics.read(self.metrics_map, self._RAW_REASONS, self.dirs)}

    def run(self, obj: str, prog: str, data: bytes) -> tuple[int, str, bytes] | None:
        """Run one frame and check the per-packet properties. None: the kernel refused
        the frame (see refused_by_test_run; the program never ran)."""
        self.last = ctx = f"{prog} on {data.hex()}"
        before = self._counts()
        try:
            res = self.colls[obj].programs[prog].test_run(data)
        except TupletError as e:
            assert refused_by_test_run(data) and e.errno == errno.EINVAL, f"{ctx}: test run failed: {e}"
            assert self._counts() == before, f"{ctx}: a refused test run moved a counter"
            return None
        self.runs += 1
        self.max_len = max(self.max_len, len(data))
        after = self._counts()
        moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert len(moved) == 1 and list(moved.values()) == [1], f"{ctx}: counters moved {moved}"
        (reason_no, _), = moved
        names = self.reasons[obj]
        assert reason_no in names, f"{ctx}: verdict reason {reason_no} is not in enum tpl_reason"
        reason = names[reason_no]
        assert res.retval in (TC_ACT_OK, TC_ACT_SHOT), f"{ctx}: retval {res.retval} ({reason})"
        assert (res.retval == TC_ACT_SHOT) == reason.startswith("DROP_"), f"{ctx}: {reason} -> {res.retval}"
        assert len(res.data) == len(data), f"{ctx}: frame length {len(data)} -> {len(res.data)}"
        if reason in UNTOUCHED:
            assert res.data == data, f"{ctx}: {reason} changed the frame to {res.data.hex()}"
        return res.retval, reason, res.data


def _rewrite_ok(h: FuzzHarness, obj: str, prog: str, pkt: Pkt,
                seen: Counter | None = None) -> tuple[int, bytes] | None:
    """Run pkt and check what it became: (retval, the frame as the program left it), or
    None when the kernel refused the frame."""
    r = h.run(obj, prog, pkt.data)
    if r is None:
        if seen is not None:
            seen[(prog, "REFUSED")] += 1
        return None
    retval, reason, out = r
    if seen is not None:
        seen[(prog, reason)] += 1
    if pkt.wellformed and retval == TC_ACT_OK and out != pkt.data:
        assert checksums_ok(out), f"{h.last}: {reason} rewrote a well-formed frame with bad checksums: {out.hex()}"
    return retval, out


# --- map invariants -------------------------------------------------------------------------

def _describe(name: str, k: CtTuple4 | CtTuple6, e: CtEntry) -> str:
    ip = bytes_to_ip6 if isinstance(k, CtTuple6) else be32_to_ip
    return (f"{name}: daddr={ip(k.daddr)} saddr={ip(k.saddr)} sport={be16(k.sport)} "
            f"dport={be16(k.dport)} nexthdr={k.nexthdr} flags={k.flags:#x} | lifetime={e.lifetime} "
            f"flags={e.flag_word:#06x} {e.flag_names} seen_non_syn={e.seen_non_syn} "
            f"tx={e.tx_flags_seen:#04x}@{e.last_tx_report} rx={e.rx_flags_seen:#04x}@{e.last_rx_report} "
            f"pk={e.packets} by={e.bytes} backend={e.backend_id} revnat={e.rev_nat_index} "
            f"sec={e.src_sec_id} ifindex={e.ifindex}")


def check_maps(h: FuzzHarness, kinds: Counter | None = None) -> None:
    """Every rule below is derived from bpf/lib (conntrack.h, lb.h, nodeport.h, nat_map.h,
    config.h); each problem found is reported with the entry."""
    now = h.now()
    to = h.timeouts

    def during(t: int) -> bool:
        """A time of this example (u32 seconds, compared across the wrap)."""
        return clock.diff(t, h.t0) >= -SLACK and clock.diff(t, now) <= SLACK

    maps = h.lb.coll.maps
    backends = {int.from_bytes(k, "little"): Lb4Backend.from_buffer_copy(v) for k, v in maps[BACKENDS].items()}
    backends6 = {int.from_bytes(k, "little") for k in maps[abi.BACKENDS6_MAP].keys()}
    rev_nats = {Lb4Service.from_buffer_copy(v).rev_nat_index        # one index space for both families
                for fam in families.FAMILIES for k, v in maps[fam.services_map].items()
                if fam.key_cls.from_buffer_copy(k).backend_slot == 0}
    identities = {WORLD, *ENDPOINTS.values()}
    problems: list[str] = []
    where: dict[bytes, str] = {}
    ct_entries: dict[bytes, CtEntry] = {}

    for m in h.ct_maps:
        v6 = m.name in abi.CT6_MAPS
        icmp_p = ICMP6_P if v6 else ICMP_P
        tcp_table = "_any" not in m.name          # ct_map(): TCP in tpl_ct{4,6}_v1 / the handshake tables, the rest in _any
        for raw_k, raw_v in m.items():
            k = (CtTuple6 if v6 else CtTuple4).from_buffer_copy(raw_k)
            e = CtEntry.from_buffer_copy(raw_v)
            bad = []

            def need(cond: bool, rule: str) -> None:
                if not cond:
                    bad.append(rule)

            f = k.flags
            related, service = bool(f & TUPLE_F_RELATED), bool(f & TUPLE_F_SERVICE)
            is_tcp = k.nexthdr == TCP_P
            # A key lives in one table (ct_lookup creates only when no table has it;
            # ct_settle inserts into tpl_ct{4,6}_v1 and deletes from the handshake table).
            need(raw_k not in where, f"key also in {where.get(raw_k)}")
            where[raw_k] = m.name
            ct_entries[raw_k] = e
            # Tuples.
            need(f & ~TUPLE_F_ALL == 0, "undefined TUPLE_F_ bits")
            need(k.nexthdr in (TCP_P, UDP_P, icmp_p), "nexthdr not TCP/UDP/ICMP (IPv6: ICMPv6)")
            need(is_tcp == tcp_table, "protocol in the wrong table")
            need(not service or f == TUPLE_F_SERVICE, "service key with IN/RELATED")   # lb_local
            need(not service or k.nexthdr in (TCP_P, UDP_P), "service entry not TCP/UDP")  # lb_lookup_service
            if related:                           # ct_create_related
                need(k.nexthdr == icmp_p and k.sport == 0 and k.dport == 0, "related entry not ICMP with ports 0")
            elif k.nexthdr == icmp_p:             # ct_lookup: an echo id in one port at most
                need(k.sport == 0 or k.dport == 0, "ICMP entry with both ports")
            # Flag bits.
            for name in NEVER_SET:
                need(getattr(e, name) == 0, f"{name} set")
            need(is_tcp or not (e.rx_closing or e.tx_closing), "closing bits on a non-TCP entry")  # ACTION_CLOSE: TCP
            need(is_tcp or not e.seen_non_syn, "seen_non_syn on a non-TCP entry")                  # ct_update_timeout
            if not is_tcp and not related:        # flags are 0 for every non-TCP packet
                need(e.tx_flags_seen == 0 and e.rx_flags_seen == 0, "TCP flags seen on a non-TCP flow")
            # Service entries: the client's direction only (CT_SERVICE updates tx).
            if service:
                need(e.backend_id in (backends6 if v6 else backends), "service entry's backend is not a backend")
                need(e.rev_nat_index in rev_nats, "service entry's rev-NAT is no service's")
                need(e.src_sec_id == 0 and e.ifindex == 0 and not e.node_port, "service entry with endpoint state")
                need(e.rx_flags_seen == 0 and e.last_rx_report == 0, "service entry with an rx side")
                need(e.rx_closing == e.tx_closing, "service entry half closed")
            else:
                need(e.backend_id == 0, "backend id on a non-service entry")
                need(e.rev_nat_index == 0 or e.rev_nat_index in rev_nats, "rev-NAT index of no service")
                need(e.src_sec_id in identities, "source identity neither an endpoint's nor world")
            # ct_settle runs after every hit of an endpoint entry (__ct_lookup,
            # nodeport_rev_nat4) and promotes it once established: not closing, a non-SYN
            # packet seen, packets seen both ways. (Not checked for service entries:
            # lb_local returns a drop after the hit without settling.)
            need(m.name not in SYN_MAPS or h.syn_table, "handshake table used with ct_syn_table off")
            if m.name in SYN_MAPS and not service:
                need(e.rx_closing or e.tx_closing or not e.seen_non_syn or not e.last_tx_report
                     or not e.last_rx_report, "established entry left in the handshake table")
            if e.node_port:                       # nodeport_lb4: CT_EGRESS entry, no twin
                need(f == TUPLE_F_OUT and k.nexthdr in (TCP_P, UDP_P), "NodePort flag on an odd key")
            # Lifetimes: now + the timeout of the entry's state when last refreshed.
            if not is_tcp:
                longest = to["ct_service_lifetime_nontcp"] if service else to["ct_lifetime_nontcp"]
            elif e.rx_closing and e.tx_closing:
                longest = to["ct_close_timeout"]  # both sides closing: the close timeout
            elif not e.seen_non_syn:
                longest = max(to["ct_syn_timeout"], to["ct_close_timeout"])
            else:
                longest = max(to["ct_syn_timeout"], to["ct_close_timeout"],
                              to["ct_service_lifetime_tcp"] if service else to["ct_lifetime_tcp"])
            ahead = clock.diff(e.lifetime, now)
            need(ahead <= longest + SLACK, f"lifetime {ahead}s ahead, bound {longest}s")
            need(clock.diff(e.lifetime, h.t0) >= min(to.values()) - SLACK, "lifetime before the example began")
            for last in (e.last_tx_report, e.last_rx_report):
                need(last == 0 or during(last), f"report time {last} outside the example")
                need(last == 0 or clock.diff(e.lifetime, last) >= 0, "reported after its lifetime")   # both written
            # Counters (ct_accounting): each run adds at most one packet of its length to an
            # entry; an entry counts the packet that made it, a related twin starts at zero;
            # service entries never count (their packets count on the endpoint entries).
            if h.accounting and not service:
                need((0 if related else 1) <= e.packets <= h.runs, f"packets {e.packets} of {h.runs} runs")
                need(ETH_HLEN * e.packets <= e.bytes <= h.max_len * e.packets, "bytes out of range")
            else:
                need(e.packets == 0 and e.bytes == 0, "counters on a service entry or with ct_accounting off")
            if bad:
                problems.append(f"{_describe(m.name, k, e)}: {'; '.join(bad)}")
            if kinds is not None:
                kinds[(m.name, "SVC" if service else "IN" if f & TUPLE_F_IN else "OUT",
                       {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}.get(k.nexthdr), related, bool(e.node_port))] += 1

    # NAT entries (nat_map.h): keyed by the reply's wire tuple with TUPLE_F_OUT, each owned
    # by the CT_EGRESS entry nat_key_for_ct() maps to it, with NodePort or DSRInternal.
    if h.nat_map is not None:
        for raw_k, raw_v in h.nat_map.items():
            k, v = CtTuple4.from_buffer_copy(raw_k), Nat4Entry.from_buffer_copy(raw_v)
            owner = CtTuple4(daddr=k.daddr, saddr=k.saddr, dport=k.sport, sport=k.dport, nexthdr=k.nexthdr,
                             flags=TUPLE_F_OUT)
            e = ct_entries.get(bytes(owner))
            bad = []
            if k.flags != TUPLE_F_OUT or k.nexthdr not in (TCP_P, UDP_P):
                bad.append("key not an OUT TCP/UDP tuple")
            if e is None or not (e.node_port or e.dsr_internal):
                bad.append("no owning CT_EGRESS entry with NodePort/DSRInternal")
            if not during(v.created):
                bad.append(f"created {v.created} outside the example")
            if bad:
                problems.append(f"NAT {be32_to_ip(k.saddr)}:{be16(k.sport)} -> {be32_to_ip(k.daddr)}:"
                                f"{be16(k.dport)} proto {k.nexthdr} flags {k.flags:#x}: {'; '.join(bad)}")

    # Affinity (lb.h, lb_affinity_update): a backend that existed, a time of this example.
    for raw_k, raw_v in maps[AFFINITY].items():
        v = LbAffinityVal.from_buffer_copy(raw_v)
        if v.backend_id not in backends or not during(v.last_used):
            problems.append(f"affinity {raw_k.hex()}: backend {v.backend_id} last_used {v.last_used}")

    assert not problems, f"map invariants broken after {h.last}:\n" + "\n".join(problems)


# --- fixtures and settings ------------------------------------------------------------------

@pytest.fixture(scope="module")
def fz() -> FuzzHarness:
    h = FuzzHarness()
    yield h
    h.close()


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


PROG_IDS = [p for _, p in PROGRAMS]


def _one(h: FuzzHarness, obj: str, prog: str, pkt: Pkt, seen: Counter) -> None:
    h.reset()
    _rewrite_ok(h, obj, prog, pkt, seen)
    check_maps(h)


# --- single packets -------------------------------------------------------------------------

@pytest.mark.parametrize(("obj", "prog"), PROGRAMS, ids=PROG_IDS)
def test_random_bytes(fz: FuzzHarness, obj: str, prog: str) -> None:
    seen: Counter = Counter()

    @fuzz_settings(200)
    @given(fp.random_bytes())
    @example(Pkt(b"", False, "empty"))
    @example(Pkt(bytes(14), False, "ethertype 0"))
    @example(Pkt(bytes(12) + b"\x08\x00\x4f" + bytes(19), False, "ihl 15 in a 20-byte datagram"))
    def run(pkt: Pkt) -> None:
        _one(fz, obj, prog, pkt, seen)

    run()
    reasons = {r for _, r in seen}
    assert {"REFUSED", "DROP_INVALID_L3", "PASS_NOT_IPV4"} <= reasons, seen


def _cut_l4(frame: bytes, keep: int) -> Pkt:
    """frame's IPv4 datagram cut `keep` bytes into its L4 header, tot_len agreeing."""
    b = bytearray(frame[:34 + keep])
    b[16:18] = (len(b) - 14).to_bytes(2, "big")
    fp.fix_ip_csum(b)
    return Pkt(bytes(b), False, f"cut_l4_{keep}")


# Besides the random ones: one frame per parser verdict, whatever the random draw.
CRAFTED = [
    _cut_l4(tcp4(fp.CLIENT, 40000, fp.LB_VIP, 80, "S"), 12),                                   # short TCP header
    _cut_l4(udp4(fp.CLIENT, 40000, fp.NODE_IP, 30080), 6),                                     # short UDP header
    Pkt(bytes(Ether(src=MAC_A, dst=MAC_B) / IP(src=fp.POD1, dst=fp.POD2, flags="MF", frag=185) /
              Raw(b"f" * 16)), True, "fragment"),
    Pkt(bytes(Ether(src=MAC_A, dst=MAC_B, type=0x86DD)) + bytes(40), False, "ipv6-ish"),
    Pkt(tcp4(fp.POD1, 40000, fp.VIP, 80, "S")[:14] + b"\x44" + tcp4(fp.POD1, 40000, fp.VIP, 80, "S")[15:],
        False, "ihl 4"),
]


@pytest.mark.parametrize(("obj", "prog"), PROGRAMS, ids=PROG_IDS)
def test_crafted_frames(fz: FuzzHarness, obj: str, prog: str) -> None:
    """Valid frames of every kind, malformed IPv4 headers, truncations, other ethertypes."""
    seen: Counter = Counter()

    @fuzz_settings(250)
    @given(st.one_of(fp.ipv4_frames(), fp.flow_frames(), fp.malformed_ipv4(), fp.malformed_ipv4(), fp.non_ipv4()))
    @example(CRAFTED[0])
    @example(CRAFTED[1])
    @example(CRAFTED[2])
    @example(CRAFTED[3])
    @example(CRAFTED[4])
    def run(pkt: Pkt) -> None:
        _one(fz, obj, prog, pkt, seen)

    run()
    reasons = {r for _, r in seen}
    assert {"PASS_NOT_IPV4", "PASS_FRAGMENT", "DROP_INVALID_L3", "DROP_CT_INVALID_HDR"} <= reasons, seen


@pytest.mark.parametrize(("obj", "prog"), PROGRAMS, ids=PROG_IDS)
def test_mutated_frames(fz: FuzzHarness, obj: str, prog: str) -> None:
    seen: Counter = Counter()

    @fuzz_settings(200)
    @given(fp.mutated(st.one_of(fp.ipv4_frames(), fp.flow_frames())))
    def run(pkt: Pkt) -> None:
        _one(fz, obj, prog, pkt, seen)

    run()
    assert len({r for _, r in seen}) >= 3, seen


@pytest.mark.parametrize(("obj", "prog"), PROGRAMS, ids=PROG_IDS)
def test_ipv6_frames(fz: FuzzHarness, obj: str, prog: str) -> None:
    """Valid IPv6 frames of every kind (extension-header chains, fragments, ICMPv6 types),
    malformed and mutated ones: the pod programs track them, the NIC's load-balance IPv6
    services and pass the rest untouched, the overlay's make nothing without an option."""
    seen: Counter = Counter()

    @fuzz_settings(250)
    @given(st.one_of(fp.ipv6_frames(), fp.flow_frames6(), fp.malformed_ipv6(), fp.mutated(fp.ipv6_frames())))
    def run(pkt: Pkt) -> None:
        _one(fz, obj, prog, pkt, seen)

    run()
    reasons = {r for _, r in seen}
    if obj == OBJ_LXC:
        assert {"PASS_CT_NEW", "PASS_FRAGMENT", "PASS_ICMP6_UNTRACKED", "PASS_ICMP_UNRELATED", "DROP_INVALID_L3",
                "DROP_INVALID_EXTHDR", "DROP_CT_INVALID_HDR"} <= reasons, seen
    elif obj == OBJ_HOST:        # IPv6 on the NIC: services, else untouched
        assert {"PASS_NETDEV_UNTRACKED", "DROP_INVALID_L3", "DROP_INVALID_EXTHDR"} <= reasons, seen
    else:                        # no tunnel metadata, no DSR option: nothing made here
        assert {"PASS_OVERLAY_UNTRACKED", "DROP_INVALID_L3"} <= reasons and "PASS_CT_NEW" not in reasons, seen


# --- sequences ------------------------------------------------------------------------------

# ICMPv6 echo classes by ICMP's echo type, and ICMP's error types as ICMPv6's.
_ECHO6 = {8: ICMPv6EchoRequest, 0: ICMPv6EchoReply}
_ERROR6 = {3: 1, 11: 3, 12: 4}


def _l4(frame: bytes):
    """(IP layer, L4 layer) of a frame scapy can read as IPv4, or as IPv6 without extension
    headers; else None."""
    try:
        p = Ether(frame)
    except Exception:           # scapy may refuse garbage outright
        return None
    if isinstance(p.payload, IPv6):
        ip = p[IPv6]
        layers = {TCP_P: (TCP,), UDP_P: (UDP,), ICMP6_P: tuple(_ECHO6.values())}.get(ip.nh)
        if layers is None or not isinstance(ip.payload, layers):
            return None
        return ip, ip.payload
    if not isinstance(p.payload, IP) or p[IP].frag:
        return None
    ip = p[IP]
    layer = {TCP_P: TCP, UDP_P: UDP, ICMP_P: ICMP}.get(ip.proto)
    if layer is None or not isinstance(ip.payload, layer):    # (not the quoted header of an error)
        return None
    return ip, ip.payload


def _echo(l4, reply: bool):
    """The next echo of an ICMP (ICMPv6) echo flow: the same kind, or its answer."""
    if isinstance(l4, (ICMPv6EchoRequest, ICMPv6EchoReply)):
        request = isinstance(l4, ICMPv6EchoRequest)
        return (ICMPv6EchoReply if request == reply else ICMPv6EchoRequest)(id=l4.id, seq=(l4.seq + 1) & 0xFFFF)
    if l4.type not in (0, 8):
        return None
    return ICMP(type=8 - l4.type if reply else l4.type, id=l4.id, seq=(l4.seq + 1) & 0xFFFF)


def _again(frame: bytes, tcp_flags: str | int) -> Pkt | None:
    """Another well-formed packet of a frame's flow, in the same direction."""
    got = _l4(frame)
    if got is None:
        return None
    ip, l4 = got
    if isinstance(l4, TCP):
        l4 = TCP(sport=l4.sport, dport=l4.dport, flags=tcp_flags)
    elif isinstance(l4, UDP):
        l4 = UDP(sport=l4.sport, dport=l4.dport) / Raw(b"a")
    else:
        l4 = _echo(l4, reply=False)
        if l4 is None:
            return None
    return Pkt(bytes(Ether(src=MAC_A, dst=MAC_B) / type(ip)(src=ip.src, dst=ip.dst) / l4), True,
               f"again[{tcp_flags}]")


def _reply_to(frame: bytes, tcp_flags: str | int) -> Pkt | None:
    """A well-formed answer to a frame (addresses and ports swapped), or None."""
    got = _l4(frame)
    if got is None:
        return None
    ip, l4 = got
    if isinstance(l4, TCP):
        l4 = TCP(sport=l4.dport, dport=l4.sport, flags=tcp_flags)
    elif isinstance(l4, UDP):
        l4 = UDP(sport=l4.dport, dport=l4.sport) / Raw(b"r")
    else:
        l4 = _echo(l4, reply=True)
        if l4 is None:
            return None
    return Pkt(bytes(Ether(src=MAC_B, dst=MAC_A) / type(ip)(src=ip.dst, dst=ip.src) / l4), True,
               f"reply[{tcp_flags}]")


def _error_for(frame: bytes, icmp_type: int) -> Pkt | None:
    """An ICMP error about a frame, from its destination back to its source, quoting it."""
    got = _l4(frame)
    if got is None:
        return None
    ip, _ = got
    if isinstance(ip, IPv6):
        err = ICMPv6Unknown(type=_ERROR6[icmp_type], code=1, msgbody=b"\0\0\0\0" + bytes(ip)[:48])
    else:
        err = ICMP(type=icmp_type, code=1) / Raw(bytes(ip)[:28])
    return Pkt(bytes(Ether(src=MAC_B, dst=MAC_A) / type(ip)(src=ip.dst, dst=ip.src) / err), True,
               f"icmp_error[{icmp_type}]")


# How packets cross the node: out of one hook into the next, each program seeing what the
# previous one left; with the path their replies take. Paths with a program not in
# PROGRAMS are left out.
_PATHS = {
    "pod->pod": (("cil_from_container", "cil_to_container"), "pod->pod"),
    "nic->pod": (("cil_from_netdev", "cil_to_container"), "pod->nic"),
    "pod->nic": (("cil_from_container", "cil_to_netdev"), "nic->pod"),
}
_OBJ_OF = {p: o for o, p in PROGRAMS}
PATHS = {name: (progs, back) for name, (progs, back) in _PATHS.items() if all(p in _OBJ_OF for p in progs)}
PATH_NAMES = sorted(PATHS)

# Services and their backends, as destinations of aimed frames.
TARGETS = sorted({(s.address, s.port, s.proto) for s in SERVICES_PROGRAMMED} |
                 {(a, p, s.proto) for s in SERVICES_PROGRAMMED for a, p, _ in s.backends.values()})
TARGETS4 = [t for t in TARGETS if ":" not in t[0]]   # for IPv4 sources (the pool's addresses)
EXTERNAL = sorted({(s.address, s.port, s.proto) for s in SERVICES_PROGRAMMED
                   if s.flags & F_EXTERNAL and ":" not in s.address})
EXTERNAL6 = sorted({(s.address, s.port, s.proto) for s in SERVICES_PROGRAMMED if s.flags & F_EXTERNAL} - set(EXTERNAL))
PODS = st.sampled_from(sorted(a for a in ENDPOINTS if ":" not in a))   # pods to IPv4 services
OUTSIDE = st.sampled_from((fp.CLIENT, fp.OUTSIDER)) | fp.addresses
OUTSIDE6 = st.sampled_from((fp.CLIENT_6, fp.OUTSIDER_6)) | fp.addresses6
# Flows that make sense on a path (clients outside to NodePort/LB services, pods to
# services, backends and the outside), and any frame on any path.
OPENS = [(path, frames) for path, frames in (
    ("nic->pod", fp.aimed_frames(EXTERNAL, OUTSIDE)),
    ("nic->pod", fp.aimed_frames(EXTERNAL6, OUTSIDE6)),
    ("pod->pod", fp.aimed_frames(TARGETS4, PODS)),
    ("pod->nic", fp.aimed_frames([(fp.CLIENT, 80, TCP_P), (fp.OUTSIDER, 53, UDP_P)], PODS)),
    ("pod->pod", fp.flow_frames6()),
) if path in PATHS]
ADVANCES = st.sampled_from((0, 0, 0, 0, 0, 0, 0, 1, 5, 11, 30, 61, 120, 8001))
prog_index = st.integers(0, len(PROGRAMS) - 1)
path_choice = st.sampled_from(PATH_NAMES)
flow_flags = st.sampled_from(("S", "SA", "A", "A", "PA", "FA", "R", "RA")) | st.integers(0, 255)
# A step: what to send (a new frame, the flow again, a reply, the last frame once more),
# where (one program, or a path: None picks the reply path of the last one), then how far
# to move the clock.
steps = st.one_of(
    st.one_of([st.tuples(st.just("open"), st.just(path), frames, ADVANCES) for path, frames in OPENS]),
    st.one_of([st.tuples(st.just("open"), st.just(path), frames, ADVANCES) for path, frames in OPENS]),
    st.tuples(st.just("open"), path_choice, fp.aimed_frames(TARGETS4) | fp.flow_frames(), ADVANCES),
    st.tuples(st.just("again"), st.none() | path_choice, flow_flags, ADVANCES),
    st.tuples(st.just("again"), st.none() | path_choice, flow_flags, ADVANCES),
    st.tuples(st.just("reply"), st.none() | path_choice, flow_flags, ADVANCES),
    st.tuples(st.just("reply"), st.none() | path_choice, flow_flags, ADVANCES),
    # A flow's packets both ways in a row (handshakes, closes and reopens), on its paths.
    st.tuples(st.just("burst"), st.none(), st.lists(st.tuples(st.booleans(), flow_flags), min_size=2, max_size=6),
              ADVANCES),
    st.tuples(st.just("error"), st.none() | path_choice, st.sampled_from(fp.ICMP_ERROR_TYPES), ADVANCES),
    st.tuples(st.just("pkt"), prog_index, fp.mutated(fp.aimed_frames(TARGETS4) | fp.flow_frames()), ADVANCES),
    st.tuples(st.just("pkt"), prog_index, fp.any_packet(), ADVANCES),
    st.tuples(st.just("replay"), prog_index, st.none(), ADVANCES),
)


def _s(frame: bytes) -> Pkt:
    return Pkt(frame, True, "scripted")


# Sequences run besides the random ones, so each service path is reached whatever the
# random draw: a ClusterIP connection's whole life (handshake, data, close, an ICMP error,
# reopen after aging); a reply whose service lost its rev-NAT entry; NodePort/LB flows on
# the NIC both ways; the no-backend, remote-backend and affinity services.
SCRIPTED = [
    [("open", "pod->pod", _s(tcp4(fp.POD1, 40000, fp.VIP, 80, "S")), 0),
     ("burst", None, [(True, "SA"), (False, "A"), (False, "PA"), (True, "PA"), (False, "FA"), (True, "FA"),
                      (False, "A")], 0),
     ("error", None, 3, 11),
     ("burst", None, [(False, "S"), (True, "SA"), (False, "A")], 8001),
     ("again", None, "A", 0)],
    [("open", "pod->pod", _s(tcp4(fp.POD2, 40001, fp.NOREV_VIP, 80, "S")), 0),
     ("reply", None, "SA", 0)],
    [("open", "nic->pod", _s(tcp4(fp.CLIENT, 40000, fp.LB_VIP, 80, "S")), 0),
     ("burst", None, [(True, "SA"), (False, "A"), (False, "FA"), (True, "RA")], 5),
     ("open", "nic->pod", _s(udp4(fp.CLIENT, 40001, fp.NODE_IP, 30080)), 0),
     ("reply", None, "", 61),
     ("again", None, "", 0)],
    # IPv6 between pods: a TCP connection's whole life in the IPv6 tables, an ICMPv6 error, a
    # reopen after aging; a UDP flow behind a destination-options header.
    [("open", "pod->pod", _s(tcp(fp.POD1_6, 40000, fp.POD2_6, 80, "S")), 0),
     ("burst", None, [(True, "SA"), (False, "A"), (False, "PA"), (True, "PA"), (False, "FA"), (True, "FA"),
                      (False, "A")], 0),
     ("error", None, 3, 11),
     ("burst", None, [(False, "S"), (True, "SA"), (False, "A")], 8001),
     ("open", "pod->pod", _s(bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src=fp.POD3_6, dst=fp.POD1_6) /
                                   IPv6ExtHdrDestOpt() / UDP(sport=40001, dport=53) / Raw(b"q"))), 0),
     ("reply", None, "", 0)],
    # IPv6 on the NIC: a LoadBalancer connection's life, a NodePort UDP exchange, the remote backend.
    [("open", "nic->pod", _s(tcp(fp.CLIENT_6, 40000, fp.LB_VIP_6, 80, "S")), 0),
     ("burst", None, [(True, "SA"), (False, "A"), (False, "PA"), (True, "PA"), (False, "FA"), (True, "FA")], 5),
     ("open", "nic->pod", _s(udp(fp.CLIENT_6, 40001, fp.NODE_IP_6, 30080)), 0),
     ("reply", None, "", 61),
     ("again", None, "", 0),
     ("open", "nic->pod", _s(tcp(fp.CLIENT_6, 40002, fp.REMOTE_VIP_6, 80, "S")), 0)],
    [("open", "nic->pod", _s(tcp4(fp.CLIENT, 40000, fp.REMOTE_VIP, 80, "S")), 0),
     ("open", "pod->pod", _s(tcp4(fp.POD1, 40000, fp.EMPTY_VIP, 80, "S")), 0),
     ("open", "nic->pod", _s(tcp4(fp.OUTSIDER, 40000, fp.AFF_VIP, 80, "S")), 30),
     ("again", None, "A", 0)],
]

# What the sequences must reach, by program ("*": any): a check that the fuzzing gets past
# the parsers (SCRIPTED alone reaches all of it, so it does not hang on the random draw).
REACHED = {
    ("cil_from_container", "PASS_CT_NEW"), ("cil_from_container", "PASS_CT_ESTABLISHED"),
    ("cil_from_container", "PASS_CT_REPLY"), ("cil_from_container", "PASS_CT_RELATED"),
    ("*", "PASS_CT_REOPENED"), ("cil_from_container", "DROP_NO_SERVICE_BACKEND"),
    ("cil_to_container", "PASS_CT_NEW"), ("cil_to_container", "PASS_CT_REPLY"),
    ("cil_to_container", "PASS_CT_RELATED"), ("cil_to_container", "DROP_REV_NAT_MISSING"),
    ("cil_from_netdev", "PASS_CT_NEW"), ("cil_from_netdev", "PASS_CT_ESTABLISHED"),
    ("cil_from_netdev", "DROP_REMOTE_BACKEND"), ("cil_to_netdev", "PASS_CT_REPLY"),
}


SEQUENCE_EXAMPLES = {"syn-table": 320, "one-table": 120}


@pytest.fixture(scope="module", params=sorted(SEQUENCE_EXAMPLES, reverse=True))
def fz_seq(request, fz: FuzzHarness):
    """(harness, examples): the default datapath, and with ct_syn_table off (new TCP
    entries straight into tpl_ct4_v1 with their related twin, as the reference)."""
    if request.param == "syn-table":
        yield fz, SEQUENCE_EXAMPLES[request.param]
        return
    h = FuzzHarness({"ct_syn_table": 0})
    yield h, SEQUENCE_EXAMPLES[request.param]
    h.close()


def test_sequences(fz_seq: tuple[FuzzHarness, int]) -> None:
    """Several packets in a row through all programs: flows are opened, answered,
    established, closed, reopened, aged and hit by odd packets; the maps are checked after
    each packet."""
    fz, examples = fz_seq
    seen: Counter = Counter()
    kinds: Counter = Counter()

    def send(path: tuple[str, ...], pkt: Pkt) -> Pkt | None:
        """pkt through each program of path in turn; what the last one left (None: dropped)."""
        for prog in path:
            r = _rewrite_ok(fz, _OBJ_OF[prog], prog, pkt, seen)
            check_maps(fz, kinds)
            if r is None or r[0] != TC_ACT_OK:
                return None
            out = r[1]
            pkt = Pkt(out, pkt.wellformed and (out == pkt.data or checksums_ok(out)), f"out of {prog}")
        return pkt

    @fuzz_settings(examples)
    @given(st.lists(steps, min_size=2, max_size=12))
    @example(SCRIPTED[0])
    @example(SCRIPTED[1])
    @example(SCRIPTED[2])
    @example(SCRIPTED[3])
    @example(SCRIPTED[4])
    @example(SCRIPTED[5])
    def run(seq) -> None:
        fz.reset()
        flow: Pkt | None = None       # the current flow's first frame, as its client sent it
        path = PATH_NAMES[0]          # the path it took
        flow_out: Pkt | None = None   # as the last program of its path delivered it
        last: Pkt | None = None       # the last frame as the last program left it
        for kind, where, arg, adv in seq:
            if kind == "open":
                flow, path = arg, where
                flow_out = send(PATHS[where][0], arg)
                last = flow_out or last
            elif kind == "burst" and flow is not None:
                fwd = flow_out or flow        # the flow's last frame as delivered
                for is_reply, flags in arg:
                    if is_reply:
                        pkt = _reply_to(fwd.data, flags)
                        if pkt is not None:
                            last = send(PATHS[PATHS[path][1]][0], pkt) or last
                    else:
                        pkt = _again(flow.data, flags)
                        if pkt is not None:
                            fwd = send(PATHS[path][0], pkt) or fwd
                            last = fwd
            elif kind in ("again", "reply", "error") and flow is not None:
                if kind == "again":
                    pkt, p = _again(flow.data, arg), where or path
                elif kind == "reply":
                    pkt, p = _reply_to((last or flow).data, arg), where or PATHS[path][1]
                else:
                    pkt, p = _error_for((last or flow).data, arg), where or PATHS[path][1]
                if pkt is not None:
                    last = send(PATHS[p][0], pkt) or last
            elif kind == "pkt":
                obj, prog = PROGRAMS[where]
                r = _rewrite_ok(fz, obj, prog, arg, seen)
                check_maps(fz, kinds)
                last = Pkt(r[1], False, f"out of {prog}") if r is not None else last
            elif kind == "replay" and last is not None:
                obj, prog = PROGRAMS[where]
                _rewrite_ok(fz, obj, prog, last, seen)
                check_maps(fz, kinds)
            if adv:
                fz.advance(adv)
                check_maps(fz, kinds)

    run()
    # The conntrack and service paths of every program were reached, not only the parsers.
    reached = set(seen) | {("*", r) for _, r in seen}
    missing = {(p, r) for p, r in REACHED if p in _OBJ_OF or p == "*"} - reached
    assert not missing, (missing, sorted(seen.items()))
    used = {m.name for m in fz.ct_maps if fz.syn_table or m.name not in SYN_MAPS}
    assert used <= {k[0] for k in kinds}, sorted(kinds.items())
    assert any(k[1] == "SVC" for k in kinds) and any(k[4] for k in kinds), sorted(kinds.items())
    # Both families' NIC paths: NodePort entries (k[4]) in an IPv4 and in an IPv6 table.
    assert {k[0] in abi.CT6_MAPS for k in kinds if k[4]} == {False, True}, sorted(kinds.items())


# --- the checker itself ---------------------------------------------------------------------

_UDP = CtTuple4.make(fp.POD1, fp.POD2, 53, 40000, UDP_P, TUPLE_F_OUT)
_TCP = CtTuple4.make(fp.POD1, fp.POD2, 80, 40000, TCP_P, TUPLE_F_OUT)
_SVC = CtTuple4.make(fp.POD1, fp.VIP, 80, 40000, TCP_P, TUPLE_F_SERVICE)
_SVC_IN = CtTuple4.make(fp.POD1, fp.VIP, 80, 40000, TCP_P, TUPLE_F_SERVICE | TUPLE_F_IN)
_REL_TCP = CtTuple4.make(fp.POD1, fp.POD2, 0, 0, TCP_P, TUPLE_F_RELATED)
_REL_PORTS = CtTuple4.make(fp.POD1, fp.POD2, 53, 0, ICMP_P, TUPLE_F_RELATED)
_FLAG8 = CtTuple4.make(fp.POD1, fp.POD2, 53, 40000, UDP_P, 8)
_UDP6 = CtTuple6.make(fp.POD1_6, fp.POD2_6, 53, 40000, UDP_P, TUPLE_F_OUT)
_REL6_ICMP4 = CtTuple6.make(fp.POD1_6, fp.POD2_6, 0, 0, ICMP_P, TUPLE_F_RELATED)
_SVC6 = CtTuple6.make(fp.POD1_6, fp.POD2_6, 80, 40000, TCP_P, TUPLE_F_SERVICE)
# (table: "any", "tcp" (tpl_ct4_v1), "syn" (the handshake table), "tcp+syn" (both), "any6" or
# "tcp6" (tpl_ct_any6_v1, tpl_ct6_v1); key;
# entry fields, callables of (harness, now) for times; what check_maps must say).
BAD_ENTRIES = {
    "control": ("any", _UDP, {}, None),            # a possible entry: nothing to say
    "undefined-tuple-flag": ("any", _FLAG8, {}, "undefined TUPLE_F_ bits"),
    "tcp-in-any-table": ("any", _REL_TCP, {}, "protocol in the wrong table"),
    "related-with-ports": ("any", _REL_PORTS, {}, "related entry not ICMP with ports 0"),
    "udp-seen-non-syn": ("any", _UDP, {"seen_non_syn": 1}, "seen_non_syn on a non-TCP entry"),
    "udp-closing": ("any", _UDP, {"tx_closing": 1}, "closing bits on a non-TCP entry"),
    "udp-tcp-flags": ("any", _UDP, {"tx_flags_seen": 2}, "TCP flags seen on a non-TCP flow"),
    "dsr-internal": ("any", _UDP, {"dsr_internal": 1}, "dsr_internal set"),
    "udp-lifetime": ("any", _UDP, {"lifetime": lambda h, now: now + h.timeouts["ct_lifetime_nontcp"] + 5},
                     "ahead, bound"),
    "tcp-lifetime": ("tcp", _TCP, {"seen_non_syn": 1, "lifetime": lambda h, now: now + max(h.timeouts.values()) + 5},
                     "ahead, bound"),
    "closed-tcp-lifetime": ("tcp", _TCP, {"rx_closing": 1, "tx_closing": 1, "seen_non_syn": 1,
                                          "lifetime": lambda h, now: now + h.timeouts["ct_close_timeout"] + 5},
                            "ahead, bound"),
    "backend-on-endpoint-entry": ("tcp", _TCP, {"backend_id": 19}, "backend id on a non-service entry"),
    "unknown-backend": ("tcp", _SVC, {"backend_id": 999, "rev_nat_index": 15, "src_sec_id": 0},
                        "service entry's backend is not a backend"),
    "service-and-in": ("tcp", _SVC_IN, {"backend_id": 19, "rev_nat_index": 15, "src_sec_id": 0},
                       "service key with IN/RELATED"),
    "no-packets": ("any", _UDP, {"packets": 0, "bytes": 0}, "packets 0"),
    "unknown-identity": ("any", _UDP, {"src_sec_id": 12345}, "source identity"),
    "in-both-tcp-tables": ("tcp+syn", _TCP, {}, "key also in"),
    "established-in-handshake-table": ("syn", _TCP, {"seen_non_syn": 1, "last_rx_report": lambda h, now: now},
                                       "established entry left"),
    "ipv6-control": ("any6", _UDP6, {}, None),
    "ipv6-related-icmpv4": ("any6", _REL6_ICMP4, {}, "related entry not ICMP"),
    "ipv6-unknown-backend": ("tcp6", _SVC6, {"backend_id": 999, "rev_nat_index": 15, "src_sec_id": 0},
                             "service entry's backend is not a backend"),
    "ipv6-udp-closing": ("any6", _UDP6, {"tx_closing": 1}, "closing bits on a non-TCP entry"),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_checker_catches_impossible_entries(fz: FuzzHarness, case: str) -> None:
    """check_maps is not vacuous: each impossible entry written by hand is reported."""
    table, key, fields, says = BAD_ENTRIES[case]
    tcp_tables = [m for m in fz.ct_maps if "_any" not in m.name and m.name not in abi.CT6_MAPS]
    if table in ("tcp+syn", "syn") and CT_MAP_SYN not in fz.lb.coll.maps:
        pytest.skip("no handshake table in this build")
    targets = {"any": [fz.lb.coll.maps[CT_MAP_ANY]], "tcp": [m for m in tcp_tables if m.name != CT_MAP_SYN][:1],
               "tcp+syn": tcp_tables, "syn": [fz.lb.coll.maps.get(CT_MAP_SYN)],
               "any6": [fz.lb.coll.maps[abi.CT6_MAP_ANY]], "tcp6": [fz.lb.coll.maps[abi.CT6_MAP_TCP]]}[table]
    fz.reset()
    now = fz.now()
    fz.runs, fz.max_len = 1, 100          # as if one 100-byte packet had run
    e = CtEntry(lifetime=now + 30, packets=1, bytes=60, src_sec_id=WORLD, last_tx_report=now)
    for name, v in fields.items():
        setattr(e, name, v(fz, now) if callable(v) else v)
    try:
        for m in targets:
            m.update(key, e)
        if says is None:
            check_maps(fz)
        else:
            with pytest.raises(AssertionError, match=says):
                check_maps(fz)
    finally:
        fz.reset()


def test_checker_catches_orphan_nat_entries(fz: FuzzHarness) -> None:
    if fz.nat_map is None:
        pytest.skip("no NAT table in this build")
    fz.reset()
    try:
        key = CtTuple4.make(fp.POD1, fp.CLIENT, 80, 40000, TCP_P, TUPLE_F_OUT)
        fz.nat_map.update(key, Nat4Entry(created=fz.now()))
        with pytest.raises(AssertionError, match="no owning CT_EGRESS entry"):
            check_maps(fz)
    finally:
        fz.reset()
