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

static __always_inline bool ipv6_addr_equal(const union v6addr *a, const union v6addr *b)
{
	return a->p[0] == b->p[0] && a->p[1] == b->p[1] && a->p[2] == b->p[2] && a->p[3] == b->p[3];
}

#endif
