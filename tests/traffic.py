"""Real sockets inside test namespaces: an echo server and a client driven over stdin."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

from tuplet.lab.topology import Pod, Topology

ECHO_SERVER = textwrap.dedent("""
    import socket, sys, threading
    port = int(sys.argv[1])
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", port)); t.listen(64)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
    def tcp_conn(c):
        with c:
            while (d := c.recv(4096)):
                c.sendall(d)
    def udp_loop():
        while True:
            d, peer = u.recvfrom(4096); u.sendto(d, peer)
    threading.Thread(target=udp_loop, daemon=True).start()
    print("ready", flush=True)
    while True:
        c, _ = t.accept(); threading.Thread(target=tcp_conn, args=(c,), daemon=True).start()
""")

# Like ECHO_SERVER, but every answer is prefixed with the server's name (argv[2]),
# so a client behind a service sees which backend served it.
NAMED_SERVER = ECHO_SERVER.replace("c.sendall(d)", "c.sendall(NAME + b' ' + d)").replace(
    "u.sendto(d, peer)", "u.sendto(NAME + b' ' + d, peer)").replace(
    "port = int(sys.argv[1])", "port = int(sys.argv[1]); NAME = sys.argv[2].encode()")

# One TCP connection kept open; each stdin line is sent and its echo printed.
# Prints "port N" (the local port) first.
TCP_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("port", s.getsockname()[1], flush=True)
    for line in sys.stdin:
        s.sendall(line.encode()); print(s.recv(4096).decode().strip(), flush=True)
""")

UDP_ONCE = textwrap.dedent("""
    import socket, sys
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
    u.bind(("0.0.0.0", int(sys.argv[3])))
    u.sendto(b"ping", (sys.argv[1], int(sys.argv[2]))); print(u.recvfrom(100)[0].decode())
""")

TCP_ONCE = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(b"hello"); assert s.recv(100) == b"hello"; s.close(); print("ok")
""")


def ipv6(script: str) -> str:
    """One of the scripts above on IPv6 sockets (bound to ``::``) instead of IPv4 ones."""
    return script.replace("socket.socket()", "socket.socket(socket.AF_INET6)").replace(
        "socket.AF_INET,", "socket.AF_INET6,").replace('"0.0.0.0"', '"::"')


def start_server(topo: Topology, pod: Pod, port: int, name: str | None = None,
                 family6: bool = False) -> subprocess.Popen[str]:
    """An echo server (TCP and UDP on ``port``); with ``name``, answers start with it; with
    ``family6``, on IPv6 sockets bound to ``::`` (which take IPv4 too)."""
    script = ECHO_SERVER if name is None else NAMED_SERVER
    argv = [sys.executable, "-c", ipv6(script) if family6 else script, str(port), *([] if name is None else [name])]
    p = topo.popen(pod, argv, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


class LiveConnection:
    """A TCP connection that stays open while the test reloads or restarts things."""

    def __init__(self, topo: Topology, pod: Pod, dst: str, port: int) -> None:
        self.proc = topo.popen(pod, [sys.executable, "-c", TCP_CLIENT, dst, str(port)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().split()
        assert first[:1] == ["port"], f"client failed to connect: {first}"
        self.sport = int(first[1])

    def roundtrip(self, text: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=5)


def tcp_once(topo: Topology, pod: Pod, dst: str, port: int) -> None:
    r = topo.run(pod, [sys.executable, "-c", TCP_ONCE, dst, str(port)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def udp_once(topo: Topology, pod: Pod, dst: str, port: int, sport: int) -> None:
    script = ipv6(UDP_ONCE) if ":" in dst else UDP_ONCE
    r = topo.run(pod, [sys.executable, "-c", script, dst, str(port), str(sport)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ping", r.stderr


# One request per line of argv: TCP connections (one each) or UDP datagrams; prints
# "<answer> <peer address>:<peer port>" per request, or "error <what>".
ASK = textwrap.dedent("""
    import socket, sys
    proto, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    for i in range(n):
        try:
            if proto == "tcp":
                s = socket.create_connection((dst, port), timeout=3)
                s.sendall(b"hi"); d = s.recv(100); peer = s.getpeername(); s.close()
            else:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
                s.sendto(b"hi", (dst, port)); d, peer = s.recvfrom(100); s.close()
            print(d.decode().split()[0], "%s:%d" % peer[:2], flush=True)
        except OSError as e:
            print("error", type(e).__name__, flush=True)
""")


def ask(topo: Topology, host: Pod | Any, proto: str, dst: str, port: int, n: int = 1) -> list[tuple[str, str]]:
    """``n`` requests to dst:port (IPv4 or IPv6); (answering server's name, peer as the client saw it:
    ``address:port``, unbracketed) each."""
    script = ipv6(ASK) if ":" in dst else ASK
    r = topo.run(host, [sys.executable, "-c", script, proto, dst, str(port), str(n)], capture_output=True,
                 text=True, timeout=10 + 4 * n)
    assert r.returncode == 0, r.stderr
    return [tuple(line.split(None, 1)) for line in r.stdout.splitlines()]  # type: ignore[misc]
