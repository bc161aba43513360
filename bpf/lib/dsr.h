/* SPDX-License-Identifier: GPL-2.0 */
/* Direct Server Return over Geneve.
 *
 * LB node (cil_from_netdev): a flow whose backend runs on another node is
 * DNATed to the backend, given a tunnel key (remote = the backend's node) and,
 * on its first packet (TCP SYN; every packet of other protocols), a Geneve
 * option carrying the service address and port; then redirected to the
 * node's collect-metadata Geneve device.
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

#define GENEVE_OPT_CRITICAL 0x80 /* type bit: drop the packet if the option is not understood */
#define GENEVE_OPT_LEN_MASK 0x1f /* length byte: low 5 bits, body length in words; high 3 reserved */
#define GENEVE_OPT_WORD 4        /* option lengths count 4-byte words */
#define GENEVE_OPT_HDR_LEN 4     /* class, type, length */

#define DSR_OPT_CLASS 0x014B
#define DSR_OPT_TYPE (GENEVE_OPT_CRITICAL | 0x01)
#define DSR_OPT_LEN 2            /* body length in words */
#define DSR_TUNNEL_TTL 64        /* outer IPv4 TTL, the kernel's default */

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

/* LB node: tunnel the DNATed packet to the backend's node. Returns
 * TPL_PASS_DSR_REDIRECT (the caller redirects) or a drop reason.
 */
static __always_inline int dsr_encap4(struct __sk_buff *skb, const struct pkt4 *p, __be32 node_addr,
				      __be32 svc_addr, __be16 svc_port)
{
	struct bpf_tunnel_key key = {};
	struct dsr_opt4 opt = {
		.opt_class = bpf_htons(DSR_OPT_CLASS),
		.type = DSR_OPT_TYPE,
		.length = DSR_OPT_LEN,
		.addr = svc_addr,
		.port = svc_port,
	};

	if (!node_addr)                      /* a remote backend without node=: nowhere to send it */
		return TPL_DROP_REMOTE_BACKEND;
	key.remote_ipv4 = bpf_ntohl(node_addr);
	key.tunnel_ttl = DSR_TUNNEL_TTL;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return TPL_DROP_DSR_ENCAP;
	if (p->proto != IPPROTO_TCP ||
	    (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		if (bpf_skb_set_tunnel_opt(skb, &opt, sizeof(opt)) < 0)
			return TPL_DROP_DSR_ENCAP;
	}
	return TPL_PASS_DSR_REDIRECT;
}

/* Backend node: the DSR option of the packet, if any. It must be the only
 * option. Returns TPL_CONTINUE with *found set and opt filled, *found clear
 * when the packet carries no options, no tunnel metadata at all
 * (BPF_PROG_TEST_RUN) or one ignorable unknown option; else a drop reason.
 */
static __always_inline int dsr_read_opt4(struct __sk_buff *skb, struct dsr_opt4 *opt, bool *found)
{
	long n = bpf_skb_get_tunnel_opt(skb, opt, sizeof(*opt));

	*found = false;
	if (n == -ENOMEM)                    /* more option bytes than the DSR option */
		return TPL_DROP_DSR_OPT_NOT_ALONE;
	if (n < 0)                           /* no tunnel metadata or no options */
		return TPL_CONTINUE;
	if (n < GENEVE_OPT_HDR_LEN)
		return TPL_DROP_DSR_OPT_MALFORMED;
	if (opt->opt_class != bpf_htons(DSR_OPT_CLASS) || opt->type != DSR_OPT_TYPE) {
		if (opt->type & GENEVE_OPT_CRITICAL)
			return TPL_DROP_DSR_OPT_CRITICAL;
		/* An unknown option the sender marked as ignorable: ignore it,
		 * as long as it is the only one.
		 */
		return (__u32)((opt->length & GENEVE_OPT_LEN_MASK) + 1) * GENEVE_OPT_WORD == n ?
		       TPL_CONTINUE : TPL_DROP_DSR_OPT_NOT_ALONE;
	}
	/* The kernel checks the options' total length only: ours must say 2
	 * words and fill the 12 bytes (more than 12 was -ENOMEM above).
	 */
	if ((opt->length & GENEVE_OPT_LEN_MASK) != DSR_OPT_LEN || n != sizeof(*opt))
		return TPL_DROP_DSR_OPT_MALFORMED;
	if (!opt->addr || !opt->port)
		return TPL_DROP_DSR_OPT_MALFORMED;
	*found = true;
	return TPL_CONTINUE;
}

/* Backend node, a packet the Geneve device decapsulated: a DSR flow's first
 * packet (with the option) gets its CT_EGRESS entry with DSRInternal, whose
 * NAT entry says which service address the reply must come from; later
 * packets refresh it. Returns a pass reason (the caller marks the packet as
 * from the tunnel) or a drop reason.
 */
static __always_inline enum tpl_reason dsr_backend4(struct __sk_buff *skb, struct pkt4 *p)
{
	struct ipv4_ct_tuple tuple = {}, nk;
	struct nat4_entry nat = {};
	struct ct_state st = {};
	struct dsr_opt4 opt = {};
	__u32 now = tpl_now();
	bool has_opt;
	int ret;

	ret = dsr_read_opt4(skb, &opt, &has_opt);
	if (tpl_has_verdict(ret))
		return ret;
	ret = ct_lookup4(&tuple, p, CT_EGRESS, skb->len, &st, now);
	if (ret != CT_NEW)
		return ct_status_reason(ret);
	if (!has_opt)
		return TPL_PASS_OVERLAY_UNTRACKED;
	ret = ct_may_create4(p);
	if (tpl_has_verdict(ret))
		return ret;

	__builtin_memset(&st, 0, sizeof(st));
	st.dsr_internal = 1;
	st.src_sec_id = endpoint_identity4(p->saddr);
	ret = ct_create4(&tuple, CT_EGRESS, &st, p->tcp_flags, skb->len, now);
	if (tpl_has_verdict(ret))
		return ret;
	nat4_key_for_ct(&tuple, &nk);
	nat.created = now;
	nat.to_addr = opt.addr;
	nat.to_port = opt.port;
	if (bpf_map_update_elem(&tpl_nat4_v1, &nk, &nat, BPF_ANY) < 0)
		return TPL_DROP_NAT_INSERT_FAILED;
	return TPL_PASS_CT_NEW;
}

#endif
