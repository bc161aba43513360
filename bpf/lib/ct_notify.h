/* SPDX-License-Identifier: GPL-2.0 */
/* Conntrack events for `tuplet ct events` (conntrack -E): NEW when the datapath
 * creates or promotes an entry, DESTROY when GC, a flush, an endpoint removal
 * or `ct delete` deletes one.
 *
 * Written only while a listener is attached: the listener sets
 * tpl_ct_notify_ctl_v1[0].listeners (an array lookup the verifier inlines, then
 * one load: the whole cost when nobody listens). The datapath's records are
 * limited per CPU to ctl.rate per second; records refused (over the rate, or the
 * ring full) are counted per CPU in tpl_ct_notify_lost_v1, which the listener
 * prints. User-space deletions (flush, endpoint, delete) reach the same ring
 * through tpl_ct_notify_emit (bpf/ct_gc.c), run with BPF_PROG_TEST_RUN.
 */
#ifndef TUPLET_CT_NOTIFY_H
#define TUPLET_CT_NOTIFY_H

#include "compiler.h"
#include "conntrack_types.h"

enum ct_notify_type {
	CT_NOTIFY_NEW = 1,
	CT_NOTIFY_DESTROY = 2,
};

enum ct_notify_reason {
	CT_NOTIFY_R_CREATED = 0,   /* NEW: a packet created it */
	CT_NOTIFY_R_PROMOTED = 1,  /* NEW: moved out of the handshake table */
	CT_NOTIFY_R_GC = 2,        /* DESTROY: expired, deleted by GC */
	CT_NOTIFY_R_FLUSH = 3,     /* DESTROY: ct flush */
	CT_NOTIFY_R_ENDPOINT = 4,  /* DESTROY: its endpoint was removed */
	CT_NOTIFY_R_DELETE = 5,    /* DESTROY: ct delete */
};

enum ct_notify_table {
	CT_NOTIFY_T_TCP = 0,
	CT_NOTIFY_T_ANY = 1,
	CT_NOTIFY_T_SYN = 2,
};

/* The key and a copy of the entry, so the listener decodes and filters events
 * as `ct list` does entries.
 */
struct ct_notify_rec {
	__u64 ktime_ns;
	struct ct_entry entry;
	struct ipv4_ct_tuple tuple;
	__u8 type;               /* enum ct_notify_type */
	__u8 reason;             /* enum ct_notify_reason */
	__u8 table;              /* enum ct_notify_table */
	__u8 pad0;
	__u16 pad1;
	__u32 pad2;
};
ASSERT_SIZE(struct ct_notify_rec, 88);

struct ct_notify_ctl {
	__u32 listeners;         /* listeners attached; 0: write nothing */
	__u32 rate;              /* datapath records per CPU per second */
};
ASSERT_SIZE(struct ct_notify_ctl, 8);

struct ct_notify_cpu {
	__u64 window_ns;         /* start of the current one-second window */
	__u64 sent;              /* records written in it */
	__u64 lost;              /* records not delivered, ever */
};
ASSERT_SIZE(struct ct_notify_cpu, 24);

#define CT_NOTIFY_RING_SIZE (1 << 22)   /* bytes: 4 MiB, 47k records */
#define CT_NOTIFY_WINDOW_NS 1000000000ULL
/* Records are submitted without waking the listener (a wake-up per record is an
 * irq_work per packet); it polls every 100 ms, and is woken once a quarter of
 * the ring is waiting.
 */
#define CT_NOTIFY_WAKE_BYTES (CT_NOTIFY_RING_SIZE / 4)

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, CT_NOTIFY_RING_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct_notify_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct ct_notify_ctl);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct_notify_ctl_v1 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ct_notify_cpu);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ct_notify_lost_v1 SEC(".maps");

const volatile struct ct_notify_rec ct_notify_rec_layout __attribute__((unused)) = {};
const volatile enum ct_notify_type ct_notify_type_names __attribute__((unused)) = 0;
const volatile enum ct_notify_reason ct_notify_reason_names __attribute__((unused)) = 0;
const volatile enum ct_notify_table ct_notify_table_names __attribute__((unused)) = 0;

/* The per-packet check: the one load made when nobody listens. */
static __always_inline struct ct_notify_ctl *ct_notify_on(void)
{
	__u32 zero = 0;
	struct ct_notify_ctl *ctl = bpf_map_lookup_elem(&tpl_ct_notify_ctl_v1, &zero);

	if (!ctl || !READ_ONCE(ctl->listeners))
		return NULL;
	return ctl;
}

/* Write one record; rate-limited for the datapath (limit = ctl->rate), not for GC. */
static __noinline void ct_notify_write(const struct ipv4_ct_tuple *t, const struct ct_entry *e,
				       __u32 what, __u32 limit)
{
	__u32 zero = 0;
	struct ct_notify_cpu *c = bpf_map_lookup_elem(&tpl_ct_notify_lost_v1, &zero);
	struct ct_notify_rec *r;
	__u64 now = bpf_ktime_get_ns();

	if (!c || !t || !e)
		return;
	if (limit) {
		if (now - c->window_ns >= CT_NOTIFY_WINDOW_NS) {
			c->window_ns = now;
			c->sent = 0;
		}
		if (c->sent >= limit) {
			c->lost++;
			return;
		}
	}
	r = bpf_ringbuf_reserve(&tpl_ct_notify_v1, sizeof(*r), 0);
	if (!r) {
		c->lost++;
		return;
	}
	c->sent++;
	r->ktime_ns = now;
	__builtin_memcpy(&r->entry, e, sizeof(r->entry));
	__builtin_memcpy(&r->tuple, t, sizeof(r->tuple));
	r->type = what & 0xff;
	r->reason = (what >> 8) & 0xff;
	r->table = (what >> 16) & 0xff;
	r->pad0 = 0;
	r->pad1 = 0;
	r->pad2 = 0;
	bpf_ringbuf_submit(r, bpf_ringbuf_query(&tpl_ct_notify_v1, BPF_RB_AVAIL_DATA) >= CT_NOTIFY_WAKE_BYTES ?
			   BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

#define CT_NOTIFY_WHAT(type, reason, table) ((type) | ((reason) << 8) | ((table) << 16))

/* NEW, from the datapath. */
static __always_inline void ct_notify_new(const struct ipv4_ct_tuple *t, const struct ct_entry *e,
					  __u32 reason, __u32 table)
{
	struct ct_notify_ctl *ctl = ct_notify_on();

	if (ctl)
		ct_notify_write(t, e, CT_NOTIFY_WHAT(CT_NOTIFY_NEW, reason, table), ctl->rate ? ctl->rate : 1);
}

/* DESTROY, from GC's deleters (not rate-limited: bounded by the pass). */
static __always_inline void ct_notify_destroy(const struct ipv4_ct_tuple *t, const struct ct_entry *e,
					      __u32 reason, __u32 table)
{
	if (ct_notify_on())
		ct_notify_write(t, e, CT_NOTIFY_WHAT(CT_NOTIFY_DESTROY, reason, table), 0);
}

#endif
