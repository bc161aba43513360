"""Connection-tracking and NAT map sizes, computed as the reference computes them.

Each map has a static default (CT TCP 524288, CT non-TCP 262144, NAT two thirds of
their sum). With dynamic sizing (``--bpf-map-dynamic-size-ratio``, default 0.0025)
the maps share ``ratio`` of the node's total memory in proportion to their
defaults::

    mem     = floor(MemTotal * ratio)
    T       = 524288*CT + 262144*CT + 524288*NAT + 524288*NEIGH + 262144*SOCKREV
    entries = floor(default * mem / T), clamped to [minimum, 2**24]

where CT, NAT, NEIGH and SOCKREV are per-entry sizes (key + value) in bytes. A size
set explicitly replaces the dynamic one for that map only and must lie in
[1024, 2**24].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tuplet.core.errors import ConfigError, TupletError

GIB = 1 << 30

#: Largest number of entries any map may have.
LIMIT_MAX = 1 << 24
#: Smallest number of entries an explicitly sized map may have.
LIMIT_MIN = 1 << 10

CT_TCP_DEFAULT = 1 << 19  # 524288
CT_ANY_DEFAULT = 1 << 18  # 262144
NAT_DEFAULT = (CT_TCP_DEFAULT + CT_ANY_DEFAULT) * 2 // 3  # 524288
NEIGH_DEFAULT = 1 << 19  # 524288
SOCKREV_DEFAULT = 1 << 18  # 262144

CT_TCP_MIN = 1 << 17  # 131072
CT_ANY_MIN = 1 << 16  # 65536
NAT_MIN = 1 << 17  # 131072

RATIO_DEFAULT = 0.0025

FLAG_TCP = "bpf-ct-global-tcp-max"
FLAG_ANY = "bpf-ct-global-any-max"
FLAG_NAT = "bpf-nat-global-max"
FLAG_RATIO = "bpf-map-dynamic-size-ratio"

Source = Literal["dynamic", "explicit", "default"]

#: Width of the name column of :meth:`Sizing.describe`.
NAME_WIDTH = 30


@dataclass(frozen=True)
class EntrySizes:
    """Bytes per entry (key + value) of the maps that share the dynamic budget.

    The defaults are the values the reference's unit tests use.
    """

    ct: int = 94
    nat: int = 94
    neigh: int = 24
    sockrev: int = 48

    def total(self) -> int:
        """``T``: bytes the default-sized maps would take together (148373504 by default)."""
        return (CT_TCP_DEFAULT * self.ct + CT_ANY_DEFAULT * self.ct + NAT_DEFAULT * self.nat
                + NEIGH_DEFAULT * self.neigh + SOCKREV_DEFAULT * self.sockrev)


@dataclass(frozen=True)
class MapSize:
    """The entry count chosen for one map, where it came from and how it was reached."""

    name: str
    entries: int
    source: Source
    derivation: str


@dataclass(frozen=True)
class Sizing:
    """Sizes of the TCP CT, non-TCP CT and NAT maps for one node."""

    tcp: MapSize
    any: MapSize
    nat: MapSize
    ratio: float
    mem_total: int
    dynamic: bool

    def maps(self) -> tuple[MapSize, MapSize, MapSize]:
        """The three maps in display order."""
        return (self.tcp, self.any, self.nat)

    def to_json(self) -> dict[str, object]:
        return {"dynamic": self.dynamic, "ratio": self.ratio, "mem_total": self.mem_total,
                "maps": [m.__dict__ for m in self.maps()]}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> "Sizing":
        maps = d["maps"]
        if not isinstance(maps, list) or len(maps) != 3:
            raise TypeError("sizing: 'maps' is not a list of three tables")
        tcp, any_, nat = (MapSize(**m) for m in maps)
        return cls(tcp, any_, nat, float(str(d["ratio"])), int(str(d["mem_total"])), bool(d["dynamic"]))

    def display_order(self) -> tuple[MapSize, MapSize, MapSize]:
        """The maps in the order the reference's status lists them."""
        return (self.any, self.tcp, self.nat)

    def summary(self) -> str:
        """``dynamic sizing: on (ratio: 0.002500)`` or ``dynamic sizing: off``."""
        state = f"on (ratio: {self.ratio:f})" if self.dynamic else "off"
        return f"dynamic sizing: {state}"

    def describe(self, verbose: bool = False) -> list[str]:
        """Lines of a status block like the reference's ``BPF Maps:`` section.

        With ``verbose`` a ``Derivation:`` part follows, one line per map saying where
        its size came from (dynamic, explicit or default) and how it was reached.
        """
        lines = [f"BPF Maps:   {self.summary()}", f"  {'Name':<{NAME_WIDTH}}Size"]
        lines += [f"  {m.name:<{NAME_WIDTH}}{m.entries}" for m in self.display_order()]
        if verbose:
            lines.append("  Derivation:")
            lines += [f"    {m.name}: {m.source}, {m.derivation}" for m in self.display_order()]
        return lines


def node_memory_bytes(meminfo_path: str = "/proc/meminfo") -> int:
    """Total memory of the node in bytes, from the ``MemTotal`` line of ``meminfo_path``."""
    with open(meminfo_path, encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.strip() != "MemTotal":
                continue
            fields = rest.split()
            try:
                value = int(fields[0])
            except (IndexError, ValueError):
                break
            unit = fields[1].lower() if len(fields) > 1 else ""
            if unit in ("", "b"):
                return value
            if unit == "kb":
                return value * 1024
            break
    raise TupletError(meminfo_path, "read MemTotal", detail="no valid 'MemTotal: N kB' line")


def _check_explicit(flag: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(flag, f"must be an integer, not {value!r}")
    if value < LIMIT_MIN:
        raise ConfigError(flag, f"{value} is below the minimum of {LIMIT_MIN} entries")
    if value > LIMIT_MAX:
        raise ConfigError(flag, f"{value} is above the maximum of {LIMIT_MAX} entries")
    return value


def _clamp(value: int, lo: int) -> tuple[int, str]:
    if value < lo:
        return lo, f"; raised to minimum {lo}"
    if value > LIMIT_MAX:
        return LIMIT_MAX, f"; capped at maximum {LIMIT_MAX}"
    return value, ""


def _dynamic(name: str, default: int, minimum: int, mem: int, total: int, budget: str) -> MapSize:
    raw = default * mem // total
    entries, note = _clamp(raw, minimum)
    return MapSize(name, entries, "dynamic", f"{budget}; {default} x {mem} / {total} = {raw}{note}")


def compute_sizing(mem_total: int, ratio: float = RATIO_DEFAULT, tcp: int | None = None,
                   any_: int | None = None, nat: int | None = None,
                   entry_sizes: EntrySizes = EntrySizes()) -> Sizing:
    """Sizes of the CT and NAT maps for a node with ``mem_total`` bytes of memory.

    ``tcp``, ``any_`` and ``nat`` are explicit sizes (``None`` when the flag is not
    set); each must lie in [1024, 2**24] and turns dynamic sizing off for its map
    only. ``ratio`` 0 disables dynamic sizing. Raises ConfigError naming the flag
    for an invalid value.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(FLAG_RATIO, f"{ratio!r} must be between 0 and 1")
    if mem_total < 0:
        raise ValueError(f"mem_total must not be negative, got {mem_total}")
    if tcp is not None:
        _check_explicit(FLAG_TCP, tcp)
    if any_ is not None:
        _check_explicit(FLAG_ANY, any_)
    if nat is not None:
        _check_explicit(FLAG_NAT, nat)

    dynamic = ratio > 0
    mem = int(mem_total * ratio) if dynamic else 0
    total = entry_sizes.total()
    if dynamic and total <= 0:
        raise ValueError(f"entry sizes must add up to a positive total, got {total}")
    budget = f"{ratio:g} x {mem_total / GIB:.1f} GiB = {mem} B"

    def pick(name: str, flag: str, value: int | None, default: int, minimum: int) -> MapSize:
        if value is not None:
            return MapSize(name, value, "explicit", f"--{flag}={value}")
        if dynamic:
            return _dynamic(name, default, minimum, mem, total, budget)
        return MapSize(name, default, "default", f"default {default}")

    tcp_size = pick("TCP connection tracking", FLAG_TCP, tcp, CT_TCP_DEFAULT, CT_TCP_MIN)
    any_size = pick("Non-TCP connection tracking", FLAG_ANY, any_, CT_ANY_DEFAULT, CT_ANY_MIN)
    if nat is not None or dynamic:
        nat_size = pick("NAT", FLAG_NAT, nat, NAT_DEFAULT, NAT_MIN)
    else:
        raw = (tcp_size.entries + any_size.entries) * 2 // 3
        entries, note = _clamp(raw, LIMIT_MIN)
        nat_size = MapSize("NAT", entries, "default",
                           f"({tcp_size.entries} + {any_size.entries}) x 2 / 3 = {raw}{note}")
    return Sizing(tcp_size, any_size, nat_size, float(ratio), mem_total, dynamic)
