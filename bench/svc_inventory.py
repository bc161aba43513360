#!/usr/bin/env python3
"""What the service metrics cost a scrape: tuplet.lb.inventory.read over N services per family.

    .venv/bin/python bench/svc_inventory.py [--services 100] [--backends 4] [--rounds 5]

Loads bpf_lxc.o with its maps pinned under a pin root of its own, programs N IPv4 and N
IPv6 ClusterIP services (each with ``--backends`` backends, Maglev 251) through the
service writer, then times ``inventory.read`` (both families' service and backend maps
walked, the registry read): the min and median of ``--rounds`` reads. Removes its pins
and node state afterwards.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))

from tuplet.agent import log  # noqa: E402
from tuplet.bpf import bpffs  # noqa: E402
from tuplet.datapath.abi import OBJ_LXC  # noqa: E402
from tuplet.lb import inventory  # noqa: E402
from tuplet.lb import writer as lb  # noqa: E402
from tuplet.lb.model import Backend, Service, ServiceType  # noqa: E402
from tuplet.node import state  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.config import NodeConfig  # noqa: E402

PIN_ROOT = "/sys/fs/bpf/tuplet/bench-svc-inventory"


def services(n: int, backends: int) -> list[Service]:
    out = []
    for i in range(n):
        hi, lo = divmod(i, 250)
        out.append(Service(f"s{i}", ServiceType.CLUSTER_IP, f"10.96.{hi}.{lo + 1}", 80, source="cli", backends=tuple(
            Backend(f"10.64.{hi}.{lo + 1}", 8000 + j) for j in range(backends))))
        out.append(Service(f"s{i}-v6", ServiceType.CLUSTER_IP, f"fd00::{i + 1:x}", 80, source="cli", backends=tuple(
            Backend(f"fd00:10:244::{i + 1:x}", 8000 + j) for j in range(backends))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--services", type=int, default=100, help="services per family")
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    log.configure("warning", "console")
    bpffs.ensure_mounted()
    spec = open_object(OBJ_LXC, NodeConfig(), pin_root=PIN_ROOT)
    coll = spec.load()
    try:
        with lb.ServiceTable(PIN_ROOT, local_addrs=set(), default_maglev_size=251) as t:
            for s in services(a.services, a.backends):
                t.upsert(s)
        times = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            inv = inventory.read(PIN_ROOT)
            times.append(time.perf_counter() - t0)
        print(f"{len(inv.services)} services, {sum(inv.backends.values())} backends: inventory.read "
              f"min {min(times) * 1e3:.1f} ms, median {statistics.median(times) * 1e3:.1f} ms")
    finally:
        coll.close()
        spec.close()
        state.remove(PIN_ROOT)
        bpffs.remove_tree(PIN_ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
