/* SPDX-License-Identifier: GPL-2.0 */
/* NodePort and LoadBalancer services on the node's NIC, the LB node's side:
 * Maglev selection, DNAT to a local backend with a CT_EGRESS entry (NodePort
 * flag, rev-NAT index) or to a remote one over DSR (dsr_encap), and the
 * reply's reverse NAT on its way out of the node. The backend node's side of
 * DSR is in dsr.h. One body for IPv4 and IPv6 (fam: PKT_FAM4 / PKT_FAM6, p a
 * struct pkt4 or pkt6), as lb.h and conntrack.h.
 */
#ifndef TUPLET_NODEPORT_H
#define TUPLET_NODEPORT_H

#include "compiler.h"
#include "config.h"
#include "reasons.h"
#include "packet.h"
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
static __always_inline enum tpl_reason nodeport_lb(int fam, struct __sk_buff *skb, void *p)
{
	union ct_tuple_any tuple = {};
	struct ct_state st = {};
	union lb_backend be;
	struct lb4_service *svc;
	union lb_key key;
	__u16 rev_nat;
	__u32 now;
	int ret;

	svc = lb_lookup_service(fam, &key, p);
	if (!svc || !(svc->flags & LB_SVC_F_EXTERNAL))
		return TPL_PASS_NETDEV_UNTRACKED;
	rev_nat = svc->rev_nat_index;
	now = tpl_now();

	ret = lb_local(fam, skb, p, &key, svc, LB_SELECT_MAGLEV, !overlay_ifindex, &be, &tuple, now);
	if (tpl_has_verdict(ret))
		return ret;
	/* Remote backend: the CT_SERVICE entry is all this node keeps. */
	if (overlay_ifindex && lb_backend_remote(fam, &be))
		return dsr_encap(fam, skb, p, &be, &key);

	ret = ct_lookup(fam, &tuple, p, CT_EGRESS, skb->len, &st, now);
	if (ret != CT_NEW)
		return ct_status_reason(ret);
	ret = ct_may_create(fam, p);
	if (tpl_has_verdict(ret))
		return ret;

	__builtin_memset(&st, 0, sizeof(st));
	st.rev_nat_index = rev_nat;
	st.node_port = 1;
	st.ifindex = skb->ifindex;
	st.src_sec_id = endpoint_identity_src(fam, p);
	ret = ct_create(fam, &tuple, CT_EGRESS, &st, PKT(p, fam, tcp_flags), skb->len, now);
	return tpl_verdict_or(ret, TPL_PASS_CT_NEW);
}

/* A packet leaving the node on its NIC: the reply of a NodePort flow (it hits
 * the flow's CT_EGRESS entry as a reply) gets the service address back; so
 * does the reply of a DSR flow (DSRInternal entry), from its NAT entry, and
 * goes straight to the client. A node with neither NIC-reachable services
 * (of either family: the writer sets tpl_lb4_external_v1 for both) nor an
 * overlay has no such flows: its packets pass without a table probe.
 */
static __always_inline enum tpl_reason nodeport_rev_nat(int fam, struct __sk_buff *skb, void *p)
{
	union ct_tuple_any t;
	__u8 proto = PKT(p, fam, proto);
	bool is_tcp = proto == IPPROTO_TCP;
	__u8 tcp_flags = is_tcp ? PKT(p, fam, tcp_flags) : 0;
	struct ct_entry *e;
	__u16 rev_nat;
	bool in_syn, dsr;
	__u32 now;
	int ret;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return TPL_PASS_NETDEV_UNTRACKED;
	if (!overlay_ifindex && !lb4_has_external())
		return TPL_PASS_NETDEV_UNTRACKED;
	/* The reply of the flow's CT_EGRESS entry. */
	ct_tuple_reply(fam, &t, p, TUPLE_F_OUT);
	e = ct_find(fam, &t, &in_syn);
	if (!e || !(e->node_port || e->dsr_internal))
		return TPL_PASS_NETDEV_UNTRACKED;
	now = tpl_now();
	ct_entry_hit(e, is_tcp, CT_INGRESS, is_tcp ? ct_tcp_action(tcp_flags) : ACTION_UNSPEC,
		     tcp_flags, skb->len, CT_REPLY, now);
	rev_nat = READ_ONCE(e->rev_nat_index);
	dsr = e->dsr_internal;
	ct_settle(fam, &t, e, in_syn, now);
	if (dsr)
		ret = dsr_reply_snat(fam, skb, p, &t);
	else if (rev_nat)
		ret = lb_rev_nat(fam, skb, p, rev_nat);
	else
		ret = TPL_CONTINUE;
	return tpl_verdict_or(ret, TPL_PASS_CT_REPLY);
}

#endif
