// SPDX-License-Identifier: GPL-2.0
/* In-kernel conntrack garbage collection.
 *
 * tpl_ct_gc is never attached: the agent runs it with BPF_PROG_TEST_RUN on a
 * small buffer that carries its arguments and receives its results. One run
 * walks one conntrack map with bpf_for_each_map_elem and deletes the entries
 * whose lifetime is below `now`, together with the NAT entries they own.
 *
 * tpl_ct_gc walks a whole map in one run (the kernel does not preempt it):
 * bench/gc.py keeps it as the walk floor. A pass uses the sliced programs
 * below instead (README, "Garbage collection"):
 *
 * - bpf/ct_gc_iter.c: iter/bpf_map_elem programs, read in small slices (a
 *   separate object: some kernels refuse them, and then the pass falls back).
 * - tpl_ct_gc_keys: the batch fallback's deleter, run with BPF_PROG_TEST_RUN
 *   on a few keys read with BPF_MAP_LOOKUP_BATCH and the lifetime user space
 *   saw for each.
 *
 * Both delete an entry only if its lifetime, re-read as the last step before
 * bpf_map_delete_elem, is still the one judged expired (the datapath refreshes
 * the lifetime of every entry it uses), and delete the owned NAT entry only
 * after the conntrack entry is gone.
 */
#include "lib/compiler.h"
#include "lib/conntrack_types.h"
#include "lib/conntrack_map.h"
#include "lib/nat_map.h"
#include "lib/ct_gc.h"

char LICENSE[] SEC("license") = "GPL";

/* gc_args.map: which map to walk (tuplet/gc.py _MAP_SELECTOR), */
enum gc_map_sel {
	GC_MAP_TCP = 0,
	GC_MAP_ANY = 1,
	GC_MAP_SYN = 2,
	GC_MAP_NAT = 3,          /* count only (GC_WALK_ONLY): NAT entries go with their CT entry */
	GC_MAP_TCP6 = 4,         /* the IPv6 tables */
	GC_MAP_ANY6 = 5,
	GC_MAP_SYN6 = 6,
	GC_MAP_NAT6 = 7,         /* the IPv6 NAT table: count only, as GC_MAP_NAT */
};

/* and how. */
enum gc_map_arg {
	/* Or'ed into the selector: visit every entry and count it, read and
	 * delete nothing (what the walk alone costs; bench/gc.py reports it).
	 */
	GC_WALK_ONLY = 0x80000000U,
	/* Count the NAT entries: the only thing the NAT maps are walked for. */
	GC_NAT_COUNT = GC_MAP_NAT | GC_WALK_ONLY,
	GC_NAT6_COUNT = GC_MAP_NAT6 | GC_WALK_ONLY,
};

/* Anchor the enums in BTF so the agent can check its copies (tuplet/gc.py). */
const volatile enum gc_map_sel gc_map_sel_names __attribute__((unused)) = 0;
const volatile enum gc_map_arg gc_map_arg_names __attribute__((unused)) = 0;

/* The run's buffer after a 14-byte Ethernet header (which it ignores). */
struct gc_args {
	__u32 now;               /* in: delete entries whose lifetime is before now (wrap-safe) */
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

static long gc_count(struct bpf_map *map, void *key, struct ct_entry *e,
		     struct gc_ctx *ctx)
{
	ctx->alive++;
	return 0;
}

/* One entry of a one-run walk (`key` a struct ipv{4,6}_ct_tuple by fam). */
static __always_inline long gc_entry(int fam, struct bpf_map *map, void *key, struct ct_entry *e,
				     struct gc_ctx *ctx)
{
	union ct_tuple_any nat = {};

	if (!gc_expired(READ_ONCE(e->lifetime), ctx->now)) {
		ctx->alive++;
		return 0;
	}
	if (gc_owned_nat(fam, key, e, &nat) && bpf_map_delete_elem(nat_map(fam), &nat) == 0)
		ctx->nat_deleted++;
	if (bpf_map_delete_elem(map, key) == 0)
		ctx->deleted++;
	else
		ctx->delete_failed++;
	return 0;
}

static long gc_entry4(struct bpf_map *map, struct ipv4_ct_tuple *key, struct ct_entry *e,
		      struct gc_ctx *ctx)
{
	return gc_entry(4, map, key, e, ctx);
}

static long gc_entry6(struct bpf_map *map, struct ipv6_ct_tuple *key, struct ct_entry *e,
		      struct gc_ctx *ctx)
{
	return gc_entry(6, map, key, e, ctx);
}

/* One walker per map, each a subprogram of its own: every bpf_for_each_map_elem
 * call instruction then sees one map. Left to itself clang merges the calls
 * into one instruction fed different maps, which 6.1's verifier rejects
 * ("tail_call abusing map_ptr"); 6.6 and later accept it.
 */
#define GC_WALKER(sel, name, map, table, fam)				\
static __noinline int gc_walk_##name(struct gc_ctx *ctx, int count_only) \
{									\
	if (!ctx)							\
		return 0;						\
	if (count_only)							\
		return bpf_for_each_map_elem(&map, gc_count, ctx, 0);	\
	return bpf_for_each_map_elem(&map, gc_entry##fam, ctx, 0);	\
}

GC_CT_TABLES(GC_WALKER)

#define GC_WALK_CASE(sel, name, map, table, fam)			\
	case sel:							\
		gc_walk_##name(&ctx, count_only);			\
		break;

/* The NAT tables, counted only: X(selector, short name, map). */
#define GC_NAT_TABLES(X)						\
	X(GC_MAP_NAT, nat, tpl_nat4_v1)					\
	X(GC_MAP_NAT6, nat6, tpl_nat6_v1)

#define GC_NAT_WALKER(sel, name, map)					\
static __noinline int gc_walk_##name(struct gc_ctx *ctx)		\
{									\
	if (!ctx)							\
		return 0;						\
	return bpf_for_each_map_elem(&map, gc_count, ctx, 0);		\
}

GC_NAT_TABLES(GC_NAT_WALKER)

/* NAT entries are deleted with their CT entry, never walked but to count them. */
#define GC_NAT_CASE(sel, name, map)					\
	case sel:							\
		if (!count_only)					\
			return -1;					\
		gc_walk_##name(&ctx);					\
		break;

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
	GC_CT_TABLES(GC_WALK_CASE)
	GC_NAT_TABLES(GC_NAT_CASE)
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

/* tpl_ct_gc_keys' buffer after the Ethernet header: gc_keys_args, then
 * `count` records, each a key and the lifetime user space read with it.
 */
struct gc_keys_args {
	__u32 map;               /* in: enum gc_map_sel */
	__u32 count;             /* in: records that follow, at most GC_KEYS_MAX */
	__u32 now;               /* in */
	__u32 pad;
	__u32 verdicts[6];       /* out: records per enum gc_verdict */
};
ASSERT_SIZE(struct gc_keys_args, 40);

struct gc_key_rec {
	struct ipv4_ct_tuple key;
	__u16 pad;
	__u32 seen;              /* the lifetime judged expired */
};
ASSERT_SIZE(struct gc_key_rec, 20);

/* The same for an IPv6 table. */
struct gc_key6_rec {
	struct ipv6_ct_tuple key;
	__u16 pad;
	__u32 seen;
};
ASSERT_SIZE(struct gc_key6_rec, 44);

/* Records one run of tpl_ct_gc_keys takes: bounds the run's time. */
enum gc_keys_limit {
	GC_KEYS_MAX = 128,
};
const volatile enum gc_keys_limit gc_keys_limit_names __attribute__((unused)) = 0;
#define GC_KEYS_OFF (GC_ARGS_OFF + sizeof(struct gc_keys_args))

struct gc_keys_ctx {
	struct __sk_buff *skb;
	struct gc_keys_args *a;
	int err;
};

/* One record per bpf_loop step (a bounded C loop costs 6.1's verifier a state per
 * iteration and counter value); one step function per map, as for the walkers.
 */
#define GC_KEYS_DELETER(fn, map, table, rec, fam)				\
static long fn##_step(__u64 i, struct gc_keys_ctx *c)			\
{									\
	rec r;								\
	struct ct_entry *e;						\
	__u8 v;								\
									\
	if (i >= GC_KEYS_MAX || bpf_skb_load_bytes(c->skb, GC_KEYS_OFF + i * sizeof(r), &r, sizeof(r)) < 0) { \
		c->err = -1;						\
		return 1;						\
	}								\
	e = bpf_map_lookup_elem(&map, &r.key);				\
	if (!e)								\
		v = GC_V_GONE;						\
	else if (!gc_test_unprotected &&				\
		 (READ_ONCE(e->lifetime) != r.seen || !gc_expired(r.seen, c->a->now))) \
		v = GC_V_REFRESHED;					\
	else								\
		v = gc_delete_if_unchanged(fam, &map, &r.key, e, r.seen, table); \
	if (v < GC_V_COUNTED)						\
		c->a->verdicts[v]++;					\
	return 0;							\
}									\
static __noinline int fn(struct __sk_buff *skb, struct gc_keys_args *a)	\
{									\
	struct gc_keys_ctx c = { .skb = skb, .a = a };			\
									\
	if (!skb || !a || a->count > GC_KEYS_MAX)			\
		return -1;						\
	bpf_loop(a->count, fn##_step, &c, 0);				\
	return c.err;							\
}

#define gc_key4_rec gc_key_rec
#define GC_KEYS(sel, name, map, table, fam)				\
	GC_KEYS_DELETER(gc_keys_##name, map, table, struct gc_key##fam##_rec, fam)
GC_CT_TABLES(GC_KEYS)

#define GC_KEYS_CASE(sel, name, map, table, fam)			\
	case sel:							\
		ret = gc_keys_##name(skb, &a);				\
		break;

SEC("tc")
int tpl_ct_gc_keys(struct __sk_buff *skb)
{
	struct gc_keys_args a;
	int ret;

	if (bpf_skb_load_bytes(skb, GC_ARGS_OFF, &a, sizeof(a)) < 0)
		return -1;
	__builtin_memset(a.verdicts, 0, sizeof(a.verdicts));
	switch (a.map) {
	GC_CT_TABLES(GC_KEYS_CASE)
	default:
		return -1;
	}
	if (ret < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, GC_ARGS_OFF, &a, sizeof(a), 0) < 0)
		return -1;
	return 0;
}

/* DESTROY records of user-space deletions (ct flush, endpoint removal, ct
 * delete), built by user space (tuplet/conntrack/notify.py) and run here with
 * BPF_PROG_TEST_RUN so they reach listeners through the same ring as the
 * datapath's and GC's. The buffer after the 14-byte header: a __u32 count,
 * then count struct ct_notify_rec. Returns the records written.
 */
#define CT_NOTIFY_EMIT_MAX 64
#define CT_NOTIFY_EMIT_OFF (GC_ARGS_OFF + 4)

struct ct_notify_emit_ctx {
	struct __sk_buff *skb;
	__u32 written;
};

static long ct_notify_emit_step(__u64 i, struct ct_notify_emit_ctx *c)
{
	struct ct_notify_rec r;
	struct ct_notify_cpu *cpu;
	__u32 zero = 0;

	if (i >= CT_NOTIFY_EMIT_MAX ||
	    bpf_skb_load_bytes(c->skb, CT_NOTIFY_EMIT_OFF + i * sizeof(r), &r, sizeof(r)) < 0)
		return 1;
	r.ktime_ns = bpf_ktime_get_ns();
	r.type = CT_NOTIFY_DESTROY;
	if (bpf_ringbuf_output(&tpl_ct_notify_v1, &r, sizeof(r), 0) == 0) {
		c->written++;
	} else {
		cpu = bpf_map_lookup_elem(&tpl_ct_notify_lost_v1, &zero);
		if (cpu)
			cpu->lost++;
	}
	return 0;
}

SEC("tc")
int tpl_ct_notify_emit(struct __sk_buff *skb)
{
	struct ct_notify_emit_ctx c = { .skb = skb };
	__u32 count;

	if (!ct_notify_on())
		return 0;
	if (bpf_skb_load_bytes(skb, GC_ARGS_OFF, &count, sizeof(count)) < 0 || count > CT_NOTIFY_EMIT_MAX)
		return -1;
	bpf_loop(count, ct_notify_emit_step, &c, 0);
	return c.written;
}
