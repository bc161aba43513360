"""The ipcache: identities of remote pods by IPv4 or IPv6 prefix (an LPM trie per family,
``tpl_ipcache4_v1`` and ``tpl_ipcache6_v1``, the datapath reads when it creates an entry,
bpf/lib/ipcache.h). A local endpoint's identity wins; an
address in no prefix is world (2).

Entries come from ``[[ipcache]]`` in the node file (``apply`` makes that set exact) and
from `tuplet ipcache add/delete`, which ``apply`` leaves alone. Changes hold the node lock.
"""
from __future__ import annotations

import contextlib
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import structlog

from tuplet.bpf.maps import Map
from tuplet.core.errors import ConfigError, NotFoundError
from tuplet.datapath import paths
from tuplet.datapath.abi import IPCACHE6_MAP, IPCACHE_MAP
from tuplet.datapath.layouts import Ipcache6Key, IpcacheInfo, IpcacheKey
from tuplet.node import state
from tuplet.node.lock import node_lock

log = structlog.get_logger("tuplet.ipcache")


@dataclass(frozen=True)
class IpcacheEntry:
    prefix: str        # normalized, "10.65.0.0/16" or "f00d:1::/64"
    identity: int
    source: str = "config"

    def to_json(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "identity": self.identity, "source": self.source}


#: The LPM trie of each address family.
MAPS = {4: IPCACHE_MAP, 6: IPCACHE6_MAP}


def parse_prefix(v: Any, key: str) -> str:
    try:
        return str(ipaddress.ip_network(v, strict=False)) if isinstance(v, str) else _bad(v, key)
    except ValueError:
        return _bad(v, key)


def _bad(v: Any, key: str) -> str:
    raise ConfigError(key, "must be an IPv4 or IPv6 prefix such as 10.65.0.0/16 or f00d:1::/64 (a prefix "
                      f"length of at most 32 or 128), got {v!r}")


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


def key_of(prefix: str) -> tuple[str, bytes]:
    """(ipcache map, key) of a normalized prefix: struct ipcache_key or ipcache6_key."""
    net = ipaddress.ip_network(prefix)
    layout = IpcacheKey if net.version == 4 else Ipcache6Key
    raw = net.prefixlen.to_bytes(4, "little") + net.network_address.packed
    return MAPS[net.version], bytes(layout.from_buffer_copy(raw))


def _prefix_of(raw: bytes) -> str:
    """A key of either trie (4 + 4 or 4 + 16 bytes) as its prefix."""
    addr = ipaddress.ip_address(raw[4:])
    return f"{addr}/{int.from_bytes(raw[:4], 'little')}"


def read(m: Map) -> dict[str, int]:
    """prefix -> identity (an LPM trie has no batch lookups: key by key)."""
    out = {}
    for raw in list(m.keys()):
        v = m.lookup(raw)
        if v is not None:
            out[_prefix_of(raw)] = IpcacheInfo.from_buffer_copy(v).sec_id
    return out


def sync_config(maps: Mapping[str, Map | None], entries: Sequence[IpcacheEntry], previous: Sequence[str]) -> None:
    """Program the configuration's prefixes into their family's trie (``maps``: by name);
    remove those an earlier apply configured that it no longer has; leave the rest (added
    with `tuplet ipcache add`)."""
    for e in entries:
        name, key = key_of(e.prefix)
        m = maps.get(name)
        if m is not None:
            m.update(key, IpcacheInfo(sec_id=e.identity))
    wanted = {e.prefix for e in entries}
    for p in previous:
        name, key = key_of(p)
        m = maps.get(name)
        if p not in wanted and m is not None:
            m.delete(key)


@contextlib.contextmanager
def _cli_prefix(pin_root: str, prefix: str, change: str) -> Iterator[tuple[Map, bytes]]:
    """The prefix's ipcache map and key, under the node lock, for a change of a prefix the
    node file does not own (``change``: what to do in the file instead)."""
    name, key = key_of(prefix)
    with node_lock(pin_root):
        st = state.load(pin_root)
        if st is not None and prefix in st.ipcache:
            raise ConfigError("prefix", f"{prefix} is from the node file ([[ipcache]]): {change} it there")
        with paths.open_pinned(pin_root, name) as m:
            yield m, key


def add(pin_root: str, prefix: str, identity: int) -> IpcacheEntry:
    prefix = parse_prefix(prefix, "prefix")
    identity = parse_identity(identity, "--identity")
    with _cli_prefix(pin_root, prefix, "change") as (m, key):
        m.update(key, IpcacheInfo(sec_id=identity))
    log.info("ipcache entry set", prefix=prefix, identity=identity)
    return IpcacheEntry(prefix, identity, "cli")


def delete(pin_root: str, prefix: str) -> None:
    prefix = parse_prefix(prefix, "prefix")
    with _cli_prefix(pin_root, prefix, "remove") as (m, key):
        if not m.delete(key):
            raise NotFoundError(f"ipcache prefix {prefix}", "delete", detail="not in the ipcache")
    log.info("ipcache entry deleted", prefix=prefix)


def listing(pin_root: str) -> list[IpcacheEntry]:
    st = state.load(pin_root)
    configured = set(st.ipcache) if st else set()
    entries: dict[str, int] = {}
    for name in MAPS.values():
        if paths.is_pinned(pin_root, name):
            with paths.open_pinned(pin_root, name) as m:
                entries.update(read(m))
    return [IpcacheEntry(p, ident, "config" if p in configured else "cli")
            for p, ident in sorted(entries.items(), key=lambda kv: _sort_key(kv[0]))]


def _sort_key(prefix: str) -> tuple[int, int, int]:
    net = ipaddress.ip_network(prefix)
    return net.version, int(net.network_address), net.prefixlen
