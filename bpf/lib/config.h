/* SPDX-License-Identifier: GPL-2.0 */
/* Load-time configuration. The loader writes these before the object is
 * loaded (they live in .rodata, so the verifier sees them as constants and
 * prunes branches that a configuration disables). Names and units are part of
 * the loader's contract: do not rename without updating tuplet/datapath.py.
 */
#ifndef TUPLET_CONFIG_H
#define TUPLET_CONFIG_H

#include "compiler.h"

/* Conntrack lifetimes, in seconds (reference agent defaults). */
const volatile __u32 ct_lifetime_tcp = 8000;           /* established TCP, 2h13m20s */
const volatile __u32 ct_lifetime_nontcp = 60;          /* UDP, ICMP, other */
const volatile __u32 ct_service_lifetime_tcp = 8000;   /* established TCP, service entries */
const volatile __u32 ct_service_lifetime_nontcp = 60;  /* non-TCP service entries */
const volatile __u32 ct_syn_timeout = 60;              /* TCP until a non-SYN packet is seen */
const volatile __u32 ct_close_timeout = 10;            /* TCP once both sides are closing */
const volatile __u32 ct_service_close_rebalance = 60;  /* closed service entry keeps its backend */

/* How often (seconds) a flow's last_{rx,tx}_report is refreshed, and which
 * TCP flags are accumulated into {rx,tx}_flags_seen. All eight flags by
 * default so `tuplet ct list` shows everything a flow has carried; SYN is
 * always included because closing logic needs "both SYNs seen".
 */
const volatile __u32 ct_report_interval = 5;
const volatile __u8 ct_report_flags = 0xff;

/* Count packets and bytes per entry (two atomic adds per packet; never on
 * service entries). Off by default, as the reference: Packets=0 Bytes=0.
 */
const volatile __u8 ct_accounting = 0;

/* New TCP entries wait in tpl_ct4_syn_v1 until their connection is
 * established (flood protection). 0: one LRU table, as the reference.
 */
const volatile __u8 ct_syn_table = 1;

/* Fault injection for tests: treat every conntrack insert as failed. Zero in
 * production, where the verifier removes the check as dead code.
 */
const volatile __u8 fault_ct_insert = 0;

/* DSR over Geneve (0: no overlay configured). The ifindex of the node's
 * collect-metadata Geneve device: the LB node redirects flows to remote
 * backends there (cil_from_netdev).
 */
const volatile __u32 overlay_ifindex = 0;

#endif
