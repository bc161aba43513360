/* SPDX-License-Identifier: GPL-2.0 */
/* Local endpoints (pods) by IPv4 and by IPv6 address, programmed by the agent. */
#ifndef TUPLET_ENDPOINT_H
#define TUPLET_ENDPOINT_H

#include "compiler.h"
#include "ipcache.h"
#include "packet.h"

/* Reserved identities. An enum anchored in BTF, so the agent can check its copy. */
enum tpl_identity {
	TPL_IDENTITY_WORLD = 2,   /* anything that is not a known endpoint or ipcache prefix */
};
const volatile enum tpl_identity tpl_identity_names __attribute__((unused)) = 0;

#define EP_MAP_SIZE 65536

struct endpoint_info {
	__u32 ifindex;   /* host-side veth */
	__u32 sec_id;    /* security identity shown as SourceSecurityID */
	__u32 flags;
	__u32 pad;
};
ASSERT_SIZE(struct endpoint_info, 16);

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __be32);
	__type(value, struct endpoint_info);
	__uint(max_entries, EP_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ep4_v1 SEC(".maps");

static __always_inline struct endpoint_info *endpoint_lookup4(__be32 addr)
{
	return bpf_map_lookup_elem(&tpl_ep4_v1, &addr);
}

/* Identity of an address: a local endpoint's, else the ipcache's (a remote
 * pod), else world.
 */
static __always_inline __u32 endpoint_identity4(__be32 addr)
{
	struct endpoint_info *ep = endpoint_lookup4(addr);
	struct ipcache_info *rc;

	if (ep)
		return ep->sec_id;
	rc = ipcache_lookup4(addr);
	return rc ? rc->sec_id : TPL_IDENTITY_WORLD;
}

/* An endpoint with an IPv6 address has it here too, with the same value. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, union v6addr);
	__type(value, struct endpoint_info);
	__uint(max_entries, EP_MAP_SIZE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} tpl_ep6_v1 SEC(".maps");

static __always_inline struct endpoint_info *endpoint_lookup6(const union v6addr *addr)
{
	return bpf_map_lookup_elem(&tpl_ep6_v1, addr);
}

static __always_inline __u32 endpoint_identity6(const union v6addr *addr)
{
	struct endpoint_info *ep = endpoint_lookup6(addr);
	struct ipcache_info *rc;

	if (ep)
		return ep->sec_id;
	rc = ipcache_lookup6(addr);
	return rc ? rc->sec_id : TPL_IDENTITY_WORLD;
}

/* The identity of the source of p's packet (a struct pkt4 or pkt6 by fam). */
static __always_inline __u32 endpoint_identity_src(int fam, const void *p)
{
	if (fam == PKT_FAM6)
		return endpoint_identity6(&((const struct pkt6 *)p)->saddr);
	return endpoint_identity4(((const struct pkt4 *)p)->saddr);
}

#endif
