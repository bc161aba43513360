/* SPDX-License-Identifier: GPL-2.0 */
/* Remote identities: IPv4 or IPv6 prefix -> security identity of the pods behind it
 * (pods on other nodes), programmed by the agent ([[ipcache]], `tuplet ipcache`).
 */
#ifndef TUPLET_IPCACHE_H
#define TUPLET_IPCACHE_H

#include "compiler.h"
#include "ipv6.h"

struct ipcache_key {
	__u32 prefixlen;  /* LPM trie: bits of addr that count */
	__be32 addr;
};
ASSERT_SIZE(struct ipcache_key, 8);

struct ipcache_info {
	__u32 sec_id;
	__u32 flags;
};
ASSERT_SIZE(struct ipcache_info, 8);

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_info);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ipcache4_v1 SEC(".maps");

static __always_inline struct ipcache_info *ipcache_lookup4(__be32 addr)
{
	struct ipcache_key key = { .prefixlen = 32, .addr = addr };

	return bpf_map_lookup_elem(&tpl_ipcache4_v1, &key);
}

struct ipcache6_key {
	__u32 prefixlen;  /* LPM trie: bits of addr that count */
	union v6addr addr;
};
ASSERT_SIZE(struct ipcache6_key, 20);

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache6_key);
	__type(value, struct ipcache_info);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ipcache6_v1 SEC(".maps");

static __always_inline struct ipcache_info *ipcache_lookup6(const union v6addr *addr)
{
	struct ipcache6_key key = { .prefixlen = 128, .addr = *addr };

	return bpf_map_lookup_elem(&tpl_ipcache6_v1, &key);
}

#endif
