"""An address with an optional port, as tuplet prints them and operators paste them back:
``10.0.0.1``, ``10.0.0.1:80``, ``fd00::10``, ``[fd00::10]``, ``[fd00::10]:80`` (an IPv6
address with a port is bracketed, as `ct list` and `svc list` print it)."""
from __future__ import annotations

import ipaddress

from tuplet.core.errors import ConfigError

FORM = "ADDRESS, ADDRESS:PORT, [IPV6] or [IPV6]:PORT"


def parse(text: str, flag: str, *, prefix: bool = False) -> tuple[str, int | None]:
    """(address or, with ``prefix``, address/prefix in canonical text; port or None).
    A bad value is a ConfigError naming ``flag``; brackets are for IPv6 only."""
    host, port = text, None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(flag, f"must be {FORM}, got {text!r}")
        port = rest[1:] if rest else None
        if ":" not in host:
            raise ConfigError(flag, f"must be {FORM} (only an IPv6 address is bracketed), got {text!r}")
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port is not None and not (port.isdigit() and int(port) <= 65535):
        raise ConfigError(flag, f"must be {FORM} with a port 0 to 65535, got {text!r}")
    try:
        addr = str(ipaddress.ip_network(host, strict=False)) if prefix and "/" in host \
            else str(ipaddress.ip_address(host))
    except ValueError:
        what = "address or prefix (10.64.0.0/16, f00d::/64)" if prefix else "address"
        raise ConfigError(flag, f"must be an IPv4 or IPv6 {what}, optionally with a port ({FORM}), "
                                f"got {text!r}") from None
    return addr, int(port) if port is not None else None
