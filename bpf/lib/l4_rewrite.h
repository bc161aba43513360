/* SPDX-License-Identifier: GPL-2.0 */
/* Rewriting a packet's IPv4 address and TCP/UDP port in place, with the IP
 * header checksum and the L4 checksum (pseudo-header included) updated
 * incrementally. BPF_F_PSEUDO_HDR keeps CHECKSUM_PARTIAL packets (locally
 * generated, checksum left to the device) correct; a UDP checksum of zero
 * ("none") stays zero.
 */
#ifndef TUPLET_L4_REWRITE_H
#define TUPLET_L4_REWRITE_H

#include "compiler.h"
#include "packet.h"
#include "reasons.h"

#define IP_CSUM_OFF 10
#define IP_SADDR_OFF 12
#define IP_DADDR_OFF 16
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6
#define L4_SPORT_OFF 0
#define L4_DPORT_OFF 2

static __always_inline int l4_csum_off(__u8 proto)
{
	return proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF;
}

/* Rewrite a TCP/UDP port at port_off, the L4 checksum at csum_off following
 * (no pseudo-header part: ports are not in it). Either family.
 */
static __always_inline int l4_rewrite_port(struct __sk_buff *skb, __u32 port_off, __u32 csum_off,
					   __be16 old_port, __be16 port, __u64 mangled)
{
	if (old_port == port)
		return TPL_CONTINUE;
	if (bpf_l4_csum_replace(skb, csum_off, old_port, port, mangled | sizeof(port)) < 0)
		return TPL_DROP_NAT_REWRITE;
	if (bpf_skb_store_bytes(skb, port_off, &port, sizeof(port), 0) < 0)
		return TPL_DROP_NAT_REWRITE;
	return TPL_CONTINUE;
}

/* Rewrite the source (to_src) or destination address and port of p's packet.
 * Returns TPL_CONTINUE, or TPL_DROP_NAT_REWRITE when the kernel refused a store.
 */
static __always_inline int pkt4_rewrite(struct __sk_buff *skb, struct pkt4 *p, bool to_src,
					__be32 addr, __be16 port)
{
	__u32 ip_off = p->l3_off + (to_src ? IP_SADDR_OFF : IP_DADDR_OFF);
	__u32 port_off = p->l4_off + (to_src ? L4_SPORT_OFF : L4_DPORT_OFF);
	__u32 csum_off = p->l4_off + l4_csum_off(p->proto);
	__be32 old_addr = to_src ? p->saddr : p->daddr;
	__be16 old_port = to_src ? p->sport : p->dport;
	__u64 mangled = p->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int ret;

	if (p->proto != IPPROTO_TCP && p->proto != IPPROTO_UDP)
		return TPL_DROP_NAT_REWRITE;

	if (old_addr != addr) {
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, addr,
					BPF_F_PSEUDO_HDR | mangled | sizeof(addr)) < 0)
			return TPL_DROP_NAT_REWRITE;
		if (bpf_l3_csum_replace(skb, p->l3_off + IP_CSUM_OFF, old_addr, addr, sizeof(addr)) < 0)
			return TPL_DROP_NAT_REWRITE;
		if (bpf_skb_store_bytes(skb, ip_off, &addr, sizeof(addr), 0) < 0)
			return TPL_DROP_NAT_REWRITE;
	}
	ret = l4_rewrite_port(skb, port_off, csum_off, old_port, port, mangled);
	if (tpl_has_verdict(ret))
		return ret;
	if (to_src) {
		p->saddr = addr;
		p->sport = port;
	} else {
		p->daddr = addr;
		p->dport = port;
	}
	return TPL_CONTINUE;
}

static __always_inline int pkt4_dnat(struct __sk_buff *skb, struct pkt4 *p, __be32 addr, __be16 port)
{
	return pkt4_rewrite(skb, p, false, addr, port);
}

static __always_inline int pkt4_snat(struct __sk_buff *skb, struct pkt4 *p, __be32 addr, __be16 port)
{
	return pkt4_rewrite(skb, p, true, addr, port);
}

#endif
