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

static __always_inline void *ct_map4(__u8 nexthdr)
{
	return nexthdr == IPPROTO_TCP ? (void *)&tpl_ct4_v1 : (void *)&tpl_ct_any4_v1;
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
static __always_inline void ct_create_related4(const struct ipv4_ct_tuple *tuple, struct ct_entry *entry,
					       __u32 now)
{
	struct ipv4_ct_tuple icmp = {
		.daddr = tuple->daddr,
		.saddr = tuple->saddr,
		.nexthdr = IPPROTO_ICMP,
		.flags = tuple->flags | TUPLE_F_RELATED,
	};
	struct ct_entry *rel;

	entry->packets = 0;
	entry->bytes = 0;
	entry->lifetime = now + ct_lifetime_nontcp;
	/* When it already says what the new one would, refresh its lifetime in
	 * place instead of replacing it (a lookup instead of an LRU insert: the
	 * reconnect-storm path).
	 */
	rel = bpf_map_lookup_elem(&tpl_ct_any4_v1, &icmp);
	if (rel && ct_identity_same(rel, entry)) {
		if (READ_ONCE(rel->lifetime) != entry->lifetime)
			WRITE_ONCE(rel->lifetime, entry->lifetime);
		return;
	}
	/* Best effort: the main entry is in, the flow works without it. */
	if (bpf_map_update_elem(&tpl_ct_any4_v1, &icmp, entry, BPF_ANY) == 0 && !rel) {
		ct_event(CT_EV_INSERT_ANY);
		ct_notify_new(&icmp, entry, CT_NOTIFY_R_CREATED, CT_NOTIFY_T_ANY);
	}
}

/* Whether an entry of the handshake table belongs with the established ones:
 * not closing, a packet without SYN seen after the first packet, and (but for
 * service entries, which see the client's direction only) packets seen both
 * ways. A spoofed SYN flood never gets there; a real handshake does on its
 * third packet; a connection picked up mid-stream on its first reply.
 */
static __always_inline bool ct_established(const struct ipv4_ct_tuple *t, const struct ct_entry *e)
{
	if (ct_entry_closing(e) || !e->seen_non_syn)
		return false;
	if (t->flags & TUPLE_F_SERVICE)
		return true;
	return READ_ONCE(e->last_tx_report) && READ_ONCE(e->last_rx_report);
}

/* After a hit on entry e of key t: promote it from the handshake table into
 * tpl_ct4_v1 once established, with its related twin (which waits until then,
 * so a flood from random sources does not churn the non-TCP table either).
 * A failed insert leaves it where it is, to be retried on the next packet.
 */
static __always_inline void ct_settle4(const struct ipv4_ct_tuple *t, struct ct_entry *e, bool in_syn,
				       __u32 now)
{
	struct ct_entry copy, twin = {};
	__u8 f;

	if (!in_syn || !ct_established(t, e))
		return;
	__builtin_memcpy(&copy, e, sizeof(copy));
	if (bpf_map_update_elem(&tpl_ct4_v1, t, &copy, BPF_ANY) < 0) {
		ct_event(CT_EV_PROMOTE_FAILED);
		tpl_signal(TPL_SIGNAL_CT_FILL_UP, TPL_SIGNAL_MAP_TCP);
		return;
	}
	bpf_map_delete_elem(&tpl_ct4_syn_v1, t);
	ct_event(CT_EV_PROMOTED);
	ct_event(CT_EV_INSERT_TCP);
	ct_notify_new(t, &copy, CT_NOTIFY_R_PROMOTED, CT_NOTIFY_T_TCP);
	if ((t->flags & TUPLE_F_SERVICE) || copy.node_port || copy.dsr_internal)
		return;
	/* The twin reads as if made with the entry: its identity, and the
	 * opening packet's flags in the entry's own direction.
	 */
	ct_identity_copy(&twin, &copy);
	if (t->flags & TUPLE_F_IN) {
		f = copy.rx_flags_seen;
		twin.rx_flags_seen = (f & TCP_FLAG_SYN) ? TCP_FLAG_SYN : f;
		twin.last_rx_report = now;
	} else {
		f = copy.tx_flags_seen;
		twin.tx_flags_seen = (f & TCP_FLAG_SYN) ? TCP_FLAG_SYN : f;
		twin.last_tx_report = now;
	}
	ct_create_related4(t, &twin, now);
}

/* Which tables ct_lookup4 probes: the main one (tpl_ct4_v1 or tpl_ct_any4_v1),
 * the handshake table (TCP with ct_syn_table), or both, in that order.
 */
enum ct_tables {
	CT_TABLE_MAIN = 1,
	CT_TABLE_SYN = 2,
	CT_TABLES_ALL = CT_TABLE_MAIN | CT_TABLE_SYN,
};

/* The entry of tuple t: the main table, then (TCP) the handshake table. */
static __always_inline struct ct_entry *ct_find4(const struct ipv4_ct_tuple *t, bool *in_syn)
{
	struct ct_entry *e = bpf_map_lookup_elem(ct_map4(t->nexthdr), t);

	*in_syn = false;
	if (e || !ct_use_syn_table(t->nexthdr))
		return e;
	e = bpf_map_lookup_elem(&tpl_ct4_syn_v1, t);
	*in_syn = e != NULL;
	return e;
}

static __always_inline void ct_tuple_reverse4(struct ipv4_ct_tuple *t)
{
	__be32 a = t->daddr;
	__be16 p = t->dport;

	t->daddr = t->saddr;
	t->saddr = a;
	t->dport = t->sport;
	t->sport = p;
}

/* The key under which p's packet is a reply of a tracked flow: its own
 * addresses, its ports swapped (addresses name the reply direction, ports the
 * original one: conntrack_types.h). ct_tuple_reverse4() of it is the key of
 * the packet as its flow's original direction.
 */
static __always_inline void ct_tuple_reply4(struct ipv4_ct_tuple *t, const struct pkt4 *p, __u8 flags)
{
	t->daddr = p->daddr;
	t->saddr = p->saddr;
	t->dport = p->sport;
	t->sport = p->dport;
	t->nexthdr = p->proto;
	t->flags = flags;
}

/* One lookup: on a hit, update the entry for this packet and report `status`. */
static __always_inline int __ct_lookup4(void *map, bool in_syn, const struct ipv4_ct_tuple *tuple,
					bool is_tcp, enum ct_dir dir, enum ct_action action, __u8 flags,
					__u32 len, int status, struct ct_state *st, __u32 now)
{
	struct ct_entry *e = bpf_map_lookup_elem(map, tuple);

	if (!e)
		return CT_NEW;
	status = ct_entry_hit(e, is_tcp, dir, action, flags, len, status, now);
	ct_state_fill(st, e);
	ct_settle4(tuple, e, in_syn, now);
	return status;
}

/* Look a packet up at time now in `tables` (enum ct_tables; CT_TABLES_ALL
 * but for a caller that splits the lookup). Fills tuple with the flow's key
 * in the packet's own direction (ready for ct_create4 on CT_NEW), st with
 * what the entry holds. Returns a ct_status.
 */
static __always_inline int ct_lookup4(struct ipv4_ct_tuple *tuple, const struct pkt4 *p,
				      enum ct_dir dir, __u32 len, struct ct_state *st, __u32 now,
				      unsigned int tables)
{
	bool is_tcp = p->proto == IPPROTO_TCP;
	enum ct_action action = ACTION_UNSPEC;
	__u8 related = 0, flags = 0;
	void *map = ct_map4(p->proto);
	int ret;

	/* Reply candidate first (flags are set per lookup below). */
	ct_tuple_reply4(tuple, p, 0);

	if (is_tcp) {
		flags = p->tcp_flags;
		action = ct_tcp_action(flags);
	} else if (p->proto == IPPROTO_ICMP) {
		tuple->dport = 0;
		tuple->sport = 0;
		switch (p->icmp_type) {
		case ICMP_DEST_UNREACH:
		case ICMP_TIME_EXCEEDED:
		case ICMP_PARAMETERPROB:
			related = TUPLE_F_RELATED;
			break;
		case ICMP_ECHOREPLY:
			tuple->sport = p->icmp_id;
			break;
		case ICMP_ECHO:
			tuple->dport = p->icmp_id;
			break;
		}
	}

	/* Reply direction first: a reply or related packet takes precedence. */
	tuple->flags = (dir == CT_INGRESS ? TUPLE_F_OUT : TUPLE_F_IN) | related;
	if (tables & CT_TABLE_MAIN) {
		ret = __ct_lookup4(map, false, tuple, is_tcp, dir, action, flags, len,
				   related ? CT_RELATED : CT_REPLY, st, now);
		if (ret != CT_NEW)
			return ret;
	}

	ct_tuple_reverse4(tuple);
	tuple->flags = (dir == CT_INGRESS ? TUPLE_F_IN : TUPLE_F_OUT) | related;
	if (tables & CT_TABLE_MAIN) {
		ret = __ct_lookup4(map, false, tuple, is_tcp, dir, action, flags, len,
				   related ? CT_RELATED : CT_ESTABLISHED, st, now);
		if (ret != CT_NEW)
			return ret;
	}
	if (!(tables & CT_TABLE_SYN) || !ct_use_syn_table(p->proto))
		return CT_NEW;

	/* Not established: the handshake table, in the same order. Established
	 * flows never get here, so they pay no extra lookup.
	 */
	ct_tuple_reverse4(tuple);
	tuple->flags = dir == CT_INGRESS ? TUPLE_F_OUT : TUPLE_F_IN;
	ret = __ct_lookup4(&tpl_ct4_syn_v1, true, tuple, is_tcp, dir, action, flags, len, CT_REPLY, st,
			   now);
	ct_tuple_reverse4(tuple);
	tuple->flags = dir == CT_INGRESS ? TUPLE_F_IN : TUPLE_F_OUT;
	if (ret != CT_NEW)
		return ret;
	return __ct_lookup4(&tpl_ct4_syn_v1, true, tuple, is_tcp, dir, action, flags, len,
			    CT_ESTABLISHED, st, now);
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
static __always_inline int ct_may_create4(const struct pkt4 *p)
{
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_RST))
		return TPL_PASS_CT_UNTRACKED_RST;
	return TPL_CONTINUE;
}

/* Create the entry for tuple (as left by ct_lookup4) at time now and, for endpoint
 * traffic, its related-ICMP entry. New TCP entries go to the handshake table
 * (ct_syn_table) and get their twin on promotion. Returns TPL_CONTINUE or
 * TPL_DROP_CT_INSERT_FAILED.
 */
static __always_inline int ct_create4(const struct ipv4_ct_tuple *tuple, enum ct_dir dir,
				      const struct ct_state *st, __u8 tcp_flags, __u32 len, __u32 now)
{
	bool is_tcp = tuple->nexthdr == IPPROTO_TCP;
	bool syn = ct_use_syn_table(tuple->nexthdr);
	void *map = syn ? (void *)&tpl_ct4_syn_v1 : ct_map4(tuple->nexthdr);
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
		ct_event(CT_EV_INSERT_FAILED);
		tpl_signal(TPL_SIGNAL_CT_FILL_UP, is_tcp ? TPL_SIGNAL_MAP_TCP : TPL_SIGNAL_MAP_ANY);
		return TPL_DROP_CT_INSERT_FAILED;
	}
	ct_event(syn ? CT_EV_INSERT_SYN : is_tcp ? CT_EV_INSERT_TCP : CT_EV_INSERT_ANY);
	ct_notify_new(tuple, &entry, CT_NOTIFY_R_CREATED,
		      syn ? CT_NOTIFY_T_SYN : is_tcp ? CT_NOTIFY_T_TCP : CT_NOTIFY_T_ANY);

	/* Endpoint traffic only: service, NodePort and DSR entries have no related twin. */
	if (dir != CT_SERVICE && !st->node_port && !st->dsr_internal && !syn)
		ct_create_related4(tuple, &entry, now);
	return TPL_CONTINUE;
}

#endif
