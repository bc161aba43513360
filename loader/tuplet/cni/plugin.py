"""`tuplet-cni`: a chained CNI plugin (spec 1.0.0; GC and STATUS of 1.1) that registers a
pod with the node's datapath.

It runs after an interface plugin such as ``ptp``: from ``prevResult`` it takes the
host-side interface (the one without a ``sandbox``) and the pod's IPv4 and/or IPv6
address (the first of each family in ``ips``), adds a live endpoint (:mod:`tuplet.node.endpoints`, under the node lock) and prints
``prevResult`` unchanged. DEL removes the endpoint and flushes its conntrack entries;
it succeeds when there is nothing to delete. The plugin does the work itself, under the
node lock, rather than asking the agent: the datapath works without an agent, so pods
must too, and the lock already makes it safe beside `apply` and the agent.

Network configuration keys of its own (all optional): ``pin_root`` (default
/sys/fs/bpf/tuplet), ``identity`` (the pods' security identity, default 0).
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from tuplet.agent import log as logmod
from tuplet.bpf.bpffs import DEFAULT_PIN_ROOT
from tuplet.core.errors import ConfigError, NotFoundError, TupletError
from tuplet.node import endpoints
from tuplet.node.lock import NodeLockedError
from tuplet.node.state import PHASE_READY, EndpointRecord

SUPPORTED = ["0.4.0", "1.0.0", "1.1.0"]
# Error codes of the spec, and the plugin's own (100+).
E_VERSION, E_ENV, E_DECODE, E_CONFIG, E_TRY_AGAIN, E_UNAVAILABLE = 1, 4, 6, 7, 11, 50
E_NOT_APPLIED, E_INTERFACE, E_TAKEN, E_DATAPATH = 100, 101, 102, 103


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details


@dataclass
class Request:
    command: str
    container_id: str
    ifname: str
    conf: dict[str, Any]

    @property
    def version(self) -> str:
        return str(self.conf.get("cniVersion", "1.0.0"))

    @property
    def pin_root(self) -> str:
        return str(self.conf.get("pin_root") or DEFAULT_PIN_ROOT)

    @property
    def owner(self) -> str:
        return f"{self.container_id}/{self.ifname}"

    @property
    def name(self) -> str:
        return f"cni-{self.container_id[:12]}-{self.ifname}"


def _env(name: str) -> str:
    v = os.environ.get(name, "")
    if not v:
        raise CniError(E_ENV, f"{name} is not set")
    return v


def parse_request(stdin: str) -> Request:
    command = _env("CNI_COMMAND")
    if command == "VERSION":
        return Request(command, "", "", {})
    try:
        conf = json.loads(stdin) if stdin.strip() else None
    except ValueError as e:
        raise CniError(E_DECODE, "network configuration is not JSON", str(e)) from None
    if not isinstance(conf, dict):
        raise CniError(E_DECODE, "network configuration must be a JSON object")
    if str(conf.get("cniVersion", "")) not in SUPPORTED:
        raise CniError(E_VERSION, f"unsupported cniVersion {conf.get('cniVersion')!r}",
                       f"supported: {', '.join(SUPPORTED)}")
    if command in ("GC", "STATUS"):
        return Request(command, "", "", conf)
    return Request(command, _env("CNI_CONTAINERID"), _env("CNI_IFNAME"), conf)


@dataclass(frozen=True)
class HostSide:
    """What the plugin takes from prevResult: the host-side interface and the pod's
    addresses ("" for a family it has none of)."""

    ifname: str
    ipv4: str
    ipv6: str

    def matches(self, rec: EndpointRecord) -> bool:
        return (rec.ifname, rec.ipv4, rec.ipv6) == (self.ifname, self.ipv4, self.ipv6)

    def describe(self) -> str:
        return " ".join([self.ifname, *(a for a in (self.ipv4, self.ipv6) if a)])


def host_side(prev: Any) -> HostSide:
    """The host-side interface and the pod's addresses from an interface plugin's result."""
    if not isinstance(prev, dict):
        raise CniError(E_CONFIG, "prevResult is missing: tuplet-cni is a chained plugin and runs after "
                       "an interface plugin such as ptp")
    ifaces = prev.get("interfaces") or []
    host = [i for i, x in enumerate(ifaces) if isinstance(x, dict) and x.get("name") and not x.get("sandbox")]
    if not host:
        raise CniError(E_CONFIG, "prevResult has no host-side interface (one without \"sandbox\")")
    first: dict[int, str] = {}
    for ip in prev.get("ips") or []:
        try:
            iface = ipaddress.ip_interface(str(ip.get("address", "")))
        except (ValueError, AttributeError):
            continue
        first.setdefault(iface.version, str(iface.ip))
    if not first:
        raise CniError(E_CONFIG, "prevResult has no IPv4 or IPv6 address")
    return HostSide(str(ifaces[host[0]]["name"]), first.get(4, ""), first.get(6, ""))


def _identity(conf: dict[str, Any]) -> int:
    v = conf.get("identity", 0)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFFFFFF:
        raise CniError(E_CONFIG, f"identity must be an integer between 0 and 4294967295, got {v!r}")
    return v


def _datapath_error(e: TupletError) -> CniError:
    if isinstance(e, NodeLockedError):
        return CniError(E_TRY_AGAIN, "the node's datapath is busy", str(e))
    if isinstance(e, NotFoundError) and "not applied" in str(e):
        return CniError(E_NOT_APPLIED, "tuplet datapath not applied on this node", str(e))
    if isinstance(e, NotFoundError) and "interface" in str(e):
        return CniError(E_INTERFACE, "host-side interface not found", str(e))
    if isinstance(e, ConfigError):
        return CniError(E_TAKEN, "endpoint refused", str(e))
    return CniError(E_DATAPATH, "datapath error", str(e))


def cmd_add(req: Request) -> dict[str, Any]:
    prev: dict[str, Any] = req.conf.get("prevResult") or {}
    hs = host_side(req.conf.get("prevResult"))
    rec = EndpointRecord(req.name, hs.ifname, hs.ipv4, _identity(req.conf), source="cni", owner=req.owner,
                         ipv6=hs.ipv6)
    existing = endpoints.find(req.pin_root, owner=req.owner)
    if existing and existing.phase == PHASE_READY and hs.matches(existing):
        return dict(prev)   # ADD repeated: already there
    try:
        if existing:
            endpoints.delete(req.pin_root, existing.name, missing_ok=True)
        endpoints.add(req.pin_root, rec)
    except TupletError as e:
        raise _datapath_error(e) from None
    return {**prev, "cniVersion": req.version}


def cmd_del(req: Request) -> None:
    try:
        rec = endpoints.find(req.pin_root, owner=req.owner)
        if rec is not None:
            endpoints.delete(req.pin_root, rec.name, missing_ok=True)
    except TupletError as e:
        if isinstance(e, NotFoundError) and "not applied" in str(e):
            return   # no datapath: nothing to delete
        raise _datapath_error(e) from None


def cmd_check(req: Request) -> None:
    hs = host_side(req.conf.get("prevResult"))
    rec = endpoints.find(req.pin_root, owner=req.owner)
    if rec is None or rec.phase != PHASE_READY:
        raise CniError(E_DATAPATH, f"container {req.container_id} has no tuplet endpoint")
    if not hs.matches(rec):
        raise CniError(E_DATAPATH, f"endpoint {rec.name} is {' '.join([rec.ifname, *rec.addresses])}, "
                       f"prevResult says {hs.describe()}")
    in_map = endpoints.map_entries(req.pin_root)
    for addr in rec.addresses:
        entry = in_map.get(addr)
        if entry is None or entry.sec_id != rec.identity:
            raise CniError(E_DATAPATH, f"endpoint {rec.name} ({addr}) is not in the datapath's endpoint map")


def cmd_gc(req: Request) -> None:
    valid = {f"{a.get('containerID')}/{a.get('ifname')}" for a in req.conf.get("cni.dev/valid-attachments") or []
             if isinstance(a, dict)}
    for rec in endpoints.listing(req.pin_root):
        if rec.source == "cni" and rec.owner not in valid:
            try:
                endpoints.delete(req.pin_root, rec.name, missing_ok=True)
            except TupletError as e:
                raise _datapath_error(e) from None


def cmd_status(req: Request) -> None:
    if endpoints.find_datapath(req.pin_root) is None:
        raise CniError(E_UNAVAILABLE, "tuplet datapath not applied on this node")


def run(stdin: str) -> dict[str, Any] | None:
    req = parse_request(stdin)
    if req.command == "VERSION":
        return {"cniVersion": "1.0.0", "supportedVersions": SUPPORTED}
    handlers = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "GC": cmd_gc, "STATUS": cmd_status}
    if req.command not in handlers:
        raise CniError(E_ENV, f"unknown CNI_COMMAND {req.command!r}")
    out = handlers[req.command](req)
    return out if isinstance(out, dict) else None


def _fail(e: CniError, version: str) -> NoReturn:
    json.dump({"cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details}, sys.stdout)
    print()
    sys.exit(1)


def main() -> int:
    logmod.configure(os.environ.get("TUPLET_CNI_LOG_LEVEL", "warning"), "json")
    stdin = sys.stdin.read()
    try:
        version = str(json.loads(stdin).get("cniVersion", "1.0.0"))
    except (ValueError, AttributeError):
        version = "1.0.0"
    try:
        out = run(stdin)
    except CniError as e:
        _fail(e, version)
    except TupletError as e:
        _fail(_datapath_error(e), version)
    if out is not None:
        json.dump(out, sys.stdout)
        print()
    return 0
