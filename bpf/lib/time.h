/* SPDX-License-Identifier: GPL-2.0 */
/* The conntrack clock: seconds of CLOCK_MONOTONIC, the same clock the agent's
 * garbage collector compares lifetimes against.
 */
#ifndef TUPLET_TIME_H
#define TUPLET_TIME_H

#include "compiler.h"

#define NSEC_PER_SEC 1000000000ULL

/* Added to the clock. Zero in production; tests advance it to age entries
 * without sleeping. Writable from user space (lives in .bss).
 */
__u32 clock_offset_sec = 0;

static __always_inline __u32 tpl_now(void)
{
	return (__u32)(bpf_ktime_get_coarse_ns() / NSEC_PER_SEC) + clock_offset_sec;
}

/* a is later than b on the u32 clock, also across its wrap (as the kernel's
 * time_after): lifetimes and stamps are compared this way, never with a plain <
 * on the raw values.
 */
static __always_inline bool tpl_time_after(__u32 a, __u32 b)
{
	return (__s32)(a - b) > 0;
}

#endif
