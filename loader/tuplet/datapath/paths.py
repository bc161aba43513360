"""Where the datapath's parts are: the built objects, the pinned maps, and the records
tuplet keeps beside them in /run.

Pins live on bpffs, which holds only BPF objects; the records (what was attached, the
service registry, the agent's report, the node lock) live in /run, and like bpffs they
go away at reboot together with what they describe.
"""
from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

from tuplet.bpf.maps import Map
from tuplet.core.errors import NotFoundError
from tuplet.datapath.abi import OBJ_LXC

STATE_DIR = Path(os.environ.get("TUPLET_STATE_DIR", "/run/tuplet"))


def object_dir() -> Path:
    """Where the built BPF objects are: $TUPLET_OBJ_DIR; else, installed by `make install`,
    bpf/ beside the venv; else the source tree's build/."""
    env = os.environ.get("TUPLET_OBJ_DIR")
    if env:
        return Path(env)
    installed = Path(sys.prefix).parent / "bpf"
    if (installed / OBJ_LXC).exists():
        return installed
    return Path(__file__).resolve().parents[3] / "build"


def object_path(name: str) -> str:
    """The path of one built object, as a string (BTF readers cache by it)."""
    return str(object_dir() / name)


def open_pinned(pin_root: str, name: str) -> Map:
    """A pinned map of the datapath, with a hint when the datapath is not there."""
    path = os.path.join(pin_root, name)
    if not os.path.exists(path):
        raise NotFoundError(f"pinned map {path}", "open",
                            detail="no datapath under this pin root (run `tuplet apply` first)")
    return Map.from_pin(path)


def is_pinned(pin_root: str, name: str) -> bool:
    return os.path.exists(os.path.join(pin_root, name))


def open_present(pin_root: str, names: Iterable[str], stack: ExitStack) -> list[Map]:
    """The maps of ``names`` pinned under pin_root (the others left out), closed with ``stack``."""
    return [stack.enter_context(open_pinned(pin_root, n)) for n in names if is_pinned(pin_root, n)]


def state_path(pin_root: str) -> Path:
    """What ``apply`` attached and configured under pin_root (:mod:`tuplet.node.state`)."""
    name = pin_root.strip("/").replace("/", "_") or "root"
    return STATE_DIR / f"{name}.json"


def services_path(pin_root: str) -> Path:
    """The service registry of the datapath under pin_root (:mod:`tuplet.lb.writer`)."""
    return state_path(pin_root).with_suffix(".services.json")


def agent_path(pin_root: str) -> Path:
    """What the running agent reports to `tuplet status` (:mod:`tuplet.agent.service`)."""
    return state_path(pin_root).with_suffix(".agent.json")


def lock_path(pin_root: str) -> Path:
    """The node lock of the datapath under pin_root (:mod:`tuplet.node.lock`)."""
    return state_path(pin_root).with_suffix(".lock")
