"""What tuplet attached, kept across runs so teardown and re-apply know what is theirs.

Pins live on bpffs, which holds only BPF objects; this record lives in /run (like
bpffs, it goes away at reboot, together with the attachments it describes).

Endpoints come from two sources: the node file (``configured``, made exact by every
``apply``) and live commands (``live``: `tuplet endpoint add`, the CNI plugin), which
``apply`` leaves alone. A live endpoint's ``phase`` is ``adding`` or ``deleting`` while a
command works on it; a record left in either phase (the command was killed) is finished
or undone by the next command under the node lock (:mod:`tuplet.node.endpoints`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from tuplet.bpf.links import Attachment
from tuplet.datapath.paths import agent_path, services_path, state_path

SOURCE_CONFIG = "config"
PHASE_READY, PHASE_ADDING, PHASE_DELETING = "ready", "adding", "deleting"


@dataclass
class EndpointRecord:
    name: str
    ifname: str
    ipv4: str                       # "" for an IPv6-only endpoint
    identity: int = 0
    source: str = SOURCE_CONFIG     # config | cli | cni
    phase: str = PHASE_READY
    had_clsact: bool = True         # the device had a clsact qdisc before tuplet attached
    owner: str = ""                 # cni: "<container id>/<ifname>" of the attachment
    ipv6: str = ""                  # "" for an IPv4-only endpoint

    @property
    def addresses(self) -> tuple[str, ...]:
        """The endpoint's addresses, IPv4 first (one or both)."""
        return tuple(a for a in (self.ipv4, self.ipv6) if a)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EndpointRecord":
        return cls(name=str(d["name"]), ifname=str(d["ifname"]), ipv4=str(d["ipv4"]),
                   identity=int(d.get("identity", 0)), source=str(d.get("source", SOURCE_CONFIG)),
                   phase=str(d.get("phase", PHASE_READY)), had_clsact=bool(d.get("had_clsact", True)),
                   owner=str(d.get("owner", "")), ipv6=str(d.get("ipv6", "")))


@dataclass
class NodeState:
    pin_root: str
    netns: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)   # ipv4 -> ifname (configured ones)
    sizing: dict[str, Any] | None = None                      # Sizing.to_json() at apply
    gc: dict[str, Any] | None = None                          # GC schedule settings at apply
    attach_mode: str = "auto"                                 # node.attach_mode at apply
    configured: list[EndpointRecord] = field(default_factory=list)
    live: dict[str, EndpointRecord] = field(default_factory=dict)   # name -> live endpoint
    ipcache: list[str] = field(default_factory=list)   # prefixes [[ipcache]] programmed at apply
    socket_lb_cgroup: str = ""                         # the cgroup socket LB was attached to ("": off)

    def all_endpoints(self) -> list[EndpointRecord]:
        return [*self.configured, *self.live.values()]

    def to_json(self) -> dict[str, object]:
        return {"pin_root": self.pin_root, "netns": self.netns,
                "attachments": [a.to_json() for a in self.attachments],
                "endpoints": self.endpoints, "sizing": self.sizing, "gc": self.gc,
                "attach_mode": self.attach_mode,
                "configured": [e.to_json() for e in self.configured],
                "live": [e.to_json() for e in self.live.values()], "ipcache": self.ipcache,
                "socket_lb_cgroup": self.socket_lb_cgroup}


def load(pin_root: str) -> NodeState | None:
    p = state_path(pin_root)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    live = [EndpointRecord.from_json(e) for e in d.get("live", [])]
    return NodeState(pin_root=d["pin_root"], netns=d.get("netns"),
                     attachments=[Attachment.from_json(a) for a in d.get("attachments", [])],
                     endpoints=dict(d.get("endpoints", {})), sizing=d.get("sizing"), gc=d.get("gc"),
                     attach_mode=str(d.get("attach_mode", "auto")),
                     configured=[EndpointRecord.from_json(e) for e in d.get("configured", [])],
                     live={e.name: e for e in live}, ipcache=[str(p) for p in d.get("ipcache", [])],
                     socket_lb_cgroup=str(d.get("socket_lb_cgroup", "")))


def save(st: NodeState) -> None:
    p = state_path(st.pin_root)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(st.to_json(), indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def remove(pin_root: str, keep_services: bool = False) -> None:
    state_path(pin_root).unlink(missing_ok=True)
    agent_path(pin_root).unlink(missing_ok=True)
    if not keep_services:
        services_path(pin_root).unlink(missing_ok=True)
        services_path(pin_root).with_suffix(".lock").unlink(missing_ok=True)
