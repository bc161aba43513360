/* SPDX-License-Identifier: GPL-2.0 */
/* Connection tracking: lookup in both directions, TCP state from flags,
 * per-state lifetimes, entry creation with its related-ICMP twin.
 *
 * Directions are the endpoint's: CT_EGRESS for packets a pod sends,
 * CT_INGRESS for packets it receives. tx_* fields record what the tracked
 * endpoint sent, rx_* what it received.
 */
#ifndef TUPLET_CONNTRACK_H
#define TUPLET_CONNTRACK_H

#include "compiler.h"
#include "config.h"
#include "time.h"
#include "reasons.h"
#include "packet.h"
#include "conntrack_types.h"
#include "conntrack_map.h"
#include "ct_events.h"
#include "ct_notify.h"
#include "signal.h"

enum ct_dir {
	CT_EGRESS = 0,
	CT_INGRESS = 1,
	CT_SERVICE = 2,
};

enum ct_status {
	CT_NEW = 0,
	CT_ESTABLISHED = 1,
	CT_REPLY = 2,
	CT_RELATED = 3,
	CT_REOPENED = 4,
};

enum ct_action {
	ACTION_UNSPEC = 0,
	ACTION_CREATE = 1,
	ACTION_CLOSE = 2,
};

/* What a lookup found, and what a new entry should carry. */
struct ct_state {
	__u64 backend_id;
	__u32 src_sec_id;
	__u16 rev_nat_index;
	__u16 ifindex;
	__u8 from_tunnel;
	__u8 dsr_internal;
	__u8 node_port;
	__u8 closing;
};

/* Family-generic: the functions below taking a family (PKT_FAM4 / PKT_FAM6, a
 * compile-time constant: all are inlined) work on a struct ipv4_ct_tuple or
 * ipv6_ct_tuple given as void *, in that family's tables; the ...4 / ...6
 * wrappers give them types.
 */

/* The main table of a protocol: TCP in tpl_ct{4,6}_v1, the rest in tpl_ct_any{4,6}_v1. */
static __always_inline void *ct_map(int fam, __u8 nexthdr)
{
	if (fam == PKT_FAM6)
		return nexthdr == IPPROTO_TCP ? (void *)&tpl_ct6_v1 : (void *)&tpl_ct_any6_v1;
	return nexthdr == IPPROTO_TCP ? (void *)&tpl_ct4_v1 : (void *)&tpl_ct_any4_v1;
}

/* The handshake table. */
static __always_inline void *ct_syn_map(int fam)
{
	return fam == PKT_FAM6 ? (void *)&tpl_ct6_syn_v1 : (void *)&tpl_ct4_syn_v1;
}

/* Field f of tuple t (a struct ipv4_ct_tuple or ipv6_ct_tuple by fam). The
 * tuples are packed: read and written by value, never through the address of
 * a field.
 */
#define CT_TUPLE_GET(t, fam, f) \
	((fam) == PKT_FAM6 ? ((const struct ipv6_ct_tuple *)(t))->f : ((const struct ipv4_ct_tuple *)(t))->f)
#define CT_TUPLE_SET(t, fam, f, v)						\
	do {									\
		if ((fam) == PKT_FAM6)						\
			((struct ipv6_ct_tuple *)(t))->f = (v);			\
		else								\
			((struct ipv4_ct_tuple *)(t))->f = (v);			\
	} while (0)

/* An event of this family's tables (CT_EV_*6 are their IPv4 twins + 8). */
static __always_inline void ct_event_fam(int fam, enum ct_event ev4)
{
	ct_event(fam == PKT_FAM6 ? ev4 + (CT_EV_INSERT_TCP6 - CT_EV_INSERT_TCP) : ev4);
}

/* A table of this family filled up: ask the agent to collect early. */
static __always_inline void ct_signal_fill_up(int fam, bool is_tcp)
{
	if (fam == PKT_FAM6)
		tpl_signal(TPL_SIGNAL_CT_FILL_UP, is_tcp ? TPL_SIGNAL_MAP_TCP6 : TPL_SIGNAL_MAP_ANY6);
	else
		tpl_signal(TPL_SIGNAL_CT_FILL_UP, is_tcp ? TPL_SIGNAL_MAP_TCP : TPL_SIGNAL_MAP_ANY);
}

/* A NEW record for `ct events`. The ring's records carry IPv4 tuples only
 * (struct ct_notify_rec): IPv6 entries are not reported there.
 */
static __always_inline void ct_notify_new_fam(int fam, const void *t, const struct ct_entry *e, __u32 reason,
					      __u32 table)
{
	if (fam == PKT_FAM4)
		ct_notify_new(t, e, reason, table);
}

/* New entries of this protocol start in the handshake table. */
static __always_inline bool ct_use_syn_table(__u8 nexthdr)
{
	return ct_syn_table && nexthdr == IPPROTO_TCP;
}

static __always_inline enum ct_action ct_tcp_action(__u8 flags)
{
	if (flags & (TCP_FLAG_RST | TCP_FLAG_FIN))
		return ACTION_CLOSE;
	if ((flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN)
		return ACTION_CREATE;
	return ACTION_UNSPEC;
}

static __always_inline bool ct_entry_alive(const struct ct_entry *e)
{
	return !e->rx_closing || !e->tx_closing;
}

static __always_inline bool ct_entry_closing(const struct ct_entry *e)
{
	return e->rx_closing || e->tx_closing;
}

/* Both SYNs seen. The reference compares a u8 with a 16-bit big-endian
 * constant here and is never true; these are u8 flag bytes, compare as such.
 */
static __always_inline bool ct_entry_seen_both_syns(const struct ct_entry *e)
{
	return (e->rx_flags_seen & TCP_FLAG_SYN) && (e->tx_flags_seen & TCP_FLAG_SYN);
}

static __always_inline __u8 ct_report_mask(void)
{
	return ct_report_flags | TCP_FLAG_SYN;
}

/* lifetime = now + timeout; accumulate the report flags of this direction
 * and refresh its last report when a new flag appears or the interval passed.
 * A field is stored only when its value changes (the clock moves once a
 * second): an established flow's packets then only read the entry, and its
 * cache line is not written back and forth between CPUs.
 */
static __always_inline void __ct_update_timeout(struct ct_entry *e, __u32 timeout,
						enum ct_dir dir, __u8 flags, __u32 now)
{
	__u8 seen = flags & ct_report_mask();
	__u8 acc;
	__u32 last;

	if (READ_ONCE(e->lifetime) != now + timeout)
		WRITE_ONCE(e->lifetime, now + timeout);
	if (dir == CT_INGRESS) {
		acc = READ_ONCE(e->rx_flags_seen);
		last = READ_ONCE(e->last_rx_report);
	} else {
		acc = READ_ONCE(e->tx_flags_seen);
		last = READ_ONCE(e->last_tx_report);
	}
	seen |= acc;
	if (tpl_time_after(now, last + ct_report_interval) || acc != seen) {
		if (dir == CT_INGRESS) {
			WRITE_ONCE(e->rx_flags_seen, seen);
			WRITE_ONCE(e->last_rx_report, now);
		} else {
			WRITE_ONCE(e->tx_flags_seen, seen);
			WRITE_ONCE(e->last_tx_report, now);
		}
	}
}

static __always_inline __u32 ct_lifetime(const struct ct_entry *e, bool is_tcp, enum ct_dir dir)
{
	if (!is_tcp)
		return dir == CT_SERVICE ? ct_service_lifetime_nontcp : ct_lifetime_nontcp;
	if (!e->seen_non_syn)
		return ct_syn_timeout;
	return dir == CT_SERVICE ? ct_service_lifetime_tcp : ct_lifetime_tcp;
}

static __always_inline void ct_update_timeout(struct ct_entry *e, bool is_tcp, enum ct_dir dir,
					      __u8 flags, __u32 now)
{
	if (is_tcp && !(flags & TCP_FLAG_SYN) && !e->seen_non_syn)
		e->seen_non_syn = 1;
	__ct_update_timeout(e, ct_lifetime(e, is_tcp, dir), dir, flags, now);
}

/* Per-entry packets and bytes (ct_accounting), never on service entries: a
 * service flow's packets are counted on its endpoint entries already.
 */
static __always_inline void ct_account(struct ct_entry *e, enum ct_dir dir, __u32 len)
{
	if (!ct_accounting || dir == CT_SERVICE)
		return;
	__sync_fetch_and_add(&e->packets, 1);
	__sync_fetch_and_add(&e->bytes, len);
}

/* A flow's identity: what an entry says about whose flow it is and where it
 * goes, as opposed to its state (lifetime, flags, counters). The one list of
 * those fields, copied between struct ct_state and struct ct_entry (which
 * name them alike) in either direction, or from entry to entry: a macro
 * because the two are different types, and ct_entry's flags are bitfields.
 */
#define ct_identity_copy(dst, src)				\
	do {							\
		(dst)->backend_id = (src)->backend_id;		\
		(dst)->src_sec_id = (src)->src_sec_id;		\
		(dst)->rev_nat_index = (src)->rev_nat_index;	\
		(dst)->ifindex = (src)->ifindex;		\
		(dst)->from_tunnel = (src)->from_tunnel;	\
		(dst)->dsr_internal = (src)->dsr_internal;	\
		(dst)->node_port = (src)->node_port;		\
	} while (0)

/* Whether map entry e (other CPUs may write it) has entry id's identity. */
static __always_inline bool ct_identity_same(const struct ct_entry *e, const struct ct_entry *id)
{
	return READ_ONCE(e->rev_nat_index) == id->rev_nat_index &&
	       READ_ONCE(e->src_sec_id) == id->src_sec_id &&
	       READ_ONCE(e->backend_id) == id->backend_id &&
	       READ_ONCE(e->ifindex) == id->ifindex &&
	       e->from_tunnel == id->from_tunnel && e->dsr_internal == id->dsr_internal &&
	       e->node_port == id->node_port;
}

static __always_inline void ct_state_fill(struct ct_state *st, const struct ct_entry *e)
{
	ct_identity_copy(st, e);
	st->closing = ct_entry_closing(e);
}

/* A packet hit entry e at time now (tpl_now(), read once per packet). Returns
 * the status to report (status, or CT_REOPENED).
 */
static __always_inline int ct_entry_hit(struct ct_entry *e, bool is_tcp, enum ct_dir dir,
					enum ct_action action, __u8 flags, __u32 len, int status,
					__u32 now)
{
	if (action == ACTION_CREATE && ct_entry_closing(e)) {
		/* A SYN on a closing connection starts a new one on the same tuple:
		 * forget the old connection's state, counters and flags.
		 */
		e->rx_closing = 0;
		e->tx_closing = 0;
		e->seen_non_syn = 0;
		WRITE_ONCE(e->rx_flags_seen, 0);
		WRITE_ONCE(e->tx_flags_seen, 0);
		if (ct_accounting) {
			WRITE_ONCE(e->packets, 0);
			WRITE_ONCE(e->bytes, 0);
		}
		ct_update_timeout(e, is_tcp, dir, flags, now);
		ct_account(e, dir, len);
		return CT_REOPENED;
	}

	if (ct_entry_alive(e))
		ct_update_timeout(e, is_tcp, dir, flags, now);
	ct_account(e, dir, len);

	if (action == ACTION_CLOSE) {
		if (dir == CT_SERVICE) {
			/* A service entry sees one direction only. */
			e->rx_closing = 1;
			e->tx_closing = 1;
		} else if ((flags & TCP_FLAG_RST) && !ct_entry_seen_both_syns(e)) {
			/* RST before the handshake completed: the connection is gone. */
			e->rx_closing = 1;
			e->tx_closing = 1;
		} else if (dir == CT_INGRESS) {
			e->rx_closing = 1;
		} else {
			e->tx_closing = 1;
		}
		if (!ct_entry_alive(e))
			__ct_update_timeout(e, ct_close_timeout, dir, flags, now);
	}
	return status;
}

/* The related-ICMP entry of an endpoint flow: one per address pair, so every
 * new connection between the same two addresses refreshes it. entry is the
 * flow's entry (a copy, modified here).
 */
static __always_inline void ct_create_related(int fam, const void *tuple, struct ct_entry *entry, __u32 now)
{
	struct ipv4_ct_tuple icmp4 = {};
	struct ipv6_ct_tuple icmp6 = {};
	void *icmp = fam == PKT_FAM6 ? (void *)&icmp6 : (void *)&icmp4;
	void *map = ct_map(fam, pkt_icmp_proto(fam));
	struct ct_entry *rel;

	if (fam == PKT_FAM6) {
		icmp6.daddr = ((const struct ipv6_ct_tuple *)tuple)->daddr;
		icmp6.saddr = ((const struct ipv6_ct_tuple *)tuple)->saddr;
	} else {
		icmp4.daddr = ((const struct ipv4_ct_tuple *)tuple)->daddr;
		icmp4.saddr = ((const struct ipv4_ct_tuple *)tuple)->saddr;
	}
	CT_TUPLE_SET(icmp, fam, nexthdr, pkt_icmp_proto(fam));
	CT_TUPLE_SET(icmp, fam, flags, CT_TUPLE_GET(tuple, fam, flags) | TUPLE_F_RELATED);

	entry->packets = 0;
	entry->bytes = 0;
	entry->lifetime = now + ct_lifetime_nontcp;
	/* When it already says what the new one would, refresh its lifetime in
	 * place instead of replacing it (a lookup instead of an LRU insert: the
	 * reconnect-storm path).
	 */
	rel = bpf_map_lookup_elem(map, icmp);
	if (rel && ct_identity_same(rel, entry)) {
		if (READ_ONCE(rel->lifetime) != entry->lifetime)
			WRITE_ONCE(rel->lifetime, entry->lifetime);
		return;
	}
	/* Best effort: the main entry is in, the flow works without it. */
	if (bpf_map_update_elem(map, icmp, entry, BPF_ANY) == 0 && !rel) {
		ct_event_fam(fam, CT_EV_INSERT_ANY);
		ct_notify_new_fam(fam, icmp, entry, CT_NOTIFY_R_CREATED, CT_NOTIFY_T_ANY);
	}
}

/* Whether an entry of the handshake table belongs with the established ones:
 * not closing, a packet without SYN seen after the first packet, and (but for
 * service entries, which see the client's direction only) packets seen both
 * ways. A spoofed SYN flood never gets there; a real handshake does on its
 * third packet; a connection picked up mid-stream on its first reply.
 */
static __always_inline bool ct_established(__u8 tuple_flags, const struct ct_entry *e)
{
	if (ct_entry_closing(e) || !e->seen_non_syn)
		return false;
	if (tuple_flags & TUPLE_F_SERVICE)
		return true;
	return READ_ONCE(e->last_tx_report) && READ_ONCE(e->last_rx_report);
}

/* After a hit on entry e of key t: promote it from the handshake table into
 * the main TCP table once established, with its related twin (which waits
 * until then, so a flood from random sources does not churn the non-TCP table
 * either). A failed insert leaves it where it is, to be retried on the next
 * packet.
 */
static __always_inline void ct_settle(int fam, const void *t, struct ct_entry *e, bool in_syn, __u32 now)
{
	__u8 tflags = CT_TUPLE_GET(t, fam, flags);
	struct ct_entry copy, twin = {};
	__u8 f;

	if (!in_syn || !ct_established(tflags, e))
		return;
	__builtin_memcpy(&copy, e, sizeof(copy));
	if (bpf_map_update_elem(ct_map(fam, IPPROTO_TCP), t, &copy, BPF_ANY) < 0) {
		ct_event_fam(fam, CT_EV_PROMOTE_FAILED);
		ct_signal_fill_up(fam, true);
		return;
	}
	bpf_map_delete_elem(ct_syn_map(fam), t);
	ct_event_fam(fam, CT_EV_PROMOTED);
	ct_event_fam(fam, CT_EV_INSERT_TCP);
	ct_notify_new_fam(fam, t, &copy, CT_NOTIFY_R_PROMOTED, CT_NOTIFY_T_TCP);
	if ((tflags & TUPLE_F_SERVICE) || copy.node_port || copy.dsr_internal)
		return;
	/* The twin reads as if made with the entry: its identity, and the
	 * opening packet's flags in the entry's own direction.
	 */
	ct_identity_copy(&twin, &copy);
	if (tflags & TUPLE_F_IN) {
		f = copy.rx_flags_seen;
		twin.rx_flags_seen = (f & TCP_FLAG_SYN) ? TCP_FLAG_SYN : f;
		twin.last_rx_report = now;
	} else {
		f = copy.tx_flags_seen;
		twin.tx_flags_seen = (f & TCP_FLAG_SYN) ? TCP_FLAG_SYN : f;
		twin.last_tx_report = now;
	}
	ct_create_related(fam, t, &twin, now);
}

static __always_inline void ct_settle4(const struct ipv4_ct_tuple *t, struct ct_entry *e, bool in_syn,
				       __u32 now)
{
	ct_settle(PKT_FAM4, t, e, in_syn, now);
}

/* The entry of tuple t: the main table, then (TCP) the handshake table. */
static __always_inline struct ct_entry *ct_find(int fam, const void *t, bool *in_syn)
{
	__u8 nexthdr = CT_TUPLE_GET(t, fam, nexthdr);
	struct ct_entry *e = bpf_map_lookup_elem(ct_map(fam, nexthdr), t);

	*in_syn = false;
	if (e || !ct_use_syn_table(nexthdr))
		return e;
	e = bpf_map_lookup_elem(ct_syn_map(fam), t);
	*in_syn = e != NULL;
	return e;
}

static __always_inline struct ct_entry *ct_find4(const struct ipv4_ct_tuple *t, bool *in_syn)
{
	return ct_find(PKT_FAM4, t, in_syn);
}

/* Swap the addresses and the ports of tuple t. */
static __always_inline void ct_tuple_reverse(int fam, void *t)
{
	__be16 p = CT_TUPLE_GET(t, fam, dport);

	if (fam == PKT_FAM6) {
		struct ipv6_ct_tuple *t6 = t;
		union v6addr a = t6->daddr;

		t6->daddr = t6->saddr;
		t6->saddr = a;
	} else {
		struct ipv4_ct_tuple *t4 = t;
		__be32 a = t4->daddr;

		t4->daddr = t4->saddr;
		t4->saddr = a;
	}
	CT_TUPLE_SET(t, fam, dport, CT_TUPLE_GET(t, fam, sport));
	CT_TUPLE_SET(t, fam, sport, p);
}

/* The key under which p's packet is a reply of a tracked flow: its own
 * addresses, its ports swapped (addresses name the reply direction, ports the
 * original one: conntrack_types.h). ct_tuple_reverse() of it is the key of
 * the packet as its flow's original direction.
 */
static __always_inline void ct_tuple_reply(int fam, void *t, const void *p, __u8 flags)
{
	if (fam == PKT_FAM6) {
		((struct ipv6_ct_tuple *)t)->daddr = ((const struct pkt6 *)p)->daddr;
		((struct ipv6_ct_tuple *)t)->saddr = ((const struct pkt6 *)p)->saddr;
	} else {
		((struct ipv4_ct_tuple *)t)->daddr = ((const struct pkt4 *)p)->daddr;
		((struct ipv4_ct_tuple *)t)->saddr = ((const struct pkt4 *)p)->saddr;
	}
	CT_TUPLE_SET(t, fam, dport, PKT(p, fam, sport));
	CT_TUPLE_SET(t, fam, sport, PKT(p, fam, dport));
	CT_TUPLE_SET(t, fam, nexthdr, PKT(p, fam, proto));
	CT_TUPLE_SET(t, fam, flags, flags);
}

static __always_inline void ct_tuple_reply4(struct ipv4_ct_tuple *t, const struct pkt4 *p, __u8 flags)
{
	ct_tuple_reply(PKT_FAM4, t, p, flags);
}

/* One lookup: on a hit, update the entry for this packet and report `status`. */
static __always_inline int __ct_lookup(int fam, void *map, bool in_syn, const void *tuple, bool is_tcp,
				       enum ct_dir dir, enum ct_action action, __u8 flags, __u32 len, int status,
				       struct ct_state *st, __u32 now)
{
	struct ct_entry *e = bpf_map_lookup_elem(map, tuple);

	if (!e)
		return CT_NEW;
	status = ct_entry_hit(e, is_tcp, dir, action, flags, len, status, now);
	ct_state_fill(st, e);
	ct_settle(fam, tuple, e, in_syn, now);
	return status;
}

/* Look a packet up at time now. Fills tuple with the flow's key in the
 * packet's own direction (ready for ct_create on CT_NEW), st with what the
 * entry holds. Returns a ct_status.
 */
static __always_inline int ct_lookup(int fam, void *tuple, const void *p, enum ct_dir dir, __u32 len,
				     struct ct_state *st, __u32 now)
{
	__u8 proto = PKT(p, fam, proto);
	bool is_tcp = proto == IPPROTO_TCP;
	enum ct_action action = ACTION_UNSPEC;
	__u8 related = 0, flags = 0;
	void *map = ct_map(fam, proto);
	int ret;

	/* Reply candidate first (flags are set per lookup below). */
	ct_tuple_reply(fam, tuple, p, 0);

	if (is_tcp) {
		flags = PKT(p, fam, tcp_flags);
		action = ct_tcp_action(flags);
	} else if (proto == pkt_icmp_proto(fam)) {
		CT_TUPLE_SET(tuple, fam, dport, 0);
		CT_TUPLE_SET(tuple, fam, sport, 0);
		switch (pkt_icmp_kind(fam, PKT(p, fam, icmp_type))) {
		case PKT_ICMP_ERROR:
			related = TUPLE_F_RELATED;
			break;
		case PKT_ICMP_ECHO_REPLY:
			CT_TUPLE_SET(tuple, fam, sport, PKT(p, fam, icmp_id));
			break;
		case PKT_ICMP_ECHO_REQUEST:
			CT_TUPLE_SET(tuple, fam, dport, PKT(p, fam, icmp_id));
			break;
		case PKT_ICMP_OTHER:
			break;
		}
	}

	/* Reply direction first: a reply or related packet takes precedence. */
	CT_TUPLE_SET(tuple, fam, flags, (dir == CT_INGRESS ? TUPLE_F_OUT : TUPLE_F_IN) | related);
	ret = __ct_lookup(fam, map, false, tuple, is_tcp, dir, action, flags, len,
			  related ? CT_RELATED : CT_REPLY, st, now);
	if (ret != CT_NEW)
		return ret;

	ct_tuple_reverse(fam, tuple);
	CT_TUPLE_SET(tuple, fam, flags, (dir == CT_INGRESS ? TUPLE_F_IN : TUPLE_F_OUT) | related);
	ret = __ct_lookup(fam, map, false, tuple, is_tcp, dir, action, flags, len,
			  related ? CT_RELATED : CT_ESTABLISHED, st, now);
	if (ret != CT_NEW || !ct_use_syn_table(proto))
		return ret;

	/* Not established: the handshake table, in the same order. Established
	 * flows never get here, so they pay no extra lookup.
	 */
	ct_tuple_reverse(fam, tuple);
	CT_TUPLE_SET(tuple, fam, flags, dir == CT_INGRESS ? TUPLE_F_OUT : TUPLE_F_IN);
	ret = __ct_lookup(fam, ct_syn_map(fam), true, tuple, is_tcp, dir, action, flags, len, CT_REPLY, st,
			  now);
	ct_tuple_reverse(fam, tuple);
	CT_TUPLE_SET(tuple, fam, flags, dir == CT_INGRESS ? TUPLE_F_IN : TUPLE_F_OUT);
	if (ret != CT_NEW)
		return ret;
	return __ct_lookup(fam, ct_syn_map(fam), true, tuple, is_tcp, dir, action, flags, len, CT_ESTABLISHED,
			   st, now);
}

static __always_inline int ct_lookup4(struct ipv4_ct_tuple *tuple, const struct pkt4 *p, enum ct_dir dir,
				      __u32 len, struct ct_state *st, __u32 now)
{
	return ct_lookup(PKT_FAM4, tuple, p, dir, len, st, now);
}

/* The verdict reason of a lookup that found an entry. */
static __always_inline enum tpl_reason ct_status_reason(int status)
{
	switch (status) {
	case CT_ESTABLISHED:
		return TPL_PASS_CT_ESTABLISHED;
	case CT_REPLY:
		return TPL_PASS_CT_REPLY;
	case CT_RELATED:
		return TPL_PASS_CT_RELATED;
	case CT_REOPENED:
		return TPL_PASS_CT_REOPENED;
	}
	return TPL_PASS_CT_NEW;
}

/* Whether p's packet, which found no entry, may create one. A reset for a
 * flow we do not know ends nothing: it is not tracked. Returns TPL_CONTINUE
 * or TPL_PASS_CT_UNTRACKED_RST.
 */
static __always_inline int ct_may_create(int fam, const void *p)
{
	if (PKT(p, fam, proto) == IPPROTO_TCP && (PKT(p, fam, tcp_flags) & TCP_FLAG_RST))
		return TPL_PASS_CT_UNTRACKED_RST;
	return TPL_CONTINUE;
}

static __always_inline int ct_may_create4(const struct pkt4 *p)
{
	return ct_may_create(PKT_FAM4, p);
}

/* Create the entry for tuple (as left by ct_lookup) at time now and, for endpoint
 * traffic, its related-ICMP entry. New TCP entries go to the handshake table
 * (ct_syn_table) and get their twin on promotion. Returns TPL_CONTINUE or
 * TPL_DROP_CT_INSERT_FAILED.
 */
static __always_inline int ct_create(int fam, const void *tuple, enum ct_dir dir, const struct ct_state *st,
				     __u8 tcp_flags, __u32 len, __u32 now)
{
	__u8 nexthdr = CT_TUPLE_GET(tuple, fam, nexthdr);
	bool is_tcp = nexthdr == IPPROTO_TCP;
	bool syn = ct_use_syn_table(nexthdr);
	void *map = syn ? ct_syn_map(fam) : ct_map(fam, nexthdr);
	struct ct_entry entry = {};

	ct_identity_copy(&entry, st);
	if (ct_accounting && dir != CT_SERVICE) {
		entry.packets = 1;
		entry.bytes = len;
	}
	/* A new TCP entry stays in the SYN state (short lifetime) until a
	 * later packet without SYN shows the handshake progressed.
	 */
	__ct_update_timeout(&entry, ct_lifetime(&entry, is_tcp, dir), dir, tcp_flags, now);

	if (fault_ct_insert || bpf_map_update_elem(map, tuple, &entry, BPF_ANY) < 0) {
		/* The table is full or contended: ask the agent to collect early. */
		ct_event_fam(fam, CT_EV_INSERT_FAILED);
		ct_signal_fill_up(fam, is_tcp);
		return TPL_DROP_CT_INSERT_FAILED;
	}
	ct_event_fam(fam, syn ? CT_EV_INSERT_SYN : is_tcp ? CT_EV_INSERT_TCP : CT_EV_INSERT_ANY);
	ct_notify_new_fam(fam, tuple, &entry, CT_NOTIFY_R_CREATED,
			  syn ? CT_NOTIFY_T_SYN : is_tcp ? CT_NOTIFY_T_TCP : CT_NOTIFY_T_ANY);

	/* Endpoint traffic only: service, NodePort and DSR entries have no related twin. */
	if (dir != CT_SERVICE && !st->node_port && !st->dsr_internal && !syn)
		ct_create_related(fam, tuple, &entry, now);
	return TPL_CONTINUE;
}

static __always_inline int ct_create4(const struct ipv4_ct_tuple *tuple, enum ct_dir dir,
				      const struct ct_state *st, __u8 tcp_flags, __u32 len, __u32 now)
{
	return ct_create(PKT_FAM4, tuple, dir, st, tcp_flags, len, now);
}

#endif
