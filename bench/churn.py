#!/usr/bin/env python3
"""GC churn soak: does a GC pass every second ever break a live connection?

    make bench-churn      (or: .venv/bin/python bench/churn.py [--minutes 3] [--lifetime 4]
                               [--modes protected,unprotected] [--slow 32] [--crr 2] [--json])

Not part of the test suite. One namespace topology (prefix ``tpl-churn``): a node, a client
pod, three backend pods running ``build/loadgen server 8000`` and an external host. Services:
a ClusterIP (VIP:80) and a NodePort (NODE_IP:30080, ``[[devices]] eth0``), both over the three
local backends. Conntrack lifetimes are short (``--lifetime`` seconds for established TCP,
regular and service, 2 s after a close: load-time config) and this process runs a GC pass
(``CtGc``, the default method) every ``--gc-every`` seconds on the pinned maps.

Traffic, for ``--minutes`` per mode:
  churn  ``loadgen crr`` (connect, 64-byte request, echo, close) from the client pod to the
         ClusterIP and from the external host to the NodePort, ``--crr`` processes each:
         thousands of connections per second; loadgen counts failed transactions.
  slow   ``--slow`` long-lived connections per path (this script's ``slow`` subcommand in the
         client pod and in the external host), each sending a 64-byte request after a random
         pause of 0.6 to 1.6 lifetimes (so their entries often expire, or are judged expired
         just as the connection talks again) and expecting the echo within 2 s. A reset
         (ECONNRESET, EOF) or a missing echo (stall) is counted, and the connection reopened.

Modes:
  protected    production programs: the GC deletes only if the lifetime re-read in the
               program is still the one judged expired; ClusterIP picks its backend by flow hash.
  unprotected  the test-only switches gc_test_unprotected (no re-check) and lb_test_random_slot
               (a random ClusterIP backend, the reference's way): a lost entry moves the
               connection to another backend, which resets it.

Reported per mode and path: transactions and failures of the churn, slow requests, resets,
stalls; and the GC's totals (passes, deleted, kept because refreshed after the verdict).
"""
from __future__ import annotations

import argparse
import json
import random
import select
import socket
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402  (bench/report.py)
from tuplet.agent import log  # noqa: E402
from tuplet.bpf.objects import ObjectSpec  # noqa: E402
from tuplet.conntrack.gc import CtGc  # noqa: E402
from tuplet.conntrack.gc_progs import GcSwitches  # noqa: E402
from tuplet.datapath import abi, paths  # noqa: E402
from tuplet.lab.topology import Topology  # noqa: E402
from tuplet.node import apply as node_apply  # noqa: E402
from tuplet.node import config  # noqa: E402
from tuplet.node.netns import enter, sysctl  # noqa: E402

CLIENT, BACKS = "10.64.0.36", ("10.64.0.98", "10.64.0.64", "10.64.0.72")
VIP, NODE_IP, EXT = "10.68.174.146", "172.191.0.254", "172.191.0.1"
SVC_PORT, NODE_PORT, BACKEND_PORT = 80, 30080, 8000
PIN_ROOT = "/sys/fs/bpf/tuplet/bench/churn"
LOADGEN = ROOT / "build" / "loadgen"
MSG = b"x" * 64


# --- the slow talkers (run inside a namespace as `churn.py slow ...`) --------------------------

def slow(target: str, port: int, n: int, lifetime: float, seconds: float) -> dict[str, int]:
    """n connections to target:port, each talking after random pauses; counts what broke."""
    rnd = random.Random()
    out = {"requests": 0, "ok": 0, "resets": 0, "stalls": 0, "connect_failures": 0}

    def connect() -> socket.socket | None:
        try:
            s = socket.create_connection((target, port), timeout=2)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        except OSError:
            out["connect_failures"] += 1
            return None

    def pause() -> float:
        return time.monotonic() + rnd.uniform(0.6, 1.6) * lifetime

    conns: list[socket.socket | None] = [connect() for _ in range(n)]
    due = [time.monotonic() + rnd.uniform(0, lifetime) for _ in range(n)]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        i = min(range(n), key=due.__getitem__)
        time.sleep(max(0.0, min(due[i], end) - time.monotonic()))
        if time.monotonic() >= end:
            break
        s = conns[i]
        if s is None:
            conns[i], due[i] = connect(), pause()
            continue
        out["requests"] += 1
        failed = ""
        try:
            s.sendall(MSG)
            got = b""
            deadline = time.monotonic() + 2
            while len(got) < len(MSG):
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([s], [], [], left)[0]:
                    failed = "stalls"
                    break
                chunk = s.recv(len(MSG) - len(got))
                if not chunk:
                    failed = "resets"
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            failed = "resets"
        except OSError:
            failed = "stalls"
        if failed:
            out[failed] += 1
            s.close()
            conns[i] = connect()
        else:
            out["ok"] += 1
        due[i] = pause()
    for s in conns:
        if s is not None:
            s.close()
    return out


# --- the node ---------------------------------------------------------------------------------

def node_config(t: Topology, node: Any, pods: dict[str, Any], lifetime: int) -> config.NodeConfig:
    text = textwrap.dedent(f"""
        [node]
        name = "churn"
        netns = "{node.netns}"
        pin_root = "{PIN_ROOT}"

        [[devices]]
        ifname = "eth0"

        [conntrack]
        tcp_max = 262144
        any_max = 65536
        timeout_regular_tcp = "{lifetime}s"
        timeout_service_tcp = "{lifetime}s"
        timeout_regular_tcp_fin = "2s"

        [lb]
        maglev_table_size = 1021
        socket_lb = false   # per packet; never on the root cgroup
    """)
    for name, pod in pods.items():
        text += f'\n[[endpoints]]\nname = "{name}"\nifname = "{pod.host_ifname}"\nipv4 = "{pod.ipv4}"\n'
    backends = ", ".join(f'"{b}:{BACKEND_PORT}"' for b in BACKS)
    text += textwrap.dedent(f"""
        [[services]]
        name = "web"
        type = "ClusterIP"
        address = "{VIP}"
        port = {SVC_PORT}
        backends = [{backends}]

        [[services]]
        name = "np"
        type = "NodePort"
        address = "{NODE_IP}"
        port = {NODE_PORT}
        backends = [{backends}]
    """)
    return config.parse(text)


def apply_with(cfg: config.NodeConfig, random_slot: bool) -> None:
    """Apply, with the datapath's test-only lb_test_random_slot set for the unprotected mode
    (bench only: open_object is wrapped for the duration of the apply)."""
    orig = node_apply.open_object

    def opened(*a: Any, **kw: Any) -> ObjectSpec:
        spec = orig(*a, **kw)
        if random_slot and spec.has_global(".rodata", "lb_test_random_slot"):
            spec.set_const("lb_test_random_slot", 1)
        return spec

    node_apply.open_object = opened   # type: ignore[assignment]
    try:
        node_apply.apply(cfg)
    finally:
        node_apply.open_object = orig   # type: ignore[assignment]


class GcLoop(threading.Thread):
    """A GC pass every `every` seconds on the pinned maps, totals kept."""

    def __init__(self, every: float, unprotected: bool) -> None:
        super().__init__(daemon=True)
        self.every, self.unprotected = every, unprotected
        self.stop = threading.Event()
        self.totals = {"passes": 0, "deleted": 0, "nat_deleted": 0, "kept_refreshed": 0, "worst_pass_ms": 0.0}
        self.method = ""

    def run(self) -> None:
        maps = [paths.open_pinned(PIN_ROOT, n) for n in abi.CT_MAPS]
        nat = paths.open_pinned(PIN_ROOT, abi.NAT_MAP)
        with CtGc(maps, nat=nat, switches=GcSwitches(unprotected=self.unprotected)) as g:
            self.method = g.method.value
            while not self.stop.wait(self.every):
                r = g.run()
                tt = self.totals
                tt["passes"] += 1
                tt["deleted"] += r.deleted
                tt["nat_deleted"] += r.nat_deleted
                tt["kept_refreshed"] += sum(m.kept_refreshed for m in r.maps)
                tt["worst_pass_ms"] = max(tt["worst_pass_ms"], round(r.duration * 1e3, 1))
        for m in [*maps, nat]:
            m.close()


def one_mode(t: Topology, hosts: dict[str, Any], cfg: config.NodeConfig, mode: str,
             args: argparse.Namespace) -> dict[str, Any]:
    unprotected = mode == "unprotected"
    apply_with(cfg, random_slot=unprotected)
    seconds = args.minutes * 60
    gc = GcLoop(args.gc_every, unprotected)
    gc.start()
    paths_ = {"clusterip": (hosts["client"], VIP, SVC_PORT), "nodeport": (hosts["ext"], NODE_IP, NODE_PORT)}
    procs: dict[str, Any] = {}
    try:
        for name, (host, target, port) in paths_.items():
            procs[f"{name}/crr"] = t.popen(host, [str(LOADGEN), "crr", target, str(port), f"{seconds:g}",
                                                  str(args.crr), "64"], stdout=-1, stderr=-1, text=True)
            procs[f"{name}/slow"] = t.popen(host, [sys.executable, __file__, "slow", target, str(port),
                                                   str(args.slow), str(args.lifetime), f"{seconds:g}"],
                                            stdout=-1, stderr=-1, text=True)
        res: dict[str, Any] = {"mode": mode}
        for key, p in procs.items():
            out, err = p.communicate(timeout=seconds + 120)
            if p.returncode != 0:
                raise RuntimeError(f"{key} failed ({p.returncode}): {err.strip()[-300:]}")
            name, kind = key.split("/")
            if kind == "crr":
                kv = dict(item.split("=") for item in out.split())
                n, e, el = int(kv["transactions"]), int(kv["errors"]), float(kv["elapsed"])
                res.setdefault(name, {}).update(crr_per_s=round(n / el), crr=n, crr_failed=e)
            else:
                res.setdefault(name, {}).update({f"slow_{k}": v for k, v in json.loads(out).items()})
    finally:
        gc.stop.set()
        gc.join(30)
        node_apply.teardown(PIN_ROOT)
    res["gc"] = {"method": gc.method, **gc.totals}
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    with Topology(prefix="tpl-churn") as t:
        node = t.add_node("node")
        pods = {"client": t.add_pod(node, "client", CLIENT)}
        for i, b in enumerate(BACKS):
            pods[f"back{i + 1}"] = t.add_pod(node, f"back{i + 1}", b)
        ext = t.add_external(node, "ext", EXT, node_ip=NODE_IP, node_ifname="eth0")
        t.add_service_range(node, "10.68.0.0/16")
        for ns in (pods["client"].netns, ext.netns):
            with enter(ns):
                sysctl("net.ipv4.tcp_tw_reuse", 1)
                sysctl("net.ipv4.ip_local_port_range", "1024 65535")
        servers = [t.popen(pods[f"back{i + 1}"], [str(LOADGEN), "server", str(BACKEND_PORT), "1"],
                           stdin=-1, stdout=-1, text=True) for i in range(len(BACKS))]
        for s in servers:
            line = s.stdout.readline().strip() if s.stdout else ""
            if line != "ready":
                raise RuntimeError(f"loadgen server did not start: {line!r}")
        cfg = node_config(t, node, pods, args.lifetime)
        for mode in args.modes.split(","):
            print(f"  {mode}: {args.minutes:g} min ...", file=sys.stderr, flush=True)
            results.append(one_mode(t, {"client": pods["client"], "ext": ext}, cfg, mode, args))
            print(f"  {mode}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    prot = [r for r in results if r["mode"] == "protected"]
    broken = sum(r[p][k] for r in prot for p in ("clusterip", "nodeport")
                 for k in ("crr_failed", "slow_resets", "slow_stalls"))
    return {"argv": sys.argv[1:], "lifetime_s": args.lifetime, "minutes_per_mode": args.minutes,
            "results": results, "protected_broken": broken, "checks_passed": broken == 0}


def print_table(res: dict[str, Any]) -> None:
    print(f"GC churn soak: lifetime {res['lifetime_s']} s, {res['minutes_per_mode']:g} min per mode")
    for r in res["results"]:
        g = r["gc"]
        print(f"\n{r['mode']}: GC ({g['method']}) {g['passes']} passes, {g['deleted']} deleted, "
              f"{g['kept_refreshed']} kept (refreshed after the verdict), worst pass {g['worst_pass_ms']} ms")
        for p in ("clusterip", "nodeport"):
            x = r[p]
            print(f"  {p:9}  churn {x['crr']:>9,} conns ({x['crr_per_s']:,}/s), {x['crr_failed']} failed;"
                  f"  slow {x['slow_requests']:,} requests: {x['slow_resets']} reset, {x['slow_stalls']} stalled,"
                  f" {x['slow_connect_failures']} connect failures")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "slow":
        target, port, n, lifetime, seconds = sys.argv[2:7]
        print(json.dumps(slow(target, int(port), int(n), float(lifetime), float(seconds))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0, help="per mode")
    ap.add_argument("--lifetime", type=int, default=4, help="established TCP lifetime, seconds")
    ap.add_argument("--gc-every", type=float, default=1.0)
    ap.add_argument("--slow", type=int, default=32, help="long-lived connections per path")
    ap.add_argument("--crr", type=int, default=2, help="churning client processes per path")
    ap.add_argument("--modes", default="protected,unprotected")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    log.configure("warning")
    return report.emit(run(args), args, print_table)


if __name__ == "__main__":
    sys.exit(main())
