/* SPDX-License-Identifier: GPL-2.0 */
/* The IPv6 address as keys and values hold it: 16 bytes in network order,
 * readable as bytes or 32-bit words (4-byte aligned, so keys that embed one
 * after a __u32 need no padding).
 */
#ifndef TUPLET_IPV6_H
#define TUPLET_IPV6_H

#include "compiler.h"

union v6addr {
	__u8 addr[16];
	__be32 p[4];
};
ASSERT_SIZE(union v6addr, 16);

/* Next-header values of include/net/ipv6.h and uapi/linux/in6.h (defines, so
 * not in vmlinux.h). IPPROTO_AH (51) is in vmlinux.h's enum.
 */
#define NEXTHDR_HOP 0           /* hop-by-hop options */
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_ICMP 58         /* ICMPv6 */
#define NEXTHDR_NONE 59
#define NEXTHDR_DEST 60         /* destination options */
#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 NEXTHDR_ICMP
#endif

#define IPV6_HLEN 40
#define IP6_OFFSET 0xfff8       /* fragment offset bits of frag_hdr.frag_off (host order) */

/* Extension headers walked to reach the transport header (the reference's
 * IPV6_MAX_HEADERS); a longer chain is dropped (TPL_DROP_INVALID_EXTHDR).
 */
#define IPV6_MAX_EXT_HDRS 4
/* The longest extension header: hdrlen 255 in 8-byte units (AH: 1028 bytes). */
#define IPV6_MAX_EXT_HDR_LEN 2048

/* ICMPv6 types (uapi/linux/icmpv6.h: defines). */
#define ICMPV6_DEST_UNREACH 1
#define ICMPV6_PKT_TOOBIG 2
#define ICMPV6_TIME_EXCEED 3
#define ICMPV6_PARAMPROB 4
#define ICMPV6_ECHO_REQUEST 128
#define ICMPV6_ECHO_REPLY 129

static __always_inline bool ipv6_addr_equal(const union v6addr *a, const union v6addr *b)
{
	return a->p[0] == b->p[0] && a->p[1] == b->p[1] && a->p[2] == b->p[2] && a->p[3] == b->p[3];
}

static __always_inline bool ipv6_addr_is_zero(const union v6addr *a)
{
	return !(a->p[0] | a->p[1] | a->p[2] | a->p[3]);
}

/* An IPv4 address stored in an IPv6 field: ::ffff:a.b.c.d (RFC 4291 2.5.5.2). */
static __always_inline bool ipv6_addr_is_v4mapped(const union v6addr *a)
{
	return !a->p[0] && !a->p[1] && a->p[2] == bpf_htonl(0x0000ffff);
}

#endif
