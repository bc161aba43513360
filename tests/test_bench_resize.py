"""bench/resize.py runs end to end on a small table and its own checks pass."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_resize_small() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "resize.py"), "--entries", "3000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.lstrip().startswith("3,000")]
    assert len(rows) == 3 and not any("FAILED" in " ".join(row) for row in rows), r.stdout
    # grow and shrink-with-room copy everything; shrinking to 2048 keeps ~2048, drops the rest
    copied = [int(row[4].replace(",", "")) for row in rows]
    dropped = [int(row[5].replace(",", "")) for row in rows]
    assert copied[:2] == [3000, 3000] and dropped[:2] == [0, 0], r.stdout
    assert copied[2] + dropped[2] == 3000 and 0.95 * 2048 <= copied[2] <= 2048, r.stdout
    assert not os.path.exists("/sys/fs/bpf/tuplet/bench")


def test_bench_resize_rejects_bad_counts() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "resize.py"), "--entries", "10,x"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--entries" in r.stderr
