// SPDX-License-Identifier: GPL-2.0
/* Test only: what the kernel's Geneve receive path leaves on a packet, for
 * BPF_PROG_TEST_RUN. The test writes a tunnel key (IPv4 or IPv6 remote) and
 * the Geneve option bytes into inject_cfg and the program under test into
 * inject_next; tunnel_inject sets them as tunnel metadata on the frame and
 * tail-calls that program (cil_from_overlay), which then reads them with
 * bpf_skb_get_tunnel_key/opt as it does after a real decapsulation.
 * mark_inject sets skb->mark (what cil_from_overlay left on the packet) and
 * tail-calls inject_next[1] (cil_to_container).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

#define INJECT_OPT_MAX 32
#define TC_ACT_SHOT 2

struct inject_cfg {
	__u32 remote_ipv4;       /* host order, as struct bpf_tunnel_key */
	__u32 remote_ipv6[4];
	__u32 ipv6;              /* nonzero: remote_ipv6 is the outer source */
	__u32 opt_len;           /* bytes of opt (a multiple of 4; 0: no options) */
	__u32 mark;              /* mark_inject: skb->mark */
	__u8 opt[INJECT_OPT_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct inject_cfg);
	__uint(max_entries, 1);
} inject_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
	__uint(max_entries, 2);
} inject_next SEC(".maps");

SEC("tc")
int tunnel_inject(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	struct inject_cfg *cfg;
	__u32 zero = 0, len;
	__u64 flags = 0;

	cfg = bpf_map_lookup_elem(&inject_cfg, &zero);
	if (!cfg)
		return TC_ACT_SHOT;
	if (cfg->ipv6) {
		__builtin_memcpy(key.remote_ipv6, cfg->remote_ipv6, sizeof(key.remote_ipv6));
		flags = BPF_F_TUNINFO_IPV6;
	} else {
		key.remote_ipv4 = cfg->remote_ipv4;
	}
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), flags) < 0)
		return TC_ACT_SHOT;
	len = cfg->opt_len;
	if (len > INJECT_OPT_MAX)
		return TC_ACT_SHOT;
	if (len && bpf_skb_set_tunnel_opt(skb, cfg->opt, len) < 0)
		return TC_ACT_SHOT;
	bpf_tail_call(skb, &inject_next, 0);
	return TC_ACT_SHOT;
}

SEC("tc")
int mark_inject(struct __sk_buff *skb)
{
	struct inject_cfg *cfg;
	__u32 zero = 0;

	cfg = bpf_map_lookup_elem(&inject_cfg, &zero);
	if (!cfg)
		return TC_ACT_SHOT;
	skb->mark = cfg->mark;
	bpf_tail_call(skb, &inject_next, 1);
	return TC_ACT_SHOT;
}
