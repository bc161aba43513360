"""What the running agent reports to `tuplet status`: a JSON file beside the node state,
written by the agent, read by the CLI (only while the pid in it lives)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tuplet.datapath import paths


def agent_state_path(pin_root: str) -> Path:
    """What the running agent reports to `tuplet status`."""
    return paths.agent_path(pin_root)


def read_agent_state(pin_root: str) -> dict[str, Any] | None:
    """The agent's report, or None when no agent runs for pin_root."""
    try:
        d: dict[str, Any] = json.loads(agent_state_path(pin_root).read_text(encoding="utf-8"))
        os.kill(int(d["pid"]), 0)
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError):
        return None
    except PermissionError:
        pass
    return d
