"""The node's overlay device for DSR over Geneve: a collect-metadata (``external``) Geneve device.

``[overlay] device = NAME`` in the node configuration makes :func:`ensure_device` create it (or adopt
an existing collect-metadata Geneve device of that name) and bring it up; ``cil_from_overlay`` is
attached to its ingress and ``cil_from_netdev`` redirects flows to remote backends to it. Without the
``geneve`` module the kernel refuses the device and apply fails with a clear error before anything is
changed; a configuration without ``[overlay]`` never touches Geneve.
"""
from __future__ import annotations

import errno
import os
from typing import Any

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tuplet.core.errors import NotSupportedError, TupletError

log = structlog.get_logger("tuplet.overlay")


def _geneve_info(link: Any) -> tuple[str | None, bool]:
    info = link.get_attr("IFLA_LINKINFO")
    if not info:
        return None, False
    kind = info.get_attr("IFLA_INFO_KIND")
    data = info.get_attr("IFLA_INFO_DATA")
    external = bool(data is not None and data.get_attr("IFLA_GENEVE_COLLECT_METADATA") is not None)
    return kind, external


def ensure_device(name: str) -> tuple[int, bool]:
    """The ifindex of Geneve device ``name`` in the current namespace, created when missing and set up.
    Returns (ifindex, created)."""
    created = False
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            kind, external = _geneve_info(ipr.get_links(found[0])[0])
            if kind != "geneve" or not external:
                raise TupletError(f"overlay device {name}", "adopt",
                                  detail=f"exists but is not a collect-metadata Geneve device (kind {kind}, "
                                         f"external {external}); remove it or name another [overlay] device")
        else:
            try:
                ipr.link("add", ifname=name, kind="geneve", geneve_collect_metadata=True)
            except NetlinkError as e:
                if e.code in (errno.EOPNOTSUPP, errno.ENOENT, errno.EINVAL):
                    raise NotSupportedError(
                        "Geneve devices (module geneve), needed by [overlay]",
                        detail=f"the kernel cannot create a Geneve device ({os.strerror(e.code)}); load the geneve "
                               "module (modprobe geneve) or remove [overlay] from the configuration") from None
                raise TupletError(f"overlay device {name}", "create", e.code) from None
            created = True
            found = ipr.link_lookup(ifname=name)
        idx = found[0]
        ipr.link("set", index=idx, state="up")
    if created:
        log.info("overlay device created", device=name, ifindex=idx)
    return idx, created


def remove_device(name: str) -> None:
    """Delete the overlay device (when tuplet created it)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if found:
            ipr.link("del", index=found[0])
