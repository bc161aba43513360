#!/usr/bin/env python3
"""A ClusterIP service three ways, side by side in one run: direct, iptables (kube-proxy style), tuplet;
for IPv4 and IPv6.

    make bench-services    (or: .venv/bin/python bench/services.py [--seconds 3] [--rounds 5]
                                [--concurrency N] [--cpus LIST|all] [--no-udp] [--quick]
                                [--families 4,6] [--json] [--out FILE])
    make bench-services BENCH_ARGS="--quick --json"

One namespace topology (prefix ``tpl-bench``): a node, a client pod and two backend pods, each
backend running ``build/loadgen server 8000`` (TCP and UDP echo, forked epoll workers). The
client pod runs ``build/loadgen crr|rr|udp_rr`` against:

  direct    the backends' own addresses (client process i to backend i mod 2); no tuplet,
            no nat table in the node.
  iptables  the ClusterIP 10.68.174.146:80, implemented in the node's nat table the way
            kube-proxy does it: PREROUTING (and OUTPUT) jump to KUBE-SERVICES, which jumps to
            KUBE-SVC-*; ``-m statistic --mode random --probability`` picks a KUBE-SEP-* chain
            that DNATs to one backend; KUBE-MARK-MASQ / KUBE-POSTROUTING as kube-proxy has them
            (nothing is masqueraded for pod-to-service traffic). nf_conntrack tracks the
            connections. Only the nat table is modelled: kube-proxy's filter-table rules
            (KUBE-FORWARD, KUBE-FIREWALL...) would add to this mode's cost.
  tuplet    the same ClusterIP in tuplet's datapath (``node_apply.apply``), no nat table:
            per-packet LB (``[lb] socket_lb = false``): DNAT and a CT_SERVICE entry per flow.
  tuplet-sock  tuplet with socket LB (``[lb] socket_lb = true`` on the bench's own cgroup,
            ``/sys/fs/cgroup/unified/tuplet-test-*``, which only the client processes join):
            connect()/sendto() to the ClusterIP go straight to a backend, no per-packet NAT.
            IPv4 only (tuplet has no IPv6 socket LB yet).

IPv6 (``--families``, default ``4,6``): the pods are dual stack (fd00:10:64::/64 beside their IPv4
addresses) and the service has an IPv6 ClusterIP, fd00:10:68::ae92:80, with the same backends
(their IPv6 addresses); the backends run ``loadgen server6`` (one socket on :: serving both
families). Three more modes, each beside its IPv4 one in the rotation:

  direct6    the backends' IPv6 addresses.
  ip6tables  kube-proxy's IPv6 rules: the same chains and rules in ip6tables' nat table (/128s,
             ``DNAT --to-destination [backend]:8000``), nf_conntrack.
  tuplet6    the IPv6 ClusterIP in tuplet, per packet; tuplet is applied with the same
             configuration (both ClusterIPs) as in tuplet mode, only the traffic's family differs.

The ratios: tuplet/iptables and tuplet6/ip6tables, and IPv6's cost per transaction over IPv4's
(IPv4's rate over IPv6's) for each of direct, iptables and tuplet, paired by round.

Switching modes: the nat table is deleted (``nft delete table ip nat``, ``ip6 nat`` for IPv6, with the
nf_tables backend, so conntrack is not even hooked in direct and tuplet mode) and nf_conntrack is
flushed; tuplet is torn down (its maps, CT included, go with it). Every round runs every
mode, in a rotated order, each mode doing CRR, RR and UDP RR (``--seconds`` each); the tables
give medians over the rounds, and "spread" is (max - min) / median.

  CRR     transactions/s of connect, 64-byte request, 64-byte echo, close; a new TCP
          connection each time. The client closes first with a normal FIN (no SO_LINGER
          RST), so TIME_WAIT is on the client; the client pod has net.ipv4.tcp_tw_reuse=1
          and ip_local_port_range 1024-65535 so ports never run out.
  RR      transactions/s of request/echo over one persistent TCP connection per process.
  UDP RR  the same with one connected UDP socket per process.

``--concurrency`` client processes run at once (default: 2 per CPU). Servers and clients are
pinned to one CPU (``--cpus``, default the last one; ``taskset -c``): veth delivers a packet in
the sending CPU's softirq, so each transaction's whole cost lands on that CPU, which stays
busy, and the rate is the inverse of the per-transaction CPU cost. Unpinned (``--cpus all``),
request/response rates on a small machine swing by 2-3x with where the scheduler puts the
two ends of a connection.

Path checks, so the benchmark cannot measure the wrong path: in every mode both backends
accept connections and the servers count at least the transactions the client completed;
in direct mode there is neither a KUBE- nat rule nor a tuplet pin root; in tuplet-sock mode tuplet's
CT tables hold no service entry but the client's OUT entries, and the socket reverse-NAT map holds entries; in iptables mode the
KUBE-SEP DNAT rules matched at least as many connections as CRR completed (and the UDP
flows), with tuplet's pin root gone (ip6tables the same with the ip6tables rules, and no KUBE- rule
in iptables' nat table, nor the other way round); in tuplet and tuplet6 mode there is no KUBE- nat
rule, tuplet's CT tables of the mode's family (tpl_ct4_v1.. or tpl_ct6_v1..) hold service (SVC) entries
for TCP and UDP after the round and the other family's none, and its counters saw at
least as many connection set-ups (PASS_CT_NEW + PASS_CT_REOPENED: CRR reuses client ports
while their closed CT entries are still there) as CRR completed. A failed check makes the
exit status 1.

The service is configured through the node configuration's ``[[services]]`` section, as an
operator would.

Writes nothing to disk but with ``--out FILE`` (the JSON results); pins live below
/sys/fs/bpf/tuplet/bench/services-<pid> (inside the project's pin root) and are removed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))
sys.path.insert(0, str(ROOT / "tests"))

import report  # noqa: E402  (bench/report.py)
from socklb_harness import in_cgroup, make_cgroup, remove_cgroup  # noqa: E402  (tests/socklb_harness.py)
from tuplet.agent import log  # noqa: E402
from tuplet.datapath import (
    abi,
    metrics,  # noqa: E402
    paths,
)
from tuplet.datapath.abi import TUPLE_F_SERVICE  # noqa: E402
from tuplet.datapath.layouts import CtTuple4, CtTuple6  # noqa: E402
from tuplet.lab.topology import Node, Pod, Topology  # noqa: E402
from tuplet.node import apply as node_apply
from tuplet.node import config  # noqa: E402
from tuplet.node.netns import enter, sysctl  # noqa: E402

SVC_RANGE = "10.68.0.0/16"
SVC_PORT, BACKEND_PORT = 80, 8000


@dataclass(frozen=True)
class Fam:
    """One address family of the bench: the pods' and the ClusterIP's addresses, kube-proxy's
    rule tools for it, and tuplet's CT tables of that family."""
    version: int
    client: str
    backends: tuple[str, str]
    pod_cidr: str
    vip: str
    iptables: str                               # iptables / ip6tables (-restore, -save)
    nft_family: str                             # the nf_tables family of its nat table
    ct_maps: tuple[str, str, str]               # TCP, any (UDP, ICMP), SYN
    tuple_cls: type[CtTuple4] | type[CtTuple6]

    @property
    def host_len(self) -> int:
        return 32 if self.version == 4 else 128

    def endpoint(self, address: str, port: int) -> str:
        return f"{address}:{port}" if self.version == 4 else f"[{address}]:{port}"


V4 = Fam(4, "10.64.0.36", ("10.64.0.98", "10.64.0.64"), "10.64.0.0/16", "10.68.174.146", "iptables", "ip",
         abi.CT_MAPS, CtTuple4)
V6 = Fam(6, "fd00:10:64::24", ("fd00:10:64::62", "fd00:10:64::40"), "fd00:10:64::/64", "fd00:10:68::ae92",
         "ip6tables", "ip6", abi.CT6_MAPS, CtTuple6)
FAMS = {4: V4, 6: V6}
SOCK_MODE = "tuplet-sock"
#: The IPv4 modes; socket LB (tuplet-sock) is IPv4 only (tuplet has no IPv6 socket LB yet).
MODES = ("direct", "iptables", "tuplet", SOCK_MODE)
#: The IPv6 modes and the kind of each: the same ClusterIP's IPv6 address with the same backends.
V6_MODES = {"direct6": "direct", "ip6tables": "iptables", "tuplet6": "tuplet"}
#: With --single-lru: tuplet with one TCP table (``syn_table = false``, the reference's layout),
#: to measure what the handshake table costs per connection.
LRU_MODE = "tuplet-lru"
#: tuplet with a `tuplet ct events` listener attached (--events), pinned to CPU 0 (off the traffic
#: CPU): what writing the event ring costs the datapath. The listener reads every record but, with
#: ``-s 192.0.2.1`` (no flow here), prints none: its decoding CPU is not what is measured, and it
#: keeps up (see "not delivered"). --events-print makes it print every event as JSON instead.
EVENTS_MODE = "tuplet+ev"
METRICS = ("crr", "rr", "udp_rr")
LABELS = {"crr": "CRR/s", "rr": "RR/s", "udp_rr": "UDP RR/s"}
LOADGEN = ROOT / "build" / "loadgen"
PIN_ROOT = f"/sys/fs/bpf/tuplet/bench/services-{os.getpid()}"
MSG_SIZE = 64

# kube-proxy names its chains KUBE-SVC-/KUBE-SEP- plus 16 characters of a hash; these are fixed.
SVC_CHAINS = {"tcp": "KUBE-SVC-BENCHWEBTCP0000", "udp": "KUBE-SVC-BENCHWEBUDP0000"}


def sep_chain(proto: str, i: int) -> str:
    return f"KUBE-SEP-BENCH{proto.upper()}{i:010d}"


def kind(mode: str) -> str:
    """What a mode does (direct, iptables, tuplet, ...), whatever its family."""
    return V6_MODES.get(mode, mode)


def fam_of(mode: str) -> Fam:
    return V6 if mode in V6_MODES else V4


def direct_of(mode: str) -> str:
    """The direct mode of a mode's family: what its ``/direct`` ratio divides by."""
    return "direct6" if mode in V6_MODES else "direct"


# --- the iptables mode ----------------------------------------------------------------------


def kube_proxy_rules(fam: Fam, protos: tuple[str, ...]) -> str:
    """The nat table kube-proxy (iptables mode) writes for one ClusterIP with two endpoints: for
    IPv6 the same chains and rules in ip6tables' nat table, with /128s and ``[address]:port``."""
    chains = ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"]
    rules = [
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    for proto in protos:
        svc = SVC_CHAINS[proto]
        chains.append(svc)
        name = f"bench/web:{proto}"
        vip = f"{fam.vip}/{fam.host_len}"
        rules.append(f'-A KUBE-SERVICES -d {vip} -p {proto} -m comment --comment "{name} cluster IP" '
                     f"-m {proto} --dport {SVC_PORT} -j {svc}")
        rules.append(f'-A {svc} ! -s {fam.pod_cidr} -d {vip} -p {proto} -m comment --comment "{name} cluster IP" '
                     f"-m {proto} --dport {SVC_PORT} -j KUBE-MARK-MASQ")
        n = len(fam.backends)
        for i, backend in enumerate(fam.backends):
            sep = sep_chain(proto, i)
            chains.append(sep)
            pick = f"-m statistic --mode random --probability {1 / (n - i):.11f} " if i < n - 1 else ""
            to = fam.endpoint(backend, BACKEND_PORT)
            rules.append(f'-A {svc} -m comment --comment "{name} -> {to}" {pick}-j {sep}')
            rules.append(f'-A {sep} -s {backend}/{fam.host_len} -m comment --comment "{name}" -j KUBE-MARK-MASQ')
            rules.append(f'-A {sep} -p {proto} -m comment --comment "{name}" -m {proto} '
                         f"-j DNAT --to-destination {to}")
    return "*nat\n" + "".join(f":{c} - [0:0]\n" for c in chains) + "\n".join(rules) + "\nCOMMIT\n"


def nat_install(t: Topology, node: Node, fam: Fam, protos: tuple[str, ...]) -> None:
    t.run(node, [f"{fam.iptables}-restore", "--noflush"], input=kube_proxy_rules(fam, protos), text=True,
          check=True, capture_output=True)


def nat_remove(t: Topology, node: Node, fam: Fam) -> None:
    """Delete the family's whole nat table (the nf_tables backend can), else flush it; flush
    nf_conntrack."""
    if shutil.which("nft") and "nf_tables" in subprocess.run([fam.iptables, "--version"], capture_output=True,
                                                              text=True).stdout:
        t.run(node, ["nft", "delete", "table", fam.nft_family, "nat"], capture_output=True)  # absent: fine
    else:
        t.run(node, [fam.iptables, "-t", "nat", "-F"], check=True, capture_output=True)
        t.run(node, [fam.iptables, "-t", "nat", "-X"], check=True, capture_output=True)
    conntrack_flush(node, fam)


def conntrack_flush(node: Node, fam: Fam) -> None:
    try:
        from pyroute2 import Conntrack

        with enter(node.netns):
            c = Conntrack(nfgen_family=socket.AF_INET if fam.version == 4 else socket.AF_INET6)
        try:
            c.flush()
        finally:
            c.close()
    except Exception as e:  # no nf_conntrack_netlink: stale entries only cost memory
        log_note(f"nf_conntrack not flushed: {e}")


def nat_rules(t: Topology, node: Node, fam: Fam) -> str:
    return t.run(node, [f"{fam.iptables}-save", "-c", "-t", "nat"], check=True, capture_output=True,
                 text=True).stdout


def dnat_hits(t: Topology, node: Node, fam: Fam) -> dict[str, int]:
    """Packets that matched each KUBE-SEP DNAT rule (one per new connection)."""
    hits: dict[str, int] = {}
    for line in nat_rules(t, node, fam).splitlines():
        if line.startswith("[") and "-j DNAT" in line and " -A KUBE-SEP-" in line:
            counts, rest = line.split("]", 1)
            hits[rest.split()[1]] = int(counts.lstrip("[").split(":")[0])
    return hits


# --- the tuplet mode ------------------------------------------------------------------------


def node_config(node: Node, pods: dict[str, Pod], fams: tuple[Fam, ...], protos: tuple[str, ...]) -> config.NodeConfig:
    text = textwrap.dedent(f"""
        [node]
        name = "bench"
        netns = "{node.netns}"
        pin_root = "{PIN_ROOT}"
    """)
    for name, pod in pods.items():
        text += textwrap.dedent(f"""
            [[endpoints]]
            name = "{name}"
            ifname = "{pod.host_ifname}"
            ipv4 = "{pod.ipv4}"
        """) + (f'ipv6 = "{pod.ipv6}"\n' if pod.ipv6 else "")
    text += textwrap.dedent("""
        [conntrack]
        tcp_max = 524288
        any_max = 262144

        [lb]
        maglev_table_size = 1021
        socket_lb = false   # tuplet-sock mode turns it on, on the bench's own cgroup
    """)
    for fam in fams:
        backends = ", ".join(f'"{fam.endpoint(b, BACKEND_PORT)}"' for b in fam.backends)
        for proto in protos:
            text += textwrap.dedent(f"""
                [[services]]
                name = "web{'' if fam.version == 4 else '6'}-{proto}"
                type = "ClusterIP"
                address = "{fam.vip}"
                port = {SVC_PORT}
                protocol = "{proto}"
                backends = [{backends}]
            """)
    return config.parse(text)


def tuplet_ct_service_entries(fam: Fam) -> dict[str, int]:
    """Service (SVC) entries in each of tuplet's CT tables of ``fam``."""
    out: dict[str, int] = {}
    for name in fam.ct_maps:
        with paths.open_pinned(PIN_ROOT, name) as m:
            out[name] = sum(1 for k in m.keys() if fam.tuple_cls.from_buffer_copy(k).flags & TUPLE_F_SERVICE)
    return out


def tuplet_new_connections() -> int:
    """Connections tuplet set up: new tuples, and tuples reused while their CT entry was closing
    (CRR cycles through the client's ports faster than closed entries expire)."""
    obj = str(paths.object_dir() / abi.OBJ_LXC)
    with paths.open_pinned(PIN_ROOT, abi.METRICS_MAP) as m:
        return sum(c.packets for c in metrics.read(m, metrics.reason_names(obj), metrics.direction_names(obj))
                   if c.reason in ("PASS_CT_NEW", "PASS_CT_REOPENED") and c.direction == "egress")


def tuplet_drops() -> dict[str, int]:
    obj = str(paths.object_dir() / abi.OBJ_LXC)
    with paths.open_pinned(PIN_ROOT, abi.METRICS_MAP) as m:
        return {f"{c.direction}/{c.reason}": c.packets
                for c in metrics.read(m, metrics.reason_names(obj), metrics.direction_names(obj)) if c.dropped}


# --- traffic --------------------------------------------------------------------------------


class Server:
    """``loadgen server`` in a backend pod; ``counts()`` reads its totals."""

    def __init__(self, t: Topology, pod: Pod) -> None:
        self.pod = pod
        # Dual-stack pods: one server on :: for both families (IPv4 as mapped addresses), so both
        # families' transactions end in the same sockets.
        cmd = "server6" if pod.ipv6 else "server"
        self.proc = t.popen(pod, [*pin(), str(LOADGEN), cmd, str(BACKEND_PORT)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"loadgen server in {pod.name} did not start: {line!r}")

    def counts(self) -> dict[str, int]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return {k: int(v) for k, v in (kv.split("=") for kv in self.proc.stdout.readline().split())}


def loadgen(t: Topology, client: Pod, kind: str, targets: str, port: int, seconds: float,
            concurrency: int) -> tuple[float, int, int]:
    """(transactions per second, transactions, errors) of one loadgen client run."""
    argv = [*pin(), str(LOADGEN), kind, targets, str(port), f"{seconds:g}", str(concurrency), str(MSG_SIZE)]
    assert not t.closed
    # In every mode the client runs in the bench's cgroup (only tuplet-sock attaches programs there).
    r = subprocess.run(in_cgroup(CGROUP, client.netns, argv), capture_output=True, text=True,
                       timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
    kv = dict(item.split("=") for item in r.stdout.split())
    n, errors, elapsed = int(kv["transactions"]), int(kv["errors"]), float(kv["elapsed"])
    return n / elapsed, n, errors


PIN_CPUS: str | None = None
CGROUP: Path | None = None


def pin() -> list[str]:
    """``taskset -c CPUS`` for the traffic processes, or nothing."""
    return ["taskset", "-c", PIN_CPUS] if PIN_CPUS else []


def log_note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


# --- the run --------------------------------------------------------------------------------


def prog_stats() -> dict[int, tuple[str, int, int]]:
    """(name, run_time_ns, run_cnt) of every loaded cil_* program, by id (kernel.bpf_stats_enabled)."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"]: (p["name"], p.get("run_time_ns", 0), p.get("run_cnt", 0))
            for p in json.loads(out.stdout) if p.get("name", "").startswith("cil_")}


def bpf_cost(before: dict[int, tuple[str, int, int]], after: dict[int, tuple[str, int, int]],
             transactions: int) -> dict[str, Any]:
    """Per transaction: runs and ns per run of each program, and the BPF time in total."""
    per: dict[str, list[int]] = {}
    for pid, (name, ns, cnt) in after.items():
        _, ns0, cnt0 = before.get(pid, (name, 0, 0))
        acc = per.setdefault(name, [0, 0])
        acc[0] += ns - ns0
        acc[1] += cnt - cnt0
    tx = max(transactions, 1)
    return {"programs": {name: {"runs_per_tx": cnt / tx, "ns_per_run": ns / cnt if cnt else 0.0}
                         for name, (ns, cnt) in per.items()},
            "bpf_ns_per_tx": sum(ns for ns, _ in per.values()) / tx}


@dataclass
class ModeStats:
    samples: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    errors: dict[str, int] = field(default_factory=lambda: {m: 0 for m in METRICS})
    checks: list[str] = field(default_factory=list)     # what was verified
    failures: list[str] = field(default_factory=list)   # what was not
    bpf: dict[str, list[dict[str, Any]]] = field(default_factory=dict)   # --bpf-stats, per metric
    events: list[str] = field(default_factory=list)     # --events: the listener's summary per round


def families_arg(text: str) -> tuple[int, ...]:
    """``--families``: "4", "6" or "4,6" (in any order, each once)."""
    parts = text.split(",")
    if not parts or len(set(parts)) != len(parts) or not set(parts) <= {"4", "6"}:
        raise argparse.ArgumentTypeError(f"{text!r}: a list of 4 and 6 (4, 6 or 4,6)")
    return tuple(sorted(int(p) for p in parts))


def families_of(args: argparse.Namespace) -> tuple[Fam, ...]:
    return tuple(FAMS[v] for v in args.families)


def modes_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The modes of a run, each IPv6 mode next to its IPv4 one (rotated per round, the two stay
    neighbours, so what drifts on the machine drifts alike for both)."""
    v4 = (*MODES, *((LRU_MODE,) if args.single_lru else ()), *((EVENTS_MODE,) if args.events else ()))
    if 4 not in args.families:
        return tuple(V6_MODES)
    if 6 not in args.families:
        return v4
    six = {k: m for m, k in V6_MODES.items()}
    return tuple(m for m4 in v4 for m in (m4, six.get(m4)) if m is not None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    protos: tuple[str, ...] = ("tcp",) if args.no_udp else ("tcp", "udp")
    metrics_run = [m for m in METRICS if m != "udp_rr" or not args.no_udp]
    modes = modes_of(args)
    fams = families_of(args)
    stats = {mode: ModeStats() for mode in modes}
    info: dict[str, Any] = {}
    with Topology(prefix="tpl-bench") as t:
        node = t.add_node("node")
        names = ("client", "back1", "back2")
        ipv6 = dict(zip(names, (V6.client, *V6.backends))) if V6 in fams else {}
        pods = {name: t.add_pod(node, name, addr, ipv6=ipv6.get(name))
                for name, addr in zip(names, (V4.client, *V4.backends))}
        client = pods["client"]
        t.add_service_range(node, SVC_RANGE)
        with enter(client.netns):
            sysctl("net.ipv4.tcp_tw_reuse", 1)       # also IPv6's
            sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        servers = [Server(t, pods["back1"]), Server(t, pods["back2"])]
        setup = node_config(node, pods, fams, protos)
        assert CGROUP is not None
        sock_setup = dataclasses.replace(setup, lb=dataclasses.replace(setup.lb, socket_lb=True,
                                                                        socket_lb_cgroup=str(CGROUP)))
        info["services_via"] = "[[services]] config"
        try:
            for fam in fams:
                nat_remove(t, node, fam)
            for rnd in range(args.rounds):
                order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
                for mode in order:
                    one_mode(t, node, client, servers, sock_setup if mode == SOCK_MODE else setup, protos,
                             metrics_run, mode, stats[mode], args)
                if not args.json:
                    done = ", ".join(f"{m} {stats[m].samples['crr'][-1]:.0f}" for m in modes)
                    print(f"  round {rnd + 1}/{args.rounds}: CRR/s {done}", file=sys.stderr, flush=True)
        finally:
            try:
                for fam in fams:
                    nat_remove(t, node, fam)
            finally:
                node_apply.teardown(PIN_ROOT)
    info["stats"] = stats
    info["metrics"] = metrics_run
    return info


def one_mode(t: Topology, node: Node, client: Pod, servers: list[Server], setup: config.NodeConfig,
             protos: tuple[str, ...], metrics_run: list[str], mode: str, st: ModeStats,
             args: argparse.Namespace) -> None:
    fam, what = fam_of(mode), kind(mode)
    targets, port = (",".join(fam.backends), BACKEND_PORT) if what == "direct" else (fam.vip, SVC_PORT)
    listener: subprocess.Popen[str] | None = None
    try:
        # Enter the mode: exactly one of (nothing, nat table, tuplet) on the path.
        if what == "iptables":
            nat_install(t, node, fam, protos)
        elif what in ("tuplet", SOCK_MODE):
            node_apply.apply(setup)
        elif mode == LRU_MODE:
            node_apply.apply(dataclasses.replace(
                setup, conntrack=dataclasses.replace(setup.conntrack, syn_table=False)))
        elif mode == EVENTS_MODE:
            node_apply.apply(setup)
            listener = subprocess.Popen(
                ["taskset", "-c", "0", sys.executable, "-m", "tuplet.cli", "--pin-root", PIN_ROOT, "ct", "events",
                 "-o", "json", *([] if args.events_print else ["-s", "192.0.2.1"])],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            assert listener.stderr is not None
            if not listener.stderr.readline().startswith("listening"):
                raise RuntimeError(f"ct events did not start: {listener.stderr.read()}")
        kube = [f.iptables for f in families_of(args) if "KUBE-" in nat_rules(t, node, f)]
        pinned = os.path.exists(PIN_ROOT)
        if kube != ([fam.iptables] if what == "iptables" else []) or pinned != mode.startswith("tuplet"):
            st.failures.append(f"wrong set-up: KUBE- nat rules in {kube or 'neither'} of iptables/ip6tables, "
                               f"tuplet {'attached' if pinned else 'absent'}")
        st.checks.append(f"KUBE- nat rules in {' and '.join(kube) or 'neither iptables nor ip6tables'}, "
                         f"tuplet pin root {'present' if pinned else 'absent'}")
        # A short warm-up that also proves the path carries traffic before measuring it.
        _, n, _ = loadgen(t, client, "crr", targets, port, 0.2, 1)
        if n == 0:
            raise RuntimeError(f"{mode}: no TCP transaction to {targets}:{port} completed in the warm-up")
        before = [s.counts() for s in servers]
        done: dict[str, int] = {}
        for metric in metrics_run:
            progs = prog_stats() if mode.startswith("tuplet") and args.bpf_stats else None
            rate, n, errors = loadgen(t, client, metric, targets, port, args.seconds, args.concurrency)
            if progs is not None:
                st.bpf.setdefault(metric, []).append(bpf_cost(progs, prog_stats(), n))
            st.samples[metric].append(rate)
            st.errors[metric] += errors
            done[metric] = n
        after = [s.counts() for s in servers]
        # The servers served what the client counted, and CRR's many connections reached both
        # (RR's and UDP RR's few flows may all hash to one backend).
        seen = [{k: a[k] - b[k] for k in a} for b, a in zip(before, after)]
        for s, d in zip(servers, seen):
            if d["accepted"] == 0:
                st.failures.append(f"backend {s.pod.name} accepted no connection")
        requests, udp = sum(d["requests"] for d in seen), sum(d["udp"] for d in seen)
        if requests < done["crr"] + done["rr"] or udp < done.get("udp_rr", 0):
            st.failures.append(f"servers saw {seen}, the client completed {done}")
        st.checks.append("both backends accepted connections; servers saw every transaction")
        if what == "iptables":
            hits = dnat_hits(t, node, fam)
            tcp = sum(v for k, v in hits.items() if "TCP" in k)
            udp = sum(v for k, v in hits.items() if "UDP" in k)
            if tcp < done["crr"] or any(v == 0 for k, v in hits.items() if "TCP" in k):
                st.failures.append(f"DNAT rules matched {hits}, CRR completed {done['crr']}")
            if "udp_rr" in metrics_run and udp == 0:
                st.failures.append(f"UDP DNAT rules matched {hits}")
            st.checks.append(f"{fam.iptables} DNAT hits tcp={tcp} udp={udp} (CRR {done['crr']})")
        elif mode.startswith("tuplet"):
            svc = tuplet_ct_service_entries(fam)
            # The other family's tables hold no service entry: the traffic took this family's path.
            other = {n: c for f in FAMS.values() if f != fam   # the IPv6 tables exist in every build
                     for n, c in tuplet_ct_service_entries(f).items() if c}
            new = tuplet_new_connections()
            drops = tuplet_drops()
            if mode == SOCK_MODE:
                with paths.open_pinned(PIN_ROOT, abi.SOCK_REV_NAT_MAP) as m:
                    rev = sum(1 for _ in m.keys())
                if any(svc.values()) or rev == 0:
                    st.failures.append(f"socket LB: service entries {svc}, socket reverse-NAT entries {rev}")
                if new < done["crr"]:
                    st.failures.append(f"tuplet counted {new} new connections, CRR completed {done['crr']}")
                st.checks.append(f"no SVC CT entries, {rev} socket reverse-NAT entries, new connections {new} "
                                 f"(CRR {done['crr']})")
            else:
                tcp_map, any_map, _ = fam.ct_maps
                if svc[tcp_map] == 0:
                    st.failures.append(f"no TCP service entries in tuplet's IPv{fam.version} CT: {svc}")
                if "udp_rr" in metrics_run and svc[any_map] == 0:
                    st.failures.append(f"no UDP service entries in tuplet's IPv{fam.version} CT: {svc}")
                if other:
                    st.failures.append(f"service entries in the other family's CT tables: {other}")
                if new < done["crr"]:
                    st.failures.append(f"tuplet counted {new} new connections, CRR completed {done['crr']}")
                st.checks.append(f"SVC CT entries {tcp_map}={svc[tcp_map]} {any_map}={svc[any_map]}, none in the "
                                 f"other family's, new connections {new} (CRR {done['crr']}), drops {drops or 0}")
            if drops:
                log_note(f"tuplet drops in this round: {drops}")
    finally:
        if listener is not None:
            listener.terminate()
            _, err = listener.communicate(timeout=60)
            summary = (err.strip().splitlines() or ["(no summary)"])[-1]
            st.checks.append("listener attached")
            log_note(f"events listener: {summary}")
            st.events.append(summary)
        # Leave the mode.
        if what == "iptables":
            nat_remove(t, node, fam)
        elif mode.startswith("tuplet"):
            node_apply.teardown(PIN_ROOT)
            with contextlib.suppress(OSError):   # the bench directory, once no other run uses it
                os.rmdir(os.path.dirname(PIN_ROOT))


def summarize(info: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    stats: dict[str, ModeStats] = info["stats"]
    metrics_run: list[str] = info["metrics"]
    modes = list(stats)
    med = {mode: {m: statistics.median(stats[mode].samples[m]) for m in metrics_run} for mode in modes}

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    def added_us(rate: float, direct: float) -> float | None:
        return 1e6 / rate - 1e6 / direct if rate and direct else None

    def paired(a: str, b: str, m: str) -> float | None:
        rs = [x / y for x, y in zip(stats[a].samples[m], stats[b].samples[m]) if y]
        return statistics.median(rs) if rs else None

    out: dict[str, Any] = {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "command": shlex.join(argv),
        "seconds": args.seconds, "rounds": args.rounds, "concurrency": args.concurrency,
        "pinned_cpus": args.cpus,
        "message_bytes": MSG_SIZE,
        "services_via": info["services_via"],
        "families": list(args.families),
        "modes": {},
    }
    for t, i in (("tuplet", "iptables"), ("tuplet6", "ip6tables")):
        if t in stats and i in stats:
            out[f"{t}_vs_{i}"] = {m: ratio(med[t][m], med[i][m]) for m in metrics_run}
            out[f"{t}_vs_{i}_paired"] = {m: paired(t, i, m) for m in metrics_run}
    # IPv6's cost per transaction over IPv4's, mode by mode: IPv4's rate over IPv6's (issue 19's
    # target for tuplet: at most 1.1 for CRR and RR).
    v6v4 = {m6: m4 for m6, m4 in V6_MODES.items() if m6 in stats and m4 in stats}
    if v6v4:
        out["ipv6_cost_vs_ipv4"] = {m6: {m: ratio(med[m4][m], med[m6][m]) for m in metrics_run}
                                    for m6, m4 in v6v4.items()}
        out["ipv6_cost_vs_ipv4_paired"] = {m6: {m: paired(m4, m6, m) for m in metrics_run}
                                           for m6, m4 in v6v4.items()}
    if SOCK_MODE in stats:
        out["tuplet_sock_vs_direct_paired"] = {m: paired(SOCK_MODE, "direct", m) for m in metrics_run}
        out["tuplet_sock_vs_iptables_paired"] = {m: paired(SOCK_MODE, "iptables", m) for m in metrics_run}
    if LRU_MODE in stats:
        out["tuplet_vs_single_lru_paired"] = {m: paired("tuplet", LRU_MODE, m) for m in metrics_run}
    if EVENTS_MODE in stats:
        out["events_vs_tuplet_paired"] = {m: paired(EVENTS_MODE, "tuplet", m) for m in metrics_run}
        out["events_listener"] = stats[EVENTS_MODE].events
    for mode in modes:
        st = stats[mode]
        out["modes"][mode] = {
            m: {"median": med[mode][m], "min": min(st.samples[m]), "max": max(st.samples[m]),
                "samples": st.samples[m], "errors": st.errors[m],
                "ratio_to_direct": ratio(med[mode][m], med[direct_of(mode)][m]),
                # With the traffic on one CPU, what the mode adds to a transaction's CPU time over
                # its family's direct mode.
                "added_us_over_direct": added_us(med[mode][m], med[direct_of(mode)][m])}
            for m in metrics_run
        }
        if st.bpf:
            out["modes"][mode]["bpf_stats"] = st.bpf
        out["modes"][mode]["checks"] = {"passed": not st.failures, "failures": st.failures,
                                        "verified": sorted(set(st.checks))}
    out["checks_passed"] = all(out["modes"][m]["checks"]["passed"] for m in modes)
    return out


def print_table(res: dict[str, Any]) -> None:
    metrics_run = [m for m in METRICS if m in next(iter(res["modes"].values()))]
    print(f"kernel {res['kernel']}, {res['cpus']} CPUs, {res['rounds']} rounds x {res['seconds']:g} s per "
          f"measurement, concurrency {res['concurrency']}, {res['message_bytes']}-byte messages, "
          f"traffic on CPUs {res['pinned_cpus']}")
    print(f"tuplet service via {res['services_via']}")
    head = f"{'mode':<11}"
    for m in metrics_run:
        head += f" {LABELS[m]:>10} {'spread':>6} {'/direct':>7}"
    print(head)
    for mode in res["modes"]:
        row = f"{mode:<11}"
        for m in metrics_run:
            d = res["modes"][mode][m]
            spread = (d["max"] - d["min"]) / d["median"] * 100 if d["median"] else 0.0
            r = d["ratio_to_direct"]
            row += f" {d['median']:>10.0f} {spread:>5.0f}% {r if r is not None else float('nan'):>7.2f}"
        print(row)
    for t, i in (("tuplet", "iptables"), ("tuplet6", "ip6tables")):
        if f"{t}_vs_{i}" not in res:
            continue
        tv, tp = res[f"{t}_vs_{i}"], res[f"{t}_vs_{i}_paired"]
        print(f"{t}/{i}: " + ", ".join(
            f"{LABELS[m].removesuffix('/s')} {tv[m]:.2f} (paired by round {tp[m]:.2f})" for m in metrics_run
            if tv[m] is not None and tp[m] is not None))
    if "ipv6_cost_vs_ipv4" in res:
        print("IPv6 cost per transaction / IPv4's (IPv4 rate / IPv6 rate; paired by round):")
        for mode, r in res["ipv6_cost_vs_ipv4"].items():
            rp = res["ipv6_cost_vs_ipv4_paired"][mode]
            print(f"  {kind(mode):<9} " + ", ".join(
                f"{LABELS[m].removesuffix('/s')} {r[m]:.3f} ({rp[m]:.3f})" for m in metrics_run
                if r[m] is not None and rp[m] is not None))
        if res["pinned_cpus"] != "all":
            print("added CPU time per transaction over direct (us, IPv4 / IPv6): " + "; ".join(
                f"{md} " + ", ".join(
                    f"{LABELS[m].removesuffix('/s')} {res['modes'][md][m]['added_us_over_direct']:.2f}"
                    f" / {res['modes'][m6][m]['added_us_over_direct']:.2f}" for m in metrics_run)
                for m6, md in V6_MODES.items() if md != "direct" and md in res["modes"] and m6 in res["modes"]))
    for key, label in (("tuplet_sock_vs_direct_paired", "direct"), ("tuplet_sock_vs_iptables_paired", "iptables")):
        if key in res:
            print(f"{SOCK_MODE}/{label} (paired by round): " + ", ".join(
                f"{LABELS[m].removesuffix('/s')} {res[key][m]:.3f}" for m in metrics_run if res[key][m] is not None))
    errs = {f"{mode}/{m}": res["modes"][mode][m]["errors"] for mode in res["modes"] for m in metrics_run
            if res["modes"][mode][m]["errors"]}
    if errs:
        print(f"client errors (failed transactions): {errs}")
    for mode in [md for md in res["modes"] if md.startswith("tuplet")]:
        for m, runs in res["modes"][mode].get("bpf_stats", {}).items():
            progs = sorted({name for r in runs for name in r["programs"]})
            parts = [f"{name} {statistics.median(r['programs'][name]['runs_per_tx'] for r in runs if name in r['programs']):.1f}"
                     f" runs x {statistics.median(r['programs'][name]['ns_per_run'] for r in runs if name in r['programs']):.0f} ns"
                     for name in progs]
            total = statistics.median(r["bpf_ns_per_tx"] for r in runs)
            print(f"{mode} BPF per {LABELS[m].removesuffix('/s')} transaction: {', '.join(parts)}; {total:.0f} ns in all")
    if "tuplet_vs_single_lru_paired" in res:
        sl = res["tuplet_vs_single_lru_paired"]
        print("tuplet/tuplet-lru (the handshake table's cost, paired by round): " + ", ".join(
            f"{LABELS[m].removesuffix('/s')} {sl[m]:.3f}" for m in metrics_run if sl[m] is not None))
    if "events_vs_tuplet_paired" in res:
        ev = res["events_vs_tuplet_paired"]
        print("tuplet+ev/tuplet (an events listener attached, paired by round): " + ", ".join(
            f"{LABELS[m].removesuffix('/s')} {ev[m]:.3f}" for m in metrics_run if ev[m] is not None))
        for s in res["events_listener"]:
            print(f"  listener: {s}")
    for mode in res["modes"]:
        c = res["modes"][mode]["checks"]
        state = "passed" if c["passed"] else "FAILED: " + "; ".join(c["failures"])
        print(f"path check {mode}: {state}")
    print(f"command: {res['command']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement (default 3)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds over all modes (default 5)")
    ap.add_argument("--concurrency", type=int, default=2 * (os.cpu_count() or 1),
                    help="client processes (default: 2 per CPU)")
    ap.add_argument("--cpus", default=str((os.cpu_count() or 1) - 1),
                    help="CPU list the servers and clients are pinned to (taskset -c), or 'all' "
                         "(default: the last CPU)")
    ap.add_argument("--quick", action="store_true", help="1 s per measurement, 2 rounds (smoke test)")
    ap.add_argument("--no-udp", action="store_true", help="skip UDP RR")
    ap.add_argument("--families", default="4,6", type=families_arg,
                    help="address families to measure: 4, 6 or 4,6 (default 4,6: the IPv4 modes and "
                         f"{', '.join(V6_MODES)} beside them)")
    ap.add_argument("--single-lru", action="store_true",
                    help=f"also run {LRU_MODE}: tuplet with one TCP table (syn_table = false)")
    ap.add_argument("--events", action="store_true",
                    help=f"also run {EVENTS_MODE}: tuplet with a `tuplet ct events` listener attached")
    ap.add_argument("--events-print", action="store_true",
                    help=f"{EVENTS_MODE}'s listener prints every event (JSON to /dev/null) instead of none")
    ap.add_argument("--bpf-stats", action="store_true",
                    help="attribute tuplet's cost: enable kernel.bpf_stats_enabled and report runs and "
                         "ns per run of each program per transaction (the accounting itself slows "
                         "tuplet by a few percent: use it to explain, not to compare)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    ap.add_argument("--out", metavar="FILE", help="also write the JSON results to FILE")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 2
    if args.rounds < 1 or args.seconds <= 0 or not 1 <= args.concurrency <= 256:
        ap.error("--rounds >= 1, --seconds > 0, --concurrency 1..256")
    if 4 not in args.families and (args.single_lru or args.events):
        ap.error("--single-lru and --events are IPv4 modes: --families must include 4")
    if os.geteuid() != 0:
        print("bench/services.py creates namespaces and loads BPF programs: run it as root", file=sys.stderr)
        return 2
    if not LOADGEN.exists():
        print(f"{LOADGEN} missing: run `make bench-services` (or make {LOADGEN.relative_to(ROOT)})",
              file=sys.stderr)
        return 2
    for tool in (f"{FAMS[v].iptables}-{op}" for v in args.families for op in ("restore", "save")):
        if not shutil.which(tool):
            print(f"{tool} missing (apt-get install iptables)", file=sys.stderr)
            return 2
    global PIN_CPUS, CGROUP
    PIN_CPUS = None if args.cpus == "all" else args.cpus
    log.configure("warning")
    t0 = time.monotonic()
    stats_file = Path("/proc/sys/kernel/bpf_stats_enabled")
    stats_was = stats_file.read_text().strip() if args.bpf_stats else None
    CGROUP = make_cgroup()
    try:
        if args.bpf_stats:
            stats_file.write_text("1")
        res = summarize(run(args), args, [sys.argv[0], *sys.argv[1:]])
    finally:
        remove_cgroup(CGROUP)
        if stats_was is not None:
            stats_file.write_text(stats_was)
    res["wall_seconds"] = round(time.monotonic() - t0, 1)
    return report.emit(res, args, print_table)


if __name__ == "__main__":
    sys.exit(main())
