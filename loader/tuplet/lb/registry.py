"""Which services tuplet programmed, and which backend ids and reverse-NAT indices they
use: the service registry, a JSON file beside the node state
(``/run/tuplet/<pin root>.services.json``), changed under a lock by the map writer
(:mod:`tuplet.lb.writer`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tuplet.core.errors import ConfigError, TupletError
from tuplet.datapath import paths
from tuplet.lb import maglev
from tuplet.lb.model import Backend, Service

REGISTRY_VERSION = 1


def backend_key(b: Backend, protocol: str) -> str:
    """Backends are shared between services by address, port and protocol."""
    return f"{b.endpoint}/{protocol}"


@dataclass
class Registry:
    """What was programmed: services by name, backend ids by backend_key."""

    services: dict[str, Service] = field(default_factory=dict)
    rev_nat: dict[str, int] = field(default_factory=dict)          # service name -> index
    backends: dict[str, int] = field(default_factory=dict)         # backend_key -> id
    default_maglev_size: int = maglev.DEFAULT_M                    # [lb] maglev_table_size at apply

    def to_json(self) -> dict[str, Any]:
        return {"version": REGISTRY_VERSION, "default_maglev_size": self.default_maglev_size,
                "services": {n: {**s.to_json(), "rev_nat": self.rev_nat[n]} for n, s in self.services.items()},
                "backends": self.backends}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Registry":
        if d.get("version") != REGISTRY_VERSION:
            raise TupletError("service registry", "read", detail=f"unknown version {d.get('version')!r}")
        r = cls()
        for name, sd in d.get("services", {}).items():
            r.services[name] = Service.from_json(sd)
            r.rev_nat[name] = int(sd["rev_nat"])
        r.backends = {k: int(v) for k, v in d.get("backends", {}).items()}
        r.default_maglev_size = int(d.get("default_maglev_size", maglev.DEFAULT_M))
        return r

    def referenced_backends(self) -> set[str]:
        return {backend_key(b, s.protocol) for s in self.services.values() for b in s.backends}


def check_config(pin_root: str, services: tuple[Service, ...]) -> None:
    """Refuse, before anything changes, configuration services whose address, port and
    protocol belong to a service added with `tuplet svc` under another name."""
    try:
        reg = Registry.from_json(json.loads(paths.services_path(pin_root).read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return
    names = {s.name for s in services}
    for i, s in enumerate(services):
        for other in reg.services.values():
            if other.name not in names and other.source != "config" and other.frontend == s.frontend:
                raise ConfigError(f"services[{i}]", f"{s.describe_frontend()} is already service {other.name!r} "
                                                   "(added with `tuplet svc`; delete it first)")
