"""prometheus/tuplet-rules.yml: valid, and its unit tests (tuplet-rules.test.yml) pass under
`promtool test rules`; a weakened rule makes them fail (they test the thresholds)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROM = Path(__file__).resolve().parents[1] / "prometheus"
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: `make prom-deps` installs it")


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(PROMTOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_are_valid() -> None:
    r = promtool("check", "rules", "tuplet-rules.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 9 rules found" in r.stdout


def test_rule_unit_tests_pass() -> None:
    r = promtool("test", "rules", "tuplet-rules.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("old,new", [
    ("> 0.75", "> 0.85"),                                   # the mixin's threshold
    ("> 0.90\n", "> 0.99\n"),
    ("<= 10)", "<= 5)"),                                     # GC floor
    ("> 0.25)", "> 0.5)"),
    ('map_name="tpl_ct4_syn_v1"} > 0.95', 'map_name="tpl_ct4_syn_v1"} > 1'),
    ("tuplet_bpf_map_capacity >= 16777216", "tuplet_bpf_map_capacity >= 33554432"),
    ('up{job="tuplet"} == 0', 'up{job="tuplet"} == 2'),
    ("insert_failures_total[5m]) > 0", "insert_failures_total[5m]) > 5"),
    ('status="uncompleted"}[15m]) > 0', 'status="uncompleted"}[15m]) > 1'),
    ('tuplet_service_backends{state="active"} == 0', 'tuplet_service_backends{state="active"} < 0'),
    ('state="active"} == 0\n        for: 5m', 'state="active"} == 0\n        for: 10m'),
])
def test_a_weakened_rule_fails_the_unit_tests(tmp_path: Path, old: str, new: str) -> None:
    rules = (PROM / "tuplet-rules.yml").read_text()
    assert old in rules
    (tmp_path / "tuplet-rules.yml").write_text(rules.replace(old, new))
    shutil.copy(PROM / "tuplet-rules.test.yml", tmp_path)
    r = promtool("test", "rules", "tuplet-rules.test.yml", cwd=tmp_path)
    assert r.returncode != 0, f"the unit tests did not notice {old!r} -> {new!r}"
