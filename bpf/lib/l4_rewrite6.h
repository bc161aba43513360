/* SPDX-License-Identifier: GPL-2.0 */
/* Rewriting an IPv6 packet's address and TCP/UDP port in place (DNAT to a
 * backend, reverse NAT of its replies), the twin of l4_rewrite.h's IPv4 one.
 *
 * IPv6 has no header checksum; the addresses are in the TCP, UDP and ICMPv6
 * checksums' pseudo-header only. An address change is one 16-byte difference
 * (bpf_csum_diff over the four 32-bit words) folded into the L4 checksum with
 * BPF_F_PSEUDO_HDR, which keeps CHECKSUM_PARTIAL packets (locally generated,
 * checksum left to the device) right as in IPv4. ICMPv6 has no ports: only
 * its addresses change.
 *
 * l4_rewrite6() takes the header offsets and the current address and port;
 * pkt6_dnat() / pkt6_snat() take them from a parsed packet and keep it current.
 */
#ifndef TUPLET_L4_REWRITE6_H
#define TUPLET_L4_REWRITE6_H

#include "compiler.h"
#include "ipv6.h"
#include "l4_rewrite.h"
#include "packet.h"
#include "reasons.h"

#define IPV6_SADDR_OFF 8
#define IPV6_DADDR_OFF 24
#define ICMPV6_CSUM_OFF 2

/* Rewrite the source (to_src) or destination address of the IPv6 packet whose
 * header starts at l3_off, and, for TCP and UDP, the port of the transport
 * header at l4_off (after any extension headers). old_addr and old_port are
 * what the packet holds now. Returns TPL_CONTINUE, or TPL_DROP_NAT_REWRITE for
 * another protocol, a port change asked of ICMPv6, or a store the kernel
 * refused.
 */
static __always_inline int l4_rewrite6(struct __sk_buff *skb, __u32 l3_off, __u32 l4_off, __u8 proto,
				       bool to_src, union v6addr *old_addr, union v6addr *addr,
				       __be16 old_port, __be16 port)
{
	__u64 mangled = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__u32 csum_off;
	__s64 diff;

	if (proto == IPPROTO_ICMPV6) {
		if (old_port != port)
			return TPL_DROP_NAT_REWRITE;
		csum_off = l4_off + ICMPV6_CSUM_OFF;
	} else if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
		csum_off = l4_off + l4_csum_off(proto);
	} else {
		return TPL_DROP_NAT_REWRITE;
	}

	if (!ipv6_addr_equal(old_addr, addr)) {
		diff = bpf_csum_diff(old_addr->p, sizeof(*old_addr), addr->p, sizeof(*addr), 0);
		if (diff < 0)
			return TPL_DROP_NAT_REWRITE;
		if (bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled) < 0)
			return TPL_DROP_NAT_REWRITE;
		if (bpf_skb_store_bytes(skb, l3_off + (to_src ? IPV6_SADDR_OFF : IPV6_DADDR_OFF), addr,
					sizeof(*addr), 0) < 0)
			return TPL_DROP_NAT_REWRITE;
	}
	return l4_rewrite_port(skb, l4_off + (to_src ? L4_SPORT_OFF : L4_DPORT_OFF), csum_off, old_port, port,
			       mangled);
}

static __always_inline int pkt6_rewrite(struct __sk_buff *skb, struct pkt6 *p, bool to_src, union v6addr *addr,
					__be16 port)
{
	union v6addr *old = to_src ? &p->saddr : &p->daddr;
	int ret;

	ret = l4_rewrite6(skb, p->l3_off, p->l4_off, p->proto, to_src, old, addr, to_src ? p->sport : p->dport,
			  port);
	if (tpl_has_verdict(ret))
		return ret;
	*old = *addr;
	if (to_src)
		p->sport = port;
	else
		p->dport = port;
	return TPL_CONTINUE;
}

static __always_inline int pkt6_dnat(struct __sk_buff *skb, struct pkt6 *p, union v6addr *addr, __be16 port)
{
	return pkt6_rewrite(skb, p, false, addr, port);
}

static __always_inline int pkt6_snat(struct __sk_buff *skb, struct pkt6 *p, union v6addr *addr, __be16 port)
{
	return pkt6_rewrite(skb, p, true, addr, port);
}

#endif
