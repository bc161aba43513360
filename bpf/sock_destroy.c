// SPDX-License-Identifier: GPL-2.0
/* Socket LB's clean-up of removed UDP backends: an iter/udp program that
 * destroys (bpf_sock_destroy, Linux 6.5+) the connected UDP sockets a
 * socket-LB connect() pointed at a backend the service no longer has, as the
 * reference does. The agent decides which (socket cookie, backend address,
 * port) are stale from the reverse maps (tpl_lb4_sock_rev_nat_v1,
 * tpl_lb6_sock_rev_nat_v1) and the service maps, puts them in the target map,
 * and reads the iterator once in each network namespace (an iter/udp walks
 * only the sockets of the namespace it is opened in). The target map holds
 * both families as struct lb6_sock_rev_key, an IPv4 backend IPv4-mapped: so an
 * AF_INET6 socket connected to an IPv4-mapped address (socket LB gave it an
 * IPv4 backend) matches as an AF_INET one does. Each destroyed socket is
 * written to the iterator's output as its target key. The socket's next
 * recv()/send() fails with ECONNABORTED; the application opens a new socket,
 * which gets a live backend.
 *
 * Its own object: a kernel without the kfunc (6.1) refuses to load it, and
 * socket LB works without it (a connected UDP socket then keeps its removed
 * backend until the application reconnects).
 */
#include "lib/compiler.h"
#include "lib/ipv6.h"
#include "lib/sock_lb_map.h"

char LICENSE[] SEC("license") = "GPL";

#define AF_INET 2
#define AF_INET6 10

extern int bpf_sock_destroy(struct sock_common *sk) __ksym;

/* The sockets to destroy, by their reverse-map key, IPv4 ones IPv4-mapped (not pinned: filled per run). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb6_sock_rev_key);
	__type(value, __u8);
	__uint(max_entries, SOCK_REV_NAT_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} tpl_sock_destroy_targets SEC(".maps");

SEC("iter/udp")
int tpl_sock_destroy_udp(struct bpf_iter__udp *ctx)
{
	struct sock *sk = (struct sock *)ctx->udp_sk;
	struct lb6_sock_rev_key k = {};
	__u16 family;

	if (!sk || sk->__sk_common.skc_state != TCP_ESTABLISHED)
		return 0;       /* not a connected socket: socket LB gave it no backend to lose */
	family = sk->__sk_common.skc_family;
	if (family == AF_INET) {
		k.address.p[2] = bpf_htonl(0xffff);
		k.address.p[3] = sk->__sk_common.skc_daddr;
	} else if (family == AF_INET6) {
		k.address.p[0] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[0];
		k.address.p[1] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[1];
		k.address.p[2] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[2];
		k.address.p[3] = sk->__sk_common.skc_v6_daddr.in6_u.u6_addr32[3];
	} else {
		return 0;
	}
	k.cookie = bpf_get_socket_cookie(sk);
	k.port = sk->__sk_common.skc_dport;
	if (!bpf_map_lookup_elem(&tpl_sock_destroy_targets, &k))
		return 0;
	if (!bpf_sock_destroy((struct sock_common *)sk))
		bpf_seq_write(ctx->meta->seq, &k, sizeof(k));
	return 0;
}
