#!/usr/bin/env python3
"""Established connections through a SYN flood: tuplet's handshake table vs one LRU vs nf_conntrack.

    make bench-flood       (or: .venv/bin/python bench/flood.py [--tcp-max N] [--syn-max N]
                                [--connections K] [--factor F] [--rounds R] [--quick]
                                [--ipv6] [--json] [--out FILE])
    make bench-flood BENCH_ARGS="--quick --json"

K established, idle TCP connections go from a client pod to a server pod; then a SYN flood of
F times the TCP table's size (default 10x) from random sources hits the server pod through the
node; then each connection is checked. A connection *survives* when its tracking entry is
still there after the flood (read before any further packet of it, so nothing re-learns it)
AND it still round-trips. Three modes, side by side in one run, each in a fresh topology:

  tuplet-syn    tuplet, ``[conntrack] syn_table = true``: TCP entries wait in the handshake
                table ``tpl_ct4_syn_v1`` (``syn_max`` entries) until established, so the
                flood churns only that table. Kept = the connection's OUT and IN entries are
                both in ``tpl_ct4_v1``, are the ones its handshake created (SYN seen in both
                directions) and have not lost packets from their count.
  tuplet-lru    tuplet, ``syn_table = false``: one LRU table, as the reference does.
  nf_conntrack  no tuplet; a stateful iptables ruleset in the node's FORWARD chain
                (ESTABLISHED,RELATED accepted, INVALID dropped, NEW TCP only with SYN, policy
                DROP), ``nf_conntrack_tcp_loose=0`` in the node (a lost entry is not re-learned
                mid-stream: the connection's packets become INVALID), and ``nf_conntrack_max``
                equal to tuplet's TCP table. Kept = an ESTABLISHED entry for the connection in
                the node's /proc/net/nf_conntrack. nf_conntrack_max is read-only in a child
                network namespace on this kernel (one global value, checked per namespace
                against that namespace's count): the run sets it in the initial namespace for
                this mode only and restores it afterwards (also on SIGINT/SIGTERM; not after
                SIGKILL). Other namespaces' conntrack tables are limited by it meanwhile.

The topology (namespaces ``tpl-flood-bench-*``): a node, a client pod (10.64.0.36), a server
pod (10.64.0.64, ``build/loadgen server 8000``) and an external host (192.168.77.2/24, the
node at .1). ``build/synflood`` in the external host sends the SYNs to 10.64.0.64:8000 from
random addresses in 198.18.0.0/15 (the benchmarking range, RFC 2544) and random ports: they
enter the node on its external link, are routed to the pod and leave on ``lxc-pod2``, where
tuplet's ``cil_to_container`` tracks them (CT_INGRESS) or, in nf_conntrack mode, they pass the
node's conntrack and FORWARD chain. Reverse-path filtering is off in the node (and would pass
anyway: the node routes 198.18.0.0/15 back through the external host, where the server's
SYN-ACKs end, dropped, since it does not forward). The server pod routes 198.18.0.0/15 through
a gateway with a permanent neighbour entry (as a pod routes off-cluster addresses), so the
flood does not fill its neighbour table with one ARP entry per spoofed source; it answers with
SYN cookies once its SYN queue is full.

Path checks (a failure makes the exit status 1): exactly one tracker is on the path (tuplet's
pin root xor the FORWARD rules); before the flood every connection round-trips and is tracked
(tuplet: OUT and IN in ``tpl_ct4_v1``; nf_conntrack: ESTABLISHED); at least 99% of the SYNs
reached the tracker (tuplet: packets counted by its ingress program on the server's veth;
nf_conntrack: SYNs admitted by the FORWARD rule plus SYNs conntrack dropped with its table
full) and, for tuplet, the server pod (TCP segments received, no checksum error); the flood
filled nf_conntrack's table (drops or early drops counted).

``--ipv6``: the same over IPv6, tuplet's modes only. The pods and the external host are
dual-stack (fd00:10:244::24 and ::40, fd00:77::2 with the node at ::1); the client holds its
connections to [fd00:10:244::40]:8000 (``loadgen server6``), ``synflood`` sends IPv6 SYNs from
random addresses in 2001:2::/48 (RFC 5180), routed by the node back to the external host; the
server pod answers through its default gateway (one neighbour). Kept = the OUT and IN entries in
``tpl_ct6_v1``, as above.

Pins live below /sys/fs/bpf/tuplet/bench/flood-<pid> and are removed at the end; writes
nothing else but ``--out FILE``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))

import report  # noqa: E402  (bench/report.py)
from tuplet.agent import log  # noqa: E402
from tuplet.conntrack import records as ct  # noqa: E402
from tuplet.datapath import (
    abi,
    metrics,  # noqa: E402
    paths,
)
from tuplet.lab.topology import External, Node, Pod, Topology  # noqa: E402
from tuplet.node import apply as node_apply
from tuplet.node import config  # noqa: E402
from tuplet.node.netns import enter, sysctl  # noqa: E402

CLIENT, SERVER, PORT = "10.64.0.36", "10.64.0.64", 8000
EXT_IP, NODE_EXT_IP = "192.168.77.2", "192.168.77.1"
FLOOD_CIDR = "198.18.0.0/15"          # RFC 2544 benchmarking addresses, never routed outside
GATEWAY = "169.254.1.1"               # the server pod's next hop for the flood's sources
MODES = ("tuplet-syn", "tuplet-lru", "nf_conntrack")
LABELS = {"tuplet-syn": "tuplet, handshake table", "tuplet-lru": "tuplet, single LRU",
          "nf_conntrack": "iptables + nf_conntrack"}
LOADGEN = ROOT / "build" / "loadgen"
SYNFLOOD = ROOT / "build" / "synflood"
BENCH_DIR = "/sys/fs/bpf/tuplet/bench"
NF_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"
TCP_SYN, TCP_ACK = 0x02, 0x10


@dataclass(frozen=True)
class Stack:
    """What a run floods over: the pods', the external host's and the flood's addresses, and
    the tuplet tables that track the connections (IPv4, or IPv6 with ``--ipv6``)."""

    name: str
    client: str
    server: str
    ext: str
    node_ext: str
    flood_cidr: str
    tcp_map: str
    syn_map: str


IPV4 = Stack("ipv4", CLIENT, SERVER, EXT_IP, NODE_EXT_IP, FLOOD_CIDR, abi.CT_MAP_TCP, abi.CT_MAP_SYN)
# IPv6: ULA pods and external link; the flood from 2001:2::/48 (RFC 5180 benchmarking addresses).
IPV6 = Stack("ipv6", "fd00:10:244::24", "fd00:10:244::40", "fd00:77::2", "fd00:77::1", "2001:2::/48",
             abi.CT6_MAP_TCP, abi.CT6_MAP_SYN)
DELIVERY = 0.99                       # share of the flood that must reach the tracker

# One process holding K connections: prints "ports P1 P2 ..."; then each stdin line
# (a timeout in seconds) sends a short message on every connection and prints
# "failed P..." (the local ports whose echo did not come back in time).
HOLD = textwrap.dedent("""
    import resource, selectors, socket, sys, time
    dst, port, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < k + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, k + 64), hard))
    socks = []
    try:
        for i in range(k):
            s = socket.create_connection((dst, port), timeout=5)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            socks.append(s)
    except OSError as e:
        print("error connection", len(socks), type(e).__name__, e, flush=True)
        sys.exit(1)
    ports = [s.getsockname()[1] for s in socks]
    print("ports", *ports, flush=True)
    sel = selectors.DefaultSelector()
    n = 0
    for line in sys.stdin:
        timeout = float(line)
        n += 1
        msg = b"rt%06d" % n
        pending, ok = {}, set()
        for s in socks:
            try:
                s.send(msg)
            except OSError:
                continue
            pending[s] = b""
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                s = key.fileobj
                try:
                    d = s.recv(64)
                except BlockingIOError:
                    continue
                except OSError:
                    d = b""
                pending[s] += d
                if not d or len(pending[s]) >= len(msg):
                    sel.unregister(s)
                    if pending.pop(s) == msg:
                        ok.add(s)
        for s in pending:
            sel.unregister(s)
        print("failed", *(p for p, s in zip(ports, socks) if s not in ok), flush=True)
""")


def note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


# --- the test bed ---------------------------------------------------------------------------


class Held:
    """K established connections client -> server, held open by one process in the client pod."""

    def __init__(self, t: Topology, client: Pod, k: int, server: str = SERVER) -> None:
        self.proc = t.popen(client, [sys.executable, "-c", HOLD, server, str(PORT), str(k)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        if first[:1] != ["ports"] or len(first) != k + 1:
            raise RuntimeError(f"holding {k} connections failed: {' '.join(first)[:200]!r}")
        self.ports = [int(p) for p in first[1:]]

    def roundtrip(self, timeout: float = 3.0) -> set[int]:
        """Send a message on every connection; the local ports whose echo did not come back."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{timeout}\n")
        self.proc.stdin.flush()
        words = self.proc.stdout.readline().split()
        if words[:1] != ["failed"]:
            raise RuntimeError(f"connection holder died: {words!r}")
        return {int(p) for p in words[1:]}

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                if self.proc.stdin:
                    self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Bed:
    """The namespaces of one run: node, client and server pods, an external host that floods;
    with the IPv6 stack, pods and external host are dual-stack and the flood is IPv6."""

    def __init__(self, prefix: str, stack: Stack = IPV4) -> None:
        self.stack = stack
        self.t = Topology(prefix=prefix)
        try:
            self._build()
        except BaseException:
            self.t.close()
            raise

    def _build(self) -> None:
        t, v6 = self.t, self.stack is IPV6
        self.node: Node = t.add_node("node")
        self.client: Pod = t.add_pod(self.node, "pod1", CLIENT, ipv6=IPV6.client if v6 else None)
        self.server: Pod = t.add_pod(self.node, "pod2", SERVER, ipv6=IPV6.server if v6 else None)
        self.ext: External = t.add_external(self.node, "ext", EXT_IP, node_ip=NODE_EXT_IP,
                                            ipv6=IPV6.ext if v6 else None, node_ipv6=IPV6.node_ext if v6 else None)
        # The node: the flood's sources are behind the external host (their SYN-ACKs end there);
        # no reverse-path filter (Topology sets it off; this keeps it so for the new link too).
        self.ip(self.node, "route", "add", self.stack.flood_cidr, "via", self.stack.ext)
        self.sysctl(self.node, {"net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
                                f"net.ipv4.conf.{self.ext.node_ifname}.rp_filter": 0})
        # The server pod: off-pod sources through one gateway (a permanent neighbour: the
        # node's side of its veth; over IPv6 the pod's default gateway fe80::1), SYN cookies
        # once the SYN queue is full (IPv6's too), no rp filter.
        self.ip(self.server, "neigh", "add", GATEWAY, "lladdr", self.server.host_mac, "dev",
                self.server.ifname, "nud", "permanent")
        self.ip(self.server, "route", "add", FLOOD_CIDR, "via", GATEWAY, "dev", self.server.ifname, "onlink")
        self.sysctl(self.server, {"net.ipv4.tcp_syncookies": 1, "net.ipv4.conf.all.rp_filter": 0,
                                  f"net.ipv4.conf.{self.server.ifname}.rp_filter": 0})
        self.server_proc = t.popen(self.server, [str(LOADGEN), "server6" if v6 else "server", str(PORT)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.server_proc.stdout is not None
        line = self.server_proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"loadgen server did not start: {line!r}")
        # The external host resolves the node once, before the flood (no packet waits for ARP).
        self.t.run(self.ext, ["ping", "-c", "1", "-W", "2", self.stack.node_ext], check=True, capture_output=True)

    def ip(self, host: Node | Pod | External, *argv: str) -> None:
        r = self.t.run(host, ["ip", *argv], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip {' '.join(argv)} in {host.netns}: {r.stderr.strip()}")

    @staticmethod
    def sysctl(host: Node | Pod | External, values: dict[str, int | str]) -> None:
        with enter(host.netns):
            for k, v in values.items():
                sysctl(k, v)

    def read(self, host: Node | Pod | External, *paths: str) -> str:
        """Files read inside the host's namespace (/proc/net and /proc/sys/net are per namespace)."""
        return self.t.run(host, ["cat", *paths], check=True, capture_output=True, text=True).stdout

    def snmp(self, host: Node | Pod | External) -> dict[str, int]:
        """/proc/net/snmp and /proc/net/netstat as {"TcpInSegs": n, "TcpExtSyncookiesSent": n, ...}."""
        out: dict[str, int] = {}
        lines = self.read(host, "/proc/net/snmp", "/proc/net/netstat").splitlines()
        for head, vals in zip(lines[::2], lines[1::2]):
            h, v = head.split(), vals.split()
            prefix = h[0].rstrip(":")
            out.update({prefix + k: int(x) for k, x in zip(h[1:], v[1:])})
        return out

    def rx_packets(self, host: Node | Pod | External, ifname: str) -> int:
        for line in self.read(host, "/proc/net/dev").splitlines():
            name, _, rest = line.partition(":")
            if name.strip() == ifname:
                return int(rest.split()[1])
        raise RuntimeError(f"no {ifname} in {host.netns}")

    def flood(self, count: int, seed: int) -> dict[str, Any]:
        argv = [str(SYNFLOOD), "-n", str(count), "-s", str(seed), self.stack.server, str(PORT), self.stack.flood_cidr]
        r = self.t.run(self.ext, argv, capture_output=True, text=True, timeout=max(60, count / 5000))
        if r.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")
        kv = dict(item.split("=") for item in r.stdout.split())
        return {"sent": int(kv["sent"]), "elapsed": float(kv["elapsed"]), "rate": float(kv["rate"]),
                "send_retries": int(kv["errors"])}

    def close(self) -> None:
        """Stop the server (EOF: it reaps its workers), then remove the namespaces."""
        p = getattr(self, "server_proc", None)
        if p is not None and p.poll() is None:
            with contextlib.suppress(OSError):
                p.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=2)
        self.t.close()

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- tuplet ---------------------------------------------------------------------------------


def tuplet_config(bed: Bed, pin_root: str, tcp_max: int, syn_max: int, syn_table: bool,
                  any_max: int | None = None) -> config.NodeConfig:
    any_max = any_max or tcp_max
    v6 = [f'ipv6 = "{p.ipv6}"' if p.ipv6 else "" for p in (bed.client, bed.server)]
    return config.parse(textwrap.dedent(f"""
        [node]
        name = "flood"
        netns = "{bed.node.netns}"
        pin_root = "{pin_root}"

        [[endpoints]]
        name = "pod1"
        ifname = "{bed.client.host_ifname}"
        ipv4 = "{CLIENT}"
        {v6[0]}

        [[endpoints]]
        name = "pod2"
        ifname = "{bed.server.host_ifname}"
        ipv4 = "{SERVER}"
        {v6[1]}

        [lb]
        socket_lb = false

        [conntrack]
        tcp_max = {tcp_max}
        any_max = {any_max}
        syn_table = {"true" if syn_table else "false"}
        syn_max = {syn_max}
    """))


@dataclass(frozen=True)
class Tracked:
    """A connection's two tuplet entries (OUT at the client's veth, IN at the server's)."""

    out: ct.CtRecord | None
    inn: ct.CtRecord | None

    @property
    def both(self) -> bool:
        return self.out is not None and self.inn is not None


def tuplet_entries(pin_root: str, ports: list[int], stack: Stack = IPV4) -> dict[int, Tracked]:
    """The entries in the stack's TCP table (``tpl_ct4_v1``, ``tpl_ct6_v1``) of the connections
    client:port -> server:PORT."""
    want = set(ports)
    found: dict[tuple[int, str], ct.CtRecord] = {}
    with paths.open_pinned(pin_root, stack.tcp_map) as m:
        for r in ct.records(m):
            if r.src[0] == stack.client and r.src[1] in want and r.dst == (stack.server, PORT) and not r.related:
                found[(r.src[1], r.direction)] = r
    return {p: Tracked(found.get((p, "OUT")), found.get((p, "IN"))) for p in ports}


def original(before: Tracked, after: Tracked) -> bool:
    """The entries after the flood are the ones the handshake made (not re-learned, not reset)."""
    if not after.both or not before.both:
        return False
    for b, a in ((before.out, after.out), (before.inn, after.inn)):
        assert a is not None and b is not None
        e = a.entry
        if not (e.tx_flags_seen & TCP_SYN and e.rx_flags_seen & TCP_SYN) or e.packets < b.entry.packets:
            return False
    return True


def tuplet_ingress(pin_root: str) -> dict[str, int]:
    """Packets tuplet's pod programs counted, by direction/reason."""
    obj = str(paths.object_dir() / abi.OBJ_LXC)
    with paths.open_pinned(pin_root, abi.METRICS_MAP) as m:
        return {f"{c.direction}/{c.reason}": c.packets
                for c in metrics.read(m, metrics.reason_names(obj), metrics.direction_names(obj))}


def map_entries(pin_root: str, name: str) -> int | None:
    try:
        with paths.open_pinned(pin_root, name) as m:
            return sum(1 for _ in m.keys())
    except Exception:   # noqa: BLE001 - not there (the BPF side without it)
        return None


# --- nf_conntrack ---------------------------------------------------------------------------


def nf_ruleset() -> str:
    return textwrap.dedent("""\
        *filter
        :INPUT ACCEPT [0:0]
        :FORWARD DROP [0:0]
        :OUTPUT ACCEPT [0:0]
        -A FORWARD -m conntrack --ctstate INVALID -j DROP
        -A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
        -A FORWARD -p tcp --syn -m conntrack --ctstate NEW -m comment --comment tpl-flood-new -j ACCEPT
        COMMIT
    """)


def nf_install(bed: Bed) -> None:
    bed.t.run(bed.node, ["iptables-restore"], input=nf_ruleset(), text=True, check=True, capture_output=True)
    # After the rules: the ct match is what hooks conntrack into this namespace.
    bed.sysctl(bed.node, {"net.netfilter.nf_conntrack_tcp_loose": 0})


def nf_remove(bed: Bed) -> None:
    for argv in (["iptables", "-F", "FORWARD"], ["iptables", "-P", "FORWARD", "ACCEPT"]):
        bed.t.run(bed.node, argv, capture_output=True)


def forward_rules(bed: Bed) -> list[str]:
    """The node's FORWARD rules, with counters (``[packets:bytes] -A FORWARD ...``)."""
    out = bed.t.run(bed.node, ["iptables-save", "-c", "-t", "filter"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "-A FORWARD" in line]


def new_syn_accepted(bed: Bed) -> int:
    for line in forward_rules(bed):
        if "tpl-flood-new" in line and line.startswith("["):
            return int(line[1:].split(":")[0])
    return 0


def nf_stats(bed: Bed) -> dict[str, int]:
    """/proc/net/stat/nf_conntrack of the node, summed over CPUs, plus the live count."""
    lines = bed.read(bed.node, "/proc/net/stat/nf_conntrack").split("\n")
    head = lines[0].split()
    tot = dict.fromkeys(head, 0)
    for line in lines[1:]:
        if line.strip():
            for k, v in zip(head, line.split()):
                tot[k] += int(v, 16)
    tot["count"] = int(bed.read(bed.node, "/proc/sys/net/netfilter/nf_conntrack_count"))
    return tot


def nf_entries(bed: Bed, ports: list[int]) -> dict[int, str]:
    """TCP state of each connection CLIENT:port -> SERVER:PORT in the node's nf_conntrack."""
    want = set(ports)
    out: dict[int, str] = {}
    for line in bed.read(bed.node, "/proc/net/nf_conntrack").splitlines():
        w = line.split()
        if len(w) < 10 or w[2] != "tcp":
            continue
        kv = {}
        for item in w[6:]:
            k, _, v = item.partition("=")
            kv.setdefault(k, v)          # the first src/dst/sport/dport: the original direction
        if kv.get("src") == CLIENT and kv.get("dst") == SERVER and kv.get("dport") == str(PORT):
            sport = int(kv["sport"])
            if sport in want:
                out[sport] = w[5]
    return out


@contextlib.contextmanager
def global_conntrack_max(value: int) -> Iterator[int]:
    """nf_conntrack_max (global: read-only in child namespaces) set to value, restored after."""
    old = int(Path(NF_MAX).read_text())
    others = sorted(n for n in os.listdir("/run/netns") if not n.startswith("tpl-flood")) \
        if os.path.isdir("/run/netns") else []
    if others:
        note(f"nf_conntrack_max is global: {value} (not {old}) for a few seconds, in the namespaces "
             f"{', '.join(others)} too")
    Path(NF_MAX).write_text(str(value))
    try:
        yield old
    finally:
        Path(NF_MAX).write_text(str(old))


# --- one mode -------------------------------------------------------------------------------


@dataclass
class ModeResult:
    mode: str
    connections: int = 0
    tracked_before: int = 0
    roundtrip_before: int = 0
    kept: int = 0                   # tracking entry still there after the flood
    roundtrip_after: int = 0
    survived: int = 0               # both
    flood: dict[str, Any] = field(default_factory=dict)
    reached_tracker: int = 0        # flood packets the tracker saw
    detail: dict[str, Any] = field(default_factory=dict)
    checks: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.survived / self.connections if self.connections else 0.0


def run_mode(mode: str, args: argparse.Namespace, prefix: str, seed: int,
             pin_root: str | None = None) -> ModeResult:
    """One mode in a fresh topology: K connections, a flood, what survived."""
    res = ModeResult(mode)
    pin_root = pin_root or f"{BENCH_DIR}/flood-{os.getpid()}"
    flood_n = args.factor * args.tcp_max
    with Bed(prefix, args.stack) as bed, contextlib.ExitStack() as stack:
        if mode.startswith("tuplet"):
            node_apply.apply(tuplet_config(bed, pin_root, args.tcp_max, args.syn_max, mode == "tuplet-syn"))
            stack.callback(_tuplet_down, pin_root)
        else:
            stack.enter_context(global_conntrack_max(args.tcp_max))
            nf_install(bed)
            stack.callback(nf_remove, bed)
        rules = forward_rules(bed)
        pinned = os.path.exists(pin_root)
        res.checks.append(f"tuplet pin root {'present' if pinned else 'absent'}, {len(rules)} FORWARD rules")
        if pinned != mode.startswith("tuplet") or bool(rules) == mode.startswith("tuplet"):
            res.failures.append(f"wrong set-up: tuplet {'attached' if pinned else 'absent'}, FORWARD rules {rules}")

        held = Held(bed.t, bed.client, args.connections, bed.stack.server)
        stack.callback(held.close)
        ports = held.ports
        res.connections = len(ports)
        failed = held.roundtrip(5.0)
        res.roundtrip_before = len(ports) - len(failed)
        time.sleep(0.3)                 # delayed ACKs: nothing of these connections is in flight
        if mode.startswith("tuplet"):
            before = tuplet_entries(pin_root, ports, bed.stack)
            res.tracked_before = sum(1 for v in before.values() if v.both)
            m0 = tuplet_ingress(pin_root)
        else:
            states = nf_entries(bed, ports)
            res.tracked_before = sum(1 for s in states.values() if s == "ESTABLISHED")
            nf0 = nf_stats(bed)
            new0 = new_syn_accepted(bed)
            res.detail["nf_conntrack_max"] = int(bed.read(bed.node, "/proc/sys/net/netfilter/nf_conntrack_max"))
        if res.roundtrip_before < res.connections or res.tracked_before < res.connections:
            res.failures.append(f"before the flood only {res.roundtrip_before}/{res.connections} round-tripped, "
                                f"{res.tracked_before} tracked")
        res.checks.append(f"before the flood: {res.roundtrip_before}/{res.connections} round-trip, "
                          f"{res.tracked_before} tracked")
        snmp0 = bed.snmp(bed.server)
        rx0 = bed.rx_packets(bed.node, bed.ext.node_ifname)

        res.flood = bed.flood(flood_n, seed)

        # What is left, read before the connections send anything more.
        if mode.startswith("tuplet"):
            after = tuplet_entries(pin_root, ports, bed.stack)
            kept = {p for p in ports if original(before[p], after[p])}
            res.detail["entries_present"] = sum(1 for v in after.values() if v.both)
            res.detail["out_kept"] = sum(1 for v in after.values() if v.out is not None)
            res.detail["in_kept"] = sum(1 for v in after.values() if v.inn is not None)
            counts = tuplet_ingress(pin_root)
            delta = {k: v - m0.get(k, 0) for k, v in counts.items() if v != m0.get(k, 0)}
            res.reached_tracker = sum(v for k, v in delta.items() if k.startswith("ingress/"))
            res.detail["tuplet_counters"] = delta
            res.detail["tcp_table_entries"] = map_entries(pin_root, bed.stack.tcp_map)
            res.detail["syn_table_entries"] = map_entries(pin_root, bed.stack.syn_map)
            drops = {k: v for k, v in delta.items() if "/DROP_" in k}
            if drops:
                note(f"{mode}: tuplet drops during the flood: {drops}")
        else:
            states = nf_entries(bed, ports)
            kept = {p for p, s in states.items() if s == "ESTABLISHED"}
            nf1 = nf_stats(bed)
            stat = {k: nf1[k] - nf0.get(k, 0) for k in ("drop", "early_drop", "insert_failed", "invalid")
                    if k in nf1}
            stat["count"] = nf1["count"]
            res.detail["nf_stat"] = stat
            admitted = new_syn_accepted(bed) - new0
            res.detail["new_syn_admitted"] = admitted
            res.reached_tracker = admitted + stat.get("drop", 0)
            if not (stat.get("drop", 0) or stat.get("early_drop", 0)):
                res.failures.append(f"the flood did not fill nf_conntrack's table: {stat}")
            res.checks.append(f"nf_conntrack full: {stat}")
        snmp1 = bed.snmp(bed.server)
        res.detail["node_rx"] = bed.rx_packets(bed.node, bed.ext.node_ifname) - rx0
        res.detail["server_tcp_in"] = snmp1["TcpInSegs"] - snmp0["TcpInSegs"]
        res.detail["server_syncookies_sent"] = snmp1.get("TcpExtSyncookiesSent", 0) - snmp0.get(
            "TcpExtSyncookiesSent", 0)
        csum = snmp1.get("TcpInCsumErrors", 0) - snmp0.get("TcpInCsumErrors", 0)
        need = int(DELIVERY * res.flood["sent"])
        if res.flood["sent"] < flood_n:
            res.failures.append(f"synflood sent {res.flood['sent']} of {flood_n}")
        if res.detail["node_rx"] < need:
            res.failures.append(f"the node received {res.detail['node_rx']} of {res.flood['sent']} SYNs")
        if res.reached_tracker < need:
            res.failures.append(f"the tracker saw {res.reached_tracker} of {res.flood['sent']} SYNs")
        if mode.startswith("tuplet") and res.detail["server_tcp_in"] < need:
            res.failures.append(f"the server pod received {res.detail['server_tcp_in']} of {res.flood['sent']} SYNs")
        if csum:
            res.failures.append(f"the server pod counted {csum} TCP checksum errors")
        res.checks.append(f"flood: sent {res.flood['sent']}, node received {res.detail['node_rx']}, tracker saw "
                          f"{res.reached_tracker}, server pod received {res.detail['server_tcp_in']} segments")

        failed = held.roundtrip(args.timeout)
        res.kept = len(kept)
        res.roundtrip_after = len(ports) - len(failed)
        res.survived = len(kept - failed)
        res.detail["lost_ports_sample"] = sorted(set(ports) - (kept - failed))[:10]
    return res


def _tuplet_down(pin_root: str) -> None:
    node_apply.teardown(pin_root)
    with contextlib.suppress(OSError):      # the bench directory, once no other run uses it
        os.rmdir(os.path.dirname(pin_root))


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, list[ModeResult]]:
    out: dict[str, list[ModeResult]] = {m: [] for m in args.modes}
    for rnd in range(args.rounds):
        order = args.modes[rnd % len(args.modes):] + args.modes[:rnd % len(args.modes)]
        for mode in order:
            seed = args.seed + rnd
            r = run_mode(mode, args, "tpl-flood-bench", seed)
            out[mode].append(r)
            if not args.json:
                print(f"  round {rnd + 1}/{args.rounds} {mode}: {r.survived}/{r.connections} survived, "
                      f"flood {r.flood['sent']} at {r.flood['rate']:.0f}/s", file=sys.stderr, flush=True)
    return out


def summarize(results: dict[str, list[ModeResult]], args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {
        "kernel": platform.release(), "cpus": os.cpu_count(), "command": shlex.join(argv),
        "tcp_max": args.tcp_max, "syn_max": args.syn_max, "nf_conntrack_max": args.tcp_max,
        "connections": args.connections, "factor": args.factor, "flood_syns": args.factor * args.tcp_max,
        "flood_sources": args.stack.flood_cidr, "stack": args.stack.name, "rounds": args.rounds, "modes": {},
    }
    for mode, runs in results.items():
        res["modes"][mode] = {
            "label": LABELS[mode],
            "fraction": sum(r.fraction for r in runs) / len(runs),
            "fractions": [r.fraction for r in runs],
            "kept": [r.kept for r in runs],
            "roundtrip_after": [r.roundtrip_after for r in runs],
            "survived": [r.survived for r in runs],
            "connections": [r.connections for r in runs],
            "flood_rate": [r.flood["rate"] for r in runs],
            "flood": [r.flood for r in runs],
            "detail": [r.detail for r in runs],
            "checks": {"passed": not any(r.failures for r in runs),
                       "failures": [f for r in runs for f in r.failures],
                       "verified": [c for r in runs for c in r.checks]},
        }
    res["fractions"] = {mode: m["fraction"] for mode, m in res["modes"].items()}
    rates = [x for m in res["modes"].values() for x in m["flood_rate"]]
    res["flood_rate_min"], res["flood_rate_max"] = min(rates), max(rates)
    res["checks_passed"] = all(m["checks"]["passed"] for m in res["modes"].values())
    return res


def print_table(res: dict[str, Any]) -> None:
    nf = " (nf_conntrack_max the same)" if "nf_conntrack" in res["modes"] else ""
    print(f"kernel {res['kernel']}, {res['cpus']} CPUs; TCP table {res['tcp_max']} entries{nf}, "
          f"handshake table {res['syn_max']}; {res['connections']} established connections; flood "
          f"{res['flood_syns']} SYNs ({res['factor']}x the TCP table) over {res['stack']} from {res['flood_sources']} at "
          f"{res['flood_rate_min']:,.0f}-{res['flood_rate_max']:,.0f} SYN/s; {res['rounds']} round(s)")
    print(f"{'mode':<26} {'entry kept':>11} {'round-trips':>11} {'survived':>9} {'fraction':>8}")
    for mode, m in res["modes"].items():
        n = sum(m["connections"])
        print(f"{m['label']:<26} {sum(m['kept']):>11} {sum(m['roundtrip_after']):>11} {sum(m['survived']):>9} "
              f"{m['fraction']:>8.3f}" + (f"   (of {n})" if n else ""))
    for mode, m in res["modes"].items():
        state = "passed" if m["checks"]["passed"] else "FAILED: " + "; ".join(m["checks"]["failures"])
        print(f"path check {mode}: {state}")
    print(f"command: {res['command']}")


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tcp-max", type=int, default=65536, help="TCP table size, and nf_conntrack_max (65536)")
    ap.add_argument("--syn-max", type=int, help="handshake table size (default: TCP size / 8, 1024 at least)")
    ap.add_argument("--connections", "-k", type=int, default=1000, help="established connections (1000)")
    ap.add_argument("--factor", type=int, default=10, help="flood size in TCP table sizes (10)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over the modes (3)")
    ap.add_argument("--timeout", type=float, default=3.0, help="seconds a round trip after the flood may take")
    ap.add_argument("--seed", type=int, default=1, help="synflood's seed in the first round (+1 per round)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--quick", action="store_true", help="TCP table 4096, 1024 handshake, 200 connections, 1 round")
    ap.add_argument("--ipv6", action="store_true",
                    help="connections and flood over IPv6 (tuplet's modes only: the default modes then)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    ap.add_argument("--out", metavar="FILE", help="also write the JSON results to FILE")
    args = ap.parse_args()
    if args.quick:
        args.tcp_max, args.connections, args.rounds = 4096, 200, 1
    if args.syn_max is None:
        args.syn_max = max(1024, args.tcp_max // 8)
    args.stack = IPV6 if args.ipv6 else IPV4
    modes = [m for m in MODES if m != "nf_conntrack"] if args.ipv6 else MODES
    if args.ipv6 and args.modes == ",".join(MODES):
        args.modes = ",".join(modes)
    args.modes = [m for m in args.modes.split(",") if m]
    if any(m not in modes for m in args.modes) or not args.modes:
        ap.error(f"--modes: a subset of {','.join(modes)}" + (" (the nf_conntrack mode is IPv4 only)" if args.ipv6 else ""))
    if args.rounds < 1 or args.factor < 1 or not 1 <= args.connections <= 20000 or args.tcp_max < 1024:
        ap.error("--rounds >= 1, --factor >= 1, --connections 1..20000, --tcp-max >= 1024")
    if 2 * args.connections > args.tcp_max:
        ap.error("--connections: 2 entries per connection must fit in the TCP table")
    if os.geteuid() != 0:
        print("bench/flood.py creates namespaces and loads BPF programs: run it as root", file=sys.stderr)
        return 2
    for exe in (LOADGEN, SYNFLOOD):
        if not exe.exists():
            print(f"{exe} missing: run `make bench-flood` (or make {exe.relative_to(ROOT)})", file=sys.stderr)
            return 2
    log.configure("warning")
    # SIGTERM unwinds like Ctrl-C: topologies closed, pins removed, nf_conntrack_max restored.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_exit)
    Topology.cleanup_stale("tpl-flood-bench")
    t0 = time.monotonic()
    res = summarize(run(args), args, [sys.argv[0], *sys.argv[1:]])
    res["wall_seconds"] = round(time.monotonic() - t0, 1)
    return report.emit(res, args, print_table)


if __name__ == "__main__":
    sys.exit(main())
