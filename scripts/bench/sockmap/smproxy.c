/* A throwaway transparent TCP forwarder whose bytes never reach user space: an eBPF
 * sk_skb verdict program redirects every segment received on one socket of a pair to
 * the other socket's send side (a SOCKHASH keyed by the receiving socket's cookie).
 * Written to measure what an in-kernel socket redirect would give meshproxy's opaque
 * connections (docs/bench/issue14-sockmap-s6.md); it is not part of meshproxy.
 *
 * Usage (as root; drops to UID after loading the program):
 *   smproxy PORT UID         listen on 127.0.0.1:PORT, dial SO_ORIGINAL_DST (IPv4)
 *
 * User space only accepts, dials, inserts both sockets into the map, and waits for
 * EOF to pass the half-close on (shutdown). Bytes that arrive before the peer socket
 * is in the map are passed to the socket's own queue (the program returns SK_PASS
 * when the lookup fails) and copied by user space; setting SO_RCVLOWAT after the
 * insert runs the verdict over whatever was already queued. One thread per
 * connection: this is for bulk and round-trip figures, not connection rates. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/bpf.h>
#include <linux/netfilter_ipv4.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static int map_fd;

static int bpf(int cmd, union bpf_attr *a) { return syscall(SYS_bpf, cmd, a, sizeof(*a)); }

static void die(const char *what) { perror(what); exit(1); }

static uint64_t cookie(int fd) {
    uint64_t c;
    socklen_t l = sizeof c;
    if (getsockopt(fd, SOL_SOCKET, SO_COOKIE, &c, &l)) die("SO_COOKIE");
    return c;
}

static int map_op(int cmd, uint64_t key, int fd) {
    union bpf_attr a;
    uint32_t v = fd;
    memset(&a, 0, sizeof a);
    a.map_fd = map_fd;
    a.key = (uint64_t)&key;
    a.value = (uint64_t)&v;
    a.flags = BPF_ANY;
    return bpf(cmd, &a);
}

static void *serve(void *arg) {
    int a = (int)(intptr_t)arg, one = 1;
    struct sockaddr_in dst;
    socklen_t len = sizeof dst;
    if (getsockopt(a, SOL_IP, SO_ORIGINAL_DST, &dst, &len)) { close(a); return 0; }
    int b = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(b, (void *)&dst, sizeof dst)) { close(a); close(b); return 0; }
    setsockopt(a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    uint64_t ca = cookie(a), cb = cookie(b);
    /* b first, keyed by a's cookie: from now on a's segments can find b. */
    if (map_op(BPF_MAP_UPDATE_ELEM, ca, b) || map_op(BPF_MAP_UPDATE_ELEM, cb, a)) die("map update");
    /* Run the verdict over bytes queued before the insert. */
    setsockopt(a, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
    setsockopt(b, SOL_SOCKET, SO_RCVLOWAT, &one, sizeof one);
    int ended[2] = {0, 0};
    static char buf[2][65536];
    while (!(ended[0] && ended[1])) {
        struct pollfd fds[2] = {{a, ended[0] ? 0 : POLLIN | POLLRDHUP, 0},
                                {b, ended[1] ? 0 : POLLIN | POLLRDHUP, 0}};
        if (poll(fds, 2, -1) < 0) break;
        for (int i = 0; i < 2; i++) {
            if (!fds[i].revents) continue;
            int from = i ? b : a, to = i ? a : b;
            ssize_t n = recv(from, buf[i], sizeof buf[i], MSG_DONTWAIT);
            if (n > 0) {
                send(to, buf[i], n, 0); /* passed before the peer was in the map */
            } else if (n == 0 || errno != EAGAIN) {
                shutdown(to, SHUT_WR);
                ended[i] = 1;
            }
        }
    }
    map_op(BPF_MAP_DELETE_ELEM, ca, 0);
    map_op(BPF_MAP_DELETE_ELEM, cb, 0);
    close(a);
    close(b);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: smproxy PORT UID\n"); return 2; }
    union bpf_attr a;
    memset(&a, 0, sizeof a);
    a.map_type = BPF_MAP_TYPE_SOCKHASH;
    a.key_size = 8;
    a.value_size = 4;
    a.max_entries = 65536;
    map_fd = bpf(BPF_MAP_CREATE, &a);
    if (map_fd < 0) die("BPF_MAP_CREATE");
    /* r6 = skb; key = get_socket_cookie(skb); r0 = sk_redirect_hash(skb, map, &key, 0);
     * return r0 ? r0 : SK_PASS */
    struct bpf_insn prog[] = {
        {0xbf, 6, 1, 0, 0},                        /* r6 = r1 */
        {0x85, 0, 0, 0, BPF_FUNC_get_socket_cookie},
        {0x7b, 10, 0, -8, 0},                      /* *(u64 *)(r10 - 8) = r0 */
        {0x18, 2, BPF_PSEUDO_MAP_FD, 0, map_fd},   /* r2 = map (two slots) */
        {0, 0, 0, 0, 0},
        {0xbf, 1, 6, 0, 0},                        /* r1 = r6 */
        {0xbf, 3, 10, 0, 0},                       /* r3 = r10 */
        {0x07, 3, 0, 0, -8},                       /* r3 += -8 */
        {0xb7, 4, 0, 0, 0},                        /* r4 = 0: the peer's send side */
        {0x85, 0, 0, 0, BPF_FUNC_sk_redirect_hash},
        {0x55, 0, 0, 1, 0},                        /* if r0 != 0 goto exit */
        {0xb7, 0, 0, 0, 1},                        /* r0 = SK_PASS */
        {0x95, 0, 0, 0, 0},                        /* exit */
    };
    static char log[65536];
    memset(&a, 0, sizeof a);
    a.prog_type = BPF_PROG_TYPE_SK_SKB;
    a.insns = (uint64_t)prog;
    a.insn_cnt = sizeof prog / sizeof prog[0];
    a.license = (uint64_t) "Dual MIT/GPL";
    a.log_buf = (uint64_t)log;
    a.log_size = sizeof log;
    a.log_level = 1;
    int prog_fd = bpf(BPF_PROG_LOAD, &a);
    if (prog_fd < 0) { fprintf(stderr, "%s\n", log); die("BPF_PROG_LOAD"); }
    memset(&a, 0, sizeof a);
    a.target_fd = map_fd;
    a.attach_bpf_fd = prog_fd;
    a.attach_type = BPF_SK_SKB_VERDICT;
    if (bpf(BPF_PROG_ATTACH, &a)) die("BPF_PROG_ATTACH");

    int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &la.sin_addr);
    if (bind(l, (void *)&la, sizeof la) || listen(l, 4096)) die("listen");
    uid_t uid = atoi(argv[2]);
    if (setresgid(uid, uid, uid) || setresuid(uid, uid, uid)) die("setresuid");
    for (;;) {
        int c = accept(l, 0, 0);
        if (c < 0) continue;
        pthread_t t;
        if (pthread_create(&t, 0, serve, (void *)(intptr_t)c)) { close(c); continue; }
        pthread_detach(t);
    }
}
