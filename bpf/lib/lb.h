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
 * (the xor of its words), so both families hash the same five values and
 * every node computes the same hash for a flow.
 */
static __always_inline __u32 lb_flow_hash(int fam, const void *p)
{
	__be32 s, d;

	if (fam == PKT_FAM6) {
		const struct pkt6 *p6 = p;

		s = p6->saddr.p[0] ^ p6->saddr.p[1] ^ p6->saddr.p[2] ^ p6->saddr.p[3];
		d = p6->daddr.p[0] ^ p6->daddr.p[1] ^ p6->daddr.p[2] ^ p6->daddr.p[3];
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

/* Rewrite a reply's source back to the service address the client used.
 * Returns TPL_CONTINUE or a drop reason.
 */
static __always_inline int lb_rev_nat(int fam, struct __sk_buff *skb, void *p, __u16 rev_nat_index)
{
	if (fam == PKT_FAM6) {
		struct lb6_reverse_nat *nat = bpf_map_lookup_elem(&tpl_lb6_reverse_nat_v1, &rev_nat_index);

		if (!nat)
			return TPL_DROP_REV_NAT_MISSING;
		return pkt6_snat(skb, p, &nat->address, nat->port);
	} else {
		struct lb4_reverse_nat *nat = bpf_map_lookup_elem(&tpl_lb4_reverse_nat_v1, &rev_nat_index);

		if (!nat)
			return TPL_DROP_REV_NAT_MISSING;
		return pkt4_snat(skb, p, nat->address, nat->port);
	}
}

#endif
