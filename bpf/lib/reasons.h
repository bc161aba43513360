/* SPDX-License-Identifier: GPL-2.0 */
/* One table of verdict reasons for every program. Values below
 * TPL_DROP_BASE pass the packet; values from TPL_DROP_BASE drop it. The agent
 * reads the names from this enum's BTF, so the CLI, metrics and bpftool
 * print the same words. Append only: values are counters' indexes.
 */
#ifndef TUPLET_REASONS_H
#define TUPLET_REASONS_H

#include "compiler.h"

enum tpl_reason {
	/* passed */
	TPL_PASS_CT_NEW = 0,           /* first packet of a flow: entry created */
	TPL_PASS_CT_ESTABLISHED = 1,   /* packet in the flow's original direction */
	TPL_PASS_CT_REPLY = 2,         /* packet in the reply direction */
	TPL_PASS_CT_RELATED = 3,       /* ICMP error related to a tracked flow */
	TPL_PASS_CT_REOPENED = 4,      /* SYN on a closing entry: connection reopened */
	TPL_PASS_NOT_IPV4 = 5,         /* ARP, other ethertypes (IPv6 where not tracked: bpf_host, bpf_overlay): untouched */
	TPL_PASS_UNTRACKED_PROTO = 6,  /* IPv4/IPv6 protocol other than TCP, UDP, ICMP/ICMPv6 */
	TPL_PASS_FRAGMENT = 7,         /* non-first IPv4 or IPv6 fragment: no L4 header */
	TPL_PASS_ICMP_UNRELATED = 8,   /* ICMP error matching no tracked flow */
	TPL_PASS_CT_UNTRACKED_RST = 9, /* TCP reset matching no tracked flow */
	TPL_PASS_NETDEV_UNTRACKED = 10,/* node NIC: not a service flow, left to the stack */
	TPL_PASS_DSR_REDIRECT = 11,    /* LB node: to a remote backend over the Geneve device (DSR) */
	TPL_PASS_OVERLAY_UNTRACKED = 12,/* Geneve device: no DSR option and no DSR flow, left to the stack */
	TPL_PASS_ICMP6_UNTRACKED = 13, /* ICMPv6 neither echo nor error 1-4 (neighbour discovery, router messages, MLD) */

	TPL_DROP_BASE = 128,
	TPL_DROP_INVALID_L3 = 128,       /* truncated or malformed Ethernet/IPv4/IPv6 header (or IPv6 extension header) */
	TPL_DROP_CT_INVALID_HDR = 129,   /* truncated or malformed TCP/UDP/ICMP/ICMPv6 header */
	TPL_DROP_CT_INSERT_FAILED = 130, /* CT: Map insertion failed */
	TPL_DROP_NO_SERVICE_BACKEND = 131, /* service without a usable backend */
	TPL_DROP_NAT_REWRITE = 132,      /* the kernel refused an address/port rewrite */
	TPL_DROP_REMOTE_BACKEND = 133,   /* NodePort/LB backend on another node: DSR not available */
	TPL_DROP_REV_NAT_MISSING = 134,  /* reply of a service flow whose reverse-NAT entry is gone */
	TPL_DROP_DSR_OPT_MALFORMED = 135, /* Geneve DSR option with a wrong length or bad service address */
	TPL_DROP_DSR_OPT_CRITICAL = 136,  /* unknown Geneve option with the critical bit set */
	TPL_DROP_DSR_OPT_NOT_ALONE = 137, /* Geneve options besides (or longer than) the DSR option */
	TPL_DROP_DSR_ENCAP = 138,         /* the kernel refused the tunnel key, option or redirect */
	TPL_DROP_NAT_INSERT_FAILED = 139, /* DSR: NAT map insertion failed */
	TPL_DROP_INVALID_EXTHDR = 140,    /* IPv6: more than IPV6_MAX_EXT_HDRS extension headers (the reference's DROP_INVALID_EXTHDR) */

	TPL_REASON_SLOTS = 256,
};

/* Metric direction: which program counted. */
enum tpl_metric_dir {
	TPL_METRIC_EGRESS = 0,          /* leaving a pod (cil_from_container) */
	TPL_METRIC_INGRESS = 1,         /* entering a pod (cil_to_container) */
	TPL_METRIC_NETDEV_INGRESS = 2,  /* entering the node on its NIC (cil_from_netdev) */
	TPL_METRIC_NETDEV_EGRESS = 3,   /* leaving the node on its NIC (cil_to_netdev) */
	TPL_METRIC_DIRS = 4,
};

/* A helper that may decide a packet's fate returns int: a reason (enum
 * tpl_reason, 0..TPL_REASON_SLOTS-1) when it decided, or TPL_CONTINUE when the
 * caller goes on. TPL_CONTINUE is negative, outside the enum's range, so "go
 * on" can never be read as a verdict (0 is TPL_PASS_CT_NEW). Test it with
 * tpl_has_verdict(), never against 0.
 */
#define TPL_CONTINUE (-1)

static __always_inline bool tpl_has_verdict(int ret)
{
	return ret != TPL_CONTINUE;
}

/* The helper's verdict if it gave one, else `otherwise`. */
static __always_inline enum tpl_reason tpl_verdict_or(int ret, enum tpl_reason otherwise)
{
	return tpl_has_verdict(ret) ? ret : otherwise;
}

#endif
