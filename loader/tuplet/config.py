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

    [conntrack]                     # all optional; reference defaults
    tcp_max = 524288
    any_max = 262144
    timeout_regular_tcp = "2h13m20s"
    ...

Every key is checked: unknown keys, wrong types and bad values raise
:class:`~tuplet.errors.ConfigError` naming the key, before anything is changed.
"""
from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .bpffs import BPFFS, DEFAULT_PIN_ROOT
from .durations import parse_duration
from .errors import ConfigError
from .links import AttachMode

IFNAMSIZ = 16
MAP_MIN, MAP_MAX = 1024, 1 << 24


@dataclass(frozen=True)
class Endpoint:
    name: str
    ifname: str
    ipv4: str
    identity: int = 0


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
    tcp_max: int = 524288
    any_max: int = 262144
    timeouts: Timeouts = field(default_factory=Timeouts)
    report_flags: int = 0xFF
    accounting: bool = True


@dataclass(frozen=True)
class NodeConfig:
    name: str = "node"
    netns: str | None = None
    pin_root: str = DEFAULT_PIN_ROOT
    attach_mode: AttachMode = AttachMode.AUTO
    endpoints: tuple[Endpoint, ...] = ()
    devices: tuple[Device, ...] = ()
    conntrack: Conntrack = field(default_factory=Conntrack)
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
    _only(doc, "", {"node", "endpoints", "devices", "conntrack"})
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
    devices = tuple(_device(d, i) for i, d in enumerate(_array(doc, "devices")))
    _unique(devices, "ifname", "devices")
    clash = {e.ifname for e in endpoints} & {d.ifname for d in devices}
    if clash:
        raise ConfigError("devices", f"interface {sorted(clash)[0]!r} is both an endpoint and a device")

    netns = node.get("netns")
    if netns is not None and (not isinstance(netns, str) or not netns or "/" in netns):
        raise ConfigError("node.netns", f"must be a network namespace name, got {netns!r}")
    return NodeConfig(name=_str(node, "node.name", "node"), netns=netns, pin_root=pin_root,
                      attach_mode=attach_mode, endpoints=endpoints, devices=devices,
                      conntrack=_conntrack(_table(doc, "conntrack")), source=source)


# --- sections -----------------------------------------------------------------------------------

def _endpoint(e: Any, i: int) -> Endpoint:
    key = f"endpoints[{i}]"
    if not isinstance(e, dict):
        raise ConfigError(key, "must be a table")
    _only(e, key, {"name", "ifname", "ipv4", "identity"})
    ifname = _ifname(e, f"{key}.ifname")
    ip = _str(e, f"{key}.ipv4", None)
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError:
        raise ConfigError(f"{key}.ipv4", f"not an IPv4 address: {ip!r}") from None
    identity = _int(e, f"{key}.identity", 0, 0, (1 << 32) - 1)
    return Endpoint(name=_str(e, f"{key}.name", ifname), ifname=ifname, ipv4=str(addr), identity=identity)


def _device(d: Any, i: int) -> Device:
    key = f"devices[{i}]"
    if not isinstance(d, dict):
        raise ConfigError(key, "must be a table")
    _only(d, key, {"ifname"})
    return Device(ifname=_ifname(d, f"{key}.ifname"))


TIMEOUT_KEYS = {f"timeout_{f.name}": f.name for f in fields(Timeouts)}


def _conntrack(t: dict[str, Any]) -> Conntrack:
    _only(t, "conntrack", {"tcp_max", "any_max", "report_flags", "accounting", *TIMEOUT_KEYS})
    timeouts = {}
    for key, attr in TIMEOUT_KEYS.items():
        if key in t:
            timeouts[attr] = _duration(t[key], f"conntrack.{key}")
    acc = t.get("accounting", True)
    if not isinstance(acc, bool):
        raise ConfigError("conntrack.accounting", f"must be true or false, got {acc!r}")
    return Conntrack(
        tcp_max=_int(t, "conntrack.tcp_max", 524288, MAP_MIN, MAP_MAX),
        any_max=_int(t, "conntrack.any_max", 262144, MAP_MIN, MAP_MAX),
        timeouts=Timeouts(**timeouts),
        report_flags=_int(t, "conntrack.report_flags", 0xFF, 0, 0xFF),
        accounting=acc,
    )


def _duration(v: Any, key: str) -> int:
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
    if secs < 1 or secs != int(secs) or secs > (1 << 31):
        raise ConfigError(key, f"must be a whole number of seconds, at least 1s, got {v!r}")
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
        if v in seen:
            raise ConfigError(f"{where}[{i}].{attr}", f"duplicate value {v!r}")
        seen.add(v)
