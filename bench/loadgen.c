// SPDX-License-Identifier: Apache-2.0
/*
 * loadgen: a small TCP/UDP request/response load generator for bench/services.py.
 *
 *   loadgen server PORT [WORKERS]
 *       Echo server on TCP and UDP PORT (0.0.0.0). WORKERS processes (default: the
 *       number of CPUs), each with its own SO_REUSEPORT sockets and an epoll loop.
 *       Prints "ready" once every socket is bound. Then each line read on stdin
 *       prints "accepted=A requests=R udp=U" (totals so far); EOF on stdin stops it.
 *
 *   loadgen server6 PORT [WORKERS]
 *       The same on :: (IPv6, and IPv4 as mapped addresses).
 *
 *   loadgen crr|rr|udp_rr IP[,IP...] PORT SECONDS [CONCURRENCY] [SIZE]
 *       CONCURRENCY client processes (default 1), process i aimed at the i-th address
 *       modulo their number, for SECONDS seconds, SIZE-byte requests (default 64).
 *       Each IP is IPv4 (10.68.0.1) or IPv6 (fd00::1 or [fd00::1]); families may mix.
 *         crr     connect, send a request, read the echo, close, per transaction.
 *                 The client closes first with a normal FIN (no SO_LINGER), so the
 *                 TIME_WAIT state stays on the client side.
 *         rr      one TCP connection per process (TCP_NODELAY), opened before the
 *                 clock starts; one request/echo per transaction.
 *         udp_rr  one connected UDP socket per process; a lost datagram is an error
 *                 after a 200 ms timeout.
 *       Prints "transactions=N errors=E elapsed=S" and exits 0 (1 on bad arguments).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 256
#define MAX_TARGETS 16
#define BUF 65536

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- server ------------------------------------------------------------------------------- */

struct srv_counts {
	uint64_t accepted, requests, udp;
	char pad[64 - 3 * sizeof(uint64_t)];  /* one cache line per worker */
};

static int bound_socket(int type, int port, int family)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	struct sockaddr_in6 a6 = { .sin6_family = AF_INET6, .sin6_port = htons(port) };
	int one = 1, zero = 0;
	int fd = socket(family, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

	if (fd < 0)
		die("socket");
	if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) ||
	    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) ||
	    (family == AF_INET6 && setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero))))
		die("setsockopt");
	if (family == AF_INET6 ? bind(fd, (struct sockaddr *)&a6, sizeof(a6)) : bind(fd, (struct sockaddr *)&a, sizeof(a)))
		die("bind");
	if (type == SOCK_STREAM && listen(fd, 4096))
		die("listen");
	return fd;
}

static void server_worker(int lfd, int ufd, struct srv_counts *c)
{
	struct epoll_event ev, evs[256];
	static char buf[BUF];
	int one = 1;
	int ep = epoll_create1(EPOLL_CLOEXEC);

	if (ep < 0)
		die("epoll_create1");
	ev.events = EPOLLIN;
	ev.data.fd = lfd;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev))
		die("epoll_ctl");
	ev.data.fd = ufd;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, ufd, &ev))
		die("epoll_ctl");
	for (;;) {
		int n = epoll_wait(ep, evs, 256, -1);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == lfd) {
				int cfd;

				while ((cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
					setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
					ev.events = EPOLLIN;
					ev.data.fd = cfd;
					if (epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev))
						close(cfd);
					else
						c->accepted++;
				}
			} else if (fd == ufd) {
				struct sockaddr_storage peer;
				socklen_t pl = sizeof(peer);
				ssize_t r;

				while ((r = recvfrom(ufd, buf, sizeof(buf), 0, (struct sockaddr *)&peer, &pl)) >= 0) {
					sendto(ufd, buf, r, 0, (struct sockaddr *)&peer, pl);
					c->udp++;
					pl = sizeof(peer);
				}
			} else {
				ssize_t r = read(fd, buf, sizeof(buf));

				if (r > 0) {
					/* Small messages: the send buffer never fills, one write does it. */
					if (write(fd, buf, r) != r) {
						close(fd);
						continue;
					}
					c->requests++;
				} else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
					close(fd);  /* also removes it from the epoll set */
				}
			}
		}
	}
}

static int server(int argc, char **argv, int family)
{
	int port, workers = (int)sysconf(_SC_NPROCESSORS_ONLN);
	pid_t pids[MAX_PROCS];
	struct srv_counts *c;
	char line[256];

	if (argc < 3)
		return 1;
	port = atoi(argv[2]);
	if (argc > 3)
		workers = atoi(argv[3]);
	if (port <= 0 || port > 65535 || workers < 1 || workers > MAX_PROCS)
		return 1;
	c = mmap(NULL, sizeof(*c) * workers, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (c == MAP_FAILED)
		die("mmap");
	memset(c, 0, sizeof(*c) * workers);
	for (int w = 0; w < workers; w++) {
		int lfd = bound_socket(SOCK_STREAM, port, family);
		int ufd = bound_socket(SOCK_DGRAM, port, family);

		pids[w] = fork();
		if (pids[w] < 0)
			die("fork");
		if (pids[w] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() == 1)
				_exit(0);
			server_worker(lfd, ufd, &c[w]);
			_exit(0);
		}
		close(lfd);
		close(ufd);
	}
	printf("ready\n");
	fflush(stdout);
	while (fgets(line, sizeof(line), stdin)) {
		uint64_t a = 0, r = 0, u = 0;

		for (int w = 0; w < workers; w++) {
			a += __atomic_load_n(&c[w].accepted, __ATOMIC_RELAXED);
			r += __atomic_load_n(&c[w].requests, __ATOMIC_RELAXED);
			u += __atomic_load_n(&c[w].udp, __ATOMIC_RELAXED);
		}
		printf("accepted=%llu requests=%llu udp=%llu\n", (unsigned long long)a,
		       (unsigned long long)r, (unsigned long long)u);
		fflush(stdout);
	}
	for (int w = 0; w < workers; w++)
		kill(pids[w], SIGKILL);
	for (int w = 0; w < workers; w++)
		waitpid(pids[w], NULL, 0);
	return 0;
}

/* ---- client ------------------------------------------------------------------------------- */

enum mode { CRR, RR, UDP_RR };

struct shared {
	volatile int go, stop;
	struct {
		uint64_t done, errors;
		char pad[64 - 2 * sizeof(uint64_t)];
	} per[MAX_PROCS];
};

static void set_timeouts(int fd, long usec)
{
	struct timeval tv = { .tv_sec = usec / 1000000, .tv_usec = usec % 1000000 };

	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

/* Read exactly n bytes; 0 on success. */
static int read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);

		if (r <= 0) {
			if (r < 0 && errno == EINTR)
				continue;
			return -1;
		}
		got += r;
	}
	return 0;
}

/* One target: an IPv4 or IPv6 address and the port. */
struct target {
	struct sockaddr_storage sa;
	socklen_t len;
};

/* "10.0.0.1", "fd00::1" or "[fd00::1]" with port into t; 0 on success. */
static int parse_target(const char *s, int port, struct target *t)
{
	struct sockaddr_in *a = (struct sockaddr_in *)&t->sa;
	struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&t->sa;
	char buf[INET6_ADDRSTRLEN + 2];
	size_t n = strlen(s);

	memset(t, 0, sizeof(*t));
	if (n >= 2 && s[0] == '[' && s[n - 1] == ']') {
		if (n - 2 >= sizeof(buf))
			return -1;
		memcpy(buf, s + 1, n - 2);
		buf[n - 2] = 0;
		s = buf;
	} else if (inet_pton(AF_INET, s, &a->sin_addr) == 1) {
		a->sin_family = AF_INET;
		a->sin_port = htons(port);
		t->len = sizeof(*a);
		return 0;
	}
	if (inet_pton(AF_INET6, s, &a6->sin6_addr) != 1)
		return -1;
	a6->sin6_family = AF_INET6;
	a6->sin6_port = htons(port);
	t->len = sizeof(*a6);
	return 0;
}

static int tcp_connect(const struct target *dst)
{
	int one = 1;
	int fd = socket(dst->sa.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	set_timeouts(fd, 1000000);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (connect(fd, (const struct sockaddr *)&dst->sa, dst->len)) {
		close(fd);
		return -1;
	}
	return fd;
}

static void client_worker(enum mode m, const struct target *dst, size_t size, struct shared *sh, int id)
{
	char req[BUF], resp[BUF];
	uint64_t done = 0, errors = 0;
	int fd = -1;

	memset(req, 'x', size);
	if (m == RR) {
		fd = tcp_connect(dst);
	} else if (m == UDP_RR) {
		fd = socket(dst->sa.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
		if (fd >= 0) {
			set_timeouts(fd, 200000);
			if (connect(fd, (const struct sockaddr *)&dst->sa, dst->len)) {
				close(fd);
				fd = -1;
			}
		}
	}
	if (m != CRR && fd < 0) {
		sh->per[id].errors = 1;
		return;
	}
	while (!sh->go)
		usleep(100);
	while (!sh->stop) {
		int ok = 0;

		if (m == CRR) {
			int c = tcp_connect(dst);

			if (c >= 0) {
				ok = write(c, req, size) == (ssize_t)size && read_full(c, resp, size) == 0;
				close(c);
			} else if (errno == EADDRNOTAVAIL) {
				usleep(1000);  /* out of local ports: do not spin */
			}
		} else if (m == RR) {
			ok = write(fd, req, size) == (ssize_t)size && read_full(fd, resp, size) == 0;
			if (!ok) {  /* the connection broke: stop counting on it */
				errors++;
				break;
			}
		} else {
			ok = send(fd, req, size, 0) == (ssize_t)size && recv(fd, resp, sizeof(resp), 0) == (ssize_t)size;
		}
		if (sh->stop)
			break;
		if (ok)
			done++;
		else
			errors++;
	}
	if (fd >= 0)
		close(fd);
	sh->per[id].done = done;
	sh->per[id].errors = errors;
}

static int client(enum mode m, int argc, char **argv)
{
	struct target dst[MAX_TARGETS];
	int ntargets = 0, port, conc = 1;
	size_t size = 64;
	double seconds, t0, t1;
	uint64_t done = 0, errors = 0;
	struct shared *sh;
	pid_t pids[MAX_PROCS];
	char *list, *tok, *save;

	if (argc < 5)
		return 1;
	port = atoi(argv[3]);
	seconds = atof(argv[4]);
	if (argc > 5)
		conc = atoi(argv[5]);
	if (argc > 6)
		size = strtoul(argv[6], NULL, 10);
	if (port <= 0 || port > 65535 || seconds <= 0 || conc < 1 || conc > MAX_PROCS || size < 1 ||
	    size > BUF || (m == UDP_RR && size > 1400))
		return 1;
	list = strdup(argv[2]);
	for (tok = strtok_r(list, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		if (ntargets == MAX_TARGETS)
			return 1;
		if (parse_target(tok, port, &dst[ntargets])) {
			fprintf(stderr, "loadgen: not an IPv4 or IPv6 address: %s\n", tok);
			return 1;
		}
		ntargets++;
	}
	if (!ntargets)
		return 1;
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		die("mmap");
	memset(sh, 0, sizeof(*sh));
	for (int i = 0; i < conc; i++) {
		pids[i] = fork();
		if (pids[i] < 0)
			die("fork");
		if (pids[i] == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			client_worker(m, &dst[i % ntargets], size, sh, i);
			_exit(0);
		}
	}
	usleep(50000);  /* let every process connect (rr, udp_rr) and wait at the start line */
	t0 = now();
	sh->go = 1;
	{
		struct timespec ts = { .tv_sec = (time_t)seconds,
				       .tv_nsec = (long)((seconds - (time_t)seconds) * 1e9) };

		while (nanosleep(&ts, &ts) && errno == EINTR)
			;
	}
	sh->stop = 1;
	t1 = now();
	for (int i = 0; i < conc; i++)
		waitpid(pids[i], NULL, 0);
	for (int i = 0; i < conc; i++) {
		done += sh->per[i].done;
		errors += sh->per[i].errors;
	}
	printf("transactions=%llu errors=%llu elapsed=%.6f\n", (unsigned long long)done,
	       (unsigned long long)errors, t1 - t0);
	return 0;
}

int main(int argc, char **argv)
{
	int rc = 1;

	signal(SIGPIPE, SIG_IGN);
	if (argc >= 2 && !strcmp(argv[1], "server"))
		rc = server(argc, argv, AF_INET);
	else if (argc >= 2 && !strcmp(argv[1], "server6"))
		rc = server(argc, argv, AF_INET6);
	else if (argc >= 2 && !strcmp(argv[1], "crr"))
		rc = client(CRR, argc, argv);
	else if (argc >= 2 && !strcmp(argv[1], "rr"))
		rc = client(RR, argc, argv);
	else if (argc >= 2 && !strcmp(argv[1], "udp_rr"))
		rc = client(UDP_RR, argc, argv);
	if (rc == 1)
		fprintf(stderr, "usage: loadgen server|server6 PORT [WORKERS]\n"
				"       loadgen crr|rr|udp_rr IP[,IP...] PORT SECONDS [CONCURRENCY] [SIZE]\n"
				"       (IP: IPv4, IPv6 or [IPv6])\n");
	return rc;
}
