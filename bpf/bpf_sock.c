// SPDX-License-Identifier: GPL-2.0
/* Socket LB: cgroup v2 programs that translate a ClusterIP at the socket, so
 * the packets already carry the backend's address and need no per-packet NAT
 * and no CT_SERVICE entry (the reference's default for ClusterIP).
 *
 *   cil_sock4_connect      connect() of TCP and UDP: VIP:port -> a backend
 *   cil_sock4_sendmsg      sendto() of unconnected UDP: the same, per datagram
 *   cil_sock4_recvmsg      recvfrom() of UDP: the backend's address -> VIP:port
 *   cil_sock4_getpeername  getpeername(): the backend's address -> VIP:port
 *
 * The backend is chosen as the per-packet path chooses (lb_select.h): the
 * service's affinity backend if it has affinity (keyed by the network
 * namespace's cookie, as the reference), else the slot of the current bank that
 * a hash of the socket cookie and the service address picks. The reverse map
 * remembers, per socket cookie and backend, the service address to show.
 * Services reachable from outside the node (NodePort, LoadBalancer) are left to
 * the per-packet path.
 */
#include "lib/compiler.h"
#include "lib/time.h"
#include "lib/hash.h"
#include "lib/lb_map.h"
#include "lib/lb6_map.h"
#include "lib/lb_select.h"
#include "lib/sock_lb_map.h"

char LICENSE[] SEC("license") = "GPL";

#define SYS_REJECT 0
#define SYS_PROCEED 1

static __always_inline __be16 sock4_user_port(const struct bpf_sock_addr *ctx)
{
	volatile __u32 port = ctx->user_port;

	return (__be16)port;
}

static __always_inline void sock4_affinity_key(struct lb4_sock_affinity_key *k, const struct lb4_service *svc,
					       __u64 netns)
{
	k->netns_cookie = netns;
	k->rev_nat_index = svc->rev_nat_index;
	k->pad = 0;
	k->pad2 = 0;
}

/* The namespace's backend within the affinity timeout, or 0. */
static __always_inline __u32 sock4_affinity_backend(const struct lb4_service *svc, __u64 netns, __u32 now)
{
	struct lb4_sock_affinity_key k;
	struct lb_affinity_val *v;

	sock4_affinity_key(&k, svc, netns);
	v = bpf_map_lookup_elem(&tpl_lb4_sock_affinity_v1, &k);
	if (!v || tpl_time_after(now, READ_ONCE(v->last_used) + svc->affinity_timeout))
		return 0;
	return READ_ONCE(v->backend_id);
}

static __always_inline void sock4_affinity_update(const struct lb4_service *svc, __u64 netns, __u32 id,
						  __u32 now)
{
	struct lb_affinity_val val = { .last_used = now, .backend_id = id };
	struct lb4_sock_affinity_key k;
	struct lb_affinity_val *v;

	sock4_affinity_key(&k, svc, netns);
	v = bpf_map_lookup_elem(&tpl_lb4_sock_affinity_v1, &k);
	if (v && READ_ONCE(v->backend_id) == id && READ_ONCE(v->last_used) == now)
		return;
	bpf_map_update_elem(&tpl_lb4_sock_affinity_v1, &k, &val, BPF_ANY);
}

/* Remember what the socket's peer is to the application (written only when it changes). */
static __always_inline void sock4_remember(__u64 cookie, const struct lb4_backend *be, const struct lb4_key *key,
					   __u16 rev_nat)
{
	struct lb4_sock_rev_key k = { .cookie = cookie, .address = be->address, .port = be->port };
	struct lb4_sock_rev_val v = { .address = key->address, .port = key->dport, .rev_nat_index = rev_nat };
	struct lb4_sock_rev_val *old = bpf_map_lookup_elem(&tpl_lb4_sock_rev_nat_v1, &k);

	if (old && old->address == v.address && old->port == v.port && old->rev_nat_index == v.rev_nat_index)
		return;
	bpf_map_update_elem(&tpl_lb4_sock_rev_nat_v1, &k, &v, BPF_ANY);
}

/* connect() / sendto() to a ClusterIP: point the socket at a backend. */
static __always_inline int sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	__u8 proto = (__u8)ctx->protocol;
	struct lb4_key key = {};
	struct lb4_service *svc;
	struct lb4_backend *be;
	__u64 cookie, netns = 0;
	__u32 now, id = 0;
	bool affinity;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SYS_PROCEED;
	key.address = ctx->user_ip4;
	key.dport = sock4_user_port(ctx);
	key.proto = proto;
	svc = bpf_map_lookup_elem(&tpl_lb4_services_v1, &key);
	if (!svc || (svc->flags & LB_SVC_F_EXTERNAL))
		return SYS_PROCEED;     /* not a ClusterIP: the per-packet path decides */

	now = tpl_now();
	affinity = svc->flags & LB_SVC_F_AFFINITY;
	if (affinity) {
		netns = bpf_get_netns_cookie(ctx);
		id = sock4_affinity_backend(svc, netns, now);
		if (id && !lb_lookup_backend(PKT_FAM4, id))
			id = 0;
	}
	cookie = bpf_get_socket_cookie(ctx);
	if (!id)
		id = lb_select_slot(PKT_FAM4, &key, svc, tpl_jhash_3words((__u32)cookie, (__u32)(cookie >> 32),
									  key.address ^ key.dport, proto));
	be = lb_lookup_backend(PKT_FAM4, id);
	if (!be)
		return SYS_REJECT;      /* a service without backends: fail now (EPERM), not after retries */
	if (affinity)
		sock4_affinity_update(svc, netns, id, now);
	sock4_remember(cookie, be, &key, svc->rev_nat_index);
	ctx->user_ip4 = be->address;
	ctx->user_port = (__u32)be->port;
	return SYS_PROCEED;
}

/* recvfrom() / getpeername(): show the service address instead of the backend's,
 * while the service still exists.
 */
static __always_inline void sock4_xlate_rev(struct bpf_sock_addr *ctx)
{
	struct lb4_sock_rev_key k = {};
	struct lb4_sock_rev_val *v;
	struct lb4_service *svc;
	struct lb4_key key = {};

	k.cookie = bpf_get_socket_cookie(ctx);
	k.address = ctx->user_ip4;
	k.port = sock4_user_port(ctx);
	v = bpf_map_lookup_elem(&tpl_lb4_sock_rev_nat_v1, &k);
	if (!v)
		return;
	key.address = v->address;
	key.dport = v->port;
	key.proto = (__u8)ctx->protocol;
	svc = bpf_map_lookup_elem(&tpl_lb4_services_v1, &key);
	if (!svc || svc->rev_nat_index != v->rev_nat_index) {
		bpf_map_delete_elem(&tpl_lb4_sock_rev_nat_v1, &k);
		return;
	}
	ctx->user_ip4 = v->address;
	ctx->user_port = (__u32)v->port;
}

SEC("cgroup/connect4")
int cil_sock4_connect(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

SEC("cgroup/sendmsg4")
int cil_sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_xlate_fwd(ctx);
}

SEC("cgroup/recvmsg4")
int cil_sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int cil_sock4_getpeername(struct bpf_sock_addr *ctx)
{
	sock4_xlate_rev(ctx);
	return SYS_PROCEED;
}
