// SPDX-License-Identifier: GPL-2.0
/* Programs on the node's NIC.
 *
 *   cil_from_netdev  NIC ingress: NodePort / LoadBalancer flows to local backends,
 *                    and to remote ones over Geneve (DSR) when the node has an overlay
 *   cil_to_netdev    NIC egress:  their replies, reverse-NATed to the service address
 *                    (DSR replies of flows this node is the backend node of, too)
 *
 * Both IPv4 and IPv6. Traffic that is not a service flow (IPv6 neighbour
 * discovery, router advertisements, ICMPv6 included) passes untouched (the
 * pod-side programs track it); malformed IPv4 / IPv6 is dropped with a
 * counted reason.
 */
#include "lib/compiler.h"
#include "lib/config.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/packet.h"
#include "lib/nodeport.h"

char LICENSE[] SEC("license") = "GPL";

/* One packet of family fam through the NIC's service path (ingress: DNAT,
 * egress: reverse NAT), parsed into pkt. Returns the verdict reason:
 * TPL_PASS_NOT_IPV4 when the packet is not of that family.
 */
static __always_inline enum tpl_reason netdev_lb(int fam, struct __sk_buff *skb, union pkt_any *pkt, bool ingress)
{
	int ret = pkt_parse(fam, skb, pkt, PKT_PROTO(IPPROTO_TCP) | PKT_PROTO(IPPROTO_UDP),
			    TPL_PASS_NETDEV_UNTRACKED);

	if (tpl_has_verdict(ret))
		return ret;
	return ingress ? nodeport_lb(fam, skb, pkt) : nodeport_rev_nat(fam, skb, pkt);
}

/* IPv4, else IPv6, else neither (TPL_PASS_NOT_IPV4), as bpf_lxc.c's
 * lxc_track_any; one packet buffer for both (the stack: the 6.1 verifier
 * counts ct_notify_write's frame on top of this one, within 512 bytes).
 */
static __always_inline enum tpl_reason netdev_lb_any(struct __sk_buff *skb, bool ingress)
{
	union pkt_any pkt = {};
	enum tpl_reason r = netdev_lb(PKT_FAM4, skb, &pkt, ingress);

	if (r == TPL_PASS_NOT_IPV4)
		r = netdev_lb(PKT_FAM6, skb, &pkt, ingress);
	return r;
}

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	int ret = netdev_lb_any(skb, true);

	if (overlay_ifindex && ret == TPL_PASS_DSR_REDIRECT) {
		tpl_verdict(skb, ret, TPL_METRIC_NETDEV_INGRESS);
		return bpf_redirect(overlay_ifindex, 0);
	}
	return tpl_verdict(skb, ret, TPL_METRIC_NETDEV_INGRESS);
}

SEC("tc")
int cil_to_netdev(struct __sk_buff *skb)
{
	return tpl_verdict(skb, netdev_lb_any(skb, false), TPL_METRIC_NETDEV_EGRESS);
}
