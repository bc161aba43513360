"""Conntrack/NAT map sizing: the reference's formula, defaults, limits and errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from tuplet.conntrack import sizing
from tuplet.conntrack.sizing import EntrySizes, MapSize, compute_sizing, node_memory_bytes
from tuplet.core.errors import ConfigError, TupletError

GIB = 1 << 30
TIB = 1 << 40


def entries(s: sizing.Sizing) -> tuple[int, int, int]:
    return (s.tcp.entries, s.any.entries, s.nat.entries)


def test_total_of_default_entry_sizes() -> None:
    assert EntrySizes().total() == 148_373_504


@pytest.mark.parametrize("gib, expected", [
    (7.5, (131_072, 65_536, 131_072)),
    (16, (151_765, 75_882, 151_765)),
    (30, (284_560, 142_280, 284_560)),
    (240, (2_276_484, 1_138_242, 2_276_484)),
])
def test_published_table(gib: float, expected: tuple[int, int, int]) -> None:
    s = compute_sizing(int(gib * GIB))
    assert s.dynamic and s.ratio == 0.0025
    assert entries(s) == expected
    assert {m.source for m in s.maps()} == {"dynamic"}


def test_derivation_text() -> None:
    s = compute_sizing(16 * GIB)
    assert s.tcp.derivation == "0.0025 x 16.0 GiB = 42949672 B; 524288 x 42949672 / 148373504 = 151765"
    assert s.any.derivation.endswith("262144 x 42949672 / 148373504 = 75882")
    small = compute_sizing(int(7.5 * GIB))
    assert small.tcp.derivation.endswith("= 71140; raised to minimum 131072")


def test_explicit_overrides_one_map_only() -> None:
    s = compute_sizing(16 * GIB, tcp=200_000)
    assert s.tcp == MapSize("TCP connection tracking", 200_000, "explicit", "--bpf-ct-global-tcp-max=200000")
    assert (s.any.entries, s.any.source) == (75_882, "dynamic")
    assert (s.nat.entries, s.nat.source) == (151_765, "dynamic")

    s = compute_sizing(16 * GIB, nat=4096)
    assert entries(s) == (151_765, 75_882, 4096)
    assert [m.source for m in s.maps()] == ["dynamic", "dynamic", "explicit"]

    s = compute_sizing(16 * GIB, any_=1 << 24)
    assert entries(s) == (151_765, 1 << 24, 151_765)


def test_ratio_zero_gives_defaults() -> None:
    s = compute_sizing(16 * GIB, ratio=0)
    assert not s.dynamic
    assert entries(s) == (524_288, 262_144, (524_288 + 262_144) * 2 // 3)
    assert s.nat.entries == 524_288
    assert [m.source for m in s.maps()] == ["default"] * 3


def test_ratio_zero_nat_follows_explicit_ct_sizes() -> None:
    s = compute_sizing(16 * GIB, ratio=0, tcp=3000, any_=1500)
    assert entries(s) == (3000, 1500, 3000)
    assert s.nat.source == "default"
    s = compute_sizing(0, ratio=0, tcp=1 << 24, any_=1 << 24)
    assert s.nat.entries == 1 << 24
    assert "capped at maximum 16777216" in s.nat.derivation


def test_clamps_at_minimum_and_maximum() -> None:
    assert entries(compute_sizing(0)) == (131_072, 65_536, 131_072)
    assert entries(compute_sizing(1 * GIB)) == (131_072, 65_536, 131_072)
    big = compute_sizing(4 * TIB)
    assert entries(big) == (1 << 24, 1 << 24, 1 << 24)
    assert big.tcp.derivation.endswith("= 38852000; capped at maximum 16777216")
    # 2 TiB: TCP (19426000 raw) is capped, non-TCP (9713000) is not.
    assert entries(compute_sizing(2 * TIB)) == (1 << 24, 9_713_000, 1 << 24)
    assert entries(compute_sizing(4 * TIB, ratio=1.0)) == (1 << 24, 1 << 24, 1 << 24)


def test_entry_sizes_are_parameters() -> None:
    doubled = EntrySizes(ct=188, nat=188, neigh=48, sockrev=96)
    assert doubled.total() == 2 * 148_373_504
    assert compute_sizing(480 * GIB, entry_sizes=doubled).tcp.entries == 2_276_484


@pytest.mark.parametrize("kwarg, flag", [
    ("tcp", "bpf-ct-global-tcp-max"),
    ("any_", "bpf-ct-global-any-max"),
    ("nat", "bpf-nat-global-max"),
])
@pytest.mark.parametrize("value", [0, 1023, (1 << 24) + 1, -5])
def test_bad_explicit_size_names_flag(kwarg: str, flag: str, value: int) -> None:
    with pytest.raises(ConfigError) as exc:
        compute_sizing(16 * GIB, **{kwarg: value})
    assert exc.value.key == flag
    assert flag in str(exc.value)


@pytest.mark.parametrize("value", [1024, 1 << 24])
def test_explicit_size_limits_are_inclusive(value: int) -> None:
    assert entries(compute_sizing(16 * GIB, tcp=value, any_=value, nat=value)) == (value,) * 3


@pytest.mark.parametrize("ratio", [-0.1, 1.0001, 2, float("nan"), float("inf")])
def test_bad_ratio_names_flag(ratio: float) -> None:
    with pytest.raises(ConfigError) as exc:
        compute_sizing(16 * GIB, ratio=ratio)
    assert exc.value.key == "bpf-map-dynamic-size-ratio"


def test_node_memory_bytes(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16318204 kB\nMemFree:         1234567 kB\n"
                       "MemAvailable:   9876543 kB\n")
    assert node_memory_bytes(str(meminfo)) == 16_318_204 * 1024
    meminfo.write_text("MemFree:         1234567 kB\n")
    with pytest.raises(TupletError):
        node_memory_bytes(str(meminfo))


def test_node_memory_bytes_of_this_host() -> None:
    assert node_memory_bytes() > 0


def test_describe() -> None:
    s = compute_sizing(16 * GIB)
    assert s.summary() == "dynamic sizing: on (ratio: 0.002500)"
    assert s.describe() == [
        "BPF Maps:   dynamic sizing: on (ratio: 0.002500)",
        "  Name                          Size",
        "  Non-TCP connection tracking   75882",
        "  TCP connection tracking       151765",
        "  NAT                           151765",
    ]
    verbose = s.describe(verbose=True)
    assert verbose[:5] == s.describe()
    assert verbose[5:7] == [
        "  Derivation:",
        "    Non-TCP connection tracking: dynamic, 0.0025 x 16.0 GiB = 42949672 B; "
        "262144 x 42949672 / 148373504 = 75882",
    ]
    assert len(verbose) == 9
    off = compute_sizing(16 * GIB, ratio=0, tcp=2048).describe(verbose=True)
    assert off[0] == "BPF Maps:   dynamic sizing: off"
    assert off[2:5] == ["  Non-TCP connection tracking   262144", "  TCP connection tracking       2048",
                        "  NAT                           176128"]
    assert off[6:] == ["    Non-TCP connection tracking: default, default 262144",
                       "    TCP connection tracking: explicit, --bpf-ct-global-tcp-max=2048",
                       "    NAT: default, (2048 + 262144) x 2 / 3 = 176128"]


def test_json_round_trip() -> None:
    s = compute_sizing(16 * GIB, any_=4096)
    assert sizing.Sizing.from_json(s.to_json()) == s
