/* SPDX-License-Identifier: GPL-2.0 */
/* Service load balancing: service lookup, backend selection (a slot by flow
 * hash, Maglev, client-IP affinity), the CT_SERVICE entry that pins a flow to its
 * backend, DNAT to the backend and reverse NAT of the replies.
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
#include "lb_select.h"
#include "conntrack_types.h"
#include "conntrack.h"
#include "l4_rewrite.h"

enum lb_select {
	LB_SELECT_HASH = 0,     /* a slot by flow hash: ClusterIP from a pod */
	LB_SELECT_MAGLEV = 1,   /* Maglev over the flow hash: the same backend on every node */
};

/* The service p's packet is addressed to, or NULL. Leaves key as slot 0's. */
static __always_inline struct lb4_service *lb4_lookup_service(struct lb4_key *key, const struct pkt4 *p)
{
	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return NULL;
	key->address = p->daddr;
	key->dport = p->dport;
	key->backend_slot = 0;
	key->proto = p->proto;
	key->scope = 0;
	key->pad = 0;
	return bpf_map_lookup_elem(&tpl_lb4_services_v1, key);
}

/* The slot of the service's current bank that the flow's hash picks. The reference
 * picks at random; by hash, a flow whose CT_SERVICE entry was lost (evicted by
 * the LRU, deleted by GC) gets the same backend back on its next packet while
 * the service's backend set is unchanged.
 */
static __always_inline __u32 lb4_select_hash(const struct lb4_key *key, const struct lb4_service *svc,
					     const struct pkt4 *p)
{
	return lb4_select_slot(key, svc, tpl_flow_hash4(p->saddr, p->daddr, p->sport, p->dport, p->proto));
}

/* The backend the service's Maglev table holds for this flow. */
static __always_inline __u32 lb4_select_maglev(const struct lb4_service *svc, const struct pkt4 *p)
{
	struct lb4_maglev_key mk = { .rev_nat_index = svc->rev_nat_index, .bank = svc->bank };
	__u32 m = svc->maglev_size, idx, *id;
	void *table;

	if (!m)
		return 0;
	table = bpf_map_lookup_elem(&tpl_lb4_maglev_v2, &mk);
	if (!table)
		return 0;
	idx = tpl_flow_hash4(p->saddr, p->daddr, p->sport, p->dport, p->proto) % m;
	id = bpf_map_lookup_elem(table, &idx);
	return id ? *id : 0;
}

static __always_inline void lb4_affinity_key(struct lb4_affinity_key *k, const struct lb4_service *svc,
					     __be32 client)
{
	k->client = client;
	k->rev_nat_index = svc->rev_nat_index;
	k->pad = 0;
}

/* The backend this client used within the affinity timeout, or 0. */
static __always_inline __u32 lb4_affinity_backend(const struct lb4_service *svc, __be32 client, __u32 now)
{
	struct lb4_affinity_key k;
	struct lb_affinity_val *v;

	lb4_affinity_key(&k, svc, client);
	v = bpf_map_lookup_elem(&tpl_lb4_affinity_v1, &k);
	if (!v || tpl_time_after(now, READ_ONCE(v->last_used) + svc->affinity_timeout))
		return 0;
	return READ_ONCE(v->backend_id);
}

/* Remember (or refresh, at most once a second) the client's backend. */
static __always_inline void lb4_affinity_update(const struct lb4_service *svc, __be32 client,
						__u32 backend_id, __u32 now)
{
	struct lb_affinity_val val = { .last_used = now, .backend_id = backend_id };
	struct lb4_affinity_key k;
	struct lb_affinity_val *v;

	lb4_affinity_key(&k, svc, client);
	v = bpf_map_lookup_elem(&tpl_lb4_affinity_v1, &k);
	if (v && READ_ONCE(v->backend_id) == backend_id && READ_ONCE(v->last_used) == now)
		return;
	bpf_map_update_elem(&tpl_lb4_affinity_v1, &k, &val, BPF_ANY);
}

static __always_inline __u32 lb4_select_backend(const struct lb4_key *key, const struct lb4_service *svc,
						const struct pkt4 *p, enum lb_select how, __u32 now)
{
	__u32 id;

	if (svc->flags & LB_SVC_F_AFFINITY) {
		id = lb4_affinity_backend(svc, p->saddr, now);
		if (id && lb4_lookup_backend(id))
			return id;
	}
	return how == LB_SELECT_MAGLEV ? lb4_select_maglev(svc, p) : lb4_select_hash(key, svc, p);
}

/* A closed service flow whose SYN comes later than the rebalance grace after
 * the close picks a new backend; within the grace it keeps the old one (the
 * backend may still hold the old connection in TIME_WAIT).
 */
static __always_inline bool lb4_rebalance_due(const struct ct_entry *e, __u32 now)
{
	__u32 closed_at = READ_ONCE(e->lifetime) - ct_close_timeout;

	return ct_entry_closing(e) && !tpl_time_after(closed_at + ct_service_close_rebalance, now);
}

/* Whether a flow may go to backend be (NULL: gone). With local_only (a node
 * without [overlay], so no DSR), a backend on another node may not. Returns
 * TPL_CONTINUE or a drop reason.
 */
static __always_inline int lb4_backend_usable(const struct lb4_backend *be, bool local_only)
{
	if (!be)
		return TPL_DROP_NO_SERVICE_BACKEND;
	if (local_only && (be->flags & LB_BACKEND_F_REMOTE))
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
 * gets the backend.
 */
static __always_inline int lb4_local(struct __sk_buff *skb, struct pkt4 *p, const struct lb4_key *key,
				     const struct lb4_service *svc, enum lb_select how, bool local_only,
				     struct lb4_backend *be, __u32 now)
{
	struct ipv4_ct_tuple t;
	bool is_tcp = p->proto == IPPROTO_TCP;
	__u8 tcp_flags = is_tcp ? p->tcp_flags : 0;
	enum ct_action action = is_tcp ? ct_tcp_action(tcp_flags) : ACTION_UNSPEC;
	__u16 rev_nat = svc->rev_nat_index;
	struct lb4_backend *found = NULL;
	__u32 id = 0;
	struct ct_entry *e;
	bool in_syn, chosen;
	int ret;

	if (!svc->count)
		return TPL_DROP_NO_SERVICE_BACKEND;

	/* The client's tuple to the service address, in its own direction. */
	ct_tuple_reply4(&t, p, TUPLE_F_SERVICE);
	ct_tuple_reverse4(&t);
	e = ct_find4(&t, &in_syn);
	if (e) {
		bool rebalance = action == ACTION_CREATE && lb4_rebalance_due(e, now);

		ct_entry_hit(e, is_tcp, CT_SERVICE, action, tcp_flags, skb->len, CT_ESTABLISHED, now);
		if (!rebalance && READ_ONCE(e->rev_nat_index) == rev_nat) {
			id = READ_ONCE(e->backend_id);
			found = lb4_lookup_backend(id);
		}
	}
	/* A new flow, a reopened one past the grace, or one whose backend is gone. */
	chosen = !found;
	if (chosen) {
		id = lb4_select_backend(key, svc, p, how, now);
		found = lb4_lookup_backend(id);
	}
	ret = lb4_backend_usable(found, local_only);
	if (tpl_has_verdict(ret))
		return ret;
	if (e) {
		if (chosen) {
			WRITE_ONCE(e->backend_id, id);
			WRITE_ONCE(e->rev_nat_index, rev_nat);
		}
		ct_settle4(&t, e, in_syn, now);
	} else {
		struct ct_state st = {};

		st.backend_id = id;
		st.rev_nat_index = rev_nat;
		ret = ct_create4(&t, CT_SERVICE, &st, tcp_flags, skb->len, now);
		if (tpl_has_verdict(ret))
			return ret;
	}
	if (svc->flags & LB_SVC_F_AFFINITY)
		lb4_affinity_update(svc, p->saddr, id, now);
	*be = *found;
	return pkt4_dnat(skb, p, be->address, be->port);
}

/* Rewrite a reply's source back to the service address the client used.
 * Returns TPL_CONTINUE or a drop reason.
 */
static __always_inline int lb4_rev_nat(struct __sk_buff *skb, struct pkt4 *p, __u16 rev_nat_index)
{
	struct lb4_reverse_nat *nat = bpf_map_lookup_elem(&tpl_lb4_reverse_nat_v1, &rev_nat_index);

	if (!nat)
		return TPL_DROP_REV_NAT_MISSING;
	return pkt4_snat(skb, p, nat->address, nat->port);
}

#endif
