// SPDX-License-Identifier: GPL-2.0
/* Programs on a pod's host-side veth.
 *
 *   cil_from_container  veth ingress: packets the pod sends (CT_EGRESS); a
 *                       packet to a service is DNATed to a backend first
 *   cil_to_container    veth egress:  packets the pod receives (CT_INGRESS); a
 *                       reply of a service flow gets the service address back
 *
 * Both track the packet, IPv4 or IPv6, and let the kernel forward it;
 * malformed packets are dropped with a counted reason, anything that is
 * neither IPv4 nor IPv6 passes untouched.
 */
#include "lib/compiler.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/packet.h"
#include "lib/endpoint.h"
#include "lib/conntrack_types.h"
#include "lib/conntrack.h"
#include "lib/lb_map.h"
#include "lib/lb6_map.h"
#include "lib/lb.h"
#include "lib/mark.h"
/* Unused here, but every program object defines every shared map, so that
 * each can be loaded and sized alone (datapath.open_object, the tests'
 * harnesses).
 */
#include "lib/nat_map.h"

char LICENSE[] SEC("license") = "GPL";

/* The protocols tracked for endpoints, per family. */
#define LXC_PROTOS4 (PKT_PROTO(IPPROTO_TCP) | PKT_PROTO(IPPROTO_UDP) | PKT_PROTO(IPPROTO_ICMP))
#define LXC_PROTOS6 (PKT_PROTO(IPPROTO_TCP) | PKT_PROTO(IPPROTO_UDP) | PKT_PROTO(IPPROTO_ICMPV6))

/* Track one packet of a local endpoint, of family fam (PKT_FAM4 / PKT_FAM6: one
 * body for both, conntrack.h; services too, lb.h). Returns the verdict reason.
 */
static __always_inline enum tpl_reason lxc_track(int fam, struct __sk_buff *skb, enum ct_dir dir)
{
	union ct_tuple_any tuple = {};
	union pkt_any pkt = {};
	void *p = &pkt;
	struct ct_state st = {};
	union lb_key key;
	__u16 rev_nat = 0;
	__u32 now;
	int ret;

	ret = pkt_parse(fam, skb, p, fam == PKT_FAM6 ? LXC_PROTOS6 : LXC_PROTOS4, TPL_PASS_UNTRACKED_PROTO);
	if (tpl_has_verdict(ret))
		return ret;
	now = tpl_now();   /* the clock, read once per packet */

	if (dir == CT_EGRESS) {
		struct lb4_service *svc = lb_lookup_service(fam, &key, p);

		if (svc) {
			rev_nat = svc->rev_nat_index;
			ret = lb_local(fam, skb, p, &key, svc, LB_SELECT_HASH, false, NULL, &tuple, now);
			if (tpl_has_verdict(ret))
				return ret;
		}
	}

	ret = ct_lookup(fam, &tuple, p, dir, skb->len, &st, now);
	if (ret == CT_REPLY && st.rev_nat_index && dir == CT_INGRESS) {
		int nat = lb_rev_nat(fam, skb, p, st.rev_nat_index);

		if (tpl_has_verdict(nat))
			return nat;
	}
	if (ret != CT_NEW)
		return ct_status_reason(ret);

	if (CT_TUPLE_GET(&tuple, fam, flags) & TUPLE_F_RELATED)
		return TPL_PASS_ICMP_UNRELATED;
	ret = ct_may_create(fam, p);
	if (tpl_has_verdict(ret))
		return ret;

	st.src_sec_id = endpoint_identity_src(fam, p);
	st.rev_nat_index = rev_nat;
	/* Delivered by cil_from_overlay (a DSR flow's backend node). */
	if (dir == CT_INGRESS && tpl_mark_is(skb, TPL_MARK_FROM_TUNNEL))
		st.from_tunnel = 1;
	ret = ct_create(fam, &tuple, dir, &st, PKT(p, fam, tcp_flags), skb->len, now);
	return tpl_verdict_or(ret, TPL_PASS_CT_NEW);
}

/* IPv4, else IPv6 (the IPv4 parser says TPL_PASS_NOT_IPV4 for it), else
 * neither: TPL_PASS_NOT_IPV4 from the IPv6 parser.
 */
static __always_inline enum tpl_reason lxc_track_any(struct __sk_buff *skb, enum ct_dir dir)
{
	enum tpl_reason r = lxc_track(PKT_FAM4, skb, dir);

	if (r == TPL_PASS_NOT_IPV4)
		r = lxc_track(PKT_FAM6, skb, dir);
	return r;
}

SEC("tc")
int cil_from_container(struct __sk_buff *skb)
{
	return tpl_verdict(skb, lxc_track_any(skb, CT_EGRESS), TPL_METRIC_EGRESS);
}

SEC("tc")
int cil_to_container(struct __sk_buff *skb)
{
	return tpl_verdict(skb, lxc_track_any(skb, CT_INGRESS), TPL_METRIC_INGRESS);
}
