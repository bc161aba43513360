"""Per-CPU conntrack statistics as `conntrack -S` shows them, from the datapath's per-CPU
verdict counters (``tpl_metrics_v2``) and table event counters (``tpl_ct_events_v2``).

conntrack -S's columns and tuplet's nearest meaning (README "Operating tuplet"):

* ``found``: packets that found their entry (``PASS_CT_ESTABLISHED`` + ``PASS_CT_REPLY`` +
  ``PASS_CT_RELATED`` + ``PASS_CT_REOPENED``).
* ``new``: packets that created a flow (``PASS_CT_NEW``).
* ``invalid``: packets dropped as malformed (``DROP_INVALID_L3`` + ``DROP_CT_INVALID_HDR``).
* ``insert``: entries inserted in any table (``insert_tcp`` + ``insert_syn`` + ``insert_any``;
  a promotion is an insert into ``tpl_ct4_v1``).
* ``insert_failed``: new flows whose insert was refused (``insert_failed``).
* ``drop``: every packet the datapath dropped, whatever the reason.
* ``early_drop``, ``search_restart``, ``error``: nf_conntrack internals with no tuplet
  counterpart (LRU evictions are invisible to BPF; the agent estimates them per GC pass).
* tuplet's own: ``promoted``, ``promote_failed``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tuplet.bpf.maps import Map
from tuplet.datapath.abi import TPL_REASON_SLOTS

FOUND_REASONS = ("PASS_CT_ESTABLISHED", "PASS_CT_REPLY", "PASS_CT_RELATED", "PASS_CT_REOPENED")
NEW_REASONS = ("PASS_CT_NEW",)
INVALID_REASONS = ("DROP_INVALID_L3", "DROP_CT_INVALID_HDR")
INSERT_EVENTS = ("insert_tcp", "insert_syn", "insert_any")
#: conntrack -S's columns, in its order, then tuplet's own.
COLUMNS = ("found", "new", "invalid", "insert", "insert_failed", "drop", "early_drop", "search_restart",
           "promoted", "promote_failed")
#: Columns nf_conntrack has and tuplet cannot count (always 0).
NO_COUNTERPART = ("early_drop", "search_restart")


@dataclass
class CpuStats:
    """One CPU's counters (or the total), by conntrack -S column; drops also by reason."""

    cpu: int | None                      # None: the total
    columns: dict[str, int] = field(default_factory=lambda: {c: 0 for c in COLUMNS})
    drops: dict[str, int] = field(default_factory=dict)

    def add(self, other: "CpuStats") -> None:
        for c, n in other.columns.items():
            self.columns[c] += n
        for r, n in other.drops.items():
            self.drops[r] = self.drops.get(r, 0) + n

    def line(self) -> str:
        who = "total " if self.cpu is None else f"cpu={self.cpu:<4}"
        return who + " " + " ".join(f"{c}={n}" for c, n in self.columns.items())

    def to_json(self) -> dict[str, object]:
        return {"cpu": self.cpu, **self.columns, "drops": dict(sorted(self.drops.items()))}


def per_cpu_u64(m: Map, offset: int = 0) -> dict[int, list[int]]:
    """Key index -> the u64 at ``offset`` of each CPU's value."""
    out: dict[int, list[int]] = {}
    stride = m.value_stride
    for key, value in m.items():
        idx = int.from_bytes(key, "little")
        out[idx] = [int.from_bytes(value[c * stride + offset:c * stride + offset + 8], "little")
                    for c in range(m.ncpus)]
    return out


def collect(metrics_map: Map | None, reasons: dict[int, str], events_map: Map | None,
            event_names: dict[int, str]) -> tuple[list[CpuStats], CpuStats]:
    """Per-CPU stats and their total. ``reasons``/``event_names``: enum names from BTF."""
    ncpus = max(m.ncpus for m in (metrics_map, events_map) if m is not None) \
        if metrics_map is not None or events_map is not None else 0
    cpus = [CpuStats(c) for c in range(ncpus)]
    if metrics_map is not None:
        for idx, per in per_cpu_u64(metrics_map).items():   # packets: the first u64 of metrics_value
            reason = reasons.get(idx % TPL_REASON_SLOTS, f"reason_{idx % TPL_REASON_SLOTS}")
            for c, n in enumerate(per):
                if not n:
                    continue
                col = cpus[c].columns
                if reason in FOUND_REASONS:
                    col["found"] += n
                elif reason in NEW_REASONS:
                    col["new"] += n
                if reason.startswith("DROP_"):
                    col["drop"] += n
                    cpus[c].drops[reason] = cpus[c].drops.get(reason, 0) + n
                    if reason in INVALID_REASONS:
                        col["invalid"] += n
    if events_map is not None:
        for idx, per in per_cpu_u64(events_map).items():
            name = event_names.get(idx, "").removesuffix("6")   # both families count alike
            for c, n in enumerate(per):
                if name in INSERT_EVENTS:
                    cpus[c].columns["insert"] += n
                elif name in ("insert_failed", "promoted", "promote_failed"):
                    cpus[c].columns[name] += n
    total = CpuStats(None)
    for s in cpus:
        total.add(s)
    return cpus, total
