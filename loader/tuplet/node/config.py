"""The node configuration file (TOML): what tuplet attaches to and how.

    [node]
    name = "node-a"                 # label in logs and status
    netns = "tpl-demo-node"         # optional: the node's network namespace
    pin_root = "/sys/fs/bpf/tuplet"
    attach_mode = "auto"            # auto (TCX, legacy TC without it) | tcx | tc

    [[endpoints]]                   # pods on this node
    name = "pod1"
    ifname = "lxc-pod1"             # host-side veth
    ipv4 = "10.64.0.36"
    identity = 3096                 # optional security identity (SourceSecurityID)

    [[devices]]                     # node devices (NIC)
    ifname = "eth0"

    [lb]
    maglev_table_size = 16381       # Maglev table entries per service (prime)
    socket_lb = true                # ClusterIP translated at connect()/sendto() (cgroup programs)
    socket_lb_cgroup = ""           # the cgroup v2 directory they attach to; "": the cgroup v2 root

    [overlay]                       # optional: DSR over Geneve (needs the geneve module)
    device = "tpl_geneve0"          # collect-metadata Geneve device, created or adopted

    [[services]]                    # see tuplet.lb.model for every key
    name = "web"
    type = "ClusterIP"
    address = "10.68.174.146"
    port = 80
    backends = ["10.64.0.98:8000", "10.64.0.64:8000"]

    [[ipcache]]                     # remote pods: prefix -> identity (SourceSecurityID)
    prefix = "10.65.0.0/24"
    identity = 3096

    [conntrack]                     # all optional; reference defaults
    tcp_max = 524288                # explicit size; unset: a share of node memory
    any_max = 262144
    nat_max = 524288
    map_dynamic_size_ratio = 0.0025 # 0: static defaults for the unset sizes
    gc_interval = "0s"              # 0s: adaptive
    gc_max_interval = "0s"          # 0s: no cap
    syn_table = true                # TCP entries wait in a table of their own until established
    syn_max = 65536                 # its size; unset: TCP size / 8
    auto_grow = false               # grow a table that stays over 90% (95% once), up to:
    auto_grow_max = 16777216
    timeout_regular_tcp = "2h13m20s"
    ...

Each [conntrack] key has a command-line flag with the reference's name
(:mod:`tuplet.node.options`).

Every key is checked: unknown keys, wrong types and bad values raise
:class:`~tuplet.errors.ConfigError` naming the key, before anything is changed.
"""
from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tuplet.bpf.bpffs import BPFFS, DEFAULT_PIN_ROOT
from tuplet.bpf.links import AttachMode
from tuplet.conntrack.sizing import RATIO_DEFAULT, Sizing, compute_sizing, node_memory_bytes
from tuplet.core.durations import parse_duration
from tuplet.core.errors import ConfigError
from tuplet.lb.maglev import DEFAULT_M
from tuplet.lb.model import Service, check_maglev_size, parse_services
from tuplet.node.ipcache import IpcacheEntry
from tuplet.node.ipcache import parse_config as parse_ipcache

IFNAMSIZ = 16
MAP_MIN, MAP_MAX = 1024, 1 << 24


@dataclass(frozen=True)
class Endpoint:
    name: str
    ifname: str
    ipv4: str = ""      # one of ipv4 and ipv6 at least ("": none)
    identity: int = 0
    ipv6: str = ""

    @property
    def addresses(self) -> tuple[str, ...]:
        """The endpoint's addresses, IPv4 first (one or both)."""
        return tuple(a for a in (self.ipv4, self.ipv6) if a)


@dataclass(frozen=True)
class Device:
    ifname: str


@dataclass(frozen=True)
class Timeouts:
    """Conntrack lifetimes in seconds; names follow the reference's flags."""

    regular_tcp: int = 8000
    regular_tcp_syn: int = 60
    regular_tcp_fin: int = 10
    regular_any: int = 60
    service_tcp: int = 8000
    service_tcp_grace: int = 60
    service_any: int = 60

    def rodata(self) -> dict[str, int]:
        """The datapath's load-time constants these map to."""
        return {
            "ct_lifetime_tcp": self.regular_tcp,
            "ct_syn_timeout": self.regular_tcp_syn,
            "ct_close_timeout": self.regular_tcp_fin,
            "ct_lifetime_nontcp": self.regular_any,
            "ct_service_lifetime_tcp": self.service_tcp,
            "ct_service_close_rebalance": self.service_tcp_grace,
            "ct_service_lifetime_nontcp": self.service_any,
        }


@dataclass(frozen=True)
class Conntrack:
    tcp_max: int | None = None      # explicit sizes; None: dynamic (or default) sizing
    any_max: int | None = None
    nat_max: int | None = None
    map_dynamic_size_ratio: float = RATIO_DEFAULT
    gc_interval: float = 0.0        # seconds; 0 = adaptive
    gc_max_interval: float = 0.0    # seconds; 0 = no cap
    timeouts: Timeouts = field(default_factory=Timeouts)
    report_flags: int = 0xFF
    accounting: bool = False      # per-entry Packets/Bytes (the reference: off)
    # Flood protection (README "Table pressure"): TCP entries wait in their own table until
    # their handshake completes. False: one LRU table, as the reference.
    syn_table: bool = True
    syn_max: int | None = None      # entries of that table; None: tcp size / 8 (1024 at least)
    # Auto-grow (off by default): the agent grows a table that stays full, up to the ceiling.
    auto_grow: bool = False
    auto_grow_max: int = 1 << 24

    def syn_entries(self, sizing: Sizing) -> int:
        """Size of the TCP handshake table: ``syn_max``, else an eighth of the TCP table."""
        return self.syn_max if self.syn_max is not None else max(MAP_MIN, sizing.tcp.entries // 8)

    def sizing(self, mem_total: int | None = None) -> Sizing:
        """The map sizes for this node (explicit values, else a share of its memory)."""
        return compute_sizing(node_memory_bytes() if mem_total is None else mem_total,
                              ratio=self.map_dynamic_size_ratio, tcp=self.tcp_max, any_=self.any_max,
                              nat=self.nat_max)


@dataclass(frozen=True)
class Lb:
    maglev_table_size: int = DEFAULT_M
    socket_lb: bool = True          # as the reference: ClusterIP at the socket
    socket_lb_cgroup: str = ""      # "": the cgroup v2 root


@dataclass(frozen=True)
class Overlay:
    device: str = "tpl_geneve0"     # collect-metadata Geneve device: created, or adopted when present


@dataclass(frozen=True)
class NodeConfig:
    name: str = "node"
    netns: str | None = None
    pin_root: str = DEFAULT_PIN_ROOT
    attach_mode: AttachMode = AttachMode.AUTO
    endpoints: tuple[Endpoint, ...] = ()
    devices: tuple[Device, ...] = ()
    conntrack: Conntrack = field(default_factory=Conntrack)
    lb: Lb = field(default_factory=Lb)
    services: tuple[Service, ...] = ()
    overlay: Overlay | None = None
    ipcache: tuple[IpcacheEntry, ...] = ()
    source: str = ""


def load(path: str | Path) -> NodeConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read {p}: {e.strerror}") from None
    return parse(text, str(p))


def parse(text: str, source: str = "<string>") -> NodeConfig:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{source}: not valid TOML: {e}") from None
    _only(doc, "", {"node", "endpoints", "devices", "conntrack", "lb", "services", "overlay", "ipcache"})
    node = _table(doc, "node")
    _only(node, "node", {"name", "netns", "pin_root", "attach_mode"})

    pin_root = _str(node, "node.pin_root", DEFAULT_PIN_ROOT)
    if not pin_root.startswith(BPFFS + "/") or ".." in Path(pin_root).parts:
        raise ConfigError("node.pin_root", f"must be a directory below {BPFFS}, got {pin_root!r}")
    mode = _str(node, "node.attach_mode", "auto")
    try:
        attach_mode = AttachMode(mode)
    except ValueError:
        raise ConfigError("node.attach_mode", f"must be one of auto, tcx, tc; got {mode!r}") from None

    endpoints = tuple(_endpoint(e, i) for i, e in enumerate(_array(doc, "endpoints")))
    _unique(endpoints, "ifname", "endpoints")
    _unique(endpoints, "name", "endpoints")
    _unique(endpoints, "ipv4", "endpoints")
    _unique(endpoints, "ipv6", "endpoints")
    devices = tuple(_device(d, i) for i, d in enumerate(_array(doc, "devices")))
    _unique(devices, "ifname", "devices")
    clash = {e.ifname for e in endpoints} & {d.ifname for d in devices}
    if clash:
        raise ConfigError("devices", f"interface {sorted(clash)[0]!r} is both an endpoint and a device")

    netns = node.get("netns")
    if netns is not None and (not isinstance(netns, str) or not netns or "/" in netns):
        raise ConfigError("node.netns", f"must be a network namespace name, got {netns!r}")
    lb = _table(doc, "lb")
    _only(lb, "lb", {"maglev_table_size", "socket_lb", "socket_lb_cgroup"})
    m = check_maglev_size(lb["maglev_table_size"], "lb.maglev_table_size") if "maglev_table_size" in lb \
        else DEFAULT_M
    socket_lb = lb.get("socket_lb", True)
    if not isinstance(socket_lb, bool):
        raise ConfigError("lb.socket_lb", f"must be true or false, got {socket_lb!r}")
    cgroup = lb.get("socket_lb_cgroup", "")
    if not isinstance(cgroup, str) or (cgroup and (not cgroup.startswith("/") or ".." in Path(cgroup).parts)):
        raise ConfigError("lb.socket_lb_cgroup", f"must be an absolute cgroup v2 directory, got {cgroup!r}")
    services = parse_services(_array(doc, "services"))
    for i, svc in enumerate(services):
        if svc.maglev_size is None and sum(1 for b in svc.backends if b.weight) > m:
            raise ConfigError(f"services[{i}].backends", f"more backends than lb.maglev_table_size ({m})")
    overlay = None
    if "overlay" in doc:
        ov = _table(doc, "overlay")
        _only(ov, "overlay", {"device"})
        dev = _str(ov, "overlay.device", Overlay.device)
        if not dev or len(dev) > 15 or "/" in dev or any(c.isspace() for c in dev):
            raise ConfigError("overlay.device", f"must be an interface name (at most 15 characters), got {dev!r}")
        if dev in {e.ifname for e in endpoints} | {d.ifname for d in devices}:
            raise ConfigError("overlay.device", f"interface {dev!r} is an endpoint or device already")
        overlay = Overlay(device=dev)
    return NodeConfig(name=_str(node, "node.name", "node"), netns=netns, pin_root=pin_root,
                      attach_mode=attach_mode, endpoints=endpoints, devices=devices,
                      conntrack=_conntrack(_table(doc, "conntrack")), lb=Lb(m, socket_lb, cgroup),
                      services=services, overlay=overlay, ipcache=parse_ipcache(_array(doc, "ipcache")),
                      source=source)


# --- sections -----------------------------------------------------------------------------------

def _endpoint(e: Any, i: int) -> Endpoint:
    key = f"endpoints[{i}]"
    if not isinstance(e, dict):
        raise ConfigError(key, "must be a table")
    _only(e, key, {"name", "ifname", "ipv4", "ipv6", "identity"})
    ifname = _ifname(e, f"{key}.ifname")
    if "ipv4" not in e and "ipv6" not in e:
        raise ConfigError(f"{key}.ipv4", "missing: an endpoint needs an ipv4 or an ipv6 address (or both)")
    ipv4, ipv6 = (str(ip_of(f"{key}.{f}", _str(e, f"{key}.{f}", None), v)) if f in e else ""
                  for f, v in (("ipv4", 4), ("ipv6", 6)))
    identity = _int(e, f"{key}.identity", 0, 0, (1 << 32) - 1)
    return Endpoint(name=_str(e, f"{key}.name", ifname), ifname=ifname, ipv4=ipv4, ipv6=ipv6, identity=identity)


def ip_of(key: str, text: str, version: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``text`` as an IPv{version} address, or a ConfigError naming ``key`` (an address of
    the other family too)."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        addr = None
    if addr is None or addr.version != version:
        raise ConfigError(key, f"not an IPv{version} address: {text!r}")
    return addr


def _device(d: Any, i: int) -> Device:
    key = f"devices[{i}]"
    if not isinstance(d, dict):
        raise ConfigError(key, "must be a table")
    _only(d, key, {"ifname"})
    return Device(ifname=_ifname(d, f"{key}.ifname"))


TIMEOUT_KEYS = {f"timeout_{f.name}": f.name for f in fields(Timeouts)}
SIZE_KEYS = ("tcp_max", "any_max", "nat_max", "syn_max", "auto_grow_max")
GC_KEYS = ("gc_interval", "gc_max_interval")
BOOL_KEYS = ("accounting", "syn_table", "auto_grow")
CONNTRACK_KEYS = {*SIZE_KEYS, *GC_KEYS, *TIMEOUT_KEYS, *BOOL_KEYS, "map_dynamic_size_ratio", "report_flags"}


def conntrack_value(key: str, v: Any, label: str) -> Any:
    """Check one [conntrack] value; ``label`` names it in errors (a key or a flag)."""
    if key in TIMEOUT_KEYS:
        return _duration(v, label)
    if key in SIZE_KEYS:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(label, f"must be an integer number of entries, got {v!r}")
        if not MAP_MIN <= v <= MAP_MAX:
            raise ConfigError(label, f"must be between {MAP_MIN} and {MAP_MAX}, got {v}")
        return v
    if key in GC_KEYS:
        return _duration(v, label, allow_zero=True)
    if key == "map_dynamic_size_ratio":
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ConfigError(label, f"must be a number between 0 and 1 (0 disables), got {v!r}")
        return float(v)
    if key == "report_flags":
        return _checked_int(v, label, 0, 0xFF)
    if key in BOOL_KEYS:
        if not isinstance(v, bool):
            raise ConfigError(label, f"must be true or false, got {v!r}")
        return v
    raise ConfigError(label, "unknown setting")


def _checked_int(v: Any, label: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(label, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(label, f"must be between {lo} and {hi}, got {v}")
    return v


def conntrack_from(values: dict[str, Any]) -> Conntrack:
    """A Conntrack from checked values keyed as in the [conntrack] table."""
    timeouts = {attr: values[k] for k, attr in TIMEOUT_KEYS.items() if k in values}
    rest = {k: v for k, v in values.items() if k not in TIMEOUT_KEYS}
    return Conntrack(timeouts=Timeouts(**timeouts), **rest)


def conntrack_values(c: Conntrack) -> dict[str, Any]:
    """The inverse of conntrack_from: every setting keyed as in the [conntrack] table."""
    out: dict[str, Any] = {k: getattr(c.timeouts, attr) for k, attr in TIMEOUT_KEYS.items()}
    for f in fields(Conntrack):
        if f.name != "timeouts":
            out[f.name] = getattr(c, f.name)
    return out


def _conntrack(t: dict[str, Any]) -> Conntrack:
    _only(t, "conntrack", CONNTRACK_KEYS)
    return conntrack_from({k: conntrack_value(k, v, f"conntrack.{k}") for k, v in t.items()})


def _duration(v: Any, key: str, allow_zero: bool = False) -> int:
    """Whole seconds from a Go duration string ("2h13m20s") or a number of seconds."""
    if isinstance(v, bool):
        raise ConfigError(key, f"must be a duration like \"1m0s\" or seconds, got {v!r}")
    if isinstance(v, int):
        secs = float(v)
    elif isinstance(v, str):
        try:
            secs = parse_duration(v)
        except ValueError as e:
            raise ConfigError(key, str(e)) from None
    else:
        raise ConfigError(key, f"must be a duration like \"1m0s\" or seconds, got {v!r}")
    least = 0 if allow_zero else 1
    if secs < least or secs != int(secs) or secs > (1 << 31):
        raise ConfigError(key, f"must be a whole number of seconds, at least {least}s, got {v!r}")
    return int(secs)


# --- scalar helpers -----------------------------------------------------------------------------

def _only(t: dict[str, Any], where: str, allowed: set[str]) -> None:
    for k in t:
        if k not in allowed:
            name = f"{where}.{k}" if where else k
            raise ConfigError(name, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _table(doc: dict[str, Any], key: str) -> dict[str, Any]:
    v = doc.get(key, {})
    if not isinstance(v, dict):
        raise ConfigError(key, "must be a table")
    return v


def _array(doc: dict[str, Any], key: str) -> list[Any]:
    v = doc.get(key, [])
    if not isinstance(v, list):
        raise ConfigError(key, "must be an array of tables ([[" + key + "]])")
    return v


def _str(t: dict[str, Any], key: str, default: str | None) -> str:
    name = key.rsplit(".", 1)[-1]
    if name not in t:
        if default is None:
            raise ConfigError(key, "missing")
        return default
    v = t[name]
    if not isinstance(v, str) or not v:
        raise ConfigError(key, f"must be a non-empty string, got {v!r}")
    return v


def _int(t: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    name = key.rsplit(".", 1)[-1]
    v = t.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(key, f"must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ConfigError(key, f"must be between {lo} and {hi}, got {v}")
    return v


def _ifname(t: dict[str, Any], key: str) -> str:
    v = _str(t, key, None)
    if len(v) >= IFNAMSIZ or "/" in v or any(c.isspace() for c in v):
        raise ConfigError(key, f"not a valid interface name: {v!r}")
    return v


def _unique(items: tuple[Any, ...], attr: str, where: str) -> None:
    seen: set[Any] = set()
    for i, it in enumerate(items):
        v = getattr(it, attr)
        if v == "":    # an optional field left out (an endpoint's ipv4 or ipv6)
            continue
        if v in seen:
            raise ConfigError(f"{where}[{i}].{attr}", f"duplicate value {v!r}")
        seen.add(v)
