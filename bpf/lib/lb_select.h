/* SPDX-License-Identifier: GPL-2.0 */
/* Backend selection shared by the per-packet path (lb.h) and socket LB
 * (bpf_sock.c): a backend by id, and the slot of the service's current bank a
 * hash picks. Needs only the service maps, not conntrack or a packet.
 */
#ifndef TUPLET_LB_SELECT_H
#define TUPLET_LB_SELECT_H

#include "compiler.h"
#include "lb_map.h"

static __always_inline struct lb4_backend *lb4_lookup_backend(__u32 id)
{
	return id ? bpf_map_lookup_elem(&tpl_lb4_backends_v1, &id) : NULL;
}

/* Test-only (0 in production): pick ClusterIP slots at random, as the reference
 * does, so a race test and the GC soak can show what the flow hash protects.
 */
const volatile __u32 lb_test_random_slot = 0;

/* The backend id in the slot of the service's current bank that hash h picks
 * (0: none). key is the service's slot 0 key.
 */
static __always_inline __u32 lb4_select_slot(const struct lb4_key *key, const struct lb4_service *svc, __u32 h)
{
	struct lb4_key slot_key = *key;
	struct lb4_service *slot;
	__u16 count = svc->count;

	if (!count)
		return 0;
	if (lb_test_random_slot)
		h = bpf_get_prandom_u32();
	slot_key.backend_slot = (h % count) + 1 + (svc->bank ? LB_BANK_STRIDE : 0);
	slot = bpf_map_lookup_elem(&tpl_lb4_services_v1, &slot_key);
	return slot ? slot->backend_id : 0;
}

#endif
