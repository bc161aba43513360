"""`make install`: the agent's files where the unit expects them, a unit systemd accepts,
and an installed `tuplet` that finds its objects without the source tree."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("install")
    r = subprocess.run(["make", "-C", str(ROOT), "install", f"PREFIX={d}/usr", f"SYSTEMD_DIR={d}/systemd",
                        f"ETC_DIR={d}/etc", f"CNI_BIN_DIR={d}/cni/bin"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return d


def test_files_and_unit(installed: Path) -> None:
    unit = (installed / "systemd/tuplet.service").read_text()
    assert f"ExecStart={installed}/usr/bin/tuplet --config /etc/tuplet/tuplet.toml" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit and not re.search(r"@[A-Z]+@", unit)
    assert (installed / "etc/tuplet.toml").exists()
    assert (installed / "cni/bin/tuplet-cni").resolve() == installed / "usr/lib/tuplet/venv/bin/tuplet-cni"
    objects = {p.name for p in (installed / "usr/lib/tuplet/bpf").iterdir()}
    assert {"bpf_lxc.o", "bpf_host.o", "bpf_overlay.o", "ct_gc.o"} <= objects, objects
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(installed / "systemd/tuplet.service")],
                           capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, v.stderr


#: issue 15: the unit's exposure (0 = locked down, 10 = unsafe) at most this.
MAX_EXPOSURE = 3.5


def test_unit_is_hardened(installed: Path) -> None:
    """`systemd-analyze security --offline=yes` on the unit as installed (placeholders filled)."""
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                        str(installed / "systemd/tuplet.service")], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for tuplet\.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m[1]) <= MAX_EXPOSURE, r.stdout
    unit = (installed / "systemd/tuplet.service").read_text()
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/sys/fs/bpf /run/tuplet",
                 "ProtectHome=yes", "PrivateTmp=yes", "RestrictAddressFamilies=AF_UNIX AF_NETLINK AF_INET AF_INET6",
                 "SystemCallArchitectures=native"):
        assert line in unit.splitlines(), line


def test_installed_tuplet_runs_from_its_own_venv(installed: Path, tmp_path: Path) -> None:
    py = installed / "usr/lib/tuplet/venv/bin/python"
    where = subprocess.run([str(py), "-c", "import tuplet.datapath.paths as d; print(d.object_dir(), d.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    objdir, module = where.stdout.split()
    assert Path(objdir) == installed / "usr/lib/tuplet/bpf" and str(installed) in module
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nattach_mode = \"sometimes\"\n")
    r = subprocess.run([str(installed / "usr/bin/tuplet"), "--config", str(bad), "agent",
                        "--prometheus-serve-addr", ""], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "node.attach_mode" in r.stderr, r.stderr


def test_lab_is_not_installed(installed: Path, tmp_path: Path) -> None:
    """The demo topology is for this source tree; a node gets the datapath and its tools only."""
    py = installed / "usr/lib/tuplet/venv/bin/python"
    r = subprocess.run([str(py), "-c", "import tuplet.lab"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode != 0 and "No module named 'tuplet.lab'" in r.stderr, r.stderr
    assert not list((installed / "usr/lib/tuplet/venv").rglob("topology.py"))
