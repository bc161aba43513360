"""The BPF filesystem: mount it when missing, and manage tuplet's pin root."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import structlog

from tuplet.core.errors import TupletError

log = structlog.get_logger("tuplet.bpffs")

BPFFS = "/sys/fs/bpf"
DEFAULT_PIN_ROOT = "/sys/fs/bpf/tuplet"


def bpffs_mounts() -> list[str]:
    """Mount points of bpf filesystems in this mount namespace."""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        return [line.split()[1] for line in f if line.split()[2:3] == ["bpf"]]


def is_bpffs(path: str) -> bool:
    """True when path lies on a mounted bpf filesystem."""
    real = os.path.realpath(path)
    return any(real == m or real.startswith(m.rstrip("/") + "/") for m in bpffs_mounts())


def ensure_mounted() -> None:
    """Mount bpffs at /sys/fs/bpf unless it is mounted already."""
    if is_bpffs(BPFFS):
        return
    os.makedirs(BPFFS, exist_ok=True)
    res = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True, text=True)
    if res.returncode != 0:
        raise TupletError(f"bpffs at {BPFFS}", "mount", detail=res.stderr.strip())
    log.info("bpffs mounted", path=BPFFS)


def ensure_pin_root(pin_root: str) -> Path:
    """Create the pin root (and bpffs under it) and return it."""
    root = Path(pin_root)
    if not str(root).startswith(BPFFS + "/"):
        raise TupletError(f"pin root {pin_root}", "check", detail=f"must be below {BPFFS}")
    ensure_mounted()
    root.mkdir(parents=True, exist_ok=True)
    if not is_bpffs(str(root)):
        raise TupletError(f"pin root {pin_root}", "check", detail="not on a bpf filesystem")
    return root


def remove_tree(path: str | Path) -> None:
    """Unpin everything under path and remove it (pins are files on bpffs)."""
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
