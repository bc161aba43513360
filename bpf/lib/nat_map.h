/* SPDX-License-Identifier: GPL-2.0 */
/* The NAT table: reply rewrites that outlive a single packet.
 *
 * Keyed by the tuple of the packet to rewrite, as it is on the wire
 * (saddr/sport = its source, daddr/dport = its destination, flags =
 * TUPLE_F_OUT). The value says what the rewritten address and port are; for
 * DSR that is the service address the client connected to.
 *
 * Every NAT entry belongs to a conntrack entry (a CT_EGRESS entry with
 * DSRInternal or NodePort set); nat_key_for_ct() is the one place that maps
 * the conntrack key to the NAT key, used by the datapath when it creates the
 * entry and by the garbage collector when it deletes the conntrack entry.
 */
#ifndef TUPLET_NAT_MAP_H
#define TUPLET_NAT_MAP_H

#include "compiler.h"
#include "conntrack_types.h"
#include "ipv6.h"
#include "packet.h"

#define NAT_MAP_SIZE 524288

struct nat4_entry {
	__u64 created;           /* seconds of the conntrack clock */
	__u64 needs_ct;
	__u64 reserved[2];
	__be32 to_addr;          /* rewritten address (DSR: service VIP) */
	__be16 to_port;          /* rewritten port (DSR: service port) */
	__u16 pad;
};
ASSERT_SIZE(struct nat4_entry, 40);

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_ct_tuple);
	__type(value, struct nat4_entry);
	__uint(max_entries, NAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_nat4_v1 SEC(".maps");

/* The IPv6 twin (tpl_nat6_v1): the same rule, IPv6 tuples and addresses. */
struct nat6_entry {
	__u64 created;           /* seconds of the conntrack clock */
	__u64 needs_ct;
	__u64 reserved[2];
	union v6addr to_addr;    /* rewritten address (DSR: service VIP) */
	__be16 to_port;          /* rewritten port (DSR: service port) */
	__u16 pad;
	__u32 pad2;
};
ASSERT_SIZE(struct nat6_entry, 56);

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv6_ct_tuple);
	__type(value, struct nat6_entry);
	__uint(max_entries, NAT_MAP_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_nat6_v1 SEC(".maps");

/* The NAT table of family fam's CT tables (PKT_FAM4 / PKT_FAM6, a compile-time
 * constant: everything here is inlined).
 */
static __always_inline void *nat_map(int fam)
{
	return fam == PKT_FAM6 ? (void *)&tpl_nat6_v1 : (void *)&tpl_nat4_v1;
}

/* Does this conntrack entry (key ct, a struct ipv{4,6}_ct_tuple by fam) own a
 * NAT entry?
 */
static __always_inline bool ct_owns_nat(int fam, const void *ct, const struct ct_entry *e)
{
	__u8 flags = fam == PKT_FAM6 ? ((const struct ipv6_ct_tuple *)ct)->flags
				     : ((const struct ipv4_ct_tuple *)ct)->flags;

	return flags == TUPLE_F_OUT && (e->dsr_internal || e->node_port);
}

/* The NAT key of a NAT-owning CT_EGRESS entry: the reply its flow's
 * destination (the backend) sends to its original source (the client), as it
 * is on the wire. The entry stores the original source in daddr/sport and the
 * original destination in saddr/dport (see conntrack_types.h), as the
 * reference's DSR entry reads: "OUT client:port -> backend:port". One body
 * for both tuple types.
 */
#define NAT_KEY_FOR_CT(ct, nat)				\
	do {						\
		(nat)->saddr = (ct)->saddr;		\
		(nat)->sport = (ct)->dport;		\
		(nat)->daddr = (ct)->daddr;		\
		(nat)->dport = (ct)->sport;		\
		(nat)->nexthdr = (ct)->nexthdr;		\
		(nat)->flags = TUPLE_F_OUT;		\
	} while (0)

static __always_inline void nat_key_for_ct(int fam, const void *ct, union ct_tuple_any *nat)
{
	if (fam == PKT_FAM6)
		NAT_KEY_FOR_CT((const struct ipv6_ct_tuple *)ct, &nat->t6);
	else
		NAT_KEY_FOR_CT((const struct ipv4_ct_tuple *)ct, &nat->t4);
}

#endif
