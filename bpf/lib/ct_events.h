/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU counters of what the conntrack tables went through: entries inserted
 * per table, promotions out of the handshake table, refused inserts. LRU
 * evictions happen inside the kernel and are invisible here; the agent derives
 * them from these counters, its GC passes and the tables' fill
 * (tuplet/pressure.py).
 */
#ifndef TUPLET_CT_EVENTS_H
#define TUPLET_CT_EVENTS_H

#include "compiler.h"

enum ct_event {
	CT_EV_INSERT_TCP = 0,      /* new entry in tpl_ct4_v1 (created there, or promoted) */
	CT_EV_INSERT_SYN = 1,      /* new entry in tpl_ct4_syn_v1 */
	CT_EV_INSERT_ANY = 2,      /* new entry in tpl_ct_any4_v1 (related twins included) */
	CT_EV_PROMOTED = 3,        /* moved from the handshake table to tpl_ct4_v1 */
	CT_EV_PROMOTE_FAILED = 4,  /* established, but the insert into tpl_ct4_v1 failed */
	CT_EV_INSERT_FAILED = 5,   /* a new flow's insert refused (DROP_CT_INSERT_FAILED) */
	/* The same events of the IPv6 tables (tpl_ct6_v1, tpl_ct6_syn_v1,
	 * tpl_ct_any6_v1): each its IPv4 twin's value + 8.
	 */
	CT_EV_INSERT_TCP6 = 8,
	CT_EV_INSERT_SYN6 = 9,
	CT_EV_INSERT_ANY6 = 10,
	CT_EV_PROMOTED6 = 11,
	CT_EV_PROMOTE_FAILED6 = 12,
	CT_EV_INSERT_FAILED6 = 13,
	CT_EV_MAX = 16,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, CT_EV_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct_events_v2 SEC(".maps");

/* Anchors the enum in the object's BTF so the agent can read its names. */
const volatile enum ct_event tpl_ct_event_names __attribute__((unused)) = 0;

static __always_inline void ct_event(enum ct_event ev)
{
	__u32 idx = ev;
	__u64 *n = bpf_map_lookup_elem(&tpl_ct_events_v2, &idx);

	if (n)
		*n += 1;
}

#endif
