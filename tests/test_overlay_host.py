"""[overlay] on the host: configuration checks, and a clear error when the kernel has no Geneve (the host's
6.18 has no geneve module; the DSR datapath itself is tested in the 6.1 VM: tests/vm/test_vm_dsr.py)."""
from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from tuplet.core.errors import ConfigError, NotSupportedError
from tuplet.node import apply as node_apply
from tuplet.node import config, state


def test_overlay_config() -> None:
    assert config.parse("").overlay is None
    assert config.parse("[overlay]\n").overlay == config.Overlay("tpl_geneve0")
    assert config.parse('[overlay]\ndevice = "gnv0"\n').overlay.device == "gnv0"
    with pytest.raises(ConfigError, match="overlay.device"):
        config.parse('[overlay]\ndevice = "a-very-long-interface-name"\n')
    with pytest.raises(ConfigError, match="overlay"):
        config.parse('[overlay]\nremote = "1.2.3.4"\n')
    with pytest.raises(ConfigError, match="overlay.device"):
        config.parse('[overlay]\ndevice = "eth0"\n[[devices]]\nifname = "eth0"\n')


def _geneve_available() -> bool:
    ns = f"tpl-gnvp-{uuid.uuid4().hex[:5]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        return subprocess.run(["ip", "-n", ns, "link", "add", "g", "type", "geneve", "external"],
                              capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_apply_without_geneve_fails_clearly_and_changes_nothing() -> None:
    if _geneve_available():
        pytest.skip("this kernel has Geneve: the error path is not reachable")
    ns = f"tpl-gnvx-{uuid.uuid4().hex[:5]}"
    pin = f"/sys/fs/bpf/tuplet/{ns}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"], check=True)
        cfg = config.parse(f'[node]\nnetns = "{ns}"\npin_root = "{pin}"\n[[devices]]\nifname = "eth0"\n'
                           '[lb]\nsocket_lb = false\n'
                           '[overlay]\ndevice = "tpl_geneve0"\n')
        with pytest.raises(NotSupportedError, match=r"Geneve.*modprobe geneve.*remove \[overlay\]"):
            node_apply.apply(cfg)
        assert state.load(pin) is None
        assert not os.path.exists(pin) or not os.listdir(pin)
        # Without [overlay] the same node applies.
        node_apply.apply(config.parse(f'[node]\nnetns = "{ns}"\npin_root = "{pin}"\n[[devices]]\nifname = "eth0"\n'
                                      '[lb]\nsocket_lb = false\n'))
        node_apply.teardown(pin)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=True)
        if os.path.isdir(pin):
            os.rmdir(pin)
