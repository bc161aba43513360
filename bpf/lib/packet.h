/* SPDX-License-Identifier: GPL-2.0 */
/* Parsing of Ethernet + IPv4 + TCP/UDP/ICMP headers into struct pkt4, and of
 * Ethernet + IPv6 (extension headers skipped) + TCP/UDP/ICMPv6 into struct
 * pkt6. Every bound is checked; a header that does not fit, or is malformed, is
 * reported as a drop reason, never read past.
 *
 * The transport part is one body for both families: functions taking the
 * packet as void * and a family constant (PKT_FAM4 / PKT_FAM6, known at compile
 * time: every function here is inlined), fields read through PKT().
 */
#ifndef TUPLET_PACKET_H
#define TUPLET_PACKET_H

#include "compiler.h"
#include "reasons.h"
#include "ipv6.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD
#define IP_MF 0x2000
#define IP_OFFMASK 0x1fff
#define IPV4_IHL_UNIT 4          /* ihl counts 4-byte words */
#define IPV4_MAX_HLEN 60         /* ihl 15: header with the most options */

/* The byte of struct tcphdr that holds the flags (CWR..FIN, TCP_FLAG_*):
 * read whole, as the bitfields would take eight loads.
 */
#define TCP_FLAGS_OFF 13

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_PSH 0x08
#define TCP_FLAG_ACK 0x10

#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

/* The fields of struct pkt4 and pkt6 after the addresses, alike in both (PKT()
 * names them in either). Ports are as on the wire.
 */
#define PKT_L4_FIELDS							\
	__be16 sport;							\
	__be16 dport;							\
	__u32 l3_off;							\
	__u32 l4_off;							\
	__u8 proto;							\
	__u8 tcp_flags;							\
	__u8 icmp_type;							\
	__u8 fragment;   /* non-first fragment: no L4 header */	\
	__be16 icmp_id;

/* What the conntrack needs from one IPv4 packet. */
struct pkt4 {
	__be32 saddr;
	__be32 daddr;
	PKT_L4_FIELDS
};

/* The same for one IPv6 packet: proto is the transport header's next-header
 * value, l4_off where it starts (after the extension headers).
 */
struct pkt6 {
	union v6addr saddr;
	union v6addr daddr;
	PKT_L4_FIELDS
};

/* A packet of either family, for callers that parse one or the other. */
union pkt_any {
	struct pkt4 p4;
	struct pkt6 p6;
};

/* Address families of the family-generic functions (here and in conntrack.h). */
#define PKT_FAM4 4
#define PKT_FAM6 6

/* Field f of packet p (a struct pkt4 or pkt6 by fam), as an lvalue. */
#define PKT(p, fam, f) (*((fam) == PKT_FAM6 ? &((struct pkt6 *)(p))->f : &((struct pkt4 *)(p))->f))

/* skb->data and skb->data_end read with a fixed-offset load each time:
 * clang otherwise may keep &skb->data_end in a register and dereference the
 * modified context pointer, which the verifier rejects.
 */
static __always_inline void *pkt_data(const struct __sk_buff *skb)
{
	void *d;

	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(d)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data)));
	return d;
}

static __always_inline void *pkt_data_end(const struct __sk_buff *skb)
{
	void *d;

	asm volatile("%0 = *(u32 *)(%1 + %2)"
		     : "=r"(d)
		     : "r"(skb), "i"(__builtin_offsetof(struct __sk_buff, data_end)));
	return d;
}

/* Make the first `len` bytes directly readable, pulling non-linear data in
 * when the skb needs it. On success returns 0 with *data / *data_end set
 * (the caller must still bound-check what it reads against *data_end).
 */
static __always_inline int pkt_ensure(struct __sk_buff *skb, __u32 len, void **data,
				      void **data_end)
{
	void *d = pkt_data(skb);
	void *de = pkt_data_end(skb);

	if (d + len > de) {
		if (len > skb->len || bpf_skb_pull_data(skb, len) < 0)
			return -1;
		d = pkt_data(skb);
		de = pkt_data_end(skb);
		if (d + len > de)
			return -1;
	}
	*data = d;
	*data_end = de;
	return 0;
}

/* The network header after the Ethernet header: TPL_CONTINUE with *l3 at hlen
 * readable bytes when the ethertype is `proto`, else TPL_PASS_NOT_IPV4 (another
 * ethertype) or TPL_DROP_INVALID_L3.
 */
static __always_inline int pkt_l3_header(struct __sk_buff *skb, __u16 proto, __u32 hlen, void **l3)
{
	void *data, *data_end;
	struct ethhdr *eth;

	if (pkt_ensure(skb, ETH_HLEN, &data, &data_end) < 0)
		return TPL_DROP_INVALID_L3;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TPL_DROP_INVALID_L3;
	if (eth->h_proto != bpf_htons(proto))
		return TPL_PASS_NOT_IPV4;
	if (pkt_ensure(skb, ETH_HLEN + hlen, &data, &data_end) < 0)
		return TPL_DROP_INVALID_L3;
	if (data + ETH_HLEN + hlen > data_end)
		return TPL_DROP_INVALID_L3;
	*l3 = data + ETH_HLEN;
	return TPL_CONTINUE;
}

/* Returns TPL_CONTINUE for IPv4 (p filled), else the verdict reason:
 * TPL_PASS_NOT_IPV4 for another ethertype, or a drop reason.
 */
static __always_inline int pkt4_parse_l3(struct __sk_buff *skb, struct pkt4 *p)
{
	struct iphdr *ip;
	void *l3;
	__u32 ihl;
	int ret;

	ret = pkt_l3_header(skb, ETH_P_IP, sizeof(struct iphdr), &l3);
	if (tpl_has_verdict(ret))
		return ret;
	ip = l3;
	ihl = ip->ihl * IPV4_IHL_UNIT;
	if (ip->version != 4 || ihl < sizeof(struct iphdr))
		return TPL_DROP_INVALID_L3;
	/* The datagram may be shorter than the frame (Ethernet padding), never longer. */
	if (bpf_ntohs(ip->tot_len) < ihl || ETH_HLEN + (__u32)bpf_ntohs(ip->tot_len) > skb->len)
		return TPL_DROP_INVALID_L3;

	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + ihl;
	p->fragment = (bpf_ntohs(ip->frag_off) & IP_OFFMASK) != 0;
	return TPL_CONTINUE;
}

/* The first 8 bytes of every IPv6 extension header (none is shorter): the next
 * header, the length (hop-by-hop, routing, destination options: 8-byte units
 * after the first 8; AH: 4-byte units after the first 8), and for a fragment
 * header its offset and M bit.
 */
struct ipv6_ext_prefix {
	__u8 nexthdr;
	__u8 hdrlen;
	__be16 frag_off;
	__be32 more;
};
ASSERT_SIZE(struct ipv6_ext_prefix, 8);

static __always_inline bool ipv6_is_exthdr(__u8 nh)
{
	return nh == NEXTHDR_HOP || nh == NEXTHDR_ROUTING || nh == NEXTHDR_FRAGMENT || nh == NEXTHDR_DEST ||
	       nh == IPPROTO_AH;
}

/* Walk at most IPV6_MAX_EXT_HDRS extension headers from p->l4_off (p->proto
 * the first one's type) to the transport header: sets p->proto and p->l4_off,
 * or p->fragment at a non-first fragment's header (nothing after it to read).
 * Returns TPL_CONTINUE, TPL_DROP_INVALID_L3 (a header cut short) or
 * TPL_DROP_INVALID_EXTHDR (the chain goes on).
 */
static __always_inline int pkt6_skip_exthdrs(struct __sk_buff *skb, struct pkt6 *p)
{
	__u32 off = p->l4_off;
	__u8 nh = p->proto;
	int i;

#pragma unroll
	for (i = 0; i < IPV6_MAX_EXT_HDRS; i++) {
		struct ipv6_ext_prefix h;

		if (!ipv6_is_exthdr(nh))
			break;
		if (bpf_skb_load_bytes(skb, off, &h, sizeof(h)) < 0)
			return TPL_DROP_INVALID_L3;
		if (nh == NEXTHDR_FRAGMENT) {
			if (h.frag_off & bpf_htons(IP6_OFFSET)) {
				p->fragment = 1;
				p->proto = h.nexthdr;
				return TPL_CONTINUE;
			}
			off += sizeof(h);
		} else if (nh == IPPROTO_AH) {
			off += ((__u32)h.hdrlen + 2) * 4;
		} else {
			off += ((__u32)h.hdrlen + 1) * 8;
		}
		nh = h.nexthdr;
	}
	if (ipv6_is_exthdr(nh))
		return TPL_DROP_INVALID_EXTHDR;
	p->proto = nh;
	p->l4_off = off;
	return TPL_CONTINUE;
}

/* Returns TPL_CONTINUE for IPv6 (p filled), else the verdict reason:
 * TPL_PASS_NOT_IPV4 for another ethertype, or a drop reason.
 */
static __always_inline int pkt6_parse_l3(struct __sk_buff *skb, struct pkt6 *p)
{
	struct ipv6hdr *ip6;
	void *l3;
	int ret;

	ret = pkt_l3_header(skb, ETH_P_IPV6, sizeof(struct ipv6hdr), &l3);
	if (tpl_has_verdict(ret))
		return ret;
	ip6 = l3;
	if (ip6->version != 6)
		return TPL_DROP_INVALID_L3;
	/* As IPv4: never longer than the frame. Payload length 0 is a jumbogram
	 * (RFC 2675: its hop-by-hop option, skipped below, carries the length) or
	 * a BIG TCP packet: the frame's length is the datagram's.
	 */
	if (ETH_HLEN + IPV6_HLEN + (__u32)bpf_ntohs(ip6->payload_len) > skb->len)
		return TPL_DROP_INVALID_L3;

	__builtin_memcpy(&p->saddr, &ip6->saddr, sizeof(p->saddr));
	__builtin_memcpy(&p->daddr, &ip6->daddr, sizeof(p->daddr));
	p->proto = ip6->nexthdr;
	p->l3_off = ETH_HLEN;
	p->l4_off = ETH_HLEN + IPV6_HLEN;
	return pkt6_skip_exthdrs(skb, p);
}

/* The ICMP of a family, and what its types mean to the conntrack. */
enum pkt_icmp_kind {
	PKT_ICMP_OTHER = 0,
	PKT_ICMP_ECHO_REQUEST = 1,
	PKT_ICMP_ECHO_REPLY = 2,
	PKT_ICMP_ERROR = 3,         /* quotes a packet: related to its flow */
};

static __always_inline __u8 pkt_icmp_proto(int fam)
{
	return fam == PKT_FAM6 ? IPPROTO_ICMPV6 : IPPROTO_ICMP;
}

static __always_inline enum pkt_icmp_kind pkt_icmp_kind(int fam, __u8 type)
{
	if (fam == PKT_FAM6) {
		switch (type) {
		case ICMPV6_ECHO_REQUEST:
			return PKT_ICMP_ECHO_REQUEST;
		case ICMPV6_ECHO_REPLY:
			return PKT_ICMP_ECHO_REPLY;
		case ICMPV6_DEST_UNREACH:
		case ICMPV6_PKT_TOOBIG:
		case ICMPV6_TIME_EXCEED:
		case ICMPV6_PARAMPROB:
			return PKT_ICMP_ERROR;
		}
		return PKT_ICMP_OTHER;
	}
	switch (type) {
	case ICMP_ECHO:
		return PKT_ICMP_ECHO_REQUEST;
	case ICMP_ECHOREPLY:
		return PKT_ICMP_ECHO_REPLY;
	case ICMP_DEST_UNREACH:
	case ICMP_TIME_EXCEEDED:
	case ICMP_PARAMETERPROB:
		return PKT_ICMP_ERROR;
	}
	return PKT_ICMP_OTHER;
}

/* The largest l4_off the L3 parser of a family leaves: a bound for the verifier. */
static __always_inline __u32 pkt_l4_max(int fam)
{
	return fam == PKT_FAM6 ? ETH_HLEN + IPV6_HLEN + IPV6_MAX_EXT_HDRS * IPV6_MAX_EXT_HDR_LEN
			       : ETH_HLEN + IPV4_MAX_HLEN;
}

/* Fills ports, TCP flags and ICMP type/id of p (a struct pkt4 or pkt6 by fam;
 * ICMPv6's echo header is ICMP's). Returns TPL_CONTINUE or a drop reason.
 */
static __always_inline int pkt_parse_l4(int fam, struct __sk_buff *skb, void *p)
{
	__u32 off = PKT(p, fam, l4_off);
	__u8 proto = PKT(p, fam, proto);
	void *data, *data_end;

	/* l4_off is bounded for the verifier (IPv4: ETH_HLEN + 20..60). */
	if (off > pkt_l4_max(fam))
		return TPL_DROP_INVALID_L3;

	if (proto == IPPROTO_TCP) {
		struct tcphdr *th;

		if (pkt_ensure(skb, off + sizeof(*th), &data, &data_end) < 0)
			return TPL_DROP_CT_INVALID_HDR;
		th = data + off;
		if ((void *)(th + 1) > data_end)
			return TPL_DROP_CT_INVALID_HDR;
		if (th->doff < 5)
			return TPL_DROP_CT_INVALID_HDR;
		PKT(p, fam, sport) = th->source;
		PKT(p, fam, dport) = th->dest;
		PKT(p, fam, tcp_flags) = ((__u8 *)th)[TCP_FLAGS_OFF];
	} else if (proto == IPPROTO_UDP) {
		struct udphdr *uh;

		if (pkt_ensure(skb, off + sizeof(*uh), &data, &data_end) < 0)
			return TPL_DROP_CT_INVALID_HDR;
		uh = data + off;
		if ((void *)(uh + 1) > data_end)
			return TPL_DROP_CT_INVALID_HDR;
		PKT(p, fam, sport) = uh->source;
		PKT(p, fam, dport) = uh->dest;
	} else if (proto == pkt_icmp_proto(fam)) {
		struct icmphdr *ih;

		if (pkt_ensure(skb, off + sizeof(*ih), &data, &data_end) < 0)
			return TPL_DROP_CT_INVALID_HDR;
		ih = data + off;
		if ((void *)(ih + 1) > data_end)
			return TPL_DROP_CT_INVALID_HDR;
		PKT(p, fam, icmp_type) = ih->type;
		PKT(p, fam, icmp_id) = ih->un.echo.id;
	}
	return TPL_CONTINUE;
}

/* A set of protocols as bits of a __u64: protocols below PKT_PROTO_MAX
 * (ICMPv6, 58, included).
 */
#define PKT_PROTO(p) (1ULL << (p))
#define PKT_PROTO_MAX 64

/* Parse a packet of family fam up to L4 for a program that tracks the
 * protocols in `protos` (PKT_PROTO bits). Returns TPL_CONTINUE with p filled,
 * else the verdict reason: not this family, a non-first fragment, `untracked`
 * for another protocol, TPL_PASS_ICMP6_UNTRACKED for ICMPv6 that is neither
 * echo nor an error (neighbour discovery, router messages: never tracked), or
 * a malformed header.
 */
static __always_inline int pkt_parse(int fam, struct __sk_buff *skb, void *p, __u64 protos,
				     enum tpl_reason untracked)
{
	int ret = fam == PKT_FAM6 ? pkt6_parse_l3(skb, p) : pkt4_parse_l3(skb, p);
	__u8 proto;

	if (tpl_has_verdict(ret))
		return ret;
	if (PKT(p, fam, fragment))
		return TPL_PASS_FRAGMENT;
	proto = PKT(p, fam, proto);
	if (proto >= PKT_PROTO_MAX || !(protos & PKT_PROTO(proto)))
		return untracked;
	ret = pkt_parse_l4(fam, skb, p);
	if (tpl_has_verdict(ret))
		return ret;
	if (fam == PKT_FAM6 && proto == IPPROTO_ICMPV6 &&
	    pkt_icmp_kind(fam, PKT(p, fam, icmp_type)) == PKT_ICMP_OTHER)
		return TPL_PASS_ICMP6_UNTRACKED;
	return TPL_CONTINUE;
}

static __always_inline int pkt4_parse(struct __sk_buff *skb, struct pkt4 *p, __u64 protos,
				      enum tpl_reason untracked)
{
	return pkt_parse(PKT_FAM4, skb, p, protos, untracked);
}

#endif
