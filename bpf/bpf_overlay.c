// SPDX-License-Identifier: GPL-2.0
/* Program on the node's collect-metadata Geneve device.
 *
 *   cil_from_overlay  Geneve ingress, after the kernel decapsulated: a DSR
 *                     flow's packets to a pod of this node (CT_EGRESS entry
 *                     with DSRInternal and the NAT entry for its reply),
 *                     IPv4 or IPv6 inner packets, over either underlay
 *
 * The packet then goes up the stack to the pod, marked as from the tunnel
 * (the pod-side program gives its CT_INGRESS entry FromTunnel). A Geneve
 * option that is malformed, unknown with the critical bit, or not alone is
 * dropped with a counted reason.
 */
#include "lib/compiler.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/packet.h"
#include "lib/dsr.h"
#include "lib/mark.h"
/* Unused here, but every program object defines every shared map, so that
 * each can be loaded and sized alone (datapath.open_object, the tests'
 * harnesses).
 */
#include "lib/lb_map.h"
#include "lib/lb6_map.h"

char LICENSE[] SEC("license") = "GPL";

#ifndef PACKET_HOST
#define PACKET_HOST 0            /* skb->pkt_type (linux/if_packet.h; not in vmlinux.h) */
#endif

static __always_inline enum tpl_reason overlay_track(int fam, struct __sk_buff *skb)
{
	union pkt_any pkt = {};
	int ret = pkt_parse(fam, skb, &pkt, PKT_PROTO(IPPROTO_TCP) | PKT_PROTO(IPPROTO_UDP),
			    TPL_PASS_OVERLAY_UNTRACKED);

	if (tpl_has_verdict(ret))
		return ret;
	return dsr_backend(fam, skb, &pkt);
}

/* The inner packet: IPv4, else IPv6, else neither (TPL_PASS_NOT_IPV4). */
static __always_inline enum tpl_reason overlay_track_any(struct __sk_buff *skb)
{
	enum tpl_reason r = overlay_track(PKT_FAM4, skb);

	if (r == TPL_PASS_NOT_IPV4)
		r = overlay_track(PKT_FAM6, skb);
	return r;
}

SEC("tc")
int cil_from_overlay(struct __sk_buff *skb)
{
	enum tpl_reason reason = overlay_track_any(skb);

	if (reason < TPL_DROP_BASE) {
		/* The inner frame's destination MAC is the LB node's: take it as ours. */
		bpf_skb_change_type(skb, PACKET_HOST);
		tpl_mark_set(skb, TPL_MARK_FROM_TUNNEL);
	}
	return tpl_verdict(skb, reason, TPL_METRIC_NETDEV_INGRESS);
}
