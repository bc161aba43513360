// SPDX-License-Identifier: GPL-2.0
/* The baseline for bench/datapath.py: a TC program that only passes the packet. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tc")
int pass(struct __sk_buff *skb)
{
	return 0;
}
