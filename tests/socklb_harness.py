"""A cgroup v2 directory of the test's own for socket LB, and clients run inside it.

Only the test's own client processes are moved into the cgroup; the cgroup is removed
afterwards (any process of ours still in it is moved back to the root first)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

from tuplet.lab import cgroups
from tuplet.lab.topology import Pod, Topology

# Answers "<name> <peer ip>:<peer port>" (IPv6: "[<peer ip>]:<port>"): who served, and whom it saw.
# With a third argument "6", it serves IPv6 too (its own sockets, IPV6_V6ONLY).
PEER_SERVER = textwrap.dedent("""
    import socket, sys, threading
    port, name, v6 = int(sys.argv[1]), sys.argv[2], sys.argv[3:] == ["6"]
    def show(peer):
        return ("[%s]:%d" if ":" in peer[0] else "%s:%d") % peer[:2]
    def tcp_conn(c, peer):
        with c:
            while c.recv(4096):
                c.sendall(("%s %s" % (name, show(peer))).encode())
    def udp_loop(u):
        while True:
            d, peer = u.recvfrom(4096); u.sendto(("%s %s" % (name, show(peer))).encode(), peer)
    def accept_loop(t):
        while True:
            c, peer = t.accept(); threading.Thread(target=tcp_conn, args=(c, peer), daemon=True).start()
    for fam, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::"))[:2 if v6 else 1]:
        t = socket.socket(fam); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        u = socket.socket(fam, socket.SOCK_DGRAM)
        if fam == socket.AF_INET6:
            t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        t.bind((any_addr, port)); t.listen(64); u.bind((any_addr, port))
        threading.Thread(target=udp_loop, args=(u,), daemon=True).start()
        threading.Thread(target=accept_loop, args=(t,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")

# n requests, one socket each; prints "<server> <what the server saw> <peer> <own address>" per
# request, the peer from getpeername (TCP, connected UDP) or recvfrom (unconnected UDP). An IPv6
# destination (IPv4-mapped ones too) uses an AF_INET6 socket, and addresses print as [ip]:port.
CLIENT = textwrap.dedent("""
    import socket, sys
    mode, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    def show(a):
        return ("[%s]:%d" if ":" in a[0] else "%s:%d") % a[:2]
    for i in range(n):
        try:
            if mode == "tcp":
                s = socket.socket(fam); s.settimeout(3)
                s.connect((dst, port)); s.sendall(b"hi"); d = s.recv(100); peer = s.getpeername()
            elif mode == "udp":
                s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3)
                s.sendto(b"hi", (dst, port)); d, peer = s.recvfrom(100)
            else:   # connected UDP
                s = socket.socket(fam, socket.SOCK_DGRAM); s.settimeout(3)
                s.connect((dst, port)); s.send(b"hi"); d = s.recv(100); peer = s.getpeername()
            print(d.decode(), show(peer), show(s.getsockname()), flush=True)
            s.close()
        except OSError as e:
            print("error", type(e).__name__, flush=True)
""")


def host(addr_port: str) -> str:
    """The address of "ip:port" or "[ip]:port"."""
    return addr_port.rsplit(":", 1)[0].strip("[]")


def port_of(addr_port: str) -> str:
    return addr_port.rsplit(":", 1)[1]


def show(address: str, port: int) -> str:
    """address:port as CLIENT and PEER_SERVER print it."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def make_cgroup() -> Path:
    return cgroups.make(f"tuplet-test-{uuid.uuid4().hex[:8]}")


remove_cgroup = cgroups.remove
in_cgroup = cgroups.argv_in


def ask(topo: Topology, pod: Pod | Any, mode: str, dst: str, port: int, n: int = 1,
        cg: Path | None = None) -> list[list[str]]:
    """n requests from pod (inside cgroup cg when given): [server, seen client, peer, own] each."""
    assert not topo.closed
    argv = in_cgroup(cg, pod.netns, [sys.executable, "-c", CLIENT, mode, dst, str(port), str(n)])
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10 + 4 * n)
    assert r.returncode == 0, r.stderr
    return [line.split() for line in r.stdout.splitlines()]
