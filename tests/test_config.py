"""Node configuration parsing: every bad value is refused with the key it came from."""
from __future__ import annotations

from pathlib import Path

import pytest

from tuplet.bpf.links import AttachMode
from tuplet.core.durations import format_duration, parse_duration
from tuplet.core.errors import ConfigError, NotSupportedError
from tuplet.node import config, socklb

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_parses() -> None:
    cfg = config.load(ROOT / "examples" / "node.toml")
    assert [e.ifname for e in cfg.endpoints] == ["lxc-pod1", "lxc-pod2"]
    assert cfg.endpoints[0].identity == 3096 and cfg.endpoints[1].identity == 0
    assert cfg.attach_mode is AttachMode.AUTO
    assert cfg.conntrack.timeouts.rodata()["ct_lifetime_tcp"] == 8000


def test_defaults_are_the_reference_timeouts() -> None:
    t = config.parse("").conntrack.timeouts
    assert (t.regular_tcp, t.regular_tcp_syn, t.regular_tcp_fin, t.regular_any) == (8000, 60, 10, 60)
    assert (t.service_tcp, t.service_tcp_grace, t.service_any) == (8000, 60, 60)


@pytest.mark.parametrize("text,s", [("1m0s", 60), ("2h13m20s", 8000), ("10s", 10), ("1.5h", 5400),
                                    ("300ms", 0.3), ("0", 0), ("6h", 21600)])
def test_go_durations(text: str, s: float) -> None:
    assert parse_duration(text) == pytest.approx(s)


def test_duration_rendering() -> None:
    assert [format_duration(x) for x in (0, 10, 60, 8000)] == ["0s", "10s", "1m0s", "2h13m20s"]


@pytest.mark.parametrize("text,key", [
    ("[node]\nattach_mode = \"xdp\"", "node.attach_mode"),
    ("[node]\npin_root = \"/tmp/x\"", "node.pin_root"),
    ("[node]\npin_root = \"/sys/fs/bpf/../x\"", "node.pin_root"),
    ("[node]\ncolour = 1", "node.colour"),
    ("[[endpoints]]\nipv4 = \"10.0.0.1\"", "endpoints[0].ifname"),
    ("[[endpoints]]\nifname = \"a\"\nipv4 = \"10.0.0.256\"", "endpoints[0].ipv4"),
    ("[[endpoints]]\nifname = \"averyveryverylongname\"\nipv4 = \"10.0.0.1\"", "endpoints[0].ifname"),
    ("[[endpoints]]\nifname = \"a\"\nipv4 = \"10.0.0.1\"\nidentity = -1", "endpoints[0].identity"),
    ("[[endpoints]]\nifname = \"a\"\nipv4 = \"10.0.0.1\"\n[[endpoints]]\nifname = \"a\"\nipv4 = \"10.0.0.2\"",
     "endpoints[1].ifname"),
    ("[[endpoints]]\nifname = \"a\"\nipv4 = \"10.0.0.1\"\n[[devices]]\nifname = \"a\"", "devices"),
    ("[[endpoints]]\nifname = \"a\"", "endpoints[0].ipv4"),
    ("[[endpoints]]\nifname = \"a\"\nipv4 = \"f00d::1\"", "endpoints[0].ipv4"),
    ("[[endpoints]]\nifname = \"a\"\nipv6 = \"10.0.0.1\"", "endpoints[0].ipv6"),
    ("[[endpoints]]\nifname = \"a\"\nipv4 = \"10.0.0.1\"\nipv6 = \"f00d::1/64\"", "endpoints[0].ipv6"),
    ("[[endpoints]]\nifname = \"a\"\nipv6 = \"f00d::1\"\n[[endpoints]]\nifname = \"b\"\nipv6 = \"F00D::1\"",
     "endpoints[1].ipv6"),
    ("[conntrack]\ntcp_max = 10", "conntrack.tcp_max"),
    ("[conntrack]\ntcp_max = 16777217", "conntrack.tcp_max"),
    ("[conntrack]\ntimeout_regular_tcp = \"soon\"", "conntrack.timeout_regular_tcp"),
    ("[conntrack]\ntimeout_regular_tcp_syn = \"500ms\"", "conntrack.timeout_regular_tcp_syn"),
    ("[conntrack]\nreport_flags = 300", "conntrack.report_flags"),
    ("[conntrack]\naccounting = \"yes\"", "conntrack.accounting"),
    ("endpoints = 3", "endpoints"),
    ("[lb]\nsocket_lb = 1", "lb.socket_lb"),
    ("[lb]\nsocket_lb_cgroup = \"unified/x\"", "lb.socket_lb_cgroup"),
    ("[lb]\nsocket_lb_cgroup = \"/sys/fs/cgroup/../x\"", "lb.socket_lb_cgroup"),
])
def test_bad_values_name_their_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config.parse(text)
    assert exc.value.key == key
    assert key in str(exc.value)


def test_endpoints_with_ipv6_beside_or_instead_of_ipv4() -> None:
    eps = config.parse("[[endpoints]]\nifname = \"a\"\nipv4 = \"10.0.0.1\"\nipv6 = \"F00D:0::1\"\n"
                       "[[endpoints]]\nifname = \"b\"\nipv6 = \"f00d::2\"\n"
                       "[[endpoints]]\nifname = \"c\"\nipv4 = \"10.0.0.3\"\n").endpoints
    assert [(e.ipv4, e.ipv6, e.addresses) for e in eps] == [
        ("10.0.0.1", "f00d::1", ("10.0.0.1", "f00d::1")), ("", "f00d::2", ("f00d::2",)),
        ("10.0.0.3", "", ("10.0.0.3",))]


def test_socket_lb_keys() -> None:
    assert config.parse("").lb.socket_lb is True    # on by default, as the reference
    assert config.parse("").lb.socket_lb_cgroup == ""   # the cgroup v2 root
    lb = config.parse("[lb]\nsocket_lb = true\nsocket_lb_cgroup = \"/sys/fs/cgroup/unified/k8s\"").lb
    assert (lb.socket_lb, lb.socket_lb_cgroup) == (True, "/sys/fs/cgroup/unified/k8s")


def test_not_toml() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.parse("[node\n")


def test_socket_lb_default_cgroup_is_the_cgroup2_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
                      "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n")
    assert socklb.cgroup2_root(str(mounts)) == "/sys/fs/cgroup/unified"
    assert socklb.resolve_cgroup("/sys/fs/cgroup/unified/pods") == "/sys/fs/cgroup/unified/pods"
    mounts.write_text("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n")
    with pytest.raises(NotSupportedError, match="socket_lb = false"):
        socklb.cgroup2_root(str(mounts))
