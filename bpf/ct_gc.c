// SPDX-License-Identifier: GPL-2.0
/* In-kernel conntrack garbage collection.
 *
 * tpl_ct_gc is never attached: the agent runs it with BPF_PROG_TEST_RUN on a
 * small buffer that carries its arguments and receives its results. One run
 * walks one conntrack map with bpf_for_each_map_elem and deletes the entries
 * whose lifetime is below `now`, together with the NAT entries they own.
 *
 * The lifetime is read and the entry deleted in the same callback, so the
 * window in which the datapath can refresh an entry that is about to be
 * deleted is a few instructions, not a batch.
 */
#include "lib/compiler.h"
#include "lib/conntrack_types.h"
#include "lib/conntrack_map.h"
#include "lib/nat_map.h"

char LICENSE[] SEC("license") = "GPL";

/* gc_args.map: which map to walk (tuplet/gc.py _MAP_SELECTOR), */
enum gc_map_sel {
	GC_MAP_TCP = 0,
	GC_MAP_ANY = 1,
	GC_MAP_SYN = 2,
	GC_MAP_NAT = 3,          /* count only (GC_WALK_ONLY): NAT entries go with their CT entry */
};

/* and how. */
enum gc_map_arg {
	/* Or'ed into the selector: visit every entry and count it, read and
	 * delete nothing (what the walk alone costs; bench/gc.py reports it).
	 */
	GC_WALK_ONLY = 0x80000000U,
	/* Count the NAT entries: the only thing the NAT map is walked for. */
	GC_NAT_COUNT = GC_MAP_NAT | GC_WALK_ONLY,
};

/* Anchor the enums in BTF so the agent can check its copies (tuplet/gc.py). */
const volatile enum gc_map_sel gc_map_sel_names __attribute__((unused)) = 0;
const volatile enum gc_map_arg gc_map_arg_names __attribute__((unused)) = 0;

/* The run's buffer after a 14-byte Ethernet header (which it ignores). */
struct gc_args {
	__u32 now;               /* in: delete entries with lifetime < now */
	__u32 map;               /* in: enum gc_map_sel */
	__u64 alive;             /* out */
	__u64 deleted;           /* out */
	__u64 nat_deleted;       /* out */
	__u64 delete_failed;     /* out: expired, but gone before the delete */
};
ASSERT_SIZE(struct gc_args, 40);

#define GC_ARGS_OFF 14

struct gc_ctx {
	__u32 now;
	__u64 alive;
	__u64 deleted;
	__u64 nat_deleted;
	__u64 delete_failed;
};

static long gc_count(struct bpf_map *map, struct ipv4_ct_tuple *key, struct ct_entry *e,
		     struct gc_ctx *ctx)
{
	ctx->alive++;
	return 0;
}

static long gc_entry(struct bpf_map *map, struct ipv4_ct_tuple *key, struct ct_entry *e,
		     struct gc_ctx *ctx)
{
	struct ipv4_ct_tuple nat = {};

	if (READ_ONCE(e->lifetime) >= ctx->now) {
		ctx->alive++;
		return 0;
	}
	if (ct_owns_nat(key, e)) {
		nat4_key_for_ct(key, &nat);
		if (bpf_map_delete_elem(&tpl_nat4_v1, &nat) == 0)
			ctx->nat_deleted++;
	}
	if (bpf_map_delete_elem(map, key) == 0)
		ctx->deleted++;
	else
		ctx->delete_failed++;
	return 0;
}

/* One walker per map, each a subprogram of its own: every bpf_for_each_map_elem
 * call instruction then sees one map. Left to itself clang merges the calls
 * into one instruction fed different maps, which 6.1's verifier rejects
 * ("tail_call abusing map_ptr"); 6.6 and later accept it.
 */
#define GC_WALKER(fn, map)							\
static __noinline int fn(struct gc_ctx *ctx, int count_only)		\
{									\
	if (!ctx)							\
		return 0;						\
	if (count_only)							\
		return bpf_for_each_map_elem(&map, gc_count, ctx, 0);	\
	return bpf_for_each_map_elem(&map, gc_entry, ctx, 0);		\
}

GC_WALKER(gc_walk_tcp, tpl_ct4_v1)
GC_WALKER(gc_walk_any, tpl_ct_any4_v1)
GC_WALKER(gc_walk_syn, tpl_ct4_syn_v1)

static __noinline int gc_walk_nat(struct gc_ctx *ctx)
{
	if (!ctx)
		return 0;
	return bpf_for_each_map_elem(&tpl_nat4_v1, gc_count, ctx, 0);
}

SEC("tc")
int tpl_ct_gc(struct __sk_buff *skb)
{
	struct gc_args args;
	struct gc_ctx ctx = {};
	__u32 count_only;

	if (bpf_skb_load_bytes(skb, GC_ARGS_OFF, &args, sizeof(args)) < 0)
		return -1;
	ctx.now = args.now;
	count_only = !!(args.map & GC_WALK_ONLY);
	switch (args.map & ~GC_WALK_ONLY) {
	case GC_MAP_TCP:
		gc_walk_tcp(&ctx, count_only);
		break;
	case GC_MAP_ANY:
		gc_walk_any(&ctx, count_only);
		break;
	case GC_MAP_SYN:
		gc_walk_syn(&ctx, count_only);
		break;
	case GC_MAP_NAT:
		if (!count_only)
			return -1;   /* NAT entries are deleted with their CT entry, never walked */
		gc_walk_nat(&ctx);
		break;
	default:
		return -1;
	}
	args.alive = ctx.alive;
	args.deleted = ctx.deleted;
	args.nat_deleted = ctx.nat_deleted;
	args.delete_failed = ctx.delete_failed;
	if (bpf_skb_store_bytes(skb, GC_ARGS_OFF, &args, sizeof(args), 0) < 0)
		return -1;
	return 0;
}
