// SPDX-License-Identifier: Apache-2.0
/*
 * synflood: a raw-socket TCP SYN flooder for bench/flood.py and tests/test_netns_flood.py.
 *
 *   synflood [-n COUNT] [-t SECONDS] [-s SEED] [-b BATCH] DST PORT SRC_CIDR
 *
 * Sends TCP SYNs to DST:PORT, each from a random address in SRC_CIDR (network and
 * broadcast addresses of prefixes up to /30 excluded) and a random source port
 * (1024-65535), with a random sequence number, IP ID and an MSS option, as a SYN flood
 * would. Packets are built whole (IP_HDRINCL) with correct IP and TCP checksums and sent
 * through the routing table of the namespace it runs in, BATCH at a time (sendmmsg,
 * default 64). An IPv6 DST (with an IPv6 SRC_CIDR) floods over IPv6: whole IPv6 packets
 * (a raw IPPROTO_RAW socket, header included) from random host bits of SRC_CIDR (the
 * all-zero host excluded), a random flow label in place of the IP ID. Stops after COUNT packets or SECONDS seconds, whichever comes first (at
 * least one of the two is needed). SEED (default: from the clock) makes the sequence of
 * sources reproducible.
 *
 * Prints "sent=N errors=E elapsed=S rate=R" (R packets per second) and exits 0; exits 1 on
 * bad arguments, 2 when the socket cannot be used. Needs CAP_NET_RAW. E counts sends the
 * kernel refused for lack of buffer space (retried, so N is what actually left).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip6.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 1024
#define TCP_OPT_LEN 4                       /* MSS */
#define TCP_LEN (sizeof(struct tcphdr) + TCP_OPT_LEN)
#define PKT_LEN (sizeof(struct iphdr) + TCP_LEN)
#define PKT6_LEN (sizeof(struct ip6_hdr) + TCP_LEN)

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t rng;

/* xorshift64*: fast, and good enough to spread sources over a table's hash. */
static uint64_t rnd(void)
{
	rng ^= rng >> 12;
	rng ^= rng << 25;
	rng ^= rng >> 27;
	return rng * 0x2545F4914F6CDD1DULL;
}

/* The Internet checksum (RFC 1071) of len bytes, added to a running sum. */
static uint32_t csum_add(uint32_t sum, const void *data, size_t len)
{
	const uint8_t *p = data;

	for (; len > 1; len -= 2, p += 2)
		sum += (uint32_t)p[0] << 8 | p[1];
	if (len)
		sum += (uint32_t)p[0] << 8;
	return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return htons((uint16_t)~sum);
}

struct pseudo {
	uint32_t saddr, daddr;
	uint8_t zero, proto;
	uint16_t len;
};

/* The IPv6 pseudo-header (RFC 8200, 8.1). */
struct pseudo6 {
	struct in6_addr saddr, daddr;
	uint32_t len;
	uint8_t zero[3], next;
};

/* The SYN at tcp (sequence number from r), its checksum started from the pseudo-header's sum. */
static void build_tcp(struct tcphdr *tcp, uint16_t sport, uint16_t dport, uint64_t r, uint32_t pseudo_sum)
{
	uint8_t *opt = (uint8_t *)(tcp + 1);

	tcp->source = htons(sport);
	tcp->dest = htons(dport);
	tcp->seq = htonl((uint32_t)(r >> 32));
	tcp->doff = TCP_LEN / 4;
	tcp->syn = 1;
	tcp->window = htons(64240);
	opt[0] = TCPOPT_MAXSEG;
	opt[1] = TCPOLEN_MAXSEG;
	opt[2] = 1460 >> 8;
	opt[3] = 1460 & 0xff;
	tcp->check = csum_fold(csum_add(pseudo_sum, tcp, TCP_LEN));
}

static void build(uint8_t *pkt, uint32_t saddr, uint32_t daddr, uint16_t sport, uint16_t dport)
{
	struct iphdr *ip = (struct iphdr *)pkt;
	struct pseudo ph = {
		.saddr = saddr, .daddr = daddr, .proto = IPPROTO_TCP, .len = htons(TCP_LEN),
	};
	uint64_t r = rnd();

	memset(pkt, 0, PKT_LEN);
	ip->version = 4;
	ip->ihl = sizeof(*ip) / 4;
	ip->tot_len = htons(PKT_LEN);
	ip->id = htons((uint16_t)r);
	ip->frag_off = htons(IP_DF);
	ip->ttl = 64;
	ip->protocol = IPPROTO_TCP;
	ip->saddr = saddr;
	ip->daddr = daddr;
	ip->check = csum_fold(csum_add(0, ip, sizeof(*ip)));
	build_tcp((struct tcphdr *)(ip + 1), sport, dport, r, csum_add(0, &ph, sizeof(ph)));
}

static void build6(uint8_t *pkt, const struct in6_addr *saddr, const struct in6_addr *daddr, uint16_t sport,
		   uint16_t dport)
{
	struct ip6_hdr *ip6 = (struct ip6_hdr *)pkt;
	struct pseudo6 ph = {
		.saddr = *saddr, .daddr = *daddr, .len = htonl(TCP_LEN), .next = IPPROTO_TCP,
	};
	uint64_t r = rnd();

	memset(pkt, 0, PKT6_LEN);
	ip6->ip6_flow = htonl(6u << 28 | ((uint32_t)r & 0xfffff));
	ip6->ip6_plen = htons(TCP_LEN);
	ip6->ip6_nxt = IPPROTO_TCP;
	ip6->ip6_hlim = 64;
	ip6->ip6_src = *saddr;
	ip6->ip6_dst = *daddr;
	build_tcp((struct tcphdr *)(ip6 + 1), sport, dport, r, csum_add(0, &ph, sizeof(ph)));
}

/* A random address of net/prefix (host bits random, never all zero: the subnet-router anycast). */
static void random6(struct in6_addr *out, const struct in6_addr *net, int prefix)
{
	do {
		uint64_t r[2] = { rnd(), rnd() };
		const uint8_t *rb = (const uint8_t *)r;
		int zero = 1;

		for (int i = 0; i < 16; i++) {
			int keep = prefix >= 8 * (i + 1) ? 8 : (prefix > 8 * i ? prefix - 8 * i : 0);
			uint8_t mask = keep ? (uint8_t)(0xff << (8 - keep)) : 0;

			out->s6_addr[i] = (net->s6_addr[i] & mask) | (rb[i] & (uint8_t)~mask);
			if (rb[i] & (uint8_t)~mask)
				zero = 0;
		}
		if (!zero || prefix == 128)
			return;
	} while (1);
}

static int usage(void)
{
	fprintf(stderr, "usage: synflood [-n COUNT] [-t SECONDS] [-s SEED] [-b BATCH] DST PORT SRC_CIDR\n"
			"  (at least one of -n, -t)\n");
	return 1;
}

int main(int argc, char **argv)
{
	static uint8_t pkts[MAX_BATCH][PKT6_LEN];
	static struct mmsghdr msgs[MAX_BATCH];
	static struct iovec iov[MAX_BATCH];
	uint64_t count = 0, sent = 0, errors = 0, seed = 0;
	double seconds = 0, t0, elapsed;
	int batch = 64, opt, fd, one = 1, prefix, port, v6;
	struct sockaddr_in dst = { .sin_family = AF_INET };
	struct sockaddr_in6 dst6 = { .sin6_family = AF_INET6 };
	uint32_t net = 0, hostmask, lo = 0, span = 0;
	char cidr[64], *slash, *end;
	struct in_addr a;
	struct in6_addr net6;

	while ((opt = getopt(argc, argv, "n:t:s:b:")) != -1) {
		switch (opt) {
		case 'n':
			count = strtoull(optarg, &end, 10);
			if (*end || !count)
				return usage();
			break;
		case 't':
			seconds = strtod(optarg, &end);
			if (*end || seconds <= 0)
				return usage();
			break;
		case 's':
			seed = strtoull(optarg, &end, 0);
			if (*end)
				return usage();
			break;
		case 'b':
			batch = atoi(optarg);
			if (batch < 1 || batch > MAX_BATCH)
				return usage();
			break;
		default:
			return usage();
		}
	}
	if (argc - optind != 3 || (!count && seconds <= 0))
		return usage();
	v6 = strchr(argv[optind], ':') != NULL;
	if (v6 ? inet_pton(AF_INET6, argv[optind], &dst6.sin6_addr) != 1
	       : inet_pton(AF_INET, argv[optind], &dst.sin_addr) != 1)
		return usage();
	port = atoi(argv[optind + 1]);
	if (port <= 0 || port > 65535)
		return usage();
	snprintf(cidr, sizeof(cidr), "%s", argv[optind + 2]);
	slash = strchr(cidr, '/');
	if (!slash)
		return usage();
	*slash = 0;
	prefix = (int)strtol(slash + 1, &end, 10);
	if (*end || slash[1] == 0 || prefix < 0 || prefix > (v6 ? 128 : 32) ||
	    (v6 ? inet_pton(AF_INET6, cidr, &net6) : inet_pton(AF_INET, cidr, &a)) != 1)
		return usage();
	if (!v6) {
		hostmask = prefix == 0 ? 0xffffffffu : (prefix == 32 ? 0 : (1u << (32 - prefix)) - 1);
		net = ntohl(a.s_addr) & ~hostmask;
		/* Host addresses only: skip the network and broadcast addresses where there are others. */
		lo = prefix <= 30 ? 1 : 0;
		span = prefix <= 30 ? hostmask - 1 : hostmask + 1;   /* 0 for /0: the whole space */
	}

	rng = seed ? seed : ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid() ^ 0x9E3779B97F4A7C15ULL;
	if (!rng)
		rng = 1;

	/* IPPROTO_RAW: the header is included (IPv4 says so once more with IP_HDRINCL). */
	fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_RAW, IPPROTO_RAW);
	if (fd < 0) {
		perror("socket(SOCK_RAW)");
		return 2;
	}
	if (!v6 && setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof(one))) {
		perror("setsockopt(IP_HDRINCL)");
		return 2;
	}
	for (int i = 0; i < batch; i++) {
		iov[i].iov_base = pkts[i];
		iov[i].iov_len = v6 ? PKT6_LEN : PKT_LEN;
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
		msgs[i].msg_hdr.msg_name = v6 ? (void *)&dst6 : (void *)&dst;
		msgs[i].msg_hdr.msg_namelen = v6 ? sizeof(dst6) : sizeof(dst);
	}

	t0 = now();
	for (;;) {
		uint64_t left = count ? count - sent : MAX_BATCH;
		int n = left < (uint64_t)batch ? (int)left : batch, done = 0;

		if (n == 0)
			break;
		if (seconds > 0 && now() - t0 >= seconds)
			break;
		for (int i = 0; i < n; i++) {
			uint64_t r = rnd();
			uint32_t host = span ? lo + (uint32_t)(r % span) : (uint32_t)r;
			uint16_t sport = 1024 + (uint16_t)((r >> 32) % (65536 - 1024));

			if (v6) {
				struct in6_addr src;

				random6(&src, &net6, prefix);
				build6(pkts[i], &src, &dst6.sin6_addr, sport, (uint16_t)port);
			} else {
				build(pkts[i], htonl(net | host), dst.sin_addr.s_addr, sport, (uint16_t)port);
			}
		}
		while (done < n) {
			int r = sendmmsg(fd, msgs + done, n - done, 0);

			if (r < 0) {
				if (errno == EINTR)
					continue;
				if (errno == ENOBUFS || errno == EAGAIN) {
					errors++;
					sched_yield();
					continue;
				}
				perror("sendmmsg");
				return 2;
			}
			done += r;
		}
		sent += n;
	}
	elapsed = now() - t0;
	printf("sent=%llu errors=%llu elapsed=%.3f rate=%.0f\n", (unsigned long long)sent,
	       (unsigned long long)errors, elapsed, elapsed > 0 ? sent / elapsed : 0.0);
	return 0;
}
