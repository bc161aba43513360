"""The ipcache: identities of remote pods by IPv4 prefix (an LPM trie the datapath reads
when it creates an entry, bpf/lib/ipcache.h). A local endpoint's identity wins; an
address in no prefix is world (2).

Entries come from ``[[ipcache]]`` in the node file (``apply`` makes that set exact) and
from `tuplet ipcache add/delete`, which ``apply`` leaves alone. Changes hold the node lock.
"""
from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import structlog

from tuplet.bpf.maps import Map
from tuplet.core.errors import ConfigError, NotFoundError
from tuplet.datapath import paths
from tuplet.datapath.abi import IPCACHE_MAP
from tuplet.datapath.layouts import IpcacheInfo, IpcacheKey, be32_to_ip, ip_to_be32
from tuplet.node import state
from tuplet.node.lock import node_lock

log = structlog.get_logger("tuplet.ipcache")


@dataclass(frozen=True)
class IpcacheEntry:
    prefix: str        # normalized, "10.65.0.0/16"
    identity: int
    source: str = "config"

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "identity": self.identity, "source": self.source}


def parse_prefix(v: Any, key: str) -> str:
    try:
        return str(ipaddress.IPv4Network(str(v), strict=False)) if isinstance(v, str) else _bad(v, key)
    except ValueError:
        return _bad(v, key)


def _bad(v: Any, key: str) -> str:
    raise ConfigError(key, f"must be an IPv4 prefix such as 10.65.0.0/16, got {v!r}")


def parse_identity(v: Any, key: str) -> int:
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 0xFFFFFFFF:
        raise ConfigError(key, f"must be an identity between 1 and 4294967295, got {v!r}")
    return v


def parse_config(items: list[Any]) -> tuple[IpcacheEntry, ...]:
    """``[[ipcache]]`` tables: ``prefix`` and ``identity``, each prefix once."""
    out: list[IpcacheEntry] = []
    for i, t in enumerate(items):
        key = f"ipcache[{i}]"
        if not isinstance(t, dict):
            raise ConfigError(key, "must be a table")
        unknown = sorted(set(t) - {"prefix", "identity"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}", "unknown key (known: prefix, identity)")
        for k in ("prefix", "identity"):
            if k not in t:
                raise ConfigError(f"{key}.{k}", "missing")
        e = IpcacheEntry(parse_prefix(t["prefix"], f"{key}.prefix"), parse_identity(t["identity"], f"{key}.identity"))
        if any(o.prefix == e.prefix for o in out):
            raise ConfigError(f"{key}.prefix", f"duplicate prefix {e.prefix}")
        out.append(e)
    return tuple(out)


def key_of(prefix: str) -> IpcacheKey:
    net = ipaddress.IPv4Network(prefix)
    return IpcacheKey(prefixlen=net.prefixlen, addr=ip_to_be32(str(net.network_address)))


def _prefix_of(raw: bytes) -> str:
    k = IpcacheKey.from_buffer_copy(raw)
    return f"{be32_to_ip(k.addr)}/{k.prefixlen}"


def read(m: Map) -> dict[str, int]:
    """prefix -> identity (an LPM trie has no batch lookups: key by key)."""
    out = {}
    for raw in list(m.keys()):
        v = m.lookup(raw)
        if v is not None:
            out[_prefix_of(raw)] = IpcacheInfo.from_buffer_copy(v).sec_id
    return out


def sync_config(m: Map | None, entries: Sequence[IpcacheEntry], previous: Sequence[str]) -> None:
    """Program the configuration's prefixes; remove those an earlier apply configured that
    it no longer has; leave the rest (added with `tuplet ipcache add`)."""
    if m is None:
        return
    for e in entries:
        m.update(key_of(e.prefix), IpcacheInfo(sec_id=e.identity))
    wanted = {e.prefix for e in entries}
    for p in previous:
        if p not in wanted:
            m.delete(key_of(p))


@contextlib.contextmanager
def _cli_prefix(pin_root: str, prefix: str, change: str) -> Iterator[Map]:
    """The ipcache map, under the node lock, for a change of a prefix the node file does
    not own (``change``: what to do in the file instead)."""
    with node_lock(pin_root):
        st = state.load(pin_root)
        if st is not None and prefix in st.ipcache:
            raise ConfigError("prefix", f"{prefix} is from the node file ([[ipcache]]): {change} it there")
        with paths.open_pinned(pin_root, IPCACHE_MAP) as m:
            yield m


def add(pin_root: str, prefix: str, identity: int) -> IpcacheEntry:
    prefix = parse_prefix(prefix, "prefix")
    identity = parse_identity(identity, "--identity")
    with _cli_prefix(pin_root, prefix, "change") as m:
        m.update(key_of(prefix), IpcacheInfo(sec_id=identity))
    log.info("ipcache entry set", prefix=prefix, identity=identity)
    return IpcacheEntry(prefix, identity, "cli")


def delete(pin_root: str, prefix: str) -> None:
    prefix = parse_prefix(prefix, "prefix")
    with _cli_prefix(pin_root, prefix, "remove") as m:
        if not m.delete(key_of(prefix)):
            raise NotFoundError(f"ipcache prefix {prefix}", "delete", detail="not in the ipcache")
    log.info("ipcache entry deleted", prefix=prefix)


def listing(pin_root: str) -> list[IpcacheEntry]:
    st = state.load(pin_root)
    configured = set(st.ipcache) if st else set()
    with paths.open_pinned(pin_root, IPCACHE_MAP) as m:
        entries = read(m)
    return [IpcacheEntry(p, ident, "config" if p in configured else "cli")
            for p, ident in sorted(entries.items(), key=lambda kv: ipaddress.IPv4Network(kv[0]))]
