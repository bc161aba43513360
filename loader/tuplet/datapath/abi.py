"""The datapath's ABI as user space sees it: every object, program and pinned map name,
and every flag value the BPF programs and Python share.

Each constant is defined here once. ``tests/test_abi.py`` checks every one against the
built objects: map and program names against what the objects declare, flag values
against the enums of their BTF (``bpf/lib/*_types.h`` and ``ct_gc.c`` name them in enums
for that reason). A pinned map's name carries its layout version (``_vN``): a changed
key or value layout gets a new name, so an old pin can never be misread.
"""
from __future__ import annotations

import struct
from typing import Final

from tuplet.bpf.links import CgroupHook, Hook

# --- objects and programs ---------------------------------------------------------------------

OBJ_LXC: Final = "bpf_lxc.o"          # pod side: cil_from_container, cil_to_container
OBJ_HOST: Final = "bpf_host.o"        # node NIC: cil_from_netdev, cil_to_netdev
OBJ_OVERLAY: Final = "bpf_overlay.o"  # Geneve device: cil_from_overlay
OBJ_SOCK: Final = "bpf_sock.o"        # socket LB: cgroup connect4/sendmsg4/recvmsg4/getpeername4
OBJ_SOCK_DESTROY: Final = "sock_destroy.o"   # socket LB: iter/udp destroying removed backends' sockets
SOCK_DESTROY_PROGRAM: Final = "tpl_sock_destroy_udp"
SOCK_DESTROY_TARGETS: Final = "tpl_sock_destroy_targets"   # not pinned: the sockets of one run
OBJ_GC: Final = "ct_gc.o"             # the in-kernel GC walker, run with BPF_PROG_TEST_RUN
GC_PROGRAM: Final = "tpl_ct_gc"             # one run walks a whole map: bench/gc.py's floor only
OBJ_GC_ITER: Final = "ct_gc_iter.o"   # the sliced pass: iter/bpf_map_elem programs
GC_KEYS_PROGRAM: Final = "tpl_ct_gc_keys"   # the batch fallback's deleter
NOTIFY_EMIT_PROGRAM: Final = "tpl_ct_notify_emit"   # DESTROY records of user-space deletions

#: (program, hook) per endpoint: packets leaving the pod enter the host-side veth.
LXC_HOOKS: Final = (("cil_from_container", Hook.INGRESS), ("cil_to_container", Hook.EGRESS))
#: (program, hook) per node device: what enters the node, what leaves it.
NETDEV_HOOKS: Final = (("cil_from_netdev", Hook.INGRESS), ("cil_to_netdev", Hook.EGRESS))
#: (program, hook) on the overlay (Geneve) device: DSR flows arriving from an LB node.
OVERLAY_HOOKS: Final = (("cil_from_overlay", Hook.INGRESS),)

#: (program, hook) on the socket-LB cgroup ([lb] socket_lb_cgroup).
SOCK_HOOKS: Final = (("cil_sock4_connect", CgroupHook.CONNECT4), ("cil_sock4_sendmsg", CgroupHook.SENDMSG4),
                     ("cil_sock4_recvmsg", CgroupHook.RECVMSG4),
                     ("cil_sock4_getpeername", CgroupHook.GETPEERNAME4))

#: Directory under the pin root where apply pins the pod programs, so an endpoint added
#: live (`tuplet endpoint add`, the CNI plugin) gets the programs the node runs.
PROGS_DIR: Final = "progs"

# --- pinned maps ------------------------------------------------------------------------------

CT_MAP_TCP: Final = "tpl_ct4_v1"
CT_MAP_ANY: Final = "tpl_ct_any4_v1"
CT_MAP_SYN: Final = "tpl_ct4_syn_v1"     # TCP entries until their connection is established
CT_MAPS: Final = (CT_MAP_TCP, CT_MAP_ANY, CT_MAP_SYN)
# IPv6 (struct ipv6_ct_tuple keys, the same struct ct_entry values), sized as their IPv4 twins.
CT6_MAP_TCP: Final = "tpl_ct6_v1"
CT6_MAP_ANY: Final = "tpl_ct_any6_v1"
CT6_MAP_SYN: Final = "tpl_ct6_syn_v1"
CT6_MAPS: Final = (CT6_MAP_TCP, CT6_MAP_ANY, CT6_MAP_SYN)
NAT_MAP: Final = "tpl_nat4_v1"
NAT6_MAP: Final = "tpl_nat6_v1"          # IPv6 tuples (DSR replies of IPv6 services), nat_map.h
EP_MAP: Final = "tpl_ep4_v1"
EP6_MAP: Final = "tpl_ep6_v1"            # the same endpoints by IPv6 address
IPCACHE_MAP: Final = "tpl_ipcache4_v1"   # LPM trie: remote IPv4 prefix -> identity (ipcache.h)
IPCACHE6_MAP: Final = "tpl_ipcache6_v1"  # LPM trie: remote IPv6 prefix -> identity
METRICS_MAP: Final = "tpl_metrics_v2"
EVENTS_MAP: Final = "tpl_ct_events_v2"
SIGNAL_MAP: Final = "tpl_signals_v1"
# Conntrack events (bpf/lib/ct_notify.h): the ring, the listener flag, per-CPU undelivered counts.
NOTIFY_MAP: Final = "tpl_ct_notify_v1"
NOTIFY_CTL_MAP: Final = "tpl_ct_notify_ctl_v1"
NOTIFY_LOST_MAP: Final = "tpl_ct_notify_lost_v1"

SERVICES_MAP: Final = "tpl_lb4_services_v1"
BACKENDS_MAP: Final = "tpl_lb4_backends_v1"
REV_NAT_MAP: Final = "tpl_lb4_reverse_nat_v1"
MAGLEV_MAP: Final = "tpl_lb4_maglev_v2"
AFFINITY_MAP: Final = "tpl_lb4_affinity_v1"
# IPv6 services (lb6_map.h): the same service value, Maglev tables in MAGLEV_MAP (reverse-NAT
# indexes and backend ids are one space for both families).
SERVICES6_MAP: Final = "tpl_lb6_services_v1"
BACKENDS6_MAP: Final = "tpl_lb6_backends_v1"
REV_NAT6_MAP: Final = "tpl_lb6_reverse_nat_v1"
AFFINITY6_MAP: Final = "tpl_lb6_affinity_v1"
#: Every service map, both families.
LB_MAPS: Final = (SERVICES_MAP, BACKENDS_MAP, REV_NAT_MAP, MAGLEV_MAP, AFFINITY_MAP,
                  SERVICES6_MAP, BACKENDS6_MAP, REV_NAT6_MAP, AFFINITY6_MAP)
#: One u32: nonzero once a NIC-reachable (LB_SVC_F_EXTERNAL) service was written; while zero
#: (and no overlay) cil_to_netdev skips its conntrack probes (lb_map.h).
EXTERNAL_MAP: Final = "tpl_lb4_external_v1"
#: Socket LB (sock_lb_map.h): (socket cookie, backend) -> service address, for recvmsg and
#: getpeername; affinity keyed by network-namespace cookie.
SOCK_REV_NAT_MAP: Final = "tpl_lb4_sock_rev_nat_v1"
SOCK_AFFINITY_MAP: Final = "tpl_lb4_sock_affinity_v1"   # both families (rev-NAT indexes are one space)
SOCK6_REV_NAT_MAP: Final = "tpl_lb6_sock_rev_nat_v1"

# --- identities (endpoint.h) ------------------------------------------------------------------

#: Reserved identity of an address that is neither a local endpoint nor in the ipcache.
TPL_IDENTITY_WORLD: Final = 2

# --- DSR over Geneve (enum tpl_mark, mark.h; enum dsr_opt_id, dsr.h) ---------------------------

#: skb->mark bits cil_from_overlay sets on a DSR packet it lets through to a pod.
TPL_MARK_FROM_TUNNEL: Final = 0x0E5D0000
#: The DSR Geneve option: class, type (critical | 1), body length in 4-byte words per family
#: (IPv4: address, port, pad; IPv6: the 16-byte address, port, pad).
DSR_OPT_CLASS: Final = 0x014B
DSR_OPT_TYPE: Final = 0x81
DSR_OPT4_LEN: Final = 2
DSR_OPT6_LEN: Final = 5

# --- conntrack tuple flags (enum ct_tuple_flag, conntrack_types.h) ----------------------------

TUPLE_F_OUT: Final = 0
TUPLE_F_IN: Final = 1
TUPLE_F_RELATED: Final = 2
TUPLE_F_SERVICE: Final = 4

# --- conntrack sentinel entries (TUPLE_F_SENTINEL, enum ct_sentinel_key) ----------------------
# Keys no packet can produce: the datapath tracks only TCP, UDP and ICMP (pkt4_parse's
# protocol masks) and sets only the flags above. The agent keeps a few of them in a large
# CT table so no run of empty buckets is long (tuplet.conntrack.sentinels).

TUPLE_F_SENTINEL: Final = 0x80
CT_SENTINEL_NEXTHDR: Final = 0
CT_SENTINEL_KEY_SIZES: Final = (14, 38)   # struct ipv4_ct_tuple, struct ipv6_ct_tuple


def ct_sentinel_key(i: int, key_size: int = 14) -> bytes:
    """Sentinel ``i``'s key of a CT table whose keys are ``key_size`` bytes (struct
    ipv4_ct_tuple, 14, or struct ipv6_ct_tuple, 38): daddr 0, saddr ``i`` (the low 4 bytes
    of it, in memory order, for an IPv6 address), ports 0, nexthdr CT_SENTINEL_NEXTHDR,
    flags TUPLE_F_SENTINEL. The one definition of the shape, for both families."""
    if key_size not in CT_SENTINEL_KEY_SIZES:
        raise ValueError(f"no conntrack tuple is {key_size} bytes")
    addr = (key_size - 6) // 2
    return (bytes(addr) + struct.pack("<I", i) + bytes(addr - 4)
            + struct.pack("<HHBB", 0, 0, CT_SENTINEL_NEXTHDR, TUPLE_F_SENTINEL))

# --- services (enum lb_svc_flag, lb_backend_flag, lb_bank in lb_map.h) ------------------------

LB_SVC_F_EXTERNAL: Final = 1
LB_SVC_F_NODEPORT: Final = 2
LB_SVC_F_LOADBALANCER: Final = 4
LB_SVC_F_AFFINITY: Final = 8
LB_BACKEND_F_REMOTE: Final = 1
#: Slot numbers of bank 1 start here.
LB_BANK_STRIDE: Final = 0x8000

# --- verdict counters (enum tpl_reason, reasons.h) --------------------------------------------

#: A counter's key is direction * TPL_REASON_SLOTS + reason.
TPL_REASON_SLOTS: Final = 256

# --- the GC program's arguments (enum gc_map_sel, gc_map_arg in ct_gc.c) ----------------------

GC_MAP_TCP: Final = 0
GC_MAP_ANY: Final = 1
GC_MAP_SYN: Final = 2
#: The NAT tables (GC_MAP_NAT, GC_MAP_NAT6): counted only (with GC_WALK_ONLY); NAT entries go
#: with their CT entry.
GC_MAP_NAT: Final = 3
GC_MAP_TCP6: Final = 4
GC_MAP_ANY6: Final = 5
GC_MAP_SYN6: Final = 6
GC_MAP_NAT6: Final = 7
#: Walk and count only; delete nothing.
GC_WALK_ONLY: Final = 0x80000000
GC_SELECTOR: Final = {CT_MAP_TCP: GC_MAP_TCP, CT_MAP_ANY: GC_MAP_ANY, CT_MAP_SYN: GC_MAP_SYN,
                      CT6_MAP_TCP: GC_MAP_TCP6, CT6_MAP_ANY: GC_MAP_ANY6, CT6_MAP_SYN: GC_MAP_SYN6}
#: The NAT tables' selectors (walk-only: counted, never collected on their own).
GC_NAT_SELECTOR: Final = {NAT_MAP: GC_MAP_NAT, NAT6_MAP: GC_MAP_NAT6}
# The sliced pass (bpf/lib/ct_gc.h): iterator program per CT map, its globals, its
# test-only switches, the deleter's record limit, and the verdict bytes.
GC_ITER_PROGRAM: Final = {CT_MAP_TCP: "tpl_gc_iter_tcp", CT_MAP_ANY: "tpl_gc_iter_any",
                          CT_MAP_SYN: "tpl_gc_iter_syn", CT6_MAP_TCP: "tpl_gc_iter_tcp6",
                          CT6_MAP_ANY: "tpl_gc_iter_any6", CT6_MAP_SYN: "tpl_gc_iter_syn6"}
GC_VAR_NOW: Final = "gc_now"
GC_VAR_WALK_ONLY: Final = "gc_walk_only"
GC_TEST_STALL_NS: Final = "gc_test_stall_ns"
GC_TEST_UNPROTECTED: Final = "gc_test_unprotected"
#: The test stall's handshake (.bss, bpf/lib/ct_gc.h) and its cap (enum gc_test_limit).
GC_TEST_ARMED: Final = "gc_test_armed"
GC_TEST_JUDGED: Final = "gc_test_judged"
GC_TEST_RELEASED: Final = "gc_test_released"
GC_TEST_OUTCOME: Final = "gc_test_outcome"
GC_TEST_STALL_MAX_NS: Final = 8_000_000
GC_STALL_NONE: Final = 0
GC_STALL_RELEASED: Final = 1
GC_STALL_TIMED_OUT: Final = 2
GC_KEYS_MAX: Final = 128
GC_V_ALIVE: Final = 0
GC_V_DELETED: Final = 1
GC_V_DELETED_NAT: Final = 2
GC_V_REFRESHED: Final = 3
GC_V_GONE: Final = 4
GC_V_COUNTED: Final = 5

# enum ct_notify_type / ct_notify_reason / ct_notify_table (bpf/lib/ct_notify.h)
CT_NOTIFY_NEW: Final = 1
CT_NOTIFY_DESTROY: Final = 2
CT_NOTIFY_R_CREATED: Final = 0
CT_NOTIFY_R_PROMOTED: Final = 1
CT_NOTIFY_R_GC: Final = 2
CT_NOTIFY_R_FLUSH: Final = 3
CT_NOTIFY_R_ENDPOINT: Final = 4
CT_NOTIFY_R_DELETE: Final = 5
CT_NOTIFY_T_TCP: Final = 0
CT_NOTIFY_T_ANY: Final = 1
CT_NOTIFY_T_SYN: Final = 2
