/* SPDX-License-Identifier: GPL-2.0 */
/* Per-CPU counters of verdicts and drop reasons: the only exit path of every
 * program goes through tpl_verdict(), which counts and maps the reason to a
 * TC action.
 */
#ifndef TUPLET_METRICS_H
#define TUPLET_METRICS_H

#include "compiler.h"
#include "reasons.h"

struct metrics_value {
	__u64 packets;
	__u64 bytes;
};
ASSERT_SIZE(struct metrics_value, 16);

/* index = dir * TPL_REASON_SLOTS + reason */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, TPL_METRIC_DIRS * TPL_REASON_SLOTS);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_metrics_v2 SEC(".maps");

/* Anchors both enums in the object's BTF so the agent can read their names. */
const volatile enum tpl_reason tpl_reason_names __attribute__((unused)) = 0;
const volatile enum tpl_metric_dir tpl_metric_dir_names __attribute__((unused)) = 0;

static __always_inline int tpl_verdict(struct __sk_buff *skb, enum tpl_reason reason,
				       enum tpl_metric_dir dir)
{
	__u32 idx = (__u32)dir * TPL_REASON_SLOTS + ((__u32)reason & (TPL_REASON_SLOTS - 1));
	struct metrics_value *m = bpf_map_lookup_elem(&tpl_metrics_v2, &idx);

	if (m) {
		m->packets += 1;
		m->bytes += skb->len;
	}
	return reason >= TPL_DROP_BASE ? TC_ACT_SHOT : TC_ACT_OK;
}

#endif
