"""`make demo`: a node, three pods and an outside client in network namespaces, real
traffic, services, the CT table; pod1, pod2 and pod3 are dual-stack (IPv6 beside IPv4).

Builds the topology, applies a node configuration (TCX where the kernel has it) with a
ClusterIP and a LoadBalancer service, opens a real TCP connection and sends UDP and ICMP
between two pods, pings over IPv6 between them, then connects to the ClusterIP from a pod twice, through socket LB (the pod's
client in the demo's own cgroup, ``<cgroup v2 root>/tuplet-demo``: socket LB never attaches to
the root cgroup here) and per packet (the same client outside that cgroup), showing the CT
entries of each, once to the IPv6 ClusterIP beside it (per packet: its SVC, OUT and IN lines),
and to the LoadBalancer VIP from outside the node (each answer says which
backend served it and from which address the reply came), prints `tuplet svc list`, `tuplet ct list` and `tuplet metrics`, and
then adds a fourth pod live (`tuplet endpoint add`), shows the entries its traffic makes,
deletes it (`tuplet endpoint delete`) and shows they went, and removes everything again,
also on Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from tuplet.agent import log as logmod
from tuplet.cli import main as cli
from tuplet.conntrack import records as ct
from tuplet.datapath import cttables, paths
from tuplet.lab import cgroups
from tuplet.lab.topology import Topology

PIN_ROOT = "/sys/fs/bpf/tuplet/demo"
CGROUP = "tuplet-demo"   # below the cgroup v2 root: socket LB's programs and the demo's client
POD1, POD2, POD3, POD4 = "10.64.0.36", "10.64.0.64", "10.64.0.98", "10.64.0.120"
POD1_V6, POD2_V6, POD3_V6 = "fd00:10:244::24", "fd00:10:244::40", "fd00:10:244::62"
CLUSTER_IP, LB_VIP, NODE_IP, EXT = "10.68.174.146", "172.190.0.17", "172.191.0.254", "172.191.0.1"
CLUSTER_IP6 = "fd00:10:96::a"

# Answers every connection with its name; runs in each backend pod (on ::, IPv4 and IPv6).
NAMED = textwrap.dedent("""
    import socket, sys, threading
    name = sys.argv[1]
    t = socket.socket(socket.AF_INET6); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("::", 9000)); t.listen(64)
    print("ready", flush=True)
    def serve(c):
        with c:
            c.recv(1024); c.sendall(name.encode())
    while True:
        c, _ = t.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

# Connects n times; prints who answered and the address the reply came from.
ASK = textwrap.dedent("""
    import socket, sys
    dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        with socket.create_connection((dst, port), timeout=5) as s:
            s.sendall(b"hi"); name = s.recv(1024).decode()
            a, p = s.getpeername()[:2]
            print(f"  connection {i + 1}: answered by {name}, reply from {f'[{a}]' if ':' in a else a}:{p}")
""")

SERVER = textwrap.dedent("""
    import socket, sys
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", 8000)); t.listen()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 5353))
    print("ready", flush=True)
    c, _ = t.accept(); c.sendall(c.recv(1024).upper()); c.close()
    data, peer = u.recvfrom(1024); u.sendto(data[::-1], peer)
""")

CLIENT = textwrap.dedent(f"""
    import socket
    s = socket.create_connection(("{POD2}", 8000), timeout=5)
    s.sendall(b"hello over tcp"); print("tcp reply:", s.recv(1024).decode()); s.close()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
    u.sendto(b"hello over udp", ("{POD2}", 5353)); print("udp reply:", u.recvfrom(1024)[0].decode())
""")


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show_entries_of(addr: str, dports: tuple[int, ...] = (), shown: set[str] | None = None) -> set[str]:
    """Print the CT entries with ``addr`` as either address (and one of dports as destination
    port, when given), as `tuplet ct list` prints them, leaving out those whose flow (the line's
    first five words) is in ``shown``. Returns the flows of all of them."""
    lines = []
    for name in cttables.NAMES:
        with paths.open_pinned(PIN_ROOT, name) as m:
            lines += [r.line() for r in ct.records(m)
                      if addr in (r.src[0], r.dst[0]) and (not dports or r.dst[1] in dports)]
    flows = {" ".join(line.split()[:5]) for line in lines}
    new = [line for line in lines if " ".join(line.split()[:5]) not in (shown or set())]
    print(f"{len(new)} {'new ' if shown else ''}entries with {addr}")
    for line in sorted(new):
        print(f"  {line}")
    return flows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tuplet-demo", description=__doc__)
    ap.add_argument("--attach-mode", choices=["auto", "tcx", "tc"], default="auto")
    ap.add_argument("--keep", action="store_true", help="leave the topology and datapath up (Enter to clean up)")
    args = ap.parse_args(argv)
    logmod.configure("warning")
    main_pid = os.getpid()

    def on_term(*_: object) -> None:
        if os.getpid() == main_pid:  # never in a forked helper
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    Topology.cleanup_stale("tpl-demo")
    cli.main(["--pin-root", PIN_ROOT, "teardown"]) if Path(PIN_ROOT).exists() else None

    with Topology(prefix="tpl-demo") as topo, tempfile.TemporaryDirectory() as tmp, cgroups.owned(CGROUP) as cg:
        try:
            step("topology: node namespace with three pods on veth pairs (dual-stack), "
                 "an outside client on eth0")
            node = topo.add_node("node")
            p1 = topo.add_pod(node, "pod1", POD1, ipv6=POD1_V6)
            p2 = topo.add_pod(node, "pod2", POD2, ipv6=POD2_V6)
            p3 = topo.add_pod(node, "pod3", POD3, ipv6=POD3_V6)
            p4 = topo.add_pod(node, "pod4", POD4)     # not in the node file: added live below
            ext = topo.add_external(node, "ext", EXT, node_ip=NODE_IP, node_ifname="eth0")
            topo.add_service_range(node, "10.68.0.0/16")
            topo.run(ext, ["ip", "route", "add", f"{LB_VIP}/32", "via", NODE_IP], check=True)
            cfg = Path(tmp) / "node.toml"
            cfg.write_text(textwrap.dedent(f"""
                [node]
                name = "demo"
                netns = "{node.netns}"
                pin_root = "{PIN_ROOT}"
                attach_mode = "{args.attach_mode}"

                [[endpoints]]
                name = "pod1"
                ifname = "{p1.host_ifname}"
                ipv4 = "{POD1}"
                ipv6 = "{POD1_V6}"
                identity = 3096

                [[endpoints]]
                name = "pod2"
                ifname = "{p2.host_ifname}"
                ipv4 = "{POD2}"
                ipv6 = "{POD2_V6}"
                identity = 4122

                [[endpoints]]
                name = "pod3"
                ifname = "{p3.host_ifname}"
                ipv4 = "{POD3}"
                ipv6 = "{POD3_V6}"

                [[devices]]
                ifname = "eth0"

                [lb]
                maglev_table_size = 1021
                socket_lb = true
                socket_lb_cgroup = "{cg}"

                [[services]]
                name = "web"
                type = "ClusterIP"
                address = "{CLUSTER_IP}"
                port = 80
                backends = ["{POD2}:9000", "{POD3}:9000"]

                [[services]]
                name = "web6"
                type = "ClusterIP"
                address = "{CLUSTER_IP6}"
                port = 80
                backends = ["[{POD2_V6}]:9000", "[{POD3_V6}]:9000"]

                [[services]]
                name = "web-lb"
                type = "LoadBalancer"
                address = "{LB_VIP}"
                port = 80
                backends = ["{POD2}:9000", "{POD3}:9000"]
            """))
            print(cfg.read_text())
            step(f"tuplet apply {cfg.name}")
            if cli.main(["apply", str(cfg)]) != 0:
                return 1
            cli.main(["--pin-root", PIN_ROOT, "status"])

            step(f"traffic: TCP and UDP from pod1 ({POD1}) to pod2 ({POD2}), then ping")
            server = topo.popen(p2, [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                print("server did not start", file=sys.stderr)
                return 1
            topo.run(p1, [sys.executable, "-c", CLIENT], check=True, timeout=20)
            server.wait(timeout=10)
            topo.run(p1, ["ping", "-c", "2", "-i", "0.2", POD2], check=True, timeout=10)
            step(f"IPv6: pod1 ({POD1_V6}) pings pod2 ({POD2_V6}); neighbour discovery passes untracked")
            topo.run(p1, ["ping", "-6", "-c", "2", "-i", "0.2", POD2_V6], check=True, timeout=10)
            time.sleep(0.2)

            for pod, name in ((p2, "pod2"), (p3, "pod3")):
                srv = topo.popen(pod, [sys.executable, "-c", NAMED, name], stdout=subprocess.PIPE, text=True)
                assert srv.stdout is not None
                if srv.stdout.readline().strip() != "ready":
                    print("backend server did not start", file=sys.stderr)
                    return 1
            ask = [sys.executable, "-c", ASK, CLUSTER_IP, "80", "4"]
            step(f"ClusterIP through socket LB: pod1's client, in cgroup {cg}, connects to {CLUSTER_IP}:80 "
                 "four times (backends pod2, pod3)")
            subprocess.run(cgroups.argv_in(cg, p1.netns, ask), check=True, timeout=30)
            print("connect() went straight to a backend (getpeername() still says the ClusterIP): only "
                  "pod-to-backend OUT/IN entries, no SVC entry, RevNAT=0")
            seen = show_entries_of(POD1, (80, 9000))
            step(f"ClusterIP per packet: the same client outside that cgroup (socket LB off for it) "
                 f"connects to {CLUSTER_IP}:80 four times")
            topo.run(p1, ask, check=True, timeout=30)
            print("each packet was translated by the pod's program: the seed's `TCP SVC` lines (pod to "
                  "ClusterIP) appear beside OUT entries with RevNAT=1 (replies reverse-NATed)")
            show_entries_of(POD1, (80, 9000), shown=seen)
            step(f"IPv6 ClusterIP per packet: the same client connects once to [{CLUSTER_IP6}]:80 (service web6, "
                 "the same backends)")
            topo.run(p1, [sys.executable, "-c", ASK, CLUSTER_IP6, "80", "1"], check=True, timeout=30)
            print("its three lines, in the IPv6 tables: SVC (pod1 to the ClusterIP, naming the backend), OUT "
                  "to the backend with the service's RevNAT, the backend's IN")
            show_entries_of(POD1_V6, (80, 9000))
            step(f"LoadBalancer: the outside client connects to {LB_VIP}:80 four times through eth0")
            topo.run(ext, [sys.executable, "-c", ASK, LB_VIP, "80", "4"], check=True, timeout=30)
            step("tuplet svc list")
            cli.main(["--pin-root", PIN_ROOT, "svc", "list"])

            step("tuplet ct list --time-diff")
            cli.main(["--pin-root", PIN_ROOT, "ct", "list", "--time-diff"])
            step("tuplet metrics")
            cli.main(["--pin-root", PIN_ROOT, "metrics"])

            step(f"a pod comes: tuplet endpoint add pod4 --ifname {p4.host_ifname} --ipv4 {POD4} --identity 5000")
            if cli.main(["--pin-root", PIN_ROOT, "endpoint", "add", "pod4", "--ifname", p4.host_ifname,
                         "--ipv4", POD4, "--identity", "5000"]) != 0:
                return 1
            cli.main(["--pin-root", PIN_ROOT, "endpoint", "list"])
            step(f"pod4 connects to pod2 ({POD2}:9000) and pings pod1: its entries appear")
            topo.run(p4, [sys.executable, "-c", ASK, POD2, "9000", "1"], check=True, timeout=30)
            topo.run(p4, ["ping", "-c", "1", POD1], check=True, timeout=10)
            show_entries_of(POD4)
            step("the pod goes: tuplet endpoint delete pod4 (detaches, flushes its entries and only those)")
            if cli.main(["--pin-root", PIN_ROOT, "endpoint", "delete", "pod4"]) != 0:
                return 1
            show_entries_of(POD4)
            if args.keep:
                input(f"\nTopology up (namespaces {node.netns}, {p1.netns}, {p2.netns}); Enter to clean up. ")
        except KeyboardInterrupt:
            print("\ninterrupted: cleaning up", file=sys.stderr)
            return 130
        finally:
            step("cleanup: tuplet teardown, namespaces and the demo's cgroup removed")
            cli.main(["--pin-root", PIN_ROOT, "teardown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
