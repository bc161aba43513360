/* SPDX-License-Identifier: GPL-2.0 */
/* What both sliced GC programs share (bpf/ct_gc.c's deleter, bpf/ct_gc_iter.c's
 * iterators): the verdicts, the pass's clock, the test-only switches and the
 * delete that re-checks the lifetime as its last step.
 */
#ifndef TUPLET_CT_GC_H
#define TUPLET_CT_GC_H

#include "compiler.h"
#include "conntrack_map.h"
#include "nat_map.h"
#include "ct_notify.h"

/* Verdicts: one byte per visited entry in the iterator's output, counted by the agent. */
enum gc_verdict {
	GC_V_ALIVE = 0,
	GC_V_DELETED = 1,        /* deleted, owned no NAT entry (or it was already gone) */
	GC_V_DELETED_NAT = 2,    /* deleted with the NAT entry it owned */
	GC_V_REFRESHED = 3,      /* judged expired, refreshed by the datapath before the delete: kept */
	GC_V_GONE = 4,           /* judged expired, already deleted by someone else */
	GC_V_COUNTED = 5,        /* walk-only visit */
};
/* Anchored in BTF so the agent can check its copy (tuplet/datapath/abi.py). */
const volatile enum gc_verdict gc_verdict_names __attribute__((unused)) = 0;

/* Set by the agent before each pass (.bss): entries with lifetime < gc_now expire. */
__u32 gc_now = 0;
/* Set by the agent before a walk-only iteration (bench: the sliced walk floor). */
__u32 gc_walk_only = 0;

/* Test-only (0 in production, so the verifier drops the code): spin this many
 * ns between judging an entry expired and the final re-check, so a test can
 * refresh the entry in between; and skip the re-check (the unprotected pass
 * the race tests and the soak compare against).
 */
const volatile __u64 gc_test_stall_ns = 0;
const volatile __u32 gc_test_unprotected = 0;

/* Eight clock reads a step: bpf_loop's 1 << 23 steps then last well beyond any stall a test asks for. */
static long gc_stall_step(__u64 i, __u64 *deadline)
{
	__u64 t = 0;
	int k;

#pragma unroll
	for (k = 0; k < 8; k++)
		t = bpf_ktime_get_ns();
	return t >= *deadline;
}

static __always_inline void gc_test_stall(void)
{
	__u64 deadline;

	if (!gc_test_stall_ns)
		return;
	deadline = bpf_ktime_get_ns() + gc_test_stall_ns;
	bpf_loop(1 << 23, gc_stall_step, &deadline, 0);
}

/* Delete `key` from `map` if its lifetime is still `seen` (< now), then the
 * NAT entry it owned. `e` points at the live value.
 */
static __always_inline __u8 gc_delete_if_unchanged(void *map, const struct ipv4_ct_tuple *key,
						   struct ct_entry *e, __u32 seen, __u32 table)
{
	struct ipv4_ct_tuple nat = {};
	bool owns;

	gc_test_stall();
	owns = ct_owns_nat(key, e);
	if (owns)
		nat4_key_for_ct(key, &nat);
	/* The last step before the delete: a refresh since the verdict keeps it. */
	if (!gc_test_unprotected && READ_ONCE(e->lifetime) != seen)
		return GC_V_REFRESHED;
	if (bpf_map_delete_elem(map, key) != 0)
		return GC_V_GONE;
	ct_notify_destroy(key, e, CT_NOTIFY_R_GC, table);
	if (owns && bpf_map_delete_elem(&tpl_nat4_v1, &nat) == 0)
		return GC_V_DELETED_NAT;
	return GC_V_DELETED;
}

#endif
