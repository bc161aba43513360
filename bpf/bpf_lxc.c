// SPDX-License-Identifier: GPL-2.0
/* Programs on a pod's host-side veth.
 *
 *   cil_from_container  veth ingress: packets the pod sends (CT_EGRESS)
 *   cil_to_container    veth egress:  packets the pod receives (CT_INGRESS)
 *
 * Both track the packet and let the kernel forward it; malformed packets are
 * dropped with a counted reason, anything that is not IPv4 passes untouched.
 */
#include "lib/compiler.h"
#include "lib/config.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/packet.h"
#include "lib/endpoint.h"
#include "lib/conntrack.h"
#include "lib/nat_map.h"

char LICENSE[] SEC("license") = "GPL";

static __always_inline enum tpl_reason ct_status_reason(int status)
{
	switch (status) {
	case CT_ESTABLISHED:
		return TPL_PASS_CT_ESTABLISHED;
	case CT_REPLY:
		return TPL_PASS_CT_REPLY;
	case CT_RELATED:
		return TPL_PASS_CT_RELATED;
	case CT_REOPENED:
		return TPL_PASS_CT_REOPENED;
	}
	return TPL_PASS_CT_NEW;
}

/* Track one packet of a local endpoint. Returns the verdict reason. */
static __always_inline enum tpl_reason lxc_track4(struct __sk_buff *skb, enum ct_dir dir)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_state st = {};
	struct pkt4 p = {};
	int ret;

	ret = pkt4_parse_l3(skb, &p);
	if (ret == 0)
		return TPL_PASS_NOT_IPV4;
	if (ret != 1)
		return ret;
	if (p.fragment)
		return TPL_PASS_FRAGMENT;
	if (p.proto != IPPROTO_TCP && p.proto != IPPROTO_UDP && p.proto != IPPROTO_ICMP)
		return TPL_PASS_UNTRACKED_PROTO;
	ret = pkt4_parse_l4(skb, &p);
	if (ret)
		return ret;

	ret = ct_lookup4(&tuple, &p, dir, skb->len, &st);
	if (ret != CT_NEW)
		return ct_status_reason(ret);

	if (tuple.flags & TUPLE_F_RELATED)
		return TPL_PASS_ICMP_UNRELATED;
	/* A reset for a flow we do not know ends nothing: do not track it. */
	if (p.proto == IPPROTO_TCP && (p.tcp_flags & TCP_FLAG_RST))
		return TPL_PASS_CT_UNTRACKED_RST;

	st.src_sec_id = endpoint_identity4(p.saddr);
	ret = ct_create4(&tuple, dir, &st, p.tcp_flags, skb->len);
	if (ret)
		return ret;
	return TPL_PASS_CT_NEW;
}

SEC("tc")
int cil_from_container(struct __sk_buff *skb)
{
	return tpl_verdict(skb, lxc_track4(skb, CT_EGRESS), TPL_METRIC_EGRESS);
}

SEC("tc")
int cil_to_container(struct __sk_buff *skb)
{
	return tpl_verdict(skb, lxc_track4(skb, CT_INGRESS), TPL_METRIC_INGRESS);
}
