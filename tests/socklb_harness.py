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

# Answers "<name> <peer ip>:<peer port>": who served, and whom it saw.
PEER_SERVER = textwrap.dedent("""
    import socket, sys, threading
    port, name = int(sys.argv[1]), sys.argv[2]
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port)); t.listen(64)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    def tcp_conn(c, peer):
        with c:
            while c.recv(4096):
                c.sendall(("%s %s:%d" % (name, *peer)).encode())
    def udp_loop():
        while True:
            d, peer = u.recvfrom(4096); u.sendto(("%s %s:%d" % (name, *peer)).encode(), peer)
    threading.Thread(target=udp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        c, peer = t.accept(); threading.Thread(target=tcp_conn, args=(c, peer), daemon=True).start()
""")

# n requests, one socket each; prints "<server> <what the server saw> <peer> <own address>" per
# request, the peer from getpeername (TCP, connected UDP) or recvfrom (unconnected UDP).
CLIENT = textwrap.dedent("""
    import socket, sys
    mode, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for i in range(n):
        try:
            if mode == "tcp":
                s = socket.create_connection((dst, port), timeout=3)
                s.sendall(b"hi"); d = s.recv(100); peer = s.getpeername()
            elif mode == "udp":
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
                s.sendto(b"hi", (dst, port)); d, peer = s.recvfrom(100)
            else:   # connected UDP
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
                s.connect((dst, port)); s.send(b"hi"); d = s.recv(100); peer = s.getpeername()
            print(d.decode(), "%s:%d" % peer, "%s:%d" % s.getsockname(), flush=True)
            s.close()
        except OSError as e:
            print("error", type(e).__name__, flush=True)
""")


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
