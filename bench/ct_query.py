#!/usr/bin/env python3
"""`tuplet ct list` / `ct list -c` / `ct top` on a 4 Mi-entry TCP table: wall time and peak RSS.

    .venv/bin/python bench/ct_query.py [--entries 4000000] [--json]

bpf_lxc.o is loaded with its maps pinned under /sys/fs/bpf/tuplet/bench/ct-query-<pid> and the
TCP table sized 4 Mi (4,194,304); ``--entries`` live entries are written with batch updates
(sources: 1,000 heavy addresses holding half the entries, the rest spread over ~1 M addresses;
one destination per 65,536 entries). Each command then runs as its own process (`python -m tuplet.cli`), output
to /dev/null; its wall time and peak RSS (wait4's ru_maxrss) are reported. The pins are removed
at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "loader"))
from tuplet.bpf.maps import Map  # noqa: E402
from tuplet.datapath import clock  # noqa: E402
from tuplet.datapath.abi import CT_MAP_TCP, OBJ_LXC  # noqa: E402
from tuplet.datapath.layouts import CtEntry  # noqa: E402
from tuplet.node import apply as node_apply  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.config import NodeConfig  # noqa: E402

SIZE = 1 << 22
PIN_ROOT = f"/sys/fs/bpf/tuplet/bench/ct-query-{os.getpid()}"
COMMANDS = {
    "ct list -c": ["ct", "list", "-c"],
    "ct list (text)": ["ct", "list"],
    "ct list -s 10.1.0.7 -c": ["ct", "list", "-s", "10.1.0.7", "-c"],
    "ct top": ["ct", "top"],
}


def fill(m: Map, n: int) -> None:
    rng = np.random.default_rng(7)
    life = clock.monotonic_now() + 100_000
    step = 1 << 16
    for s in range(0, n, step):
        k = min(step, n - s)
        keys = np.zeros((k, m.key_size), np.uint8)
        heavy = rng.random(k) < 0.5
        src = np.where(heavy, 0x0A010000 + rng.integers(0, 1000, k), 0x0B000000 + rng.integers(0, 1 << 20, k))
        keys[:, 0:4] = src.astype(">u4").view(np.uint8).reshape(k, 4)                  # original source
        idx = np.arange(s, s + k, dtype=np.uint32)        # (destination, source port) unique per entry
        keys[:, 4:8] = (0x0A020000 + (idx >> 16)).astype(">u4").view(np.uint8).reshape(k, 4)
        keys[:, 8:10] = np.full(k, 80, ">u2").view(np.uint8).reshape(k, 2)
        keys[:, 10:12] = (idx & 0xFFFF).astype(">u2").view(np.uint8).reshape(k, 2)
        keys[:, 12] = 6
        vals = np.zeros((k, m.value_size), np.uint8)
        off = CtEntry.lifetime.offset
        vals[:, off:off + 4] = np.full(k, life, "<u4").view(np.uint8).reshape(k, 4)
        m.update_batch(keys.tobytes(), vals.tobytes(), k)


def run(argv: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "tuplet.cli", "--pin-root", PIN_ROOT, *argv],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{argv} failed")
    return time.perf_counter() - t, ru.ru_maxrss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=4_000_000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    spec = open_object(OBJ_LXC, NodeConfig(), pin_root=PIN_ROOT)
    spec.set_max_entries(CT_MAP_TCP, SIZE)
    coll = spec.load()
    res: dict[str, object] = {}
    try:
        m = coll.maps[CT_MAP_TCP]
        t = time.perf_counter()
        fill(m, args.entries)
        count = m.count()
        res = {"entries": count, "capacity": SIZE, "fill_s": round(time.perf_counter() - t, 2),
               "cpus": os.cpu_count(), "kernel": os.uname().release, "commands": {}}
        base_s, base_rss = run(["--help"])
        res["python_start"] = {"seconds": round(base_s, 3), "max_rss_mib": round(base_rss / 1024, 1)}
        for name, argv in COMMANDS.items():
            s, rss = run(argv)
            res["commands"][name] = {"seconds": round(s, 2), "max_rss_mib": round(rss / 1024, 1)}  # type: ignore[index]
    finally:
        coll.close()
        node_apply.teardown(PIN_ROOT)             # unpins the maps and removes the directory
        with contextlib.suppress(OSError):        # the bench directory, once no other run uses it
            os.rmdir(os.path.dirname(PIN_ROOT))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['entries']:,} entries in a {SIZE:,}-entry TCP table (filled in {res['fill_s']} s), "
              f"{res['cpus']} CPUs, kernel {res['kernel']}")
        print(f"  python start-up alone: {res['python_start']}")
        for name, r in res["commands"].items():  # type: ignore[attr-defined]
            print(f"  {name:<26} {r['seconds']:>7.2f} s   peak RSS {r['max_rss_mib']:>7.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
