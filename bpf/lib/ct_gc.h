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
#include "time.h"
#include "ct_notify.h"

/* The conntrack tables GC collects, once: X(selector, short name, map, event table,
 * family 4|6). bpf/ct_gc.c's walkers and deleters and bpf/ct_gc_iter.c's iterators are
 * generated from it (the selectors are enum gc_map_sel in bpf/ct_gc.c).
 */
#define GC_CT_TABLES(X)							\
	X(GC_MAP_TCP, tcp, tpl_ct4_v1, CT_NOTIFY_T_TCP, 4)		\
	X(GC_MAP_ANY, any, tpl_ct_any4_v1, CT_NOTIFY_T_ANY, 4)		\
	X(GC_MAP_SYN, syn, tpl_ct4_syn_v1, CT_NOTIFY_T_SYN, 4)		\
	X(GC_MAP_TCP6, tcp6, tpl_ct6_v1, CT_NOTIFY_T_TCP, 6)		\
	X(GC_MAP_ANY6, any6, tpl_ct_any6_v1, CT_NOTIFY_T_ANY, 6)	\
	X(GC_MAP_SYN6, syn6, tpl_ct6_syn_v1, CT_NOTIFY_T_SYN, 6)

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

/* Set by the agent before each pass (.bss): entries whose lifetime is before gc_now expire. */
__u32 gc_now = 0;
/* Set by the agent before a walk-only iteration (bench: the sliced walk floor). */
__u32 gc_walk_only = 0;

/* Expired: the lifetime is before now on the u32 clock, across its wrap (never a plain <). */
static __always_inline bool gc_expired(__u32 lifetime, __u32 now)
{
	return tpl_time_after(now, lifetime);
}

/* Test-only (0 in production, so the verifier drops the code): a stall between
 * judging an entry expired and the final re-check, so a test can refresh the entry in
 * between; and skipping the re-check (the unprotected pass the race tests and the soak
 * compare against). gc_test_stall_ns is the most the stall may spin, capped at
 * GC_TEST_STALL_MAX_NS: even a test run holds its CPU for less than 10 ms.
 */
const volatile __u64 gc_test_stall_ns = 0;
const volatile __u32 gc_test_unprotected = 0;

enum gc_test_limit {
	GC_TEST_STALL_MAX_NS = 8000000,
};

/* How the last armed stall ended (gc_test_outcome). */
enum gc_stall_outcome {
	GC_STALL_NONE = 0,
	GC_STALL_RELEASED = 1,   /* the test released it (it had refreshed the entry) */
	GC_STALL_TIMED_OUT = 2,  /* GC_TEST_STALL_MAX_NS (or gc_test_stall_ns) passed first */
};
const volatile enum gc_test_limit gc_test_limit_names __attribute__((unused)) = 0;
const volatile enum gc_stall_outcome gc_stall_outcome_names __attribute__((unused)) = 0;

/* The handshake with a racing test (.bss, used only when gc_test_stall_ns is set): the
 * test sets gc_test_armed; the first entry judged expired while armed disarms it, sets
 * gc_test_judged and spins until the test sets gc_test_released or the time runs out,
 * and gc_test_outcome says which. One stall per arming, so a run stalls at most once.
 */
__u32 gc_test_armed = 0;
__u32 gc_test_judged = 0;
__u32 gc_test_released = 0;
__u32 gc_test_outcome = 0;

struct gc_stall {
	__u64 deadline;
	__u32 released;
};

static long gc_stall_step(__u64 i, struct gc_stall *st)
{
	if (READ_ONCE(gc_test_released)) {
		st->released = 1;
		return 1;
	}
	return bpf_ktime_get_ns() >= st->deadline;
}

static __always_inline void gc_test_stall(void)
{
	struct gc_stall st = {};
	__u64 ns = gc_test_stall_ns;

	if (!ns || !READ_ONCE(gc_test_armed))
		return;
	if (ns > GC_TEST_STALL_MAX_NS)
		ns = GC_TEST_STALL_MAX_NS;
	WRITE_ONCE(gc_test_armed, 0);
	WRITE_ONCE(gc_test_judged, 1);
	st.deadline = bpf_ktime_get_ns() + ns;
	/* Each step reads the clock: 1 << 23 steps outlast GC_TEST_STALL_MAX_NS. */
	bpf_loop(1 << 23, gc_stall_step, &st, 0);
	WRITE_ONCE(gc_test_outcome, st.released ? GC_STALL_RELEASED : GC_STALL_TIMED_OUT);
}

/* The re-checking delete both families share: delete `key` from `map` if its
 * lifetime (`e` points at the live value) is still `seen`, the verdict judged
 * expired. GC_V_DELETED when deleted, else why not.
 */
static __always_inline __u8 gc_recheck_delete(void *map, const void *key, struct ct_entry *e, __u32 seen)
{
	/* The last step before the delete: a refresh since the verdict keeps it. */
	if (!gc_test_unprotected && READ_ONCE(e->lifetime) != seen)
		return GC_V_REFRESHED;
	if (bpf_map_delete_elem(map, key) != 0)
		return GC_V_GONE;
	return GC_V_DELETED;
}

/* Does the entry (`key` a struct ipv{4,6}_ct_tuple by fam) own a NAT entry? Then `nat`
 * is its key in nat_map(fam) (nat_map.h's rule, the datapath's).
 */
static __always_inline bool gc_owned_nat(int fam, const void *key, const struct ct_entry *e,
					 union ct_tuple_any *nat)
{
	if (!ct_owns_nat(fam, key, e))
		return false;
	nat_key_for_ct(fam, key, nat);
	return true;
}

/* Delete `key` from `map` (a CT table of family `fam`) if its lifetime is still
 * `seen` (expired), then the NAT entry it owned, never before. `e` points at the live
 * value. Only IPv4 deletions are reported (struct ct_notify_rec carries an IPv4 tuple).
 */
static __always_inline __u8 gc_delete_if_unchanged(int fam, void *map, const void *key,
						  struct ct_entry *e, __u32 seen, __u32 table)
{
	union ct_tuple_any nat = {};
	bool owns;
	__u8 v;

	gc_test_stall();
	owns = gc_owned_nat(fam, key, e, &nat);
	v = gc_recheck_delete(map, key, e, seen);
	if (v != GC_V_DELETED)
		return v;
	if (fam == 4)
		ct_notify_destroy(key, e, CT_NOTIFY_R_GC, table);
	if (owns && bpf_map_delete_elem(nat_map(fam), &nat) == 0)
		return GC_V_DELETED_NAT;
	return GC_V_DELETED;
}

#endif
