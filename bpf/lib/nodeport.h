/* SPDX-License-Identifier: GPL-2.0 */
/* NodePort and LoadBalancer services on the node's NIC, the LB node's side:
 * Maglev selection, DNAT to a local backend with a CT_EGRESS entry (NodePort
 * flag, rev-NAT index) or to a remote one over DSR (dsr_encap4), and the
 * reply's reverse NAT on its way out of the node. The backend node's side of
 * DSR is in dsr.h.
 */
#ifndef TUPLET_NODEPORT_H
#define TUPLET_NODEPORT_H

#include "compiler.h"
#include "config.h"
#include "reasons.h"
#include "packet.h"
#include "l4_rewrite.h"
#include "endpoint.h"
#include "conntrack_types.h"
#include "conntrack.h"
#include "lb_map.h"
#include "lb6_map.h"
#include "lb.h"
#include "nat_map.h"
#include "dsr.h"

/* A packet entering the node on its NIC. Service flows are DNATed to their
 * backend and tracked; a flow to a backend on another node goes there over
 * Geneve when the node has an overlay device (TPL_PASS_DSR_REDIRECT: the
 * caller redirects), else it is dropped. Anything else is left to the stack
 * untouched.
 */
static __always_inline enum tpl_reason nodeport_lb4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple tuple = {};
	struct ct_state st = {};
	union lb_backend be;
	struct lb4_service *svc;
	union lb_key key;
	__u16 rev_nat;
	__u32 now;
	int ret;

	svc = lb_lookup_service(PKT_FAM4, &key, p);
	if (!svc || !(svc->flags & LB_SVC_F_EXTERNAL))
		return TPL_PASS_NETDEV_UNTRACKED;
	rev_nat = svc->rev_nat_index;
	now = tpl_now();

	ret = lb_local(PKT_FAM4, skb, p, &key, svc, LB_SELECT_MAGLEV, !overlay_ifindex, &be, &tuple, now);
	if (tpl_has_verdict(ret))
		return ret;
	/* Remote backend: the CT_SERVICE entry is all this node keeps. */
	if (overlay_ifindex && (be.b4.flags & LB_BACKEND_F_REMOTE))
		return dsr_encap4(skb, p, be.b4.node_addr, key.k4.address, key.k4.dport);

	ret = ct_lookup4(&tuple, p, CT_EGRESS, skb->len, &st, now);
	if (ret != CT_NEW)
		return ct_status_reason(ret);
	ret = ct_may_create4(p);
	if (tpl_has_verdict(ret))
		return ret;

	__builtin_memset(&st, 0, sizeof(st));
	st.rev_nat_index = rev_nat;
	st.node_port = 1;
	st.ifindex = skb->ifindex;
	st.src_sec_id = endpoint_identity4(p->saddr);
	ret = ct_create4(&tuple, CT_EGRESS, &st, p->tcp_flags, skb->len, now);
	return tpl_verdict_or(ret, TPL_PASS_CT_NEW);
}

/* A packet leaving the node on its NIC: the reply of a NodePort flow (it hits
 * the flow's CT_EGRESS entry as a reply) gets the service address back; so
 * does the reply of a DSR flow (DSRInternal entry), from its NAT entry, and
 * goes straight to the client. A node with neither NIC-reachable services nor
 * an overlay has no such flows: its packets pass without a table probe.
 */
static __always_inline enum tpl_reason nodeport_rev_nat4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple t;
	bool is_tcp = p->proto == IPPROTO_TCP;
	__u8 tcp_flags = is_tcp ? p->tcp_flags : 0;
	struct ipv4_ct_tuple nk;
	struct nat4_entry *nat;
	struct ct_entry *e;
	__u16 rev_nat;
	bool in_syn, dsr;
	__u32 now;
	int ret;

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return TPL_PASS_NETDEV_UNTRACKED;
	if (!overlay_ifindex && !lb4_has_external())
		return TPL_PASS_NETDEV_UNTRACKED;
	/* The reply of the flow's CT_EGRESS entry. */
	ct_tuple_reply4(&t, p, TUPLE_F_OUT);
	e = ct_find4(&t, &in_syn);
	if (!e || !(e->node_port || e->dsr_internal))
		return TPL_PASS_NETDEV_UNTRACKED;
	now = tpl_now();
	ct_entry_hit(e, is_tcp, CT_INGRESS, is_tcp ? ct_tcp_action(tcp_flags) : ACTION_UNSPEC,
		     tcp_flags, skb->len, CT_REPLY, now);
	rev_nat = READ_ONCE(e->rev_nat_index);
	dsr = e->dsr_internal;
	ct_settle4(&t, e, in_syn, now);
	if (dsr) {
		nat4_key_for_ct(&t, &nk);
		nat = bpf_map_lookup_elem(&tpl_nat4_v1, &nk);
		if (!nat)
			return TPL_DROP_REV_NAT_MISSING;
		ret = pkt4_snat(skb, p, nat->to_addr, nat->to_port);
		return tpl_verdict_or(ret, TPL_PASS_CT_REPLY);
	}
	if (!rev_nat)
		return TPL_PASS_CT_REPLY;
	ret = lb_rev_nat(PKT_FAM4, skb, p, rev_nat);
	return tpl_verdict_or(ret, TPL_PASS_CT_REPLY);
}

#endif
