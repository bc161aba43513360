/* SPDX-License-Identifier: GPL-2.0 */
/* Service load balancing: service lookup, backend selection (a slot by flow
 * hash, Maglev, client-IP affinity), the CT_SERVICE entry that pins a flow to its
 * backend, DNAT to the backend and reverse NAT of the replies. One body for
 * IPv4 and IPv6: functions take the family (PKT_FAM4 / PKT_FAM6) as conntrack.h
 * does, with the packet, keys and backends of that family behind void pointers
 * or the unions of lb_select.h.
 */
#ifndef TUPLET_LB_H
#define TUPLET_LB_H

#include "compiler.h"
#include "config.h"
#include "time.h"
#include "reasons.h"
#include "packet.h"
#include "hash.h"
#include "lb_map.h"
#include "lb6_map.h"
#include "lb_select.h"
#include "conntrack_types.h"
#include "conntrack.h"
#include "l4_rewrite.h"
#include "l4_rewrite6.h"

enum lb_select {
	LB_SELECT_HASH = 0,     /* a slot by flow hash: ClusterIP from a pod */
	LB_SELECT_MAGLEV = 1,   /* Maglev over the flow hash: the same backend on every node */
};

/* The service p's packet is addressed to, or NULL. Leaves key (a union
 * lb_key of family fam) as slot 0's.
 */
static __always_inline struct lb4_service *lb_lookup_service(int fam, union lb_key *key, const void *p)
{
	__u8 proto = PKT(p, fam, proto);

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return NULL;
	if (fam == PKT_FAM6) {
		key->k6 = (struct lb6_key){ .address = ((const struct pkt6 *)p)->daddr,
					    .dport = PKT(p, fam, dport), .proto = proto };
	} else {
		key->k4 = (struct lb4_key){ .address = ((const struct pkt4 *)p)->daddr,
					    .dport = PKT(p, fam, dport), .proto = proto };
	}
	return bpf_map_lookup_elem(lb_services_map(fam), key);
}

/* The flow hash of p's packet. An IPv6 address enters it folded to 32 bits
 * (ipv6_addr_fold), so both families hash the same five values and every node
 * computes the same hash for a flow.
 */
static __always_inline __u32 lb_flow_hash(int fam, const void *p)
{
	__be32 s, d;

	if (fam == PKT_FAM6) {
		s = ipv6_addr_fold(&((const struct pkt6 *)p)->saddr);
		d = ipv6_addr_fold(&((const struct pkt6 *)p)->daddr);
	} else {
		s = ((const struct pkt4 *)p)->saddr;
		d = ((const struct pkt4 *)p)->daddr;
	}
	return tpl_flow_hash4(s, d, PKT(p, fam, sport), PKT(p, fam, dport), PKT(p, fam, proto));
}

/* The backend the service's Maglev table holds for this flow. */
static __always_inline __u32 lb_select_maglev(int fam, const struct lb4_service *svc, const void *p)
{
	struct lb4_maglev_key mk = { .rev_nat_index = svc->rev_nat_index, .bank = svc->bank };
	__u32 m = svc->maglev_size, idx, *id;
	void *table;

	if (!m)
		return 0;
	table = bpf_map_lookup_elem(&tpl_lb4_maglev_v2, &mk);
	if (!table)
		return 0;
	idx = lb_flow_hash(fam, p) % m;
	id = bpf_map_lookup_elem(table, &idx);
	return id ? *id : 0;
}

union lb_affinity_key {
	struct lb4_affinity_key a4;
	struct lb6_affinity_key a6;
};

/* The client's affinity entry key (p's source) and its family's map. */
static __always_inline void *lb_affinity_key(int fam, union lb_affinity_key *k, const struct lb4_service *svc,
					     const void *p)
{
	if (fam == PKT_FAM6) {
		k->a6 = (struct lb6_affinity_key){ .client = ((const struct pkt6 *)p)->saddr,
						   .rev_nat_index = svc->rev_nat_index };
		return &tpl_lb6_affinity_v1;
	}
	k->a4 = (struct lb4_affinity_key){ .client = ((const struct pkt4 *)p)->saddr,
					   .rev_nat_index = svc->rev_nat_index };
	return &tpl_lb4_affinity_v1;
}

/* The backend this client used within the affinity timeout, or 0. */
static __always_inline __u32 lb_affinity_backend(int fam, const struct lb4_service *svc, const void *p, __u32 now)
{
	union lb_affinity_key k;
	struct lb_affinity_val *v;
	void *map = lb_affinity_key(fam, &k, svc, p);

	v = bpf_map_lookup_elem(map, &k);
	if (!v || tpl_time_after(now, READ_ONCE(v->last_used) + svc->affinity_timeout))
		return 0;
	return READ_ONCE(v->backend_id);
}

/* Remember (or refresh, at most once a second) the client's backend. */
static __always_inline void lb_affinity_update(int fam, const struct lb4_service *svc, const void *p,
					       __u32 backend_id, __u32 now)
{
	struct lb_affinity_val val = { .last_used = now, .backend_id = backend_id };
	union lb_affinity_key k;
	struct lb_affinity_val *v;
	void *map = lb_affinity_key(fam, &k, svc, p);

	v = bpf_map_lookup_elem(map, &k);
	if (v && READ_ONCE(v->backend_id) == backend_id && READ_ONCE(v->last_used) == now)
		return;
	bpf_map_update_elem(map, &k, &val, BPF_ANY);
}

static __always_inline __u32 lb_select_backend(int fam, const union lb_key *key, const struct lb4_service *svc,
					       const void *p, enum lb_select how, __u32 now)
{
	__u32 id;

	if (svc->flags & LB_SVC_F_AFFINITY) {
		id = lb_affinity_backend(fam, svc, p, now);
		if (id && lb_lookup_backend(fam, id))
			return id;
	}
	return how == LB_SELECT_MAGLEV ? lb_select_maglev(fam, svc, p)
				       : lb_select_slot(fam, key, svc, lb_flow_hash(fam, p));
}

/* A closed service flow whose SYN comes later than the rebalance grace after
 * the close picks a new backend; within the grace it keeps the old one (the
 * backend may still hold the old connection in TIME_WAIT).
 */
static __always_inline bool lb_rebalance_due(const struct ct_entry *e, __u32 now)
{
	__u32 closed_at = READ_ONCE(e->lifetime) - ct_close_timeout;

	return ct_entry_closing(e) && !tpl_time_after(closed_at + ct_service_close_rebalance, now);
}

/* Whether backend be (a struct lb4_backend or lb6_backend by fam) runs on another node. */
static __always_inline bool lb_backend_remote(int fam, const void *be)
{
	__u8 flags = fam == PKT_FAM6 ? ((const struct lb6_backend *)be)->flags : ((const struct lb4_backend *)be)->flags;

	return flags & LB_BACKEND_F_REMOTE;
}

/* Whether a flow may go to backend be (NULL: gone). With local_only (a node
 * without [overlay], so no DSR), a backend on another node may not. Returns
 * TPL_CONTINUE or a drop reason.
 */
static __always_inline int lb_backend_usable(int fam, const void *be, bool local_only)
{
	if (!be)
		return TPL_DROP_NO_SERVICE_BACKEND;
	if (local_only && lb_backend_remote(fam, be))
		return TPL_DROP_REMOTE_BACKEND;
	return TPL_CONTINUE;
}

/* Steer p's packet to a backend of svc: find or create the flow's CT_SERVICE
 * entry (client tuple to the service address, holding backend id and
 * rev-NAT index), choose a backend for a new flow, a reopened flow past the
 * grace, or a flow whose backend is gone, then DNAT. With local_only (a node
 * without [overlay], so no DSR), a backend on another node is refused before
 * any state is made.
 * now is the packet's tpl_now(). Returns TPL_CONTINUE or a drop reason; *be
 * (unless NULL) gets the backend. Either family
 * (fam: p a struct pkt4 or pkt6, key the service's slot 0 key). t is the
 * caller's CT tuple of fam, used here as scratch (the caller's conntrack
 * lookup fills it afterwards): one tuple on the stack, not two, keeps the
 * programs within the 512-byte stack.
 */
static __always_inline int lb_local(int fam, struct __sk_buff *skb, void *p, const union lb_key *key,
				    const struct lb4_service *svc, enum lb_select how, bool local_only,
				    union lb_backend *be, void *t, __u32 now)
{
	bool is_tcp = PKT(p, fam, proto) == IPPROTO_TCP;
	__u8 tcp_flags = is_tcp ? PKT(p, fam, tcp_flags) : 0;
	enum ct_action action = is_tcp ? ct_tcp_action(tcp_flags) : ACTION_UNSPEC;
	__u16 rev_nat = svc->rev_nat_index;
	void *found = NULL;
	__u32 id = 0;
	struct ct_entry *e;
	bool in_syn, chosen;
	int ret;

	if (!svc->count)
		return TPL_DROP_NO_SERVICE_BACKEND;

	/* The client's tuple to the service address, in its own direction. */
	ct_tuple_reply(fam, t, p, TUPLE_F_SERVICE);
	ct_tuple_reverse(fam, t);
	e = ct_find(fam, t, &in_syn);
	if (e) {
		bool rebalance = action == ACTION_CREATE && lb_rebalance_due(e, now);

		ct_entry_hit(e, is_tcp, CT_SERVICE, action, tcp_flags, skb->len, CT_ESTABLISHED, now);
		if (!rebalance && READ_ONCE(e->rev_nat_index) == rev_nat) {
			id = READ_ONCE(e->backend_id);
			found = lb_lookup_backend(fam, id);
		}
	}
	/* A new flow, a reopened one past the grace, or one whose backend is gone. */
	chosen = !found;
	if (chosen) {
		id = lb_select_backend(fam, key, svc, p, how, now);
		found = lb_lookup_backend(fam, id);
	}
	ret = lb_backend_usable(fam, found, local_only);
	if (tpl_has_verdict(ret))
		return ret;
	if (e) {
		if (chosen) {
			WRITE_ONCE(e->backend_id, id);
			WRITE_ONCE(e->rev_nat_index, rev_nat);
		}
		ct_settle(fam, t, e, in_syn, now);
	} else {
		struct ct_state st = {};

		st.backend_id = id;
		st.rev_nat_index = rev_nat;
		ret = ct_create(fam, t, CT_SERVICE, &st, tcp_flags, skb->len, now);
		if (tpl_has_verdict(ret))
			return ret;
	}
	if (svc->flags & LB_SVC_F_AFFINITY)
		lb_affinity_update(fam, svc, p, id, now);
	if (fam == PKT_FAM6) {
		struct lb6_backend *b6 = found;

		if (be)
			be->b6 = *b6;
		return pkt6_dnat(skb, p, &b6->address, b6->port);
	} else {
		struct lb4_backend *b4 = found;

		if (be)
			be->b4 = *b4;
		return pkt4_dnat(skb, p, b4->address, b4->port);
	}
}

/* The reverse-NAT entry (struct lb4_reverse_nat / lb6_reverse_nat by fam) of an index, or NULL. */
static __always_inline void *lb_rev_nat_lookup(int fam, __u16 rev_nat_index)
{
	return fam == PKT_FAM6 ? bpf_map_lookup_elem(&tpl_lb6_reverse_nat_v1, &rev_nat_index)
			       : bpf_map_lookup_elem(&tpl_lb4_reverse_nat_v1, &rev_nat_index);
}

/* Rewrite a reply's source back to the service address the client used.
 * Returns TPL_CONTINUE or a drop reason.
 */
static __always_inline int lb_rev_nat(int fam, struct __sk_buff *skb, void *p, __u16 rev_nat_index)
{
	void *nat = lb_rev_nat_lookup(fam, rev_nat_index);

	if (!nat)
		return TPL_DROP_REV_NAT_MISSING;
	if (fam == PKT_FAM6)
		return pkt6_snat(skb, p, &((struct lb6_reverse_nat *)nat)->address, ((struct lb6_reverse_nat *)nat)->port);
	return pkt4_snat(skb, p, ((struct lb4_reverse_nat *)nat)->address, ((struct lb4_reverse_nat *)nat)->port);
}

#define ICMP_HLEN 8          /* type, code, checksum, 4 more bytes; then the quoted packet (ICMP and ICMPv6) */
#define ICMP_CSUM_OFF 2

/* An ICMP error (port unreachable, fragmentation needed / packet too big, ...)
 * that a backend sent about a packet of a service flow, on its way to the
 * client (p: the error, parsed; ct_lookup found it related). The client's
 * stack matches it to a socket by the packet it quotes, which names the
 * backend: give the error the service address as source, and the quoted
 * packet the service address and port as destination, as the client sent it.
 * Only when the quoted packet's flow is a service flow: its CT_EGRESS entry
 * (one lookup of its tuple, the key ct_lookup gave it) has a reverse-NAT
 * index; anything else passes as it is.
 *
 * Checksums: ICMP's covers the quoted packet, ICMPv6's also the outer
 * addresses (pseudo-header). A quoted IPv4 header's checksum is updated with
 * its address, which leaves the sum over the quote as it was; the quoted
 * TCP/UDP checksum is left alone (the quote may be cut short; no stack checks
 * it). t: the caller's CT tuple, as scratch. Returns TPL_CONTINUE or a drop
 * reason.
 */
static __always_inline int lb_rev_nat_icmp(int fam, struct __sk_buff *skb, void *p, void *t)
{
	__u32 icmp_off = PKT(p, fam, l4_off);
	__u32 csum_off = icmp_off + ICMP_CSUM_OFF;
	__u32 in_off = icmp_off + ICMP_HLEN;    /* the quoted IP header */
	__u32 in_l4;
	void *nat;
	struct ct_entry *e;
	__be16 *ports, old_port;
	bool in_syn;
	__u8 proto;
	int ret;

	if (icmp_off > pkt_l4_max(fam))
		return TPL_CONTINUE;
	/* The quoted packet's CT_EGRESS key: ct_tuple_reply() and ct_tuple_reverse()
	 * of it (addresses swapped, ports as they are).
	 */
	if (fam == PKT_FAM6) {
		struct ipv6hdr *ip6 = pkt_at(skb, in_off, sizeof(*ip6));

		if (!ip6)
			return TPL_CONTINUE;
		proto = ip6->nexthdr;
		in_l4 = in_off + IPV6_HLEN;
		__builtin_memcpy(&((struct ipv6_ct_tuple *)t)->daddr, &ip6->saddr, sizeof(union v6addr));
		__builtin_memcpy(&((struct ipv6_ct_tuple *)t)->saddr, &ip6->daddr, sizeof(union v6addr));
	} else {
		struct iphdr *ip4 = pkt_at(skb, in_off, sizeof(*ip4));
		__u32 hlen;

		if (!ip4)
			return TPL_CONTINUE;
		hlen = ip4->ihl * IPV4_IHL_UNIT;
		if (hlen < sizeof(*ip4))
			return TPL_CONTINUE;
		proto = ip4->protocol;
		in_l4 = in_off + hlen;
		((struct ipv4_ct_tuple *)t)->daddr = ip4->saddr;
		((struct ipv4_ct_tuple *)t)->saddr = ip4->daddr;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return TPL_CONTINUE;
	ports = pkt_at(skb, in_l4, 2 * sizeof(__be16));
	if (!ports)
		return TPL_CONTINUE;
	old_port = ports[1];
	CT_TUPLE_SET(t, fam, sport, ports[0]);
	CT_TUPLE_SET(t, fam, dport, old_port);
	CT_TUPLE_SET(t, fam, nexthdr, proto);
	CT_TUPLE_SET(t, fam, flags, TUPLE_F_OUT);
	e = ct_find(fam, t, &in_syn);
	if (!e || !READ_ONCE(e->rev_nat_index))
		return TPL_CONTINUE;
	nat = lb_rev_nat_lookup(fam, READ_ONCE(e->rev_nat_index));
	if (!nat)
		return TPL_DROP_REV_NAT_MISSING;

	if (fam == PKT_FAM6) {
		struct lb6_reverse_nat *n6 = nat;
		__s64 diff;

		/* The quoted destination: payload to the checksum (no pseudo-header part). */
		diff = bpf_csum_diff(((struct ipv6_ct_tuple *)t)->saddr.p, sizeof(union v6addr), n6->address.p,
				     sizeof(union v6addr), 0);
		if (diff < 0 || bpf_l4_csum_replace(skb, csum_off, 0, diff, 0) < 0 ||
		    bpf_skb_store_bytes(skb, in_off + IPV6_DADDR_OFF, &n6->address, sizeof(n6->address), 0) < 0)
			return TPL_DROP_NAT_REWRITE;
		ret = l4_rewrite_port(skb, in_l4 + L4_DPORT_OFF, csum_off, old_port, n6->port, 0);
		if (tpl_has_verdict(ret))
			return ret;
		return pkt6_snat(skb, p, &n6->address, PKT(p, fam, sport));
	} else {
		struct lb4_reverse_nat *n4 = nat;
		struct pkt4 *p4 = p;

		if (bpf_l3_csum_replace(skb, in_off + IP_CSUM_OFF, ((struct ipv4_ct_tuple *)t)->saddr, n4->address,
					sizeof(n4->address)) < 0 ||
		    bpf_skb_store_bytes(skb, in_off + IP_DADDR_OFF, &n4->address, sizeof(n4->address), 0) < 0)
			return TPL_DROP_NAT_REWRITE;
		ret = l4_rewrite_port(skb, in_l4 + L4_DPORT_OFF, csum_off, old_port, n4->port, 0);
		if (tpl_has_verdict(ret))
			return ret;
		/* The error's source: the IP header checksum only (ICMP has no pseudo-header). */
		if (bpf_l3_csum_replace(skb, p4->l3_off + IP_CSUM_OFF, p4->saddr, n4->address, sizeof(n4->address)) < 0 ||
		    bpf_skb_store_bytes(skb, p4->l3_off + IP_SADDR_OFF, &n4->address, sizeof(n4->address), 0) < 0)
			return TPL_DROP_NAT_REWRITE;
		p4->saddr = n4->address;
		return TPL_CONTINUE;
	}
}

#endif
