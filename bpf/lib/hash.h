/* SPDX-License-Identifier: GPL-2.0 */
/* Flow hash for backend selection: Bob Jenkins' lookup3 final mix over the
 * 5-tuple with a fixed seed, so every node picks the same backend for the
 * same flow (the kernel's skb hash is seeded per boot and would not).
 */
#ifndef TUPLET_HASH_H
#define TUPLET_HASH_H

#include "compiler.h"

#define TPL_JHASH_INITVAL 0xdeadbeef

static __always_inline __u32 tpl_rol32(__u32 w, __u32 s)
{
	return (w << s) | (w >> (32 - s));
}

static __always_inline __u32 tpl_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	a += TPL_JHASH_INITVAL + (3 << 2) + initval;
	b += TPL_JHASH_INITVAL + (3 << 2) + initval;
	c += TPL_JHASH_INITVAL + (3 << 2) + initval;
	c ^= b; c -= tpl_rol32(b, 14);
	a ^= c; a -= tpl_rol32(c, 11);
	b ^= a; b -= tpl_rol32(a, 25);
	c ^= b; c -= tpl_rol32(b, 16);
	a ^= c; a -= tpl_rol32(c, 4);
	b ^= a; b -= tpl_rol32(a, 14);
	c ^= b; c -= tpl_rol32(b, 24);
	return c;
}

/* Hash of (saddr, daddr, sport, dport, proto) as they are on the wire. */
static __always_inline __u32 tpl_flow_hash4(__be32 saddr, __be32 daddr, __be16 sport, __be16 dport,
					    __u8 proto)
{
	return tpl_jhash_3words(saddr, daddr, ((__u32)sport << 16) | dport, proto);
}

#endif
