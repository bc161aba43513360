/* SPDX-License-Identifier: GPL-2.0 */
/* tuplet's bits of skb->mark. The mark is shared with other users (iptables,
 * policy routing, other programs): tuplet owns the bits of TPL_MARK_MASK
 * only, sets them with a read-modify-write and tests them masked.
 */
#ifndef TUPLET_MARK_H
#define TUPLET_MARK_H

#include "compiler.h"

enum tpl_mark {
	TPL_MARK_MASK = 0xffff0000,        /* the bits tuplet owns */
	TPL_MARK_FROM_TUNNEL = 0x0e5d0000, /* cil_from_overlay let the packet through to a pod */
};
_Static_assert((TPL_MARK_FROM_TUNNEL & ~TPL_MARK_MASK) == 0, "mark values must lie within TPL_MARK_MASK");

/* Anchors the enum in the object's BTF so the agent can check its copy. */
const volatile enum tpl_mark tpl_mark_names __attribute__((unused)) = 0;

static __always_inline void tpl_mark_set(struct __sk_buff *skb, enum tpl_mark value)
{
	/* Volatile: one 32-bit load and store. Left to itself clang stores only
	 * the 16 bits that change, and the verifier refuses narrower stores to
	 * skb->mark.
	 */
	__u32 mark = READ_ONCE(skb->mark);

	WRITE_ONCE(skb->mark, (mark & ~(__u32)TPL_MARK_MASK) | value);
}

static __always_inline bool tpl_mark_is(const struct __sk_buff *skb, enum tpl_mark value)
{
	return (skb->mark & TPL_MARK_MASK) == value;
}

#endif
