/* SPDX-License-Identifier: GPL-2.0 */
/* Parsing of Ethernet + IPv4 + TCP/UDP/ICMP headers into struct pkt4.
 * Every bound is checked; a header that does not fit, or is malformed, is
 * reported as a drop reason, never read past.
 */
#ifndef TUPLET_PACKET_H
#define TUPLET_PACKET_H

#include "compiler.h"
#include "reasons.h"

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
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

/* What the conntrack needs from one IPv4 packet. Ports are as on the wire. */
struct pkt4 {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 l3_off;
	__u32 l4_off;
	__u8 proto;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 fragment;   /* non-first fragment: no L4 header */
	__be16 icmp_id;
};

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

/* Returns TPL_CONTINUE for IPv4 (p filled), else the verdict reason:
 * TPL_PASS_NOT_IPV4 for another ethertype, or a drop reason.
 */
static __always_inline int pkt4_parse_l3(struct __sk_buff *skb, struct pkt4 *p)
{
	void *data, *data_end;
	struct ethhdr *eth;
	struct iphdr *ip;
	__u32 ihl;

	if (pkt_ensure(skb, ETH_HLEN, &data, &data_end) < 0)
		return TPL_DROP_INVALID_L3;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TPL_DROP_INVALID_L3;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return TPL_PASS_NOT_IPV4;

	if (pkt_ensure(skb, ETH_HLEN + sizeof(struct iphdr), &data, &data_end) < 0)
		return TPL_DROP_INVALID_L3;
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > data_end)
		return TPL_DROP_INVALID_L3;
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

/* Fills ports, TCP flags and ICMP type/id. Returns TPL_CONTINUE or a drop reason. */
static __always_inline int pkt4_parse_l4(struct __sk_buff *skb, struct pkt4 *p)
{
	__u32 off = p->l4_off;
	void *data, *data_end;

	/* l4_off is ETH_HLEN + 20..60: bounded for the verifier. */
	if (off > ETH_HLEN + IPV4_MAX_HLEN)
		return TPL_DROP_INVALID_L3;

	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th;

		if (pkt_ensure(skb, off + sizeof(*th), &data, &data_end) < 0)
			return TPL_DROP_CT_INVALID_HDR;
		th = data + off;
		if ((void *)(th + 1) > data_end)
			return TPL_DROP_CT_INVALID_HDR;
		if (th->doff < 5)
			return TPL_DROP_CT_INVALID_HDR;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[TCP_FLAGS_OFF];
		return TPL_CONTINUE;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh;

		if (pkt_ensure(skb, off + sizeof(*uh), &data, &data_end) < 0)
			return TPL_DROP_CT_INVALID_HDR;
		uh = data + off;
		if ((void *)(uh + 1) > data_end)
			return TPL_DROP_CT_INVALID_HDR;
		p->sport = uh->source;
		p->dport = uh->dest;
		return TPL_CONTINUE;
	}
	case IPPROTO_ICMP: {
		struct icmphdr *ih;

		if (pkt_ensure(skb, off + sizeof(*ih), &data, &data_end) < 0)
			return TPL_DROP_CT_INVALID_HDR;
		ih = data + off;
		if ((void *)(ih + 1) > data_end)
			return TPL_DROP_CT_INVALID_HDR;
		p->icmp_type = ih->type;
		p->icmp_id = ih->un.echo.id;
		return TPL_CONTINUE;
	}
	}
	return TPL_CONTINUE;
}

/* A set of IPv4 protocols as bits of a __u32: protocols below PKT_PROTO_MAX. */
#define PKT_PROTO(p) (1U << (p))
#define PKT_PROTO_MAX 32

/* Parse an IPv4 packet up to L4 for a program that tracks the protocols in
 * `protos` (PKT_PROTO bits). Returns TPL_CONTINUE with p filled, else the verdict
 * reason: not IPv4, a non-first fragment, `untracked` for another protocol,
 * or a malformed header.
 */
static __always_inline int pkt4_parse(struct __sk_buff *skb, struct pkt4 *p, __u32 protos,
				      enum tpl_reason untracked)
{
	int ret = pkt4_parse_l3(skb, p);

	if (tpl_has_verdict(ret))
		return ret;
	if (p->fragment)
		return TPL_PASS_FRAGMENT;
	if (p->proto >= PKT_PROTO_MAX || !(protos & PKT_PROTO(p->proto)))
		return untracked;
	return pkt4_parse_l4(skb, p);
}

#endif
