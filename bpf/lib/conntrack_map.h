/* SPDX-License-Identifier: GPL-2.0 */
/* The conntrack tables, IPv4 and IPv6 (the same value, sized alike). Sizes here are placeholders: the loader sets
 * max_entries from configuration before load.
 */
#ifndef TUPLET_CONNTRACK_MAP_H
#define TUPLET_CONNTRACK_MAP_H

#include "compiler.h"
#include "conntrack_types.h"

#define CT_MAP_SIZE_TCP 524288
#define CT_MAP_SIZE_ANY 262144
#define CT_MAP_SIZE_SYN 65536

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAP_SIZE_TCP);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct4_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAP_SIZE_ANY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct_any4_v1 SEC(".maps");

/* TCP entries whose handshake has not completed (ct_syn_table): a flood of
 * new connections churns this table, never the established ones above.
 * Entries move to tpl_ct4_v1 when promoted (conntrack.h, ct_settle4).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAP_SIZE_SYN);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct4_syn_v1 SEC(".maps");

/* IPv6: the same three tables, keyed by struct ipv6_ct_tuple. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv6_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAP_SIZE_TCP);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv6_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAP_SIZE_ANY);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct_any6_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv6_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, CT_MAP_SIZE_SYN);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct6_syn_v1 SEC(".maps");

#endif
