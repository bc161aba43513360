"""VM tests run only inside the guest `make vm-test` boots (it sets TUPLET_IN_VM=1); elsewhere they are skipped."""
from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("TUPLET_IN_VM") == "1":
        return
    skip = pytest.mark.skip(reason="runs inside the Debian 6.1 VM: make vm-test")
    for item in items:
        if item.get_closest_marker("vm"):
            item.add_marker(skip)
