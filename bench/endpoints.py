#!/usr/bin/env python3
"""Endpoints under load (not a timed test): add/delete latency beside a live connection,
and the flush of a deleted pod's entries against the 10 ms CPU bound.

    .venv/bin/python bench/endpoints.py [--part latency|flush|all] [--endpoints 100] [--cycles 100]
                                        [--entries 1048576] [--pod-entries 100000] [--chunks 2048,1024,512]

latency: a node namespace with two pods applied (pod1 serves, pod2 keeps one TCP
  connection round-tripping every 10 ms) and ``--endpoints`` live endpoints on plain
  veths; then ``--cycles`` times an endpoint add and delete (the library calls
  `tuplet endpoint add/delete` make, under the node lock), and a few as `tuplet` processes.
  Reports add/delete latency and the connection's drops (a round trip > 1 s, or an error).
flush: a bpf_lxc.o TCP table of ``--entries`` filled to 95%, ``--pod-entries`` of them of
  one pod, flushed with tuplet.conntrack.flush (what endpoint delete and ct flush run) at
  each chunk size, with and without a yield between chunks. Per run: time, the longest
  single system call (perf_counter around each), and the worst gap of three probes:
  ``sleeper``: wakes every 1 ms on the flusher's CPU (the issue's measure: what the
  kernel does not give back); ``spinner``: CPU-bound on the flusher's CPU (user-space
  time slicing of two CPU-bound tasks, not kernel hold); ``other-cpu``: CPU-bound on
  another CPU (the machine's own noise).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))
sys.path.insert(0, str(ROOT / "bench"))

from gap_probe import GapProbe, pinned  # noqa: E402
from tuplet.agent import log as logmod  # noqa: E402
from tuplet.bpf.maps import Map  # noqa: E402
from tuplet.conntrack.entries import EntryLayout  # noqa: E402
from tuplet.conntrack.flush import Flusher  # noqa: E402
from tuplet.datapath.abi import CT_MAP_TCP, OBJ_LXC  # noqa: E402
from tuplet.lab.topology import Topology  # noqa: E402
from tuplet.node import apply as node_apply  # noqa: E402
from tuplet.node import config, endpoints  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.netns import enter  # noqa: E402
from tuplet.node.state import EndpointRecord  # noqa: E402

POD = "10.64.0.80"
PIN_ROOT = "/sys/fs/bpf/tuplet/bench-endpoints"

# --- flush -----------------------------------------------------------------------------


def _spin(cpu: int, worst: Any, stop: Any) -> None:
    os.sched_setaffinity(0, {cpu})
    last = time.perf_counter()
    while not stop.is_set():
        now = time.perf_counter()
        if now - last > worst.value:
            worst.value = now - last
        last = now


class Spinner:
    """A CPU-bound task on ``cpu`` recording its longest gap between two clock reads."""

    def __init__(self, cpu: int) -> None:
        ctx = mp.get_context("fork")
        self.worst = ctx.Value("d", 0.0, lock=False)
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=_spin, args=(cpu, self.worst, self.stop), daemon=True)
        self.proc.start()
        time.sleep(0.1)

    def measure(self, cpu: int, fn: Callable[[], Any]) -> tuple[Any, float]:
        with pinned(cpu):
            self.worst.value = 0.0
            out = fn()
            time.sleep(0.005)
            return out, self.worst.value

    def close(self) -> None:
        self.stop.set()
        self.proc.join(5)


def fill(m: Map, lay: EntryLayout, total: int, pod: int, first: bool) -> None:
    """``total`` entries, the first ``pod`` of them with the pod's address (first=False: only those)."""
    rng = np.random.default_rng(1)
    keys = np.zeros(total, lay.key)
    keys["daddr"] = rng.integers(1, 2**32 - 1, total, dtype=np.uint32)
    keys["saddr"] = rng.integers(1, 2**32 - 1, total, dtype=np.uint32)
    keys["daddr"][:pod] = int.from_bytes(socket.inet_aton(POD), "little")
    keys["sport"] = np.arange(total) & 0xFFFF
    keys["dport"] = (np.arange(total) >> 16) & 0xFFFF
    keys["nexthdr"] = 6
    vals = np.zeros(total, lay.value)
    vals["lifetime"] = 10**9
    n = total if first else pod
    for i in range(0, n, 65536):
        k, v = keys[i:min(n, i + 65536)], vals[i:min(n, i + 65536)]
        m.update_batch(k.tobytes(), v.tobytes(), len(k))


def bench_flush(args: argparse.Namespace) -> None:
    cfg = config.parse(f"[conntrack]\ntcp_max = {args.entries}\nsyn_table = false\n")
    spec = open_object(OBJ_LXC, cfg, None)
    coll = spec.load()
    spec.close()
    m = coll.maps[CT_MAP_TCP]
    lay = EntryLayout.of(m)
    total = int(args.entries * 0.95)
    fill(m, lay, total, args.pod_entries, first=True)
    cpu, other = 0, 1 if os.cpu_count() and os.cpu_count() > 1 else 0   # type: ignore[operator]
    print(f"flush: table {m.max_entries} entries, {m.count()} filled, {args.pod_entries} of {POD}; "
          f"flusher on CPU {cpu}; load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with GapProbe(cpu) as probe:
        _, _, idle = probe.measure(lambda: time.sleep(1.0))
    print(f"  sleeper probe, nothing running on its CPU but the machine's load, 1 s: worst gap {idle * 1000:.2f} ms")
    print(f"  {'chunk':>6} {'yield':>5} {'probe':>9} {'deleted':>8} {'time ms':>8} {'longest call (wall)':>26} {'cpu ms':>6} "
          f"{'worst gap ms':>12}")
    for chunk in args.chunks:
        for yield_cpu in (False, True):
            for kind in ("sleeper", "spinner", "other-cpu"):
                fill(m, lay, total, args.pod_entries, first=False)
                flusher = Flusher([m], None, chunk=chunk, yield_cpu=yield_cpu)
                if kind == "sleeper":
                    with GapProbe(cpu) as probe:
                        res, _, gap = probe.measure(lambda: flusher.flush([POD]))
                else:
                    sp = Spinner(cpu if kind == "spinner" else other)
                    try:
                        res, gap = sp.measure(cpu, lambda: flusher.flush([POD]))
                    finally:
                        sp.close()
                print(f"  {chunk:>6} {str(yield_cpu):>5} {kind:>9} {res.ct_deleted:>8} {res.duration_s * 1000:>8.0f} "
                      f"{res.longest_step_s * 1000:>6.2f} ms {res.longest_step:<17} {res.longest_cpu_s * 1000:>6.2f} {gap * 1000:>12.2f}", flush=True)
    coll.close()


# --- add/delete latency beside a live connection ----------------------------------------

PINGER = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)
    print("up", flush=True)
    sent = drops = 0; worst = 0.0; end = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < end:
        t = time.monotonic()
        try:
            s.sendall(b"x" * 16); got = b""
            while len(got) < 16:
                d = s.recv(16 - len(got))
                if not d: raise OSError("closed")
                got += d
            worst = max(worst, time.monotonic() - t)
        except OSError:
            drops += 1
            s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0)
        sent += 1
        time.sleep(max(0.0, 0.010 - (time.monotonic() - t)))
    print(sent, drops, worst, flush=True)
""")

ECHO = textwrap.dedent("""
    import socket, threading
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("0.0.0.0", 8000)); t.listen(8); print("ready", flush=True)
    def echo(c):
        while (d := c.recv(4096)): c.sendall(d)
    while True:
        c, _ = t.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
""")


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    return (f"median {statistics.median(xs) * 1000:.1f} ms, p95 {xs[int(len(xs) * 0.95) - 1] * 1000:.1f} ms, "
            f"max {xs[-1] * 1000:.1f} ms")


def bench_latency(args: argparse.Namespace) -> None:
    with Topology(prefix="tpl-bep") as topo:
        node = topo.add_node("node")
        p1 = topo.add_pod(node, "pod1", "10.64.0.36")
        p2 = topo.add_pod(node, "pod2", "10.64.0.64")
        veths = [f"bep{i}" for i in range(args.endpoints + 1)]
        with enter(node.netns):
            for v in veths:
                subprocess.run(["ip", "link", "add", v, "type", "veth", "peer", "name", f"{v}p"], check=True)
                subprocess.run(["ip", "link", "set", v, "up"], check=True)
        cfg_text = textwrap.dedent(f"""
            [node]
            name = "bench"
            netns = "{node.netns}"
            pin_root = "{PIN_ROOT}"
            [[endpoints]]
            name = "pod1"
            ifname = "{p1.host_ifname}"
            ipv4 = "10.64.0.36"
            [[endpoints]]
            name = "pod2"
            ifname = "{p2.host_ifname}"
            ipv4 = "10.64.0.64"
            [lb]
            socket_lb = false
            [conntrack]
            tcp_max = 65536
            any_max = 65536
        """)
        node_apply.apply(config.parse(cfg_text))
        try:
            t = time.perf_counter()
            for i in range(args.endpoints):
                endpoints.add(PIN_ROOT, EndpointRecord(f"ep{i}", veths[i], f"10.65.{i // 250}.{i % 250 + 1}", 100 + i,
                                                       source="cli"))
            print(f"latency: {args.endpoints} live endpoints attached in {time.perf_counter() - t:.1f} s "
                  f"(+ pod1, pod2 from the node file); load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
            srv = topo.popen(p1, [sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
            assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
            duration = 3 + args.cycles * 0.25
            pinger = topo.popen(p2, [sys.executable, "-c", PINGER, "10.64.0.36", "8000", str(duration)],
                                stdout=subprocess.PIPE, text=True)
            assert pinger.stdout is not None and pinger.stdout.readline().strip() == "up"
            adds: list[float] = []
            dels: list[float] = []
            spare = EndpointRecord("spare", veths[-1], "10.66.0.1", 9, source="cli")
            for _ in range(args.cycles):
                t = time.perf_counter()
                endpoints.add(PIN_ROOT, spare)
                adds.append(time.perf_counter() - t)
                t = time.perf_counter()
                endpoints.delete(PIN_ROOT, "spare")
                dels.append(time.perf_counter() - t)
            cli_add: list[float] = []
            cli_del: list[float] = []
            base = [sys.executable, "-m", "tuplet.cli", "--pin-root", PIN_ROOT, "endpoint"]
            env = {**os.environ, "PYTHONPATH": str(ROOT / "loader")}
            for _ in range(5):
                t = time.perf_counter()
                subprocess.run([*base, "add", "spare", "--ifname", veths[-1], "--ipv4", "10.66.0.1"], env=env,
                               check=True, capture_output=True)
                cli_add.append(time.perf_counter() - t)
                t = time.perf_counter()
                subprocess.run([*base, "delete", "spare"], env=env, check=True, capture_output=True)
                cli_del.append(time.perf_counter() - t)
            sent, drops, worst = pinger.stdout.readline().split()
            pinger.wait(30)
            srv.kill()
            srv.wait()
            print(f"  endpoint add (library call, node lock, attach 2 hooks, endpoint map, state file), "
                  f"{args.cycles}x: {_ms(adds)}")
            print(f"  endpoint delete (detach, flush its entries in a 64 Ki + 64 Ki table), {args.cycles}x: {_ms(dels)}")
            print(f"  `tuplet endpoint add` as a process (Python start + imports included), 5x: {_ms(cli_add)}")
            print(f"  `tuplet endpoint delete` as a process, 5x: {_ms(cli_del)}")
            print(f"  pod2 -> pod1 connection, a round trip every 10 ms meanwhile: {sent} sent, {drops} dropped, "
                  f"slowest {float(worst) * 1000:.1f} ms")
        finally:
            node_apply.teardown(PIN_ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["latency", "flush", "all"], default="all")
    ap.add_argument("--endpoints", type=int, default=100)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--entries", type=int, default=1 << 20)
    ap.add_argument("--pod-entries", type=int, default=100_000)
    ap.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 1024, 512])
    args = ap.parse_args()
    logmod.configure("warning")
    if args.part in ("latency", "all"):
        bench_latency(args)
    if args.part in ("flush", "all"):
        bench_flush(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
