/* SPDX-License-Identifier: GPL-2.0 */
/* Socket LB state (bpf_sock.c): the reverse translation of each socket that
 * socket LB pointed at a backend, and per-network-namespace session affinity.
 */
#ifndef TUPLET_SOCK_LB_MAP_H
#define TUPLET_SOCK_LB_MAP_H

#include "compiler.h"
#include "lb_map.h"
#include "ipv6.h"

#define SOCK_REV_NAT_MAP_SIZE 65536

/* (socket, backend it was sent to) -> the service address the application used. */
struct lb4_sock_rev_key {
	__u64 cookie;            /* socket cookie */
	__be32 address;          /* backend address */
	__be16 port;             /* backend port */
	__u16 pad;
};
ASSERT_SIZE(struct lb4_sock_rev_key, 16);

struct lb4_sock_rev_val {
	__be32 address;          /* service address */
	__be16 port;             /* service port */
	__u16 rev_nat_index;     /* the service's, to check it still exists */
};
ASSERT_SIZE(struct lb4_sock_rev_val, 8);

/* The same for IPv6 services (tpl_lb6_sock_rev_nat_v1). */
struct lb6_sock_rev_key {
	__u64 cookie;            /* socket cookie */
	union v6addr address;    /* backend address */
	__be16 port;             /* backend port */
	__u16 pad;
	__u32 pad2;
};
ASSERT_SIZE(struct lb6_sock_rev_key, 32);

struct lb6_sock_rev_val {
	union v6addr address;    /* service address */
	__be16 port;             /* service port */
	__u16 rev_nat_index;     /* the service's, to check it still exists */
};
ASSERT_SIZE(struct lb6_sock_rev_val, 20);

/* Affinity of a network namespace (all its sockets) to a backend, as the
 * reference keys it for socket LB; the per-packet path keys by client address.
 */
struct lb4_sock_affinity_key {
	__u64 netns_cookie;
	__u16 rev_nat_index;
	__u16 pad;
	__u32 pad2;
};
ASSERT_SIZE(struct lb4_sock_affinity_key, 16);

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_sock_rev_key);
	__type(value, struct lb4_sock_rev_val);
	__uint(max_entries, SOCK_REV_NAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb4_sock_rev_nat_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb6_sock_rev_key);
	__type(value, struct lb6_sock_rev_val);
	__uint(max_entries, SOCK_REV_NAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb6_sock_rev_nat_v1 SEC(".maps");

/* Affinity is keyed by namespace and rev-NAT index, which is one space for both
 * families: this map serves IPv6 services too.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb4_sock_affinity_key);
	__type(value, struct lb_affinity_val);
	__uint(max_entries, LB_AFFINITY_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_lb4_sock_affinity_v1 SEC(".maps");

#endif
