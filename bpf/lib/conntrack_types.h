/* SPDX-License-Identifier: GPL-2.0 */
/* Conntrack key and value: the reference datapath's layout, so entries read
 * the same. User space reads these through the object's BTF; do not move
 * fields. A layout change must bump the _vN suffix of the map names.
 */
#ifndef TUPLET_CONNTRACK_TYPES_H
#define TUPLET_CONNTRACK_TYPES_H

#include "compiler.h"
#include "ipv6.h"

/* Tuple flags (key.flags). */
enum ct_tuple_flag {
	TUPLE_F_OUT = 0,
	TUPLE_F_IN = 1,
	TUPLE_F_RELATED = 2,
	TUPLE_F_SERVICE = 4,
	/* Never set by the datapath: marks the agent's sentinel entries, keys no
	 * packet can produce (also nexthdr CT_SENTINEL_NEXTHDR, a protocol
	 * pkt_parse never tracks). They only bound the empty-bucket runs a batch
	 * lookup walks (loader/tuplet/conntrack/sentinels.py).
	 */
	TUPLE_F_SENTINEL = 0x80,
};

enum ct_sentinel_key {
	CT_SENTINEL_NEXTHDR = 0,
};

/* Address fields name the reply direction, port fields the original one:
 * a flow 10.0.0.1:1000 -> 10.0.0.2:80 is stored as daddr=10.0.0.1,
 * saddr=10.0.0.2, dport=80, sport=1000.
 */
struct ipv4_ct_tuple {
	__be32 daddr;
	__be32 saddr;
	__be16 dport;
	__be16 sport;
	__u8 nexthdr;
	__u8 flags;
} __attribute__((packed));
ASSERT_SIZE(struct ipv4_ct_tuple, 14);

/* The same key for IPv6 (the reference's struct ipv6_ct_tuple): addresses name
 * the reply direction, ports the original one, as above.
 */
struct ipv6_ct_tuple {
	union v6addr daddr;
	union v6addr saddr;
	__be16 dport;
	__be16 sport;
	__u8 nexthdr;
	__u8 flags;
} __attribute__((packed));
ASSERT_SIZE(struct ipv6_ct_tuple, 38);

struct ct_entry {
	__u64 reserved0;
	__u64 backend_id;
	__u64 packets;
	__u64 bytes;
	__u32 lifetime;          /* expiry, seconds of CLOCK_MONOTONIC */
	__u16 rx_closing:1,
	      tx_closing:1,
	      reserved1:1,
	      lb_loopback:1,
	      seen_non_syn:1,
	      node_port:1,
	      proxy_redirect:1,
	      dsr_internal:1,
	      from_l7lb:1,
	      reserved2:1,
	      from_tunnel:1,
	      reserved3:5;
	__u16 rev_nat_index;
	__u16 ifindex;
	__u8 tx_flags_seen;
	__u8 rx_flags_seen;
	__u32 src_sec_id;
	__u32 last_tx_report;
	__u32 last_rx_report;
};
ASSERT_SIZE(struct ct_entry, 56);

/* Anchors the enum in the object's BTF so the agent can check its copy. */
const volatile enum ct_tuple_flag ct_tuple_flag_names __attribute__((unused)) = 0;
const volatile enum ct_sentinel_key ct_sentinel_key_names __attribute__((unused)) = 0;

/* A CT key of either family. */
union ct_tuple_any {
	struct ipv4_ct_tuple t4;
	struct ipv6_ct_tuple t6;
};

#endif
