/* SPDX-License-Identifier: GPL-2.0 */
/* NodePort and LoadBalancer services on the node's NIC: Maglev selection,
 * DNAT to a local backend with a CT_EGRESS entry (NodePort flag, rev-NAT
 * index), and the reply's reverse NAT on its way out of the node.
 */
#ifndef TUPLET_NODEPORT_H
#define TUPLET_NODEPORT_H

#include "compiler.h"
#include "reasons.h"
#include "packet.h"
#include "endpoint.h"
#include "conntrack.h"
#include "lb.h"

/* A packet entering the node on its NIC. Service flows are DNATed to their
 * backend and tracked; anything else is left to the stack untouched.
 */
static __always_inline enum tpl_reason nodeport_lb4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_state st = {};
	struct lb4_backend be;
	struct lb4_service *svc;
	struct lb4_key key;
	__u16 rev_nat;
	int ret;

	svc = lb4_lookup_service(&key, p);
	if (!svc || !(svc->flags & LB_SVC_F_EXTERNAL))
		return TPL_PASS_NETDEV_UNTRACKED;
	rev_nat = svc->rev_nat_index;

	ret = lb4_local(skb, p, &key, svc, LB_SELECT_MAGLEV, true, &be);
	if (ret)
		return ret;

	ret = ct_lookup4(&tuple, p, CT_EGRESS, skb->len, &st);
	if (ret != CT_NEW)
		return ct_status_reason(ret);
	if (p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_FLAG_RST))
		return TPL_PASS_CT_UNTRACKED_RST;

	__builtin_memset(&st, 0, sizeof(st));
	st.rev_nat_index = rev_nat;
	st.node_port = 1;
	st.ifindex = skb->ifindex;
	st.src_sec_id = endpoint_identity4(p->saddr);
	ret = ct_create4(&tuple, CT_EGRESS, &st, p->tcp_flags, skb->len);
	return ret ? ret : TPL_PASS_CT_NEW;
}

/* A packet leaving the node on its NIC: the reply of a NodePort flow (it hits
 * the flow's CT_EGRESS entry as a reply) gets the service address back.
 */
static __always_inline enum tpl_reason nodeport_rev_nat4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple t = {
		.daddr = p->daddr,
		.saddr = p->saddr,
		.dport = p->sport,
		.sport = p->dport,
		.nexthdr = p->proto,
		.flags = TUPLE_F_OUT,
	};
	bool is_tcp = p->proto == IPPROTO_TCP;
	__u8 tcp_flags = is_tcp ? p->tcp_flags : 0;
	struct ct_entry *e;
	__u16 rev_nat;
	bool in_syn;
	int ret;

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return TPL_PASS_NETDEV_UNTRACKED;
	e = ct_find4(&t, &in_syn);
	if (!e || !e->node_port)
		return TPL_PASS_NETDEV_UNTRACKED;
	ct_entry_hit(e, is_tcp, CT_INGRESS, is_tcp ? ct_tcp_action(tcp_flags) : ACTION_UNSPEC,
		     tcp_flags, skb->len, CT_REPLY);
	rev_nat = READ_ONCE(e->rev_nat_index);
	ct_settle4(&t, e, in_syn);
	if (!rev_nat)
		return TPL_PASS_CT_REPLY;
	ret = lb4_rev_nat(skb, p, rev_nat);
	return ret ? ret : TPL_PASS_CT_REPLY;
}

#endif
