/* SPDX-License-Identifier: GPL-2.0 */
/* Signals from the datapath to the agent, through a ring buffer.
 *
 * The agent reacts to a signal (e.g. runs GC early when a conntrack insert
 * failed), so one per kind and CPU per second is plenty: the rest are counted
 * by the verdict metrics and not sent.
 */
#ifndef TUPLET_SIGNAL_H
#define TUPLET_SIGNAL_H

#include "compiler.h"

enum tpl_signal_kind {
	TPL_SIGNAL_CT_FILL_UP = 1,       /* a conntrack insert failed; arg = enum tpl_signal_map */
	TPL_SIGNAL_KINDS = 2,
};

enum tpl_signal_map {
	TPL_SIGNAL_MAP_TCP = 0,
	TPL_SIGNAL_MAP_ANY = 1,
	TPL_SIGNAL_MAP_TCP6 = 2,
	TPL_SIGNAL_MAP_ANY6 = 3,
};

struct tpl_signal {
	__u64 ktime_ns;                  /* bpf_ktime_get_ns() when sent */
	__u32 kind;                      /* enum tpl_signal_kind */
	__u32 arg;
	__u32 cpu;
	__u32 pad;
};
ASSERT_SIZE(struct tpl_signal, 24);

#define TPL_SIGNAL_INTERVAL_NS 1000000000ULL
#define TPL_SIGNAL_RING_SIZE 4096          /* bytes; a page, room for 170 records */

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TPL_SIGNAL_RING_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_signals_v1 SEC(".maps");

/* When each CPU last sent each kind. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, TPL_SIGNAL_KINDS);
} tpl_signal_last SEC(".maps");

/* Anchor the record layout and the enums in BTF for the agent (a ring buffer
 * map carries no value type).
 */
const volatile struct tpl_signal tpl_signal_layout __attribute__((unused)) = {};
const volatile enum tpl_signal_kind tpl_signal_kind_names __attribute__((unused)) = 0;
const volatile enum tpl_signal_map tpl_signal_map_names __attribute__((unused)) = 0;

static __always_inline void tpl_signal(enum tpl_signal_kind kind, __u32 arg)
{
	__u32 idx = kind;
	__u64 now = bpf_ktime_get_ns();
	__u64 *last = bpf_map_lookup_elem(&tpl_signal_last, &idx);
	struct tpl_signal *s;

	if (!last || (*last && now - *last < TPL_SIGNAL_INTERVAL_NS))
		return;
	s = bpf_ringbuf_reserve(&tpl_signals_v1, sizeof(*s), 0);
	if (!s)
		return;
	*last = now;
	s->ktime_ns = now;
	s->kind = kind;
	s->arg = arg;
	s->cpu = bpf_get_smp_processor_id();
	s->pad = 0;
	bpf_ringbuf_submit(s, 0);
}

#endif
