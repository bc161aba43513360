"""Removing what tuplet attached to a device: its programs, then the clsact qdiscs it created."""
from __future__ import annotations

import contextlib
from typing import Collection

from tuplet.bpf.links import Attachment, detach, tc_destroy_clsact
from tuplet.core.errors import NotFoundError


def remove_attachments(atts: list[Attachment], keep_clsact: Collection[str] = frozenset()) -> None:
    """Detach; then remove the clsact qdiscs tuplet created that nothing of tuplet's still uses."""
    for a in atts:
        with contextlib.suppress(NotFoundError):
            detach(a)
    for ifname in sorted({a.ifname for a in atts if a.created_clsact} - set(keep_clsact)):
        tc_destroy_clsact(ifname)
