/* SPDX-License-Identifier: GPL-2.0 */
/* IPv6 service tables, the twins of lb_map.h's IPv4 ones, written by the same
 * agent code path (tuplet.lb.families describes both).
 *
 * A service is one family: its address and its backends are all IPv6 here
 * (a backend's node may be IPv4, stored IPv4-mapped: lb6_backend). What is not an address is shared with IPv4:
 *  - the service value is struct lb4_service (no field of it is an address);
 *  - reverse-NAT indexes are one space for both families, so the one Maglev
 *    outer map (tpl_lb4_maglev_v2, keyed by rev-NAT index and bank) holds the
 *    tables of IPv6 services too, a CT entry's rev_nat_index names one service
 *    whatever its family, and affinity values are struct lb_affinity_val;
 *  - backend ids are one space too: an id names a backend of one family, in
 *    that family's backend map.
 */
#ifndef TUPLET_LB6_MAP_H
#define TUPLET_LB6_MAP_H

#include "compiler.h"
#include "ipv6.h"
#include "lb_map.h"

struct lb6_key {
	union v6addr address;    /* service address: ClusterIP, LB VIP, or node address (NodePort) */
	__be16 dport;            /* service port */
	__u16 backend_slot;      /* 0: the service; else a backend slot of bank 0 or 1 */
	__u8 proto;              /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 scope;              /* reserved, 0 */
	__u16 pad;
};
ASSERT_SIZE(struct lb6_key, 24);

/* node_addr is 16 bytes: the node of a remote IPv6 backend, reached over an
 * IPv6 underlay, or over an IPv4 one when it is stored IPv4-mapped
 * (::ffff:a.b.c.d; dsr.h). The backend's own address is IPv6.
 */
struct lb6_backend {
	union v6addr address;
	__be16 port;
	__u8 proto;
	__u8 flags;              /* enum lb_backend_flag */
	union v6addr node_addr;  /* the node the backend runs on (remote backends) */
};
ASSERT_SIZE(struct lb6_backend, 36);

struct lb6_reverse_nat {
	union v6addr address;    /* what replies are rewritten to come from */
	__be16 port;
	__u16 pad;
};
ASSERT_SIZE(struct lb6_reverse_nat, 20);

struct lb6_affinity_key {
	union v6addr client;
	__u16 rev_nat_index;
	__u16 pad;
};
ASSERT_SIZE(struct lb6_affinity_key, 20);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb6_key);
	__type(value, struct lb4_service);
	__uint(max_entries, LB_SERVICE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb6_services_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb6_backend);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb6_backends_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb6_reverse_nat);
	__uint(max_entries, LB_SERVICE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb6_reverse_nat_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb6_affinity_key);
	__type(value, struct lb_affinity_val);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb6_affinity_v1 SEC(".maps");

#endif
