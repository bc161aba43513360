"""Services and their backends: the model, and its parsing from the configuration file
and from `tuplet svc` arguments.

    [[services]]
    name = "web"
    type = "ClusterIP"              # ClusterIP | NodePort | LoadBalancer
    address = "10.68.174.146"       # ClusterIP, LB VIP, or the node address for NodePort
    port = 80
    protocol = "tcp"                # tcp | udp
    affinity_timeout = "3h"         # optional client-IP session affinity (0: off)
    maglev_size = 16381             # optional, prime; default [lb] maglev_table_size
    backends = ["10.64.0.98:8000", "10.64.0.64:8000,weight=2",
                { address = "10.65.0.9", port = 8000, node = "192.168.7.2" }]

A backend is ``ADDRESS:PORT`` with optional ``,weight=N`` (Maglev weight, 0 drains it:
no new flows, established ones stay) and ``,node=ADDRESS`` (the node it runs on, for
remote backends), or the same as a table. Everything is checked here, before any map
is touched; errors name the key (``services[2].backends[1]``) or the argument.

Addresses are IPv4 or IPv6. A service is one family: its backends have the family of its
address, and so do their nodes, but for one case: an IPv6 service's backend may name an
IPv4 node (DSR over an IPv4 underlay; stored IPv4-mapped, ``::ffff:a.b.c.d``). Where an IPv6 address meets a port it is bracketed
(``[2001:db8::1]:80``), in what is parsed and in what is printed. Addresses are kept in
their canonical text (RFC 5952: ``2001:db8::1``, lower case, zeros compressed), so a
backend's ``endpoint`` -- the name its Maglev permutation hashes -- is the same string
on every node however the configuration spelled it: ``10.0.0.1:80`` or
``[2001:db8::1]:80``.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from tuplet.core.durations import parse_duration
from tuplet.core.errors import ConfigError
from tuplet.lb import maglev

#: Maglev table sizes accepted per service (prime). The upper bound keeps a table
#: under half a megabyte; the lower one keeps shares within 1% for a couple of backends.
MAGLEV_MIN, MAGLEV_MAX = 251, 131071
#: Backend slots per bank (the datapath numbers bank 1's slots from 0x8000).
MAX_BACKENDS = 0x7FFF
MAX_AFFINITY = 86400 * 7
NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?$")


class ServiceType(str, Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"

    @property
    def external(self) -> bool:
        """Reachable from the node's devices (not only from pods)."""
        return self is not ServiceType.CLUSTER_IP


PROTOCOLS = {"tcp": 6, "udp": 17}


@dataclass(frozen=True)
class Backend:
    address: str
    port: int
    weight: int = 1
    node: str | None = None

    @property
    def endpoint(self) -> str:
        """``address:port`` (``[address]:port`` for IPv6): the name the Maglev table hashes,
        the same on every node."""
        return host_port(self.address, self.port)

    def describe(self) -> str:
        out = self.endpoint
        if self.weight != 1:
            out += f",weight={self.weight}"
        if self.node:
            out += f",node={self.node}"
        return out

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "port": self.port, "weight": self.weight, "node": self.node}


@dataclass(frozen=True)
class Service:
    name: str
    type: ServiceType
    address: str
    port: int
    protocol: str = "tcp"
    backends: tuple[Backend, ...] = ()
    affinity_timeout: int = 0            # seconds; 0: no session affinity
    maglev_size: int | None = None       # None: the node's [lb] maglev_table_size
    source: str = field(default="config", compare=False)   # "config" or "cli": who owns it

    @property
    def proto(self) -> int:
        return PROTOCOLS[self.protocol]

    @property
    def family(self) -> int:
        """4 or 6: the IP version of the service, its backends and their nodes."""
        return ip_version(self.address)

    @property
    def frontend(self) -> tuple[str, int, str]:
        """What identifies the service in the datapath: (address, port, protocol)."""
        return (self.address, self.port, self.protocol)

    def describe_frontend(self) -> str:
        return f"{host_port(self.address, self.port)}/{self.protocol}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type.value, "address": self.address, "port": self.port,
                "protocol": self.protocol, "affinity_timeout": self.affinity_timeout,
                "maglev_size": self.maglev_size, "source": self.source,
                "backends": [b.to_json() for b in self.backends]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Service":
        return cls(name=d["name"], type=ServiceType(d["type"]), address=d["address"], port=d["port"],
                   protocol=d["protocol"], affinity_timeout=d.get("affinity_timeout", 0),
                   maglev_size=d.get("maglev_size"), source=d.get("source", "config"),
                   backends=tuple(Backend(b["address"], b["port"], b.get("weight", 1), b.get("node"))
                                  for b in d.get("backends", [])))


# --- checks shared by both sources ------------------------------------------------------------

def check_name(v: Any, key: str) -> str:
    if not isinstance(v, str) or not NAME_RE.match(v):
        raise ConfigError(key, f"must be a name of 1-63 letters, digits and . _ / - (starting and ending "
                               f"with a letter or digit), got {v!r}")
    return v


def ip_version(addr: str) -> int:
    """4 or 6, of an address checked by check_address."""
    return 6 if ":" in addr else 4


def host_port(addr: str, port: int) -> str:
    """``addr:port``, with an IPv6 address bracketed."""
    return f"[{addr}]:{port}" if ip_version(addr) == 6 else f"{addr}:{port}"


def check_address(v: Any, key: str) -> str:
    """An IPv4 or IPv6 service, backend or node address, in canonical text."""
    try:
        addr = ipaddress.ip_address(v) if isinstance(v, str) else None
    except ValueError:
        addr = None
    if addr is None:
        hint = " (write the address without brackets here)" if isinstance(v, str) and v.startswith("[") else ""
        raise ConfigError(key, f"not an IPv4 or IPv6 address: {v!r}{hint}")
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ConfigError(key, f"cannot be used as a service or backend address: {v}")
    return str(addr)


def split_host_port(v: str, key: str, form: str) -> tuple[str, str]:
    """``ADDR:PORT`` or ``[IPV6]:PORT`` into its two texts (not yet checked)."""
    if v.startswith("["):
        addr, sep, port = v[1:].partition("]:")
        if not sep or not addr or "]" in port:
            raise ConfigError(key, f"must look like {form} (an IPv6 address as [ADDRESS]:PORT), got {v!r}")
        if ":" not in addr:
            raise ConfigError(key, f"only an IPv6 address is bracketed, got {v!r}")
        return addr, port
    addr, sep, port = v.rpartition(":")
    if not sep or not addr:
        raise ConfigError(key, f"must look like {form}, got {v!r}")
    if ":" in addr or "]" in v:
        raise ConfigError(key, f"an IPv6 address with a port must be bracketed: [ADDRESS]:PORT, got {v!r}")
    return addr, port


def check_port(v: Any, key: str) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 65535:
        raise ConfigError(key, f"must be a port number 1-65535, got {v!r}")
    return v


def check_weight(v: Any, key: str) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= maglev.MAX_WEIGHT:
        raise ConfigError(key, f"must be an integer 0-{maglev.MAX_WEIGHT}, got {v!r}")
    return v


def check_maglev_size(v: Any, key: str) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"must be a prime number, got {v!r}")
    if not MAGLEV_MIN <= v <= MAGLEV_MAX:
        raise ConfigError(key, f"must be a prime between {MAGLEV_MIN} and {MAGLEV_MAX}, got {v}")
    if not maglev.is_prime(v):
        raise ConfigError(key, f"must be prime, got {v} (the next prime is {maglev.next_prime(v)})")
    return v


def check_affinity(v: Any, key: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise ConfigError(key, f"must be a duration like \"3h\" or seconds, got {v!r}")
    try:
        secs = float(v) if isinstance(v, int) or v.isdigit() else parse_duration(v)
    except ValueError as e:
        raise ConfigError(key, str(e)) from None
    if secs != int(secs) or not 0 <= secs <= MAX_AFFINITY:
        raise ConfigError(key, f"must be whole seconds between 0 and {MAX_AFFINITY}, got {v!r}")
    return int(secs)


def parse_backend(v: Any, key: str) -> Backend:
    """A backend from ``"ADDR:PORT[,weight=N][,node=ADDR]"`` or a table with those keys."""
    if isinstance(v, str):
        head, *opts = [part.strip() for part in v.split(",")]
        addr, port = split_host_port(head, key, "ADDRESS:PORT[,weight=N][,node=ADDRESS]")
        d: dict[str, Any] = {"address": addr, "port": port}
        for opt in opts:
            k, eq, val = opt.partition("=")
            if not eq or k not in ("weight", "node") or k in d:
                raise ConfigError(key, f"unknown or repeated option {opt!r} (allowed: weight=N, node=ADDRESS)")
            d[k] = val
    elif isinstance(v, dict):
        unknown = set(v) - {"address", "port", "weight", "node"}
        if unknown:
            raise ConfigError(f"{key}.{sorted(unknown)[0]}", "unknown key (allowed: address, node, port, weight)")
        d = dict(v)
        for k in ("address", "port"):
            if k not in d:
                raise ConfigError(f"{key}.{k}", "missing")
    else:
        raise ConfigError(key, f"must be \"ADDRESS:PORT\" or a table, got {v!r}")
    return Backend(address=check_address(d["address"], key if isinstance(v, str) else f"{key}.address"),
                   port=check_port(d["port"], key if isinstance(v, str) else f"{key}.port"),
                   weight=check_weight(d.get("weight", 1), key if isinstance(v, str) else f"{key}.weight"),
                   node=check_address(d["node"], key if isinstance(v, str) else f"{key}.node")
                   if d.get("node") is not None else None)


def check_service(s: Service, key: str) -> Service:
    """Checks across fields of one service."""
    seen: set[str] = set()
    for i, b in enumerate(s.backends):
        for what, addr in (("address", b.address), ("node", b.node)):
            if addr is None or ip_version(addr) == s.family or (what == "node" and s.family == 6):
                continue   # an IPv6 service's backend may run on a node of an IPv4 underlay
            hint = " (an IPv6 service may name an IPv4 node; not the reverse)" if what == "node" else ""
            raise ConfigError(f"{key}.backends[{i}]", f"{what} {addr} is IPv{ip_version(addr)}, but the "
                                                     f"service address {s.address} is IPv{s.family} "
                                                     f"(a service is one family){hint}")
        if b.endpoint in seen:
            raise ConfigError(f"{key}.backends[{i}]", f"duplicate backend {b.endpoint}")
        seen.add(b.endpoint)
    if len(s.backends) > MAX_BACKENDS:
        raise ConfigError(f"{key}.backends", f"at most {MAX_BACKENDS} backends, got {len(s.backends)}")
    m = s.maglev_size
    if m is not None and sum(1 for b in s.backends if b.weight) > m:
        raise ConfigError(f"{key}.maglev_size", f"{m} is smaller than the number of backends")
    return s


SERVICE_KEYS = {"name", "type", "address", "port", "protocol", "backends", "affinity_timeout", "maglev_size"}


def parse_service(t: Any, key: str) -> Service:
    """One [[services]] table."""
    if not isinstance(t, dict):
        raise ConfigError(key, "must be a table")
    for k in t:
        if k not in SERVICE_KEYS:
            raise ConfigError(f"{key}.{k}", f"unknown key (allowed: {', '.join(sorted(SERVICE_KEYS))})")
    for k in ("name", "address", "port"):
        if k not in t:
            raise ConfigError(f"{key}.{k}", "missing")
    backends = t.get("backends", [])
    if not isinstance(backends, list):
        raise ConfigError(f"{key}.backends", "must be an array")
    return check_service(Service(
        name=check_name(t["name"], f"{key}.name"),
        type=service_type(t.get("type", "ClusterIP"), f"{key}.type"),
        address=check_address(t["address"], f"{key}.address"),
        port=check_port(t["port"], f"{key}.port"),
        protocol=protocol(t.get("protocol", "tcp"), f"{key}.protocol"),
        backends=tuple(parse_backend(b, f"{key}.backends[{i}]") for i, b in enumerate(backends)),
        affinity_timeout=check_affinity(t.get("affinity_timeout", 0), f"{key}.affinity_timeout"),
        maglev_size=check_maglev_size(t["maglev_size"], f"{key}.maglev_size") if "maglev_size" in t else None,
    ), key)


def service_type(v: Any, key: str) -> ServiceType:
    try:
        return ServiceType(v)
    except ValueError:
        raise ConfigError(key, f"must be one of {', '.join(t.value for t in ServiceType)}, got {v!r}") from None


def protocol(v: Any, key: str) -> str:
    if not isinstance(v, str) or v.lower() not in PROTOCOLS:
        raise ConfigError(key, f"must be tcp or udp, got {v!r}")
    return v.lower()


def parse_services(items: list[Any], key: str = "services") -> tuple[Service, ...]:
    """The [[services]] array: every service checked, names and frontends unique."""
    out = tuple(parse_service(t, f"{key}[{i}]") for i, t in enumerate(items))
    check_unique(out, key)
    return out


def check_unique(services: tuple[Service, ...] | list[Service], key: str = "services") -> None:
    names: dict[str, int] = {}
    fronts: dict[tuple[str, int, str], str] = {}
    for i, s in enumerate(services):
        if s.name in names:
            raise ConfigError(f"{key}[{i}].name", f"duplicate service name {s.name!r}")
        names[s.name] = i
        if s.frontend in fronts:
            raise ConfigError(f"{key}[{i}]", f"{s.describe_frontend()} is already service {fronts[s.frontend]!r}")
        fronts[s.frontend] = s.name


def with_backends(s: Service, backends: tuple[Backend, ...], key: str = "backends") -> Service:
    return check_service(replace(s, backends=backends), key)


@dataclass(frozen=True)
class BackendShare:
    backend: Backend
    id: int
    slots: int            # Maglev table entries owned
    remote: bool


@dataclass(frozen=True)
class ServiceView:
    """A service as the datapath has it now (for `tuplet svc list`)."""

    service: Service
    rev_nat: int
    bank: int
    maglev_size: int
    live: bool            # slot 0 is present
    backends: list[BackendShare]

    def to_json(self) -> dict[str, Any]:
        return {**self.service.to_json(), "rev_nat_index": self.rev_nat, "bank": self.bank,
                "maglev_size": self.maglev_size, "live": self.live,
                "backends": [{**b.backend.to_json(), "id": b.id, "maglev_slots": b.slots,
                              "share": b.slots / self.maglev_size if self.maglev_size else 0.0,
                              "remote": b.remote} for b in self.backends]}
