#!/usr/bin/env python3
"""ns per packet of each pod-side program path, next to two baselines, in one run.

    make bench            (or: .venv/bin/python bench/datapath.py [--repeat N] [--new N]
                                [--compare DIR [--compare-accounting]])

Baselines: ``pass`` (a TC program that only passes the packet) and ``ct floor``
(bench/ct_floor.bpf.c: the same parser as the datapath, one LRU lookup of the 14-byte CT
key, the lifetime stored: the least a conntrack program does for an established packet).

Method: BPF_PROG_TEST_RUN. Steady-state paths run one packet ``--repeat`` times in the
kernel and report the kernel's mean: established TCP through ``cil_from_container`` (the
sender's veth) and ``cil_to_container`` (the receiver's veth), UDP, and established TCP and
UDP over IPv6, each also reported as a ratio to its IPv4 twin in the same run (issue 18's
target: <= 1.15x). Every steady-state packet is first checked to take the established path
in this build. New connections need
different packets each time: ``--new`` distinct connections, each run once, median
reported: the SYN through ``cil_from_container`` alone, and the whole handshake (SYN,
SYN-ACK, ACK through both veths' programs: six runs, summed). Rounds alternate between
programs and builds so machine noise hits all of them alike.

``--compare DIR`` loads ``bpf_lxc.o`` from DIR too (another build, e.g. the previous
version's ``build/``) with the same configuration and measures it side by side;
``--compare-accounting`` turns per-entry accounting on for it (that build's default).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))
sys.path.insert(0, str(ROOT / "tests"))

from lb_harness import LbHarness, Svc  # noqa: E402
from lxc_harness import LxcHarness, tcp, udp  # noqa: E402
from tuplet.agent import log  # noqa: E402
from tuplet.bpf.objects import Collection, ObjectSpec  # noqa: E402
from tuplet.datapath.abi import CT6_MAP_TCP, CT_MAP_SYN, CT_MAP_TCP  # noqa: E402
from tuplet.datapath.paths import object_dir  # noqa: E402

A, B = "10.64.0.36", "10.64.0.64"
A6, B6 = "fd00:10:244::24", "fd00:10:244::40"
V6_TARGET = 1.15      # an IPv6 path's ns/packet over its IPv4 twin's
VIP, VPORT, BACKEND = "10.68.174.146", 80, "10.64.0.98"   # a ClusterIP with one backend
STEADY = ("established TCP, from_container", "established TCP, to_container", "UDP",
          "established TCP IPv6, from_container", "UDP IPv6")
#: Each IPv6 path and its IPv4 twin.
V6_TWINS = {STEADY[3]: STEADY[0], STEADY[4]: STEADY[2]}
NEW = ("new TCP connection (SYN)", "new TCP connection (handshake, 6 runs)")


@dataclass
class Build:
    label: str
    coll: Collection
    steady: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in STEADY})
    new: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in NEW})


def load_lxc(label: str, obj_dir: Path | None, consts: dict[str, int]) -> Build:
    """The build's pod-side programs with room for every connection (the default configuration
    and a ClusterIP service, so a pod's packets pay the service lookup as on a real node).
    Steady-state runs repeat one packet on one skb: a DNATed packet would be measured as its
    backend flow from the second run on, so service flows are measured by bench/services.py."""
    h = LbHarness.load_both(consts={"ct_accounting": 0, **consts}, obj_dir=obj_dir,
                            sizes={CT_MAP_TCP: 1 << 20, CT6_MAP_TCP: 1 << 20, CT_MAP_SYN: 1 << 17})
    h.program(Svc(VIP, VPORT, 6, 15, {19: (BACKEND, 8000, False)}))
    h.host.close()
    return Build(label, h.coll)


def establish(b: Build) -> None:
    """The flows the steady-state paths hit, in both families: A -> B over TCP (both veths),
    and UDP."""
    egress, ingress = b.coll.programs["cil_from_container"], b.coll.programs["cil_to_container"]
    for a, z in ((A, B), (A6, B6)):
        for src, sp, dst, dp, flags in ((a, 40000, z, 80, "S"), (z, 80, a, 40000, "SA"), (a, 40000, z, 80, "A")):
            egress.test_run(tcp(src, sp, dst, dp, flags))
            ingress.test_run(tcp(src, sp, dst, dp, flags))
        egress.test_run(udp(a, 40001, z, 53, b"x" * 64))


def handshake(b: Build, sport: int) -> int:
    egress, ingress = b.coll.programs["cil_from_container"], b.coll.programs["cil_to_container"]
    ns = 0
    for src, sp, dst, dp, flags in ((A, sport, "10.65.0.2", 443, "S"), ("10.65.0.2", 443, A, sport, "SA"),
                                    (A, sport, "10.65.0.2", 443, "A")):
        pkt = tcp(src, sp, dst, dp, flags)
        ns += egress.test_run(pkt).duration_ns + ingress.test_run(pkt).duration_ns
    return ns


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=200_000, help="repetitions per steady-state run")
    ap.add_argument("--new", type=int, default=20_000, help="distinct connections for the new-connection paths")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compare", type=Path, help="a directory with another build's bpf_lxc.o to measure beside")
    ap.add_argument("--compare-accounting", action="store_true",
                    help="per-entry accounting on for the --compare build (its default before it was off)")
    args = ap.parse_args()
    log.configure("warning")

    builds = [load_lxc("this build", None, {})]
    if args.compare:
        builds.append(load_lxc(f"{args.compare}", args.compare,
                               {"ct_accounting": 1} if args.compare_accounting else {}))
    base = ObjectSpec.open(object_dir() / "pass.o").load()
    floor = ObjectSpec.open(object_dir() / "ct_floor.o").load()
    pss, flr = base.programs["pass"], floor.programs["ct_floor"]
    for b in builds:
        establish(b)
    est = tcp(A, 40000, B, 80, "A", b"x" * 64)
    reply = tcp(B, 80, A, 40000, "A", b"x" * 64)
    dgram = udp(A, 40001, B, 53, b"x" * 64)
    est6 = tcp(A6, 40000, B6, 80, "A", b"x" * 64)
    dgram6 = udp(A6, 40001, B6, 53, b"x" * 64)
    flr.test_run(est)   # the floor's entry
    # Path check (this build): each steady-state packet takes the established path.
    own = LxcHarness(builds[0].coll)
    wrong = {name: v.reason for name, v in (("est", own.egress(est)), ("reply", own.ingress(reply)),
                                            ("udp", own.egress(dgram)), ("est6", own.egress(est6)),
                                            ("udp6", own.egress(dgram6)))
             if v.reason not in ("PASS_CT_ESTABLISHED", "PASS_CT_REPLY")}
    if wrong:
        print(f"path check failed: not the established path: {wrong}", file=sys.stderr)
        return 1

    pass_ns: list[int] = []
    floor_ns: list[int] = []
    pass_once: list[int] = []
    sport = 1024
    per_round = max(1, args.new // args.rounds)
    for r in range(args.rounds):
        order = builds if r % 2 == 0 else list(reversed(builds))
        pass_ns.append(pss.test_run(est, repeat=args.repeat).duration_ns)
        floor_ns.append(flr.test_run(est, repeat=args.repeat).duration_ns)
        for b in order:
            egress, ingress = b.coll.programs["cil_from_container"], b.coll.programs["cil_to_container"]
            b.steady[STEADY[0]].append(egress.test_run(est, repeat=args.repeat).duration_ns)
            b.steady[STEADY[1]].append(ingress.test_run(reply, repeat=args.repeat).duration_ns)
            b.steady[STEADY[2]].append(egress.test_run(dgram, repeat=args.repeat).duration_ns)
            b.steady[STEADY[3]].append(egress.test_run(est6, repeat=args.repeat).duration_ns)
            b.steady[STEADY[4]].append(egress.test_run(dgram6, repeat=args.repeat).duration_ns)
        for _ in range(per_round):
            sport = sport + 1 if sport < 65535 else 1024
            syn = tcp(A, sport, "10.65.0.1", 443, "S")
            for b in order:
                b.new[NEW[0]].append(b.coll.programs["cil_from_container"].test_run(syn).duration_ns)
                b.new[NEW[1]].append(handshake(b, sport))
            pass_once.append(pss.test_run(syn).duration_ns)

    p, f, p1 = statistics.median(pass_ns), statistics.median(floor_ns), statistics.median(pass_once)
    print(f"kernel {Path('/proc/sys/kernel/osrelease').read_text().strip()}, "
          f"{args.rounds} rounds, repeat={args.repeat}, new={per_round * args.rounds}")
    print(f"baselines: pass-through {p:.1f} ns, ct floor {f:.1f} ns ({f / p:.2f}x pass), "
          f"pass-through single runs {p1:.1f} ns")
    head = f"{'path':<40}" + "".join(f" {b.label[-24:]:>24}" for b in builds)
    print(head + (f" {'ratio':>7}" if len(builds) > 1 else ""))
    for name in STEADY:
        vals = [statistics.median(b.steady[name]) for b in builds]
        cells = "".join(f" {v:>9.1f} ({v / f:>4.2f}x fl)" + " " * 4 for v in vals)
        print(f"{name:<40}{cells}" + (f" {vals[0] / vals[1]:>7.2f}" if len(vals) > 1 else ""))
    for name in NEW:
        vals = [statistics.median(b.new[name]) for b in builds]
        cells = "".join(f" {v:>24.1f}" for v in vals)
        print(f"{name:<40}{cells}" + (f" {vals[0] / vals[1]:>7.2f}" if len(vals) > 1 else ""))
    print("(x fl: ratio to the ct floor; ratio: this build / the other, medians of the same rounds)")
    b = builds[0]
    for v6, v4 in V6_TWINS.items():
        r = statistics.median(b.steady[v6]) / statistics.median(b.steady[v4])
        print(f"{v6} / {v4}: {r:.2f}x   (target <= {V6_TARGET:.2f}: {'met' if r <= V6_TARGET else 'NOT met'})")
    for b in builds:
        b.coll.close()
    base.close()
    floor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
