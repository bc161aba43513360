"""A cgroup v2 directory of one's own, and commands run inside it: socket LB's tests, benches
and the demo attach its programs there, never to the cgroup v2 root, so only the processes
they move in are load-balanced at the socket."""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

from tuplet.node import socklb

# Runs argv with itself moved into the cgroup $1 first.
IN_CGROUP = 'echo $$ > "$1/cgroup.procs" && shift && exec "$@"'


def make(name: str) -> Path:
    """The cgroup ``name`` below the cgroup v2 root (created; one left by a killed run is reused)."""
    cg = Path(socklb.cgroup2_root()) / name
    cg.mkdir(exist_ok=True)
    return cg


def remove(cg: Path) -> None:
    """Remove the cgroup; processes still in it go back to the root first."""
    root = cg.parent
    for _ in range(50):
        with contextlib.suppress(FileNotFoundError):
            for pid in (cg / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (root / "cgroup.procs").write_text(pid)
        try:
            os.rmdir(cg)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    os.rmdir(cg)


@contextlib.contextmanager
def owned(name: str) -> Iterator[Path]:
    """:func:`make` the cgroup ``name`` for the block, :func:`remove` it afterwards."""
    cg = make(name)
    try:
        yield cg
    finally:
        remove(cg)


def argv_in(cg: Path | None, netns: str, argv: list[str]) -> list[str]:
    """argv in network namespace netns, moved into cg first (outside: `ip netns exec` mounts its own /sys)."""
    ns = ["ip", "netns", "exec", netns, *argv]
    return ["sh", "-c", IN_CGROUP, "sh", str(cg), *ns] if cg else ns
