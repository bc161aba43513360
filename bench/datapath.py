#!/usr/bin/env python3
"""ns per packet of each pod-side program path, next to a pass-through program, in one run.

    make bench            (or: .venv/bin/python bench/datapath.py [--repeat N] [--new N])

Method: BPF_PROG_TEST_RUN. Steady-state paths (established TCP, UDP, pass) run one packet
``--repeat`` times in the kernel and report the kernel's mean. The new-connection path
needs a different packet each time: ``--new`` distinct SYNs run once each, the pass
program is timed the same way for its baseline, and the median is reported. Rounds
alternate between programs so machine noise hits all of them alike.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))
sys.path.insert(0, str(ROOT / "tests"))

from lxc_harness import tcp, udp  # noqa: E402
from tuplet.agent import log  # noqa: E402
from tuplet.bpf.objects import ObjectSpec  # noqa: E402
from tuplet.datapath.abi import OBJ_LXC  # noqa: E402
from tuplet.datapath.paths import object_dir  # noqa: E402
from tuplet.node.apply import open_object  # noqa: E402
from tuplet.node.config import NodeConfig  # noqa: E402

A, B = "10.64.0.36", "10.64.0.64"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=200_000, help="repetitions per steady-state run")
    ap.add_argument("--new", type=int, default=20_000, help="distinct SYNs for the new-connection path")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    log.configure("warning")

    spec = open_object(OBJ_LXC, NodeConfig(), pin_root=None)
    spec.set_max_entries("tpl_ct4_v1", 1 << 20)
    lxc = spec.load()
    base = ObjectSpec.open(object_dir() / "pass.o").load()
    egress = lxc.programs["cil_from_container"]
    pss = base.programs["pass"]

    # Establish the flows the steady-state paths hit.
    for flags in ("S", "A"):
        egress.test_run(tcp(A, 40000, B, 80, flags))
    est = tcp(A, 40000, B, 80, "A", b"x" * 64)
    dgram = udp(A, 40001, B, 53, b"x" * 64)
    egress.test_run(dgram)

    steady: dict[str, list[int]] = {"pass": [], "established TCP": [], "UDP": []}
    new_ns: list[int] = []
    pass_once: list[int] = []
    sport = 1024
    per_round = max(1, args.new // args.rounds)
    for _ in range(args.rounds):
        steady["pass"].append(pss.test_run(est, repeat=args.repeat).duration_ns)
        steady["established TCP"].append(egress.test_run(est, repeat=args.repeat).duration_ns)
        steady["UDP"].append(egress.test_run(dgram, repeat=args.repeat).duration_ns)
        for _ in range(per_round):
            syn = tcp(A, sport, "10.65.0.1", 443, "S")
            sport = sport + 1 if sport < 65535 else 1024
            new_ns.append(egress.test_run(syn).duration_ns)
            pass_once.append(pss.test_run(syn).duration_ns)

    p = statistics.median(steady["pass"])
    p1 = statistics.median(pass_once)
    print(f"kernel {Path('/proc/sys/kernel/osrelease').read_text().strip()}, "
          f"{args.rounds} rounds, repeat={args.repeat}, new={per_round * args.rounds}")
    print(f"{'path':<22} {'ns/packet':>10} {'baseline':>10} {'ratio':>7}")
    print(f"{'pass-through':<22} {p:>10.1f} {p:>10.1f} {1.0:>7.2f}")
    for name in ("established TCP", "UDP"):
        v = statistics.median(steady[name])
        print(f"{name:<22} {v:>10.1f} {p:>10.1f} {v / p:>7.2f}")
    n = statistics.median(new_ns)
    print(f"{'new TCP connection':<22} {n:>10.1f} {p1:>10.1f} {n / max(p1, 1):>7.2f}"
          "   (single runs: baseline is pass-through timed the same way)")
    lxc.close()
    base.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
