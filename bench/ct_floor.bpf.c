// SPDX-License-Identifier: GPL-2.0
/* The conntrack floor for bench/datapath.py: the least a conntrack TC program does
 * for an established packet. Parse (as the datapath, lib/packet.h), one LRU hash
 * lookup of the 14-byte CT key, the lifetime stored. A miss inserts the entry, so
 * the bench establishes its flow by running the packet once.
 */
#include "lib/compiler.h"
#include "lib/reasons.h"
#include "lib/packet.h"
#include "lib/conntrack_types.h"
#include "lib/time.h"

#define FLOOR_LIFETIME 8000

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ipv4_ct_tuple);
	__type(value, struct ct_entry);
	__uint(max_entries, 65536);
} floor_ct SEC(".maps");

SEC("tc")
int ct_floor(struct __sk_buff *skb)
{
	struct ipv4_ct_tuple t = {};
	struct ct_entry *e, fresh = {};
	struct pkt4 p = {};

	if (tpl_has_verdict(pkt4_parse(skb, &p, PKT_PROTO(IPPROTO_TCP) | PKT_PROTO(IPPROTO_UDP),
				       TPL_PASS_UNTRACKED_PROTO)))
		return TC_ACT_OK;
	t.daddr = p.saddr;
	t.saddr = p.daddr;
	t.dport = p.dport;
	t.sport = p.sport;
	t.nexthdr = p.proto;
	e = bpf_map_lookup_elem(&floor_ct, &t);
	if (e) {
		WRITE_ONCE(e->lifetime, tpl_now() + FLOOR_LIFETIME);
		return TC_ACT_OK;
	}
	fresh.lifetime = tpl_now() + FLOOR_LIFETIME;
	bpf_map_update_elem(&floor_ct, &t, &fresh, BPF_NOEXIST);
	return TC_ACT_OK;
}
