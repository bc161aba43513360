"""`make install`: the agent's files where the unit expects them, a unit systemd accepts,
and an installed `tuplet` that finds its objects without the source tree."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("install")
    r = subprocess.run(["make", "-C", str(ROOT), "install", f"PREFIX={d}/usr", f"SYSTEMD_DIR={d}/systemd",
                        f"ETC_DIR={d}/etc"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return d


def test_files_and_unit(installed: Path) -> None:
    unit = (installed / "systemd/tuplet.service").read_text()
    assert f"ExecStart={installed}/usr/bin/tuplet --config /etc/tuplet/tuplet.toml" in unit
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "@" not in unit.replace("@.service", "")
    assert (installed / "etc/tuplet.toml").exists()
    assert sorted(p.name for p in (installed / "usr/lib/tuplet/bpf").iterdir()) >= ["bpf_host.o", "bpf_lxc.o"]
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(installed / "systemd/tuplet.service")],
                           capture_output=True, text=True, timeout=60)
        assert v.returncode == 0, v.stderr


def test_installed_tuplet_runs_from_its_own_venv(installed: Path, tmp_path: Path) -> None:
    py = installed / "usr/lib/tuplet/venv/bin/python"
    where = subprocess.run([str(py), "-c", "import tuplet.datapath as d; print(d.object_dir(), d.__file__)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    objdir, module = where.stdout.split()
    assert Path(objdir) == installed / "usr/lib/tuplet/bpf" and str(installed) in module
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nattach_mode = \"sometimes\"\n")
    r = subprocess.run([str(installed / "usr/bin/tuplet"), "--config", str(bad), "agent",
                        "--prometheus-serve-addr", ""], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and "node.attach_mode" in r.stderr, r.stderr
