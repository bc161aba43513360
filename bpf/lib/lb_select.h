/* SPDX-License-Identifier: GPL-2.0 */
/* Backend selection shared by the per-packet path (lb.h) and socket LB
 * (bpf_sock.c): a backend by id, and the slot of the service's current bank a
 * hash picks, for either family. Needs only the service maps, not conntrack
 * or a packet.
 */
#ifndef TUPLET_LB_SELECT_H
#define TUPLET_LB_SELECT_H

#include "compiler.h"
#include "packet.h"
#include "lb_map.h"
#include "lb6_map.h"

/* Keys and backends of either family (PKT_FAM4 / PKT_FAM6). */
union lb_key {
	struct lb4_key k4;
	struct lb6_key k6;
};

union lb_backend {
	struct lb4_backend b4;
	struct lb6_backend b6;
};

static __always_inline void *lb_services_map(int fam)
{
	return fam == PKT_FAM6 ? (void *)&tpl_lb6_services_v1 : (void *)&tpl_lb4_services_v1;
}

/* The backend of id (a struct lb4_backend or lb6_backend by fam), or NULL. */
static __always_inline void *lb_lookup_backend(int fam, __u32 id)
{
	if (!id)
		return NULL;
	return bpf_map_lookup_elem(fam == PKT_FAM6 ? (void *)&tpl_lb6_backends_v1 : (void *)&tpl_lb4_backends_v1, &id);
}

/* Test-only (0 in production): pick ClusterIP slots at random, as the reference
 * does, so a race test and the GC soak can show what the flow hash protects.
 */
const volatile __u32 lb_test_random_slot = 0;

/* The backend id in the slot of the service's current bank that hash h picks
 * (0: none). key is the service's slot 0 key (a struct lb4_key or lb6_key by fam).
 */
static __always_inline __u32 lb_select_slot(int fam, const void *key, const struct lb4_service *svc, __u32 h)
{
	union lb_key slot_key;
	struct lb4_service *slot;
	__u16 count = svc->count, n;

	if (!count)
		return 0;
	if (lb_test_random_slot)
		h = bpf_get_prandom_u32();
	n = (h % count) + 1 + (svc->bank ? LB_BANK_STRIDE : 0);
	if (fam == PKT_FAM6) {
		slot_key.k6 = *(const struct lb6_key *)key;
		slot_key.k6.backend_slot = n;
	} else {
		slot_key.k4 = *(const struct lb4_key *)key;
		slot_key.k4.backend_slot = n;
	}
	slot = bpf_map_lookup_elem(lb_services_map(fam), &slot_key);
	return slot ? slot->backend_id : 0;
}

#endif
