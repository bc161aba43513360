"""The main tables' sizes a node configuration asks for, adjusted: grown tables kept at
their pinned size (auto-grow never shrinks), or sizes set explicitly (a grow)."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from tuplet.datapath import cttables
from tuplet.datapath.abi import CT_MAP_ANY, CT_MAP_TCP, NAT_MAP
from tuplet.node.config import NodeConfig

#: The [conntrack] key that sizes each main table (an IPv6 table is sized as its IPv4 twin,
#: cttables.sized_as).
TABLE_KEYS = {CT_MAP_TCP: "tcp_max", CT_MAP_ANY: "any_max", NAT_MAP: "nat_max"}


def _by_key_table(sizes: Mapping[str, int]) -> dict[str, int]:
    """Sizes per sizing table: a table and its IPv6 twin share one, the larger."""
    out: dict[str, int] = {}
    for table, n in sizes.items():
        t = cttables.sized_as(table)
        out[t] = max(out.get(t, 0), n)
    return out


def with_sizes(cfg: NodeConfig, sizes: Mapping[str, int]) -> NodeConfig:
    """cfg with these main tables' sizes set explicitly. Tables sized from
    others (NAT from the CT tables without dynamic sizing, the handshake table from the
    TCP table without syn_max) follow their rule."""
    if not sizes:
        return cfg
    ct = cfg.conntrack
    for table, n in _by_key_table(sizes).items():
        ct = dataclasses.replace(ct, **{TABLE_KEYS[table]: n})  # type: ignore[arg-type]
    return dataclasses.replace(cfg, conntrack=ct)


def keep_grown(cfg: NodeConfig, pinned: Mapping[str, int]) -> tuple[NodeConfig, list[tuple[str, int, int]]]:
    """cfg with each main table at max(configured, pinned): ``(cfg, [(table, configured, pinned)])``
    for the tables the configuration would have shrunk."""
    kept: list[tuple[str, int, int]] = []
    pinned = _by_key_table(pinned)
    sizing = cfg.conntrack.sizing()
    cur = {CT_MAP_TCP: sizing.tcp.entries, CT_MAP_ANY: sizing.any.entries}
    for t in (CT_MAP_TCP, CT_MAP_ANY):
        if pinned.get(t, 0) > cur[t]:
            kept.append((t, cur[t], pinned[t]))
    cfg = with_sizes(cfg, {t: p for t, _, p in kept})
    nat = cfg.conntrack.sizing().nat.entries   # may follow the CT sizes
    if pinned.get(NAT_MAP, 0) > nat:
        kept.append((NAT_MAP, nat, pinned[NAT_MAP]))
        cfg = with_sizes(cfg, {NAT_MAP: pinned[NAT_MAP]})
    return cfg, kept
