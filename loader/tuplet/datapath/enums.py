"""Names of the datapath's enums, read from BTF: one helper for every table of names the
CLI, the metrics and the logs print (verdict reasons, metric directions, conntrack
events, signal kinds), so they all say what bpftool says.

Each :class:`EnumSpec` names a C enum and how its enumerators become printed names.
Names come from the BTF of the running datapath's map when it has it (the pinned map may
be older than the objects on disk), else from the object file.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import structlog

from tuplet.bpf.btf import Btf, load_btf_from_elf
from tuplet.bpf.maps import Map
from tuplet.core.errors import TupletError

log = structlog.get_logger("tuplet.enums")


@dataclass(frozen=True)
class EnumSpec:
    """A C enum (``enum``) whose enumerators print without ``prefix``, lower-cased if
    ``lower``; sentinels (counts, bases) are ``skip``-ped."""

    enum: str
    prefix: str
    skip: tuple[str, ...] = ()
    lower: bool = False

    def names(self, btf: Btf) -> dict[int, str]:
        """Value -> printed name. A value two enumerators share keeps the first name."""
        out: dict[int, str] = {}
        for name, value in btf.enum_values(self.enum).items():
            if name in self.skip:
                continue
            short = name.removeprefix(self.prefix)
            out.setdefault(value, short.lower() if self.lower else short)
        return out


#: Verdict reasons (bpf/lib/reasons.h): ``PASS_CT_NEW``, ``DROP_CT_INSERT_FAILED``...
REASONS = EnumSpec("tpl_reason", "TPL_", skip=("TPL_DROP_BASE", "TPL_REASON_SLOTS"))
#: Which program counted a verdict: ``egress``, ``ingress``, ``netdev_ingress``...
DIRECTIONS = EnumSpec("tpl_metric_dir", "TPL_METRIC_", skip=("TPL_METRIC_DIRS",), lower=True)
#: Conntrack table events (bpf/lib/ct_events.h): ``insert_syn``, ``promoted``...
CT_EVENTS = EnumSpec("ct_event", "CT_EV_", skip=("CT_EV_MAX",), lower=True)
#: Signal kinds and the tables they name (bpf/lib/signal.h): ``CT_FILL_UP``, ``MAP_TCP``...
SIGNAL_KINDS = EnumSpec("tpl_signal_kind", "TPL_SIGNAL_", skip=("TPL_SIGNAL_KINDS",))
SIGNAL_MAPS = EnumSpec("tpl_signal_map", "TPL_SIGNAL_")


@lru_cache(maxsize=32)
def object_names(obj_path: str, spec: EnumSpec) -> dict[int, str]:
    """``spec``'s names from a built object's BTF."""
    return spec.names(load_btf_from_elf(obj_path))


def map_names(m: Map, spec: EnumSpec, obj_path: str) -> dict[int, str]:
    """``spec``'s names from the BTF the map was created with, else from the object (an
    empty table, numbers printed, when neither has them)."""
    try:
        with m.btf() as btf:
            return spec.names(btf)
    except (TupletError, KeyError, ValueError) as e:
        log.debug("enum names not in the map's BTF, using the object's", map=m.name, enum=spec.enum,
                  error=str(e))
    try:
        return object_names(obj_path, spec)
    except (TupletError, OSError, KeyError, ValueError) as e:
        log.warning("no enum names, printing numbers", object=obj_path, enum=spec.enum, error=str(e))
        return {}
