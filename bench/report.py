"""How the benchmarks hand their results over: a table on stdout, or JSON (``--json``), and
the JSON in ``--out FILE``; the exit status says whether every path check passed."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def emit(res: dict[str, Any], args: argparse.Namespace, print_table: Callable[[dict[str, Any]], None]) -> int:
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print_table(res)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0 if res["checks_passed"] else 1
