/* SPDX-License-Identifier: GPL-2.0 */
/* Direct Server Return over Geneve.
 *
 * LB node (cil_from_netdev): a flow whose backend runs on another node is
 * DNATed to the backend, given a tunnel key (remote = the backend's node) and,
 * on its first packet (TCP SYN; every packet of other protocols), a Geneve
 * option carrying the service address and port; then redirected to the
 * node's collect-metadata Geneve device.
 *
 * Either family: an IPv4 service's option carries its 4-byte address
 * (struct dsr_opt4, 2 words), an IPv6 service's its 16-byte one (struct
 * dsr_opt6, 5 words: the reference's IPv6 DSR option), with the same class
 * and type. The underlay (the node= address the packet is tunneled to) is
 * IPv4 for an IPv4 service; for an IPv6 service IPv6, or IPv4 when the
 * node address is stored IPv4-mapped (::ffff:a.b.c.d).
 *
 * Backend node (cil_from_overlay, after the kernel decapsulated): the option
 * creates a CT_EGRESS entry with DSRInternal for the flow and the NAT entry
 * the reply is rewritten with; the packet is marked as from the tunnel so the
 * pod-side program creates its CT_INGRESS entry with FromTunnel. The reply
 * leaves the node on its NIC (cil_to_netdev) with the service address as
 * source, straight to the client.
 */
#ifndef TUPLET_DSR_H
#define TUPLET_DSR_H

#include "compiler.h"
#include "reasons.h"
#include "time.h"
#include "packet.h"
#include "endpoint.h"
#include "conntrack_types.h"
#include "conntrack.h"
#include "nat_map.h"
#include "lb_select.h"
#include "l4_rewrite.h"
#include "l4_rewrite6.h"
#include "ipv6.h"

#define GENEVE_OPT_CRITICAL 0x80 /* type bit: drop the packet if the option is not understood */
#define GENEVE_OPT_LEN_MASK 0x1f /* length byte: low 5 bits, body length in words; high 3 reserved */
#define GENEVE_OPT_WORD 4        /* option lengths count 4-byte words */
#define GENEVE_OPT_HDR_LEN 4     /* class, type, length */

/* The option's class, type and body lengths. An enum anchored in BTF: the
 * tests craft options from the agent's copy (tuplet.datapath.abi).
 */
enum dsr_opt_id {
	DSR_OPT_CLASS = 0x014B,
	DSR_OPT_TYPE = GENEVE_OPT_CRITICAL | 0x01,
	DSR_OPT4_LEN = 2,        /* body length in words: IPv4 service address, port, pad */
	DSR_OPT6_LEN = 5,        /* body length in words: IPv6 service address, port, pad */
};
const volatile enum dsr_opt_id dsr_opt_id_names __attribute__((unused)) = 0;

#define DSR_TUNNEL_TTL 64        /* outer TTL / hop limit, the kernel's default */

#ifndef ENOMEM
#define ENOMEM 12
#endif

struct dsr_opt4 {
	__be16 opt_class;
	__u8 type;
	__u8 length;             /* low 5 bits: body words; high 3 reserved */
	__be32 addr;             /* service address */
	__be16 port;             /* service port */
	__u16 pad;
};
ASSERT_SIZE(struct dsr_opt4, 12);

struct dsr_opt6 {
	__be16 opt_class;
	__u8 type;
	__u8 length;
	union v6addr addr;       /* service address */
	__be16 port;             /* service port */
	__u16 pad;
};
ASSERT_SIZE(struct dsr_opt6, 24);

/* The option of either family: the header fields are at the same offsets. */
union dsr_opt {
	struct dsr_opt4 o4;
	struct dsr_opt6 o6;
};

/* The option's body words and size for a service of family fam. */
static __always_inline __u8 dsr_opt_words(int fam)
{
	return fam == PKT_FAM6 ? DSR_OPT6_LEN : DSR_OPT4_LEN;
}

static __always_inline __u32 dsr_opt_size(int fam)
{
	return ((__u32)dsr_opt_words(fam) + 1) * GENEVE_OPT_WORD;   /* header word + body */
}

/* The tunnel key to the backend's node: an IPv4 node (an IPv4 service's, or
 * an IPv6 service's stored IPv4-mapped) or an IPv6 one. Returns the flags
 * for bpf_skb_set_tunnel_key, or 0 when the backend has no node address.
 * Over IPv6 the outer UDP checksum is computed: a Geneve device drops
 * zero-checksum IPv6 UDP unless told otherwise (udp6zerocsumrx).
 */
static __always_inline __u64 dsr_tunnel_key(int fam, const union lb_backend *be, struct bpf_tunnel_key *key)
{
	const union v6addr *node = &be->b6.node_addr;

	key->tunnel_ttl = DSR_TUNNEL_TTL;
	if (fam == PKT_FAM4) {
		key->remote_ipv4 = bpf_ntohl(be->b4.node_addr);
		return key->remote_ipv4 ? BPF_F_ZERO_CSUM_TX : 0;
	}
	if (ipv6_addr_is_v4mapped(node)) {
		key->remote_ipv4 = bpf_ntohl(node->p[3]);
		return key->remote_ipv4 ? BPF_F_ZERO_CSUM_TX : 0;
	}
	if (ipv6_addr_is_zero(node))
		return 0;
	__builtin_memcpy(key->remote_ipv6, node, sizeof(key->remote_ipv6));
	return BPF_F_TUNINFO_IPV6;
}

/* LB node: tunnel the DNATed packet (p, of family fam) to backend be's node,
 * with the option naming the service (key: its slot 0 key) on the flow's
 * first packet. Returns TPL_PASS_DSR_REDIRECT (the caller redirects) or a
 * drop reason.
 */
static __always_inline int dsr_encap(int fam, struct __sk_buff *skb, const void *p, const union lb_backend *be,
				     const union lb_key *key)
{
	struct bpf_tunnel_key tk = {};
	union dsr_opt opt = {};
	__u64 flags = dsr_tunnel_key(fam, be, &tk);

	if (!flags)                          /* a remote backend without node=: nowhere to send it */
		return TPL_DROP_REMOTE_BACKEND;
	if (bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), flags) < 0)
		return TPL_DROP_DSR_ENCAP;
	if (PKT(p, fam, proto) != IPPROTO_TCP ||
	    (PKT(p, fam, tcp_flags) & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		opt.o4.opt_class = bpf_htons(DSR_OPT_CLASS);
		opt.o4.type = DSR_OPT_TYPE;
		opt.o4.length = dsr_opt_words(fam);
		if (fam == PKT_FAM6) {
			opt.o6.addr = key->k6.address;
			opt.o6.port = key->k6.dport;
		} else {
			opt.o4.addr = key->k4.address;
			opt.o4.port = key->k4.dport;
		}
		if (bpf_skb_set_tunnel_opt(skb, &opt, dsr_opt_size(fam)) < 0)
			return TPL_DROP_DSR_ENCAP;
	}
	return TPL_PASS_DSR_REDIRECT;
}

/* Backend node: the DSR option of a packet of family fam, if any. It must be
 * the only option, of that family's length (an IPv4 service's option on an
 * IPv6 packet, or the reverse, is malformed). Returns TPL_CONTINUE with
 * *found set and opt filled, *found clear when the packet carries no options,
 * no tunnel metadata at all (BPF_PROG_TEST_RUN) or one ignorable unknown
 * option; else a drop reason.
 */
static __always_inline int dsr_read_opt(int fam, struct __sk_buff *skb, union dsr_opt *opt, bool *found)
{
	long n = bpf_skb_get_tunnel_opt(skb, opt, sizeof(*opt));
	__u32 want = dsr_opt_size(fam);
	__u8 words;

	*found = false;
	if (n == -ENOMEM)                    /* more option bytes than the longest DSR option */
		return TPL_DROP_DSR_OPT_NOT_ALONE;
	if (n < 0)                           /* no tunnel metadata or no options */
		return TPL_CONTINUE;
	if (n < GENEVE_OPT_HDR_LEN)
		return TPL_DROP_DSR_OPT_MALFORMED;
	words = opt->o4.length & GENEVE_OPT_LEN_MASK;
	if (opt->o4.opt_class != bpf_htons(DSR_OPT_CLASS) || opt->o4.type != DSR_OPT_TYPE) {
		if (opt->o4.type & GENEVE_OPT_CRITICAL)
			return TPL_DROP_DSR_OPT_CRITICAL;
		/* An unknown option the sender marked as ignorable: ignore it,
		 * as long as it is the only one.
		 */
		return ((__u32)words + 1) * GENEVE_OPT_WORD == n ? TPL_CONTINUE : TPL_DROP_DSR_OPT_NOT_ALONE;
	}
	/* The kernel checks the options' total length only: ours must say the
	 * family's length and fill exactly its bytes (more bytes: another option
	 * follows).
	 */
	if (words != dsr_opt_words(fam))
		return TPL_DROP_DSR_OPT_MALFORMED;
	if (n != want)
		return n > want ? TPL_DROP_DSR_OPT_NOT_ALONE : TPL_DROP_DSR_OPT_MALFORMED;
	if (fam == PKT_FAM6 ? !opt->o6.port || ipv6_addr_is_zero(&opt->o6.addr) : !opt->o4.port || !opt->o4.addr)
		return TPL_DROP_DSR_OPT_MALFORMED;
	*found = true;
	return TPL_CONTINUE;
}

/* Backend node: the NAT entry of the DSR flow whose CT_EGRESS entry has key
 * t: its reply is to come from the option's service address. Returns
 * TPL_CONTINUE or a drop reason.
 */
static __always_inline int dsr_nat_create(int fam, const union ct_tuple_any *t, const union dsr_opt *opt,
					  __u32 now)
{
	union ct_tuple_any nk = {};

	if (fam == PKT_FAM6) {
		struct nat6_entry nat = { .created = now, .to_addr = opt->o6.addr, .to_port = opt->o6.port };

		nat_key_for_ct(fam, t, &nk);
		if (bpf_map_update_elem(&tpl_nat6_v1, &nk.t6, &nat, BPF_ANY) < 0)
			return TPL_DROP_NAT_INSERT_FAILED;
	} else {
		struct nat4_entry nat = { .created = now, .to_addr = opt->o4.addr, .to_port = opt->o4.port };

		nat_key_for_ct(fam, t, &nk);
		if (bpf_map_update_elem(&tpl_nat4_v1, &nk.t4, &nat, BPF_ANY) < 0)
			return TPL_DROP_NAT_INSERT_FAILED;
	}
	return TPL_CONTINUE;
}

/* Backend node, a packet of family fam the Geneve device decapsulated: a DSR
 * flow's first packet (with the option) gets its CT_EGRESS entry with
 * DSRInternal, whose NAT entry says which service address the reply must
 * come from; later packets refresh it. Returns a pass reason (the caller
 * marks the packet as from the tunnel) or a drop reason.
 */
static __always_inline enum tpl_reason dsr_backend(int fam, struct __sk_buff *skb, void *p)
{
	union ct_tuple_any tuple = {};
	struct ct_state st = {};
	union dsr_opt opt = {};
	__u32 now = tpl_now();
	bool has_opt;
	int ret;

	ret = dsr_read_opt(fam, skb, &opt, &has_opt);
	if (tpl_has_verdict(ret))
		return ret;
	ret = ct_lookup(fam, &tuple, p, CT_EGRESS, skb->len, &st, now);
	if (ret != CT_NEW)
		return ct_status_reason(ret);
	if (!has_opt)
		return TPL_PASS_OVERLAY_UNTRACKED;
	ret = ct_may_create(fam, p);
	if (tpl_has_verdict(ret))
		return ret;

	__builtin_memset(&st, 0, sizeof(st));
	st.dsr_internal = 1;
	st.src_sec_id = endpoint_identity_src(fam, p);
	ret = ct_create(fam, &tuple, CT_EGRESS, &st, PKT(p, fam, tcp_flags), skb->len, now);
	if (tpl_has_verdict(ret))
		return ret;
	ret = dsr_nat_create(fam, &tuple, &opt, now);
	return tpl_verdict_or(ret, TPL_PASS_CT_NEW);
}

/* The reply of a DSR flow (its CT_EGRESS entry has key t) leaves from the
 * service address its NAT entry holds. Returns TPL_CONTINUE or a drop reason.
 */
static __always_inline int dsr_reply_snat(int fam, struct __sk_buff *skb, void *p, const union ct_tuple_any *t)
{
	union ct_tuple_any nk = {};

	if (fam == PKT_FAM6) {
		struct nat6_entry *nat;

		nat_key_for_ct(fam, t, &nk);
		nat = bpf_map_lookup_elem(&tpl_nat6_v1, &nk.t6);
		if (!nat)
			return TPL_DROP_REV_NAT_MISSING;
		return pkt6_snat(skb, p, &nat->to_addr, nat->to_port);
	} else {
		struct nat4_entry *nat;

		nat_key_for_ct(fam, t, &nk);
		nat = bpf_map_lookup_elem(&tpl_nat4_v1, &nk.t4);
		if (!nat)
			return TPL_DROP_REV_NAT_MISSING;
		return pkt4_snat(skb, p, nat->to_addr, nat->to_port);
	}
}

#endif
