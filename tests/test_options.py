"""The conntrack flags: reference names and defaults, file vs flag precedence, errors naming the flag."""
from __future__ import annotations

import argparse

import pytest

from tuplet.conntrack.sizing import GIB
from tuplet.core.errors import ConfigError
from tuplet.node import config
from tuplet.node.options import FLAGS, add_flags, merge_flags

FILE = """
[conntrack]
tcp_max = 200000
timeout_regular_tcp = "1h0m0s"
gc_interval = "30s"
"""


def parse(argv: list[str], text: str = FILE) -> config.NodeConfig:
    p = argparse.ArgumentParser()
    add_flags(p)
    return merge_flags(config.parse(text), p.parse_args(argv))


def test_reference_flag_names() -> None:
    assert {f"--{f.name}" for f in FLAGS} == {
        "--bpf-ct-timeout-regular-tcp", "--bpf-ct-timeout-regular-tcp-syn", "--bpf-ct-timeout-regular-tcp-fin",
        "--bpf-ct-timeout-regular-any", "--bpf-ct-timeout-service-tcp", "--bpf-ct-timeout-service-tcp-grace",
        "--bpf-ct-timeout-service-any", "--bpf-ct-global-tcp-max", "--bpf-ct-global-any-max",
        "--bpf-nat-global-max", "--bpf-map-dynamic-size-ratio", "--conntrack-gc-interval",
        "--conntrack-gc-max-interval"}


def test_defaults_match_the_reference() -> None:
    c = parse([], "").conntrack
    t = c.timeouts
    assert (t.regular_tcp, t.regular_tcp_syn, t.regular_tcp_fin, t.regular_any) == (8000, 60, 10, 60)
    assert (t.service_tcp, t.service_tcp_grace, t.service_any) == (8000, 60, 60)
    assert (c.tcp_max, c.any_max, c.nat_max, c.map_dynamic_size_ratio) == (None, None, None, 0.0025)
    assert (c.gc_interval, c.gc_max_interval) == (0, 0)


@pytest.mark.parametrize("argv,attr,want", [
    (["--bpf-ct-timeout-regular-tcp", "2h13m20s"], "timeouts.regular_tcp", 8000),
    (["--bpf-ct-timeout-regular-tcp-syn", "30s"], "timeouts.regular_tcp_syn", 30),
    (["--bpf-ct-timeout-regular-tcp-fin", "5s"], "timeouts.regular_tcp_fin", 5),
    (["--bpf-ct-timeout-regular-any", "1m30s"], "timeouts.regular_any", 90),
    (["--bpf-ct-timeout-service-tcp", "1h"], "timeouts.service_tcp", 3600),
    (["--bpf-ct-timeout-service-tcp-grace", "2m"], "timeouts.service_tcp_grace", 120),
    (["--bpf-ct-timeout-service-any", "45s"], "timeouts.service_any", 45),
    (["--bpf-ct-global-tcp-max", "1048576"], "tcp_max", 1048576),
    (["--bpf-ct-global-any-max", "0x10000"], "any_max", 65536),
    (["--bpf-nat-global-max", "300000"], "nat_max", 300000),
    (["--bpf-map-dynamic-size-ratio", "0.005"], "map_dynamic_size_ratio", 0.005),
    (["--bpf-map-dynamic-size-ratio", "0"], "map_dynamic_size_ratio", 0.0),
    (["--conntrack-gc-interval", "1m0s"], "gc_interval", 60),
    (["--conntrack-gc-max-interval", "2h"], "gc_max_interval", 7200),
])
def test_each_flag_lands(argv: list[str], attr: str, want: object) -> None:
    c = parse(argv).conntrack
    for part in attr.split("."):
        c = getattr(c, part)
    assert c == want


def test_flags_override_the_file_and_the_rest_is_kept() -> None:
    c = parse(["--bpf-ct-global-tcp-max", "300000"]).conntrack
    assert c.tcp_max == 300000
    assert c.timeouts.regular_tcp == 3600 and c.gc_interval == 30   # from the file
    c = parse([]).conntrack
    assert c.tcp_max == 200000


@pytest.mark.parametrize("argv,flag", [
    (["--bpf-ct-global-tcp-max", "12"], "--bpf-ct-global-tcp-max"),
    (["--bpf-ct-global-tcp-max", "16777217"], "--bpf-ct-global-tcp-max"),
    (["--bpf-ct-global-any-max", "lots"], "--bpf-ct-global-any-max"),
    (["--bpf-nat-global-max", "1.5"], "--bpf-nat-global-max"),
    (["--bpf-map-dynamic-size-ratio", "1.5"], "--bpf-map-dynamic-size-ratio"),
    (["--bpf-map-dynamic-size-ratio", "half"], "--bpf-map-dynamic-size-ratio"),
    (["--bpf-ct-timeout-regular-tcp", "soon"], "--bpf-ct-timeout-regular-tcp"),
    (["--bpf-ct-timeout-regular-tcp-syn", "500ms"], "--bpf-ct-timeout-regular-tcp-syn"),
    (["--bpf-ct-timeout-regular-any", "0s"], "--bpf-ct-timeout-regular-any"),
    (["--conntrack-gc-interval=-1m"], "--conntrack-gc-interval"),
    (["--conntrack-gc-max-interval", "1x"], "--conntrack-gc-max-interval"),
])
def test_bad_values_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(argv)
    assert e.value.key == flag and str(e.value).startswith(flag + ": "), str(e.value)


@pytest.mark.parametrize("text,key", [
    ("[conntrack]\nnat_max = 10", "conntrack.nat_max"),
    ("[conntrack]\nmap_dynamic_size_ratio = 2", "conntrack.map_dynamic_size_ratio"),
    ("[conntrack]\ngc_interval = \"forever\"", "conntrack.gc_interval"),
    ("[conntrack]\ngc_max_interval = -3", "conntrack.gc_max_interval"),
])
def test_bad_file_values_name_the_key(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(text)
    assert e.value.key == key and str(e.value).startswith(f"config {key}: "), str(e.value)


def test_sizing_from_config() -> None:
    c = parse(["--bpf-ct-global-any-max", "70000"], "").conntrack
    s = c.sizing(mem_total=16 * GIB)
    # Published table row for 16 GiB, with the non-TCP table set explicitly.
    assert (s.tcp.entries, s.any.entries, s.nat.entries) == (151765, 70000, 151765)
    assert (s.tcp.source, s.any.source, s.nat.source) == ("dynamic", "explicit", "dynamic")
    s = parse(["--bpf-map-dynamic-size-ratio", "0"], "").conntrack.sizing(mem_total=16 * GIB)
    assert (s.tcp.entries, s.any.entries, s.nat.entries, s.dynamic) == (524288, 262144, 524288, False)


def test_cli_rejects_a_bad_flag_with_exit_2(tmp_path, capsys) -> None:
    from tuplet.cli import main as cli
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\npin_root = "/sys/fs/bpf/tuplet/test/never-created"\n')
    assert cli.main(["apply", str(cfg), "--bpf-ct-global-tcp-max", "12"]) == 2
    err = capsys.readouterr().err
    assert "--bpf-ct-global-tcp-max: must be between 1024 and 16777216, got 12" in err
    import os
    assert not os.path.exists("/sys/fs/bpf/tuplet/test/never-created")
