/* SPDX-License-Identifier: GPL-2.0 */
/* Service tables: services with their backend slots, backends, reverse NAT,
 * per-service Maglev lookup tables and client-IP affinity. Programmed by the
 * agent (tuplet/lb.py); the layouts are shared with it through BTF.
 *
 * A service is a set of keys in tpl_lb4_services_v1 with the same (address,
 * port, proto): slot 0 is the service itself, slots 1..count of its current
 * bank name the backends. The agent writes a new backend set into the other
 * bank, swaps the Maglev table, then rewrites slot 0 in one update, so a
 * packet sees either the old service or the new one, never a mix.
 */
#ifndef TUPLET_LB_MAP_H
#define TUPLET_LB_MAP_H

#include "compiler.h"

#define LB_SERVICE_MAP_SIZE 65536
#define LB_BACKEND_MAP_SIZE 65536
#define LB_AFFINITY_MAP_SIZE 65536
/* Slot numbers of bank 1 start here (bank 0: 1..count, bank 1: 0x8001..).
 * An enum so that the agent can check its copy against the object's BTF.
 */
enum lb_bank {
	LB_BANK_STRIDE = 0x8000,
};

/* Service flags (slot 0). */
enum lb_svc_flag {
	LB_SVC_F_EXTERNAL = 1 << 0,     /* reachable from the node's NIC (NodePort, LoadBalancer) */
	LB_SVC_F_NODEPORT = 1 << 1,
	LB_SVC_F_LOADBALANCER = 1 << 2,
	LB_SVC_F_AFFINITY = 1 << 3,     /* client-IP session affinity, timeout in slot 0 */
};

/* Backend flags. */
enum lb_backend_flag {
	LB_BACKEND_F_REMOTE = 1 << 0,   /* the backend runs on another node (node_addr) */
};

struct lb4_key {
	__be32 address;          /* service address: ClusterIP, LB VIP, or node address (NodePort) */
	__be16 dport;            /* service port */
	__u16 backend_slot;      /* 0: the service; else a backend slot of bank 0 or 1 */
	__u8 proto;              /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 scope;              /* reserved, 0 */
	__u16 pad;
};
ASSERT_SIZE(struct lb4_key, 12);

struct lb4_service {
	__u32 backend_id;        /* slot > 0: the backend in this slot */
	__u32 affinity_timeout;  /* slot 0: seconds a client keeps its backend (LB_SVC_F_AFFINITY) */
	__u32 maglev_size;       /* slot 0: M, entries of this service's Maglev table */
	__u16 count;             /* slot 0: backend slots in the current bank */
	__u16 rev_nat_index;     /* slot 0: key of tpl_lb4_reverse_nat_v1 and of the Maglev tables */
	__u8 flags;              /* slot 0: enum lb_svc_flag */
	__u8 bank;               /* slot 0: 0 or 1, which slots hold the backends */
	__u16 pad;
};
ASSERT_SIZE(struct lb4_service, 20);

struct lb4_backend {
	__be32 address;
	__be16 port;
	__u8 proto;
	__u8 flags;              /* enum lb_backend_flag */
	__be32 node_addr;        /* the node the backend runs on (remote backends) */
};
ASSERT_SIZE(struct lb4_backend, 12);

struct lb4_reverse_nat {
	__be32 address;          /* what replies are rewritten to come from */
	__be16 port;
	__u16 pad;
};
ASSERT_SIZE(struct lb4_reverse_nat, 8);

struct lb4_affinity_key {
	__be32 client;
	__u16 rev_nat_index;
	__u16 pad;
};
ASSERT_SIZE(struct lb4_affinity_key, 8);

struct lb_affinity_val {
	__u32 last_used;         /* conntrack clock, seconds */
	__u32 backend_id;
};
ASSERT_SIZE(struct lb_affinity_val, 8);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb4_key);
	__type(value, struct lb4_service);
	__uint(max_entries, LB_SERVICE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb4_services_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct lb4_backend);
	__uint(max_entries, LB_BACKEND_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb4_backends_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16);
	__type(value, struct lb4_reverse_nat);
	__uint(max_entries, LB_SERVICE_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb4_reverse_nat_v1 SEC(".maps");

/* Maglev tables, one per service and bank: an array of maglev_size backend
 * ids. BPF_F_INNER_MAP lets every table have its own size. The agent writes
 * the new table under the bank slot 0 does not use yet, so the table (and its
 * size) changes together with slot 0. IPv6 services (lb6_map.h) have
 * theirs here too: reverse-NAT indexes are one space for both families.
 */
struct lb4_maglev_key {
	__u16 rev_nat_index;
	__u8 bank;
	__u8 pad;
};
ASSERT_SIZE(struct lb4_maglev_key, 4);

struct lb4_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, struct lb4_maglev_key);
	__uint(max_entries, LB_SERVICE_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct lb4_maglev_inner);
} tpl_lb4_maglev_v2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_affinity_key);
	__type(value, struct lb_affinity_val);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb4_affinity_v1 SEC(".maps");

/* Whether this node has services reachable from its NIC (LB_SVC_F_EXTERNAL:
 * NodePort, LoadBalancer): entry 0 is nonzero once the agent wrote one (before
 * the service's commit) and stays so. While it is zero and the node has no
 * overlay (DSR), no packet the node sends can be a NodePort or DSR reply, and
 * cil_to_netdev passes it without probing the conntrack tables: an array
 * lookup the verifier inlines instead of two hash lookups per packet.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb4_external_v1 SEC(".maps");

static __always_inline bool lb4_has_external(void)
{
	__u32 zero = 0;
	__u32 *v = bpf_map_lookup_elem(&tpl_lb4_external_v1, &zero);

	return v && READ_ONCE(*v);
}

/* Anchor the enums in BTF so the agent reads their names and values. */
const volatile enum lb_svc_flag lb_svc_flag_names __attribute__((unused)) = 0;
const volatile enum lb_backend_flag lb_backend_flag_names __attribute__((unused)) = 0;
const volatile enum lb_bank lb_bank_names __attribute__((unused)) = 0;

#endif
