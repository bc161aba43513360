"""What tuplet attached, kept across runs so teardown and re-apply know what is theirs.

Pins live on bpffs, which holds only BPF objects; this record lives in /run (like
bpffs, it goes away at reboot, together with the attachments it describes).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from tuplet.bpf.links import Attachment
from tuplet.datapath.paths import agent_path, services_path, state_path


@dataclass
class NodeState:
    pin_root: str
    netns: str | None = None
    attachments: list[Attachment] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)   # ipv4 -> ifname
    sizing: dict[str, Any] | None = None                      # Sizing.to_json() at apply
    gc: dict[str, Any] | None = None                          # GC schedule settings at apply

    def to_json(self) -> dict[str, object]:
        return {"pin_root": self.pin_root, "netns": self.netns,
                "attachments": [a.to_json() for a in self.attachments],
                "endpoints": self.endpoints, "sizing": self.sizing, "gc": self.gc}


def load(pin_root: str) -> NodeState | None:
    p = state_path(pin_root)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    return NodeState(pin_root=d["pin_root"], netns=d.get("netns"),
                     attachments=[Attachment.from_json(a) for a in d.get("attachments", [])],
                     endpoints=dict(d.get("endpoints", {})), sizing=d.get("sizing"), gc=d.get("gc"))


def save(st: NodeState) -> None:
    p = state_path(st.pin_root)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(st.to_json(), indent=2), encoding="utf-8")
    os.replace(tmp, p)


def remove(pin_root: str, keep_services: bool = False) -> None:
    state_path(pin_root).unlink(missing_ok=True)
    agent_path(pin_root).unlink(missing_ok=True)
    if not keep_services:
        services_path(pin_root).unlink(missing_ok=True)
        services_path(pin_root).with_suffix(".lock").unlink(missing_ok=True)
