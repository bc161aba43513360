"""Shared fixtures: built objects, BPF_PROG_TEST_RUN harness, pin roots, namespaces."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "loader"))

from agent_harness import CONFINE_ENV  # noqa: E402
from lxc_harness import LxcHarness  # noqa: E402
from tuplet.bpf import bpffs  # noqa: E402
from tuplet.core.errors import NotSupportedError  # noqa: E402
from tuplet.datapath import clock  # noqa: E402
from tuplet.datapath.paths import object_dir  # noqa: E402
from tuplet.node import socklb  # noqa: E402

TEST_PIN_BASE = "/sys/fs/bpf/tuplet/test"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--datapath-clock", type=int, default=None, metavar="SECONDS",
                     help="run with the datapath's clock (programs, GC, tuplet subprocesses) reading SECONDS "
                          "now, through the test clock offset: e.g. 5 (a node booted seconds ago) or "
                          "4294967000 (just before the u32 wrap). `make test` runs the clock-marked tests "
                          "with a near-zero clock.")
    parser.addoption("--agent-confined", action="store_true",
                     help="run `tuplet agent` (tests/agent_harness.py) with exactly systemd/tuplet.service's "
                          "capability bounding set and a read-only root apart from its ReadWritePaths")


def pytest_configure(config: pytest.Config) -> None:
    start = config.getoption("--datapath-clock")
    if start is not None:
        # In the environment: tuplet commands and agents the tests start use the same clock.
        os.environ[clock.TEST_OFFSET_ENV] = str(clock.offset_for(start))
    if config.getoption("--agent-confined"):
        os.environ[CONFINE_ENV] = str(ROOT / "systemd" / "tuplet.service")
    if os.geteuid() != 0:
        pytest.exit("tuplet's tests load BPF programs and create namespaces: run them as root", 2)
    missing = [o for o in ("bpf_lxc.o",) if not (object_dir() / o).exists()]
    if missing:
        pytest.exit(f"BPF objects missing in {object_dir()}: {missing}; run `make` first", 2)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    base = Path(TEST_PIN_BASE)
    if base.exists() and not any(base.iterdir()):
        base.rmdir()


def _on_root_cgroup() -> list[str]:
    """Names of the programs attached to the cgroup v2 root itself."""
    try:
        root = socklb.cgroup2_root()
    except NotSupportedError:
        return []   # no cgroup v2: nothing can be attached to it
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", root], capture_output=True, text=True, check=True).stdout
    return [str(p.get("name", "")) for p in json.loads(out.strip() or "[]")]


@pytest.fixture(autouse=True, scope="module")
def _root_cgroup_untouched() -> None:
    """Socket LB is on by default and attaches to the cgroup v2 root: a test's node configuration
    must say `socket_lb = false` or name a cgroup of the test's own. Checked after each module."""
    yield
    ours = [n for n in _on_root_cgroup() if n.startswith("cil_sock")]
    assert not ours, f"a test left socket-LB programs on the cgroup v2 root: {ours}"


@pytest.fixture
def pin_root() -> str:
    """A fresh pin root below the project's own, removed afterwards."""
    bpffs.ensure_mounted()
    root = f"{TEST_PIN_BASE}/{uuid.uuid4().hex[:8]}"
    yield root
    bpffs.remove_tree(root)


@pytest.fixture
def lxc() -> LxcHarness:
    """bpf_lxc.o loaded without pins, maps empty, clock controllable."""
    h = LxcHarness.load()
    yield h
    h.close()
