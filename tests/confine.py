"""Run a command as systemd would run tuplet.service's ExecStart, without systemd: exactly the
unit's CapabilityBoundingSet, NoNewPrivileges and MemoryDenyWriteExecute, and a read-only root
apart from its ReadWritePaths (ProtectSystem=strict) in a mount namespace of its own.

    unshare --mount --propagation private python tests/confine.py UNIT -- COMMAND...

(``command(unit, cmd)`` builds that.) The settings are parsed from the unit file, so the test
and the unit cannot drift. /dev and /proc stay as they are (systemd's strict mode leaves the
API file systems to other options). The process keeps its pid through every exec, so
/proc/PID of the returned Popen is the confined command itself."""
from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
from pathlib import Path

CAP_HEADER = Path("/usr/include/linux/capability.h")
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
API_FS = ("/dev", "/proc")


def settings(unit: Path) -> dict[str, list[str]]:
    """The unit's [Service] settings, each a list of its (whitespace-separated) values."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).extend(value.split())
    return out


def capabilities(unit: Path) -> list[str]:
    """CapabilityBoundingSet, e.g. ["CAP_BPF", "CAP_NET_ADMIN"]."""
    return settings(unit).get("CapabilityBoundingSet", [])


def capability_mask(names: list[str]) -> int:
    numbers = {m[1]: int(m[2]) for m in re.finditer(r"#define\s+(CAP_\w+)\s+(\d+)\s*$", CAP_HEADER.read_text(),
                                                     re.M)}
    return sum(1 << numbers[n] for n in names)


def command(unit: Path, cmd: list[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", sys.executable, __file__, str(unit), "--", *cmd]


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return list(dict.fromkeys(points))


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def confine(unit: Path) -> list[str]:
    """In this (new, private) mount namespace: the read-only root; returns setpriv's options."""
    s = settings(unit)
    rw = s.get("ReadWritePaths", [])
    if s.get("ProtectSystem") == ["strict"]:
        for p in rw:
            os.makedirs(p, exist_ok=True)
        for mp in _mount_points():
            if _under(mp, rw) or _under(mp, list(API_FS)):
                continue
            try:
                _mount("-o", "remount,bind,ro", mp)
            except subprocess.CalledProcessError:
                if mp == "/":
                    raise
        points = set(_mount_points())
        for p in rw:
            if p not in points:
                _mount("--bind", p, p)
            _mount("-o", "remount,bind,rw", p)
    if s.get("MemoryDenyWriteExecute") == ["yes"]:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")
    caps = ",".join(["-all"] + ["+" + c.removeprefix("CAP_").lower() for c in capabilities(unit)])
    opts = [f"--bounding-set={caps}", "--inh-caps=-all", "--ambient-caps=-all"]
    if s.get("NoNewPrivileges") == ["yes"]:
        opts.append("--no-new-privs")
    return opts


def main() -> None:
    unit, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        sys.exit("usage: confine.py UNIT -- COMMAND...")
    os.execvp("setpriv", ["setpriv", *confine(Path(unit)), "--", *cmd])


if __name__ == "__main__":
    main()
