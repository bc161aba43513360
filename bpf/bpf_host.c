// SPDX-License-Identifier: GPL-2.0
/* Programs on the node's NIC.
 *
 *   cil_from_netdev  NIC ingress: NodePort / LoadBalancer flows to local backends,
 *                    and to remote ones over Geneve (DSR) when the node has an overlay
 *   cil_to_netdev    NIC egress:  their replies, reverse-NATed to the service address
 *                    (DSR replies of flows this node is the backend node of, too)
 *
 * Traffic that is not a service flow passes untouched (the pod-side programs
 * track it); malformed IPv4 is dropped with a counted reason.
 */
#include "lib/compiler.h"
#include "lib/config.h"
#include "lib/reasons.h"
#include "lib/metrics.h"
#include "lib/packet.h"
#include "lib/nodeport.h"

char LICENSE[] SEC("license") = "GPL";

/* Parse; returns TPL_CONTINUE with p filled for a TCP/UDP first fragment, else the reason. */
static __always_inline int netdev_parse4(struct __sk_buff *skb, struct pkt4 *p)
{
	return pkt4_parse(skb, p, PKT_PROTO(IPPROTO_TCP) | PKT_PROTO(IPPROTO_UDP), TPL_PASS_NETDEV_UNTRACKED);
}

SEC("tc")
int cil_from_netdev(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	int ret = netdev_parse4(skb, &p);

	if (!tpl_has_verdict(ret))
		ret = nodeport_lb4(skb, &p);
	if (overlay_ifindex && ret == TPL_PASS_DSR_REDIRECT) {
		tpl_verdict(skb, ret, TPL_METRIC_NETDEV_INGRESS);
		return bpf_redirect(overlay_ifindex, 0);
	}
	return tpl_verdict(skb, ret, TPL_METRIC_NETDEV_INGRESS);
}

SEC("tc")
int cil_to_netdev(struct __sk_buff *skb)
{
	struct pkt4 p = {};
	int ret = netdev_parse4(skb, &p);

	if (!tpl_has_verdict(ret))
		ret = nodeport_rev_nat4(skb, &p);
	return tpl_verdict(skb, ret, TPL_METRIC_NETDEV_EGRESS);
}
