// SPDX-License-Identifier: GPL-2.0
/* The sliced in-kernel GC pass: one iter/bpf_map_elem program per conntrack map.
 *
 * The agent attaches one to a map and reads the iterator's file in small
 * reads. Each visited entry writes one verdict byte (enum gc_verdict), and the
 * kernel returns from read() once the caller's buffer is full, so one read()
 * visits at most that many entries and the CPU is given back between reads.
 * Its own object: a kernel that refuses iterator programs (or this program
 * type's buffer access) leaves bpf/ct_gc.c's batch deleter usable.
 */
#include "lib/compiler.h"
#include "lib/conntrack_map.h"
#include "lib/nat_map.h"
#include "lib/ct_gc.h"

char LICENSE[] SEC("license") = "GPL";

/* One iterator body per key type: `tuple` the key of family `fam`'s tables. */
#define GC_ITER(name, tuple, fam)						\
static __always_inline int name(struct bpf_iter__bpf_map_elem *ctx, void *map, __u32 table) \
{									\
	tuple *key = ctx->key;						\
	struct ct_entry *e = ctx->value;				\
	__u8 v = GC_V_COUNTED;						\
	__u32 seen;							\
	tuple k;							\
									\
	if (!key || !e)							\
		return 0;						\
	if (!gc_walk_only) {						\
		seen = READ_ONCE(e->lifetime);				\
		if (!gc_expired(seen, gc_now)) {			\
			v = GC_V_ALIVE;					\
		} else {						\
			/* 6.1 passes no read-only iterator buffer to a helper: the key goes by the stack. */ \
			__builtin_memcpy(&k, key, sizeof(k));		\
			v = gc_delete_if_unchanged(fam, map, &k, e, seen, table);		\
		}							\
	}								\
	bpf_seq_write(ctx->meta->seq, &v, sizeof(v));			\
	return 0;							\
}

GC_ITER(gc_iter4, struct ipv4_ct_tuple, 4)
GC_ITER(gc_iter6, struct ipv6_ct_tuple, 6)

/* One program per table (GC_CT_TABLES): tpl_gc_iter_tcp ... tpl_gc_iter_syn6. */
#define GC_ITER_PROG(sel, name, map, table, fam)			\
SEC("iter/bpf_map_elem")						\
int tpl_gc_iter_##name(struct bpf_iter__bpf_map_elem *ctx)		\
{									\
	return gc_iter##fam(ctx, &map, table);				\
}

GC_CT_TABLES(GC_ITER_PROG)
