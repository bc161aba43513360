/* SPDX-License-Identifier: GPL-2.0 */
/* Compiler helpers shared by every tuplet program. */
#ifndef TUPLET_COMPILER_H
#define TUPLET_COMPILER_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef likely
#define likely(x) __builtin_expect(!!(x), 1)
#endif
#ifndef unlikely
#define unlikely(x) __builtin_expect(!!(x), 0)
#endif

/* Single, untorn accesses to map values other CPUs may update concurrently. */
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define WRITE_ONCE(x, v) (*(volatile typeof(x) *)&(x)) = (v)

/* Compile-time layout checks for structs shared with user space. */
#define ASSERT_SIZE(type, size) _Static_assert(sizeof(type) == (size), #type " must be " #size " bytes")

/* TC verdicts (include/uapi/linux/pkt_cls.h; not part of vmlinux.h). */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2

#endif
