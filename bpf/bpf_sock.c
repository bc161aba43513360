// SPDX-License-Identifier: GPL-2.0
/* Socket LB: cgroup v2 programs that translate a ClusterIP at the socket, so
 * the packets already carry the backend's address and need no per-packet NAT
 * and no CT_SERVICE entry (the reference's default for ClusterIP).
 *
 *   cil_sock{4,6}_connect      connect() of TCP and UDP: VIP:port -> a backend
 *   cil_sock{4,6}_sendmsg      sendto() of unconnected UDP: the same, per datagram
 *   cil_sock{4,6}_recvmsg      recvfrom() of UDP: the backend's address -> VIP:port
 *   cil_sock{4,6}_getpeername  getpeername(): the backend's address -> VIP:port
 *
 * One body for both families (fam: PKT_FAM4 / PKT_FAM6, the program's). The
 * address's own family may differ: an IPv6 program given an IPv4-mapped
 * address (::ffff:a.b.c.d, an AF_INET6 socket talking IPv4) translates it as
 * IPv4 (IPv4 services, backends and reverse map) and hands back the IPv4-mapped
 * result, as the reference does.
 *
 * The backend is chosen as the per-packet path chooses (lb_select.h): the
 * service's affinity backend if it has affinity (keyed by the network
 * namespace's cookie, as the reference), else the slot of the current bank that
 * a hash of the socket cookie and the service address picks (an IPv6 address
 * folded to 32 bits as lb_flow_hash folds it). The reverse map of the
 * address's family remembers, per socket cookie and backend, the service
 * address to show. Services reachable from outside the node (NodePort,
 * LoadBalancer) are left to the per-packet path.
 */
#include "lib/compiler.h"
#include "lib/time.h"
#include "lib/hash.h"
#include "lib/ipv6.h"
#include "lib/lb_map.h"
#include "lib/lb6_map.h"
#include "lib/lb_select.h"
#include "lib/sock_lb_map.h"

char LICENSE[] SEC("license") = "GPL";

#define SYS_REJECT 0
#define SYS_PROCEED 1

/* A field of a struct lb4_key / lb6_key in a union lb_key, by family. */
#define LB_KEY(k, fam, f) (*((fam) == PKT_FAM6 ? &(k)->k6.f : &(k)->k4.f))

union sock_rev_key {
	struct lb4_sock_rev_key r4;
	struct lb6_sock_rev_key r6;
};

union sock_rev_val {
	struct lb4_sock_rev_val r4;
	struct lb6_sock_rev_val r6;
};

#define SOCK_REV(v, fam, f) (*((fam) == PKT_FAM6 ? &(v)->r6.f : &(v)->r4.f))

static __always_inline void *sock_rev_map(int fam)
{
	return fam == PKT_FAM6 ? (void *)&tpl_lb6_sock_rev_nat_v1 : (void *)&tpl_lb4_sock_rev_nat_v1;
}

/* A 32-bit ctx field read whole, at its own offset from ctx, as the verifier
 * requires (otherwise the compiler may narrow the load, or load through a
 * pointer moved into the context).
 */
#define SOCK_CTX(ctx, f) (*(const volatile __u32 *)&(ctx)->f)

/* ctx's address (user_ip4 or user_ip6, user_port) and protocol as a service
 * key, and the address's family: the program's (fam), except PKT_FAM4 for an
 * IPv4-mapped address in an IPv6 program.
 */
static __always_inline int sock_ctx_key(int fam, const struct bpf_sock_addr *ctx, union lb_key *key)
{
	__u8 proto = (__u8)SOCK_CTX(ctx, protocol);
	__be16 port = (__be16)SOCK_CTX(ctx, user_port);
	union v6addr a;

	if (fam == PKT_FAM4) {
		key->k4 = (struct lb4_key){ .address = SOCK_CTX(ctx, user_ip4), .dport = port, .proto = proto };
		return PKT_FAM4;
	}
	a.p[0] = SOCK_CTX(ctx, user_ip6[0]);
	a.p[1] = SOCK_CTX(ctx, user_ip6[1]);
	a.p[2] = SOCK_CTX(ctx, user_ip6[2]);
	a.p[3] = SOCK_CTX(ctx, user_ip6[3]);
	if (ipv6_addr_is_v4mapped(&a)) {
		key->k4 = (struct lb4_key){ .address = a.p[3], .dport = port, .proto = proto };
		return PKT_FAM4;
	}
	key->k6 = (struct lb6_key){ .address = a, .dport = port, .proto = proto };
	return PKT_FAM6;
}

/* Point ctx at addr:port, an address of family afam (a __be32 or union
 * v6addr; IPv4-mapped in an IPv6 program).
 */
static __always_inline void sock_ctx_set(int fam, struct bpf_sock_addr *ctx, int afam, const void *addr,
					 __be16 port)
{
	if (fam == PKT_FAM4) {
		ctx->user_ip4 = *(const __be32 *)addr;
	} else if (afam == PKT_FAM4) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = *(const __be32 *)addr;
	} else {
		const union v6addr *a = addr;

		ctx->user_ip6[0] = a->p[0];
		ctx->user_ip6[1] = a->p[1];
		ctx->user_ip6[2] = a->p[2];
		ctx->user_ip6[3] = a->p[3];
	}
	ctx->user_port = (__u32)port;
}

static __always_inline void sock_affinity_key(struct lb4_sock_affinity_key *k, const struct lb4_service *svc,
					      __u64 netns)
{
	k->netns_cookie = netns;
	k->rev_nat_index = svc->rev_nat_index;
	k->pad = 0;
	k->pad2 = 0;
}

/* The namespace's backend within the affinity timeout, or 0 (either family:
 * rev-NAT indexes are one space).
 */
static __always_inline __u32 sock_affinity_backend(const struct lb4_service *svc, __u64 netns, __u32 now)
{
	struct lb4_sock_affinity_key k;
	struct lb_affinity_val *v;

	sock_affinity_key(&k, svc, netns);
	v = bpf_map_lookup_elem(&tpl_lb4_sock_affinity_v1, &k);
	if (!v || tpl_time_after(now, READ_ONCE(v->last_used) + svc->affinity_timeout))
		return 0;
	return READ_ONCE(v->backend_id);
}

static __always_inline void sock_affinity_update(const struct lb4_service *svc, __u64 netns, __u32 id,
						 __u32 now)
{
	struct lb_affinity_val val = { .last_used = now, .backend_id = id };
	struct lb4_sock_affinity_key k;
	struct lb_affinity_val *v;

	sock_affinity_key(&k, svc, netns);
	v = bpf_map_lookup_elem(&tpl_lb4_sock_affinity_v1, &k);
	if (v && READ_ONCE(v->backend_id) == id && READ_ONCE(v->last_used) == now)
		return;
	bpf_map_update_elem(&tpl_lb4_sock_affinity_v1, &k, &val, BPF_ANY);
}

/* The reverse-map key of (socket, peer addr:port), addr of family fam. */
static __always_inline void sock_rev_key(int fam, union sock_rev_key *k, __u64 cookie, const void *addr,
					 __be16 port)
{
	if (fam == PKT_FAM6)
		k->r6 = (struct lb6_sock_rev_key){ .cookie = cookie, .address = *(const union v6addr *)addr,
						   .port = port };
	else
		k->r4 = (struct lb4_sock_rev_key){ .cookie = cookie, .address = *(const __be32 *)addr, .port = port };
}

/* Remember what the socket's peer (backend be, at addr:port) is to the
 * application: the service at key (written only when it changes).
 */
static __always_inline void sock_remember(int fam, __u64 cookie, const void *addr, __be16 port,
					  const union lb_key *key, __u16 rev_nat)
{
	union sock_rev_key k = {};
	union sock_rev_val v = {};
	union sock_rev_val *old;
	void *map = sock_rev_map(fam);

	sock_rev_key(fam, &k, cookie, addr, port);
	if (fam == PKT_FAM6)
		v.r6 = (struct lb6_sock_rev_val){ .address = key->k6.address, .port = key->k6.dport,
						  .rev_nat_index = rev_nat };
	else
		v.r4 = (struct lb4_sock_rev_val){ .address = key->k4.address, .port = key->k4.dport,
						  .rev_nat_index = rev_nat };
	old = bpf_map_lookup_elem(map, &k);
	if (old && SOCK_REV(old, fam, port) == SOCK_REV(&v, fam, port) &&
	    SOCK_REV(old, fam, rev_nat_index) == rev_nat &&
	    (fam == PKT_FAM6 ? ipv6_addr_equal(&old->r6.address, &v.r6.address) : old->r4.address == v.r4.address))
		return;
	bpf_map_update_elem(map, &k, &v, BPF_ANY);
}

/* connect() / sendto() to a ClusterIP: point the socket at a backend. */
static __always_inline int sock_xlate_fwd(int fam, struct bpf_sock_addr *ctx)
{
	union lb_key key = {};
	struct lb4_service *svc;
	__u64 cookie, netns = 0;
	__u32 now, id = 0;
	const void *addr;
	__be32 folded;
	bool affinity;
	__be16 port;
	void *be;
	int afam;
	__u8 proto;

	afam = sock_ctx_key(fam, ctx, &key);
	proto = LB_KEY(&key, afam, proto);
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	svc = bpf_map_lookup_elem(lb_services_map(afam), &key);
	if (!svc || (svc->flags & LB_SVC_F_EXTERNAL))
		return SYS_PROCEED;     /* not a ClusterIP: the per-packet path decides */

	now = tpl_now();
	affinity = svc->flags & LB_SVC_F_AFFINITY;
	if (affinity) {
		netns = bpf_get_netns_cookie(ctx);
		id = sock_affinity_backend(svc, netns, now);
		if (id && !lb_lookup_backend(afam, id))
			id = 0;
	}
	cookie = bpf_get_socket_cookie(ctx);
	if (!id) {
		folded = afam == PKT_FAM6 ? ipv6_addr_fold(&key.k6.address) : key.k4.address;
		id = lb_select_slot(afam, &key, svc, tpl_jhash_3words((__u32)cookie, (__u32)(cookie >> 32),
								      folded ^ LB_KEY(&key, afam, dport), proto));
	}
	be = lb_lookup_backend(afam, id);
	if (!be)
		return SYS_REJECT;      /* a service without backends: fail now (EPERM), not after retries */
	if (affinity)
		sock_affinity_update(svc, netns, id, now);
	if (afam == PKT_FAM6) {
		addr = &((struct lb6_backend *)be)->address;
		port = ((struct lb6_backend *)be)->port;
	} else {
		addr = &((struct lb4_backend *)be)->address;
		port = ((struct lb4_backend *)be)->port;
	}
	sock_remember(afam, cookie, addr, port, &key, svc->rev_nat_index);
	sock_ctx_set(fam, ctx, afam, addr, port);
	return SYS_PROCEED;
}

/* recvfrom() / getpeername(): show the service address instead of the backend's,
 * while the service still exists.
 */
static __always_inline void sock_xlate_rev(int fam, struct bpf_sock_addr *ctx)
{
	union lb_key peer = {}, key = {};
	union sock_rev_key k = {};
	union sock_rev_val *v;
	struct lb4_service *svc;
	void *map;
	int afam;

	afam = sock_ctx_key(fam, ctx, &peer);
	/* The address is the first member of keys and reverse values of both families. */
	sock_rev_key(afam, &k, bpf_get_socket_cookie(ctx), &peer, LB_KEY(&peer, afam, dport));
	map = sock_rev_map(afam);
	v = bpf_map_lookup_elem(map, &k);
	if (!v)
		return;
	if (afam == PKT_FAM6)
		key.k6 = (struct lb6_key){ .address = v->r6.address, .dport = v->r6.port,
					   .proto = peer.k6.proto };
	else
		key.k4 = (struct lb4_key){ .address = v->r4.address, .dport = v->r4.port,
					   .proto = peer.k4.proto };
	svc = bpf_map_lookup_elem(lb_services_map(afam), &key);
	if (!svc || svc->rev_nat_index != SOCK_REV(v, afam, rev_nat_index)) {
		bpf_map_delete_elem(map, &k);
		return;
	}
	sock_ctx_set(fam, ctx, afam, v, SOCK_REV(v, afam, port));
}

/* Program cil_sockF_HOOK on hook cgroup/HOOKF (F: 4 or 6) running body. */
#define SOCK_PROGRAM(F, HOOK, body)							\
SEC("cgroup/" #HOOK #F)									\
int cil_sock##F##_##HOOK(struct bpf_sock_addr *ctx)					\
{											\
	body										\
}

/* The four programs of family F: cil_sockF_connect, _sendmsg, _recvmsg and
 * _getpeername on cgroup/connectF, sendmsgF, recvmsgF and getpeernameF.
 */
#define SOCK_PROGRAMS(F)								\
	SOCK_PROGRAM(F, connect, return sock_xlate_fwd(PKT_FAM##F, ctx);)		\
	SOCK_PROGRAM(F, sendmsg, return sock_xlate_fwd(PKT_FAM##F, ctx);)		\
	SOCK_PROGRAM(F, recvmsg, sock_xlate_rev(PKT_FAM##F, ctx); return SYS_PROCEED;)	\
	SOCK_PROGRAM(F, getpeername, sock_xlate_rev(PKT_FAM##F, ctx); return SYS_PROCEED;)

SOCK_PROGRAMS(4)
SOCK_PROGRAMS(6)
