"""The agent's metrics endpoint: prometheus_client's HTTP server on a
``--prometheus-serve-addr`` value (``:9962``, ``127.0.0.1:9962``, ``[::1]:9962``; empty
disables it)."""
from __future__ import annotations

import errno
import ipaddress
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_http_server

from tuplet.core.errors import ConfigError, TupletError

log = structlog.get_logger("tuplet.prom")

FLAG = "--prometheus-serve-addr"


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def parse_addr(value: str) -> tuple[str, int] | None:
    """``[HOST]:PORT`` to (host, port); host "" means every address. "" disables: None."""
    if value == "":
        return None

    def bad(why: str) -> ConfigError:
        return ConfigError(FLAG, f"{value!r}: {why} (expected [HOST]:PORT, e.g. :9962, 127.0.0.1:9962, "
                                 "[::1]:9962; empty disables the endpoint)")

    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise bad("an IPv6 address in brackets must be followed by :PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise bad("no ':' before the port")
        if ":" in host:
            raise bad("an IPv6 address needs brackets")
        if host and not _HOSTNAME.match(host):
            raise bad(f"{host!r} is not an address or host name")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad(f"{host!r} is not an IPv4 address") from None
    if not port.isdigit() or not port.isascii() or int(port) > 65535:
        raise bad(f"port {port!r} is not a number from 0 to 65535")
    return host, int(port)


def _v6only() -> bool:
    try:
        return Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "1"
    except OSError:
        return False


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class MetricsServer:
    """A running endpoint; ``port`` is the bound one (useful with port 0)."""

    server: WSGIServer
    thread: threading.Thread
    host: str
    port: int
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return _join(self.host, self.port)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        log.info("metrics endpoint stopped", address=self.address)


def serve(addr: str, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on a ``--prometheus-serve-addr`` value; None when it is empty."""
    parsed = parse_addr(addr)
    if parsed is None:
        return None
    host, port = parsed
    # "Every address": IPv6's wildcard takes IPv4 too, unless the host has no IPv6 or
    # net.ipv6.bindv6only is set.
    binds = [host] if host else ["0.0.0.0"] if _v6only() else ["::", "0.0.0.0"]
    for i, bind in enumerate(binds):
        try:
            server, thread = start_http_server(port, bind, registry)
        except socket.gaierror as e:
            raise TupletError(f"metrics endpoint {_join(host, port)}", "listen",
                              detail=f"cannot resolve {host!r}: {e.strerror} (from {FLAG} {addr!r})") from e
        except OSError as e:
            if i + 1 < len(binds) and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise TupletError(f"metrics endpoint {_join(host, port)}", "listen", e.errno or 0,
                              f"from {FLAG} {addr!r}" if e.errno else f"{e} (from {FLAG} {addr!r})") from e
        thread.name = "tuplet-metrics"
        ms = MetricsServer(server, thread, host, server.server_address[1])
        log.debug("metrics endpoint listening", address=ms.address)
        return ms
    raise AssertionError("unreachable")
