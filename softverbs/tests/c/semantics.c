/* softverbs semantics, as small verbs programs. Usage: semantics CASE [ARG]
 * Cross-process cases fork: the parent (A) initiates, the child (B) is the
 * target; they exchange addresses over a socketpair, as real programs do
 * over TCP. Exit 0 and "CASE ok" on success; on failure, a message and 1. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <arpa/inet.h>
#include <unistd.h>
#include <infiniband/verbs.h>

/* rdma-core's driver.h (private) declares it; perftest calls it. 0: IB or
 * RoCE v1, 1: RoCE v2. */
int ibv_query_gid_type(struct ibv_context *context, uint8_t port_num, unsigned int index, int *type);

static const char *who = "A";
#define CHECK(c, ...)                                                             \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "%s FAIL %s:%d: %s: ", who, __FILE__, __LINE__, #c);  \
            fprintf(stderr, __VA_ARGS__);                                         \
            fprintf(stderr, "\n");                                                \
            exit(1);                                                              \
        }                                                                         \
    } while (0)

static int sock = -1;
static void put(const void *p, size_t n) { CHECK(write(sock, p, n) == (ssize_t)n, "socket write"); }
static void get(void *p, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(sock, (char *)p + got, n - got);
        CHECK(r > 0, "socket read (peer gone?)");
        got += (size_t)r;
    }
}
static void sync_peer(void) { char c = 's'; put(&c, 1); get(&c, 1); }

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

struct info { uint32_t qpn; uint16_t lid; union ibv_gid gid; uint64_t addr; uint32_t rkey; uint32_t rkey2; uint64_t addr2; };

struct ep {
    struct ibv_context *ctx;
    struct ibv_pd *pd;
    struct ibv_comp_channel *ch;
    struct ibv_cq *cq;
    struct ibv_srq *srq;
    struct ibv_qp *qp;
    struct ibv_mr *mr;
    char *buf;
    size_t len;
};

static struct ibv_context *open_first(void) {
    int n = 0;
    struct ibv_device **l = ibv_get_device_list(&n);
    CHECK(l && n > 0, "no devices");
    struct ibv_context *c = ibv_open_device(l[0]);
    CHECK(c, "open_device");
    ibv_free_device_list(l);
    return c;
}

static void ep_open(struct ep *e, int cq_depth, int channel, size_t len) {
    memset(e, 0, sizeof *e);
    e->ctx = open_first();
    e->pd = ibv_alloc_pd(e->ctx);
    CHECK(e->pd, "alloc_pd");
    if (channel) {
        e->ch = ibv_create_comp_channel(e->ctx);
        CHECK(e->ch, "create_comp_channel");
    }
    e->cq = ibv_create_cq(e->ctx, cq_depth, e, e->ch, 0);
    CHECK(e->cq, "create_cq");
    e->len = len;
    e->buf = calloc(1, len);
    e->mr = ibv_reg_mr(e->pd, e->buf, len, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ);
    CHECK(e->mr, "reg_mr: %s", strerror(errno));
}

static struct ibv_qp *make_qp(struct ep *e, struct ibv_srq *srq, int sges) {
    struct ibv_qp_init_attr a = {0};
    a.send_cq = e->cq;
    a.recv_cq = e->cq;
    a.srq = srq;
    a.cap.max_send_wr = 64;
    a.cap.max_recv_wr = 64;
    a.cap.max_send_sge = sges;
    a.cap.max_recv_sge = sges;
    a.cap.max_inline_data = 64;
    a.qp_type = IBV_QPT_RC;
    struct ibv_qp *qp = ibv_create_qp(e->pd, &a);
    CHECK(qp, "create_qp: %s", strerror(errno));
    return qp;
}

static void to_init(struct ibv_qp *qp) {
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_INIT, .pkey_index = 0, .port_num = 1,
                            .qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ};
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) == 0, "to INIT");
}

static void to_rtr(struct ibv_qp *qp, const struct info *r, int rnr_timer) {
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_RTR, .path_mtu = IBV_MTU_1024, .dest_qp_num = r->qpn, .rq_psn = 0,
                            .max_dest_rd_atomic = 1, .min_rnr_timer = (uint8_t)rnr_timer};
    a.ah_attr.dlid = r->lid;
    a.ah_attr.port_num = 1;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                    IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER) == 0, "to RTR");
}

static void to_rts(struct ibv_qp *qp, int rnr_retry) {
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_RTS, .timeout = 14, .retry_cnt = 7, .rnr_retry = (uint8_t)rnr_retry,
                            .sq_psn = 0, .max_rd_atomic = 1};
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                    IBV_QP_MAX_QP_RD_ATOMIC) == 0, "to RTS");
}

static struct info my_info(struct ep *e, struct ibv_qp *qp) {
    struct ibv_port_attr pa;
    CHECK(ibv_query_port(e->ctx, 1, &pa) == 0, "query_port");
    struct info i = {.qpn = qp->qp_num, .lid = pa.lid, .addr = (uintptr_t)e->buf, .rkey = e->mr->rkey};
    return i;
}

/* Exchanges info and brings the QP to RTS. */
static struct info connect_qp(struct ep *e, struct ibv_qp *qp, int rnr_timer, int rnr_retry) {
    if (qp->state == IBV_QPS_RESET) to_init(qp);
    struct info me = my_info(e, qp), them;
    put(&me, sizeof me);
    get(&them, sizeof them);
    to_rtr(qp, &them, rnr_timer);
    to_rts(qp, rnr_retry);
    return them;
}

static int poll_one(struct ibv_cq *cq, struct ibv_wc *wc, int timeout_ms) {
    double end = now_ms() + timeout_ms;
    for (;;) {
        int n = ibv_poll_cq(cq, 1, wc);
        CHECK(n >= 0, "poll_cq failed");
        if (n == 1) return 1;
        if (now_ms() > end) return 0;
        usleep(100);
    }
}

static struct ibv_wc wait_wc(struct ibv_cq *cq) {
    struct ibv_wc wc;
    CHECK(poll_one(cq, &wc, 5000), "no completion within 5 s");
    return wc;
}

static void post_recv_buf(struct ibv_qp *qp, struct ibv_srq *srq, struct ep *e, size_t off, size_t len, uint64_t id) {
    struct ibv_sge s = {.addr = (uintptr_t)e->buf + off, .length = (uint32_t)len, .lkey = e->mr->lkey};
    struct ibv_recv_wr wr = {.wr_id = id, .sg_list = &s, .num_sge = 1}, *bad;
    int r = srq ? ibv_post_srq_recv(srq, &wr, &bad) : ibv_post_recv(qp, &wr, &bad);
    CHECK(r == 0, "post_recv: %d", r);
}

static int post(struct ibv_qp *qp, int op, struct ibv_sge *sg, int nsge, uint64_t raddr, uint32_t rkey, uint32_t imm,
                int flags, uint64_t id) {
    struct ibv_send_wr wr = {0}, *bad;
    wr.wr_id = id;
    wr.sg_list = sg;
    wr.num_sge = nsge;
    wr.opcode = op;
    wr.send_flags = flags;
    wr.imm_data = htonl(imm);
    wr.wr.rdma.remote_addr = raddr;
    wr.wr.rdma.rkey = rkey;
    return ibv_post_send(qp, &wr, &bad);
}

/* Waits up to timeout_ms for an async event: poll(2) on the context's
 * async fd, then ibv_get_async_event (which would block otherwise). */
static struct ibv_async_event wait_event(struct ibv_context *c, int timeout_ms) {
    struct pollfd p = {.fd = c->async_fd, .events = POLLIN};
    CHECK(poll(&p, 1, timeout_ms) == 1, "no async event within %d ms", timeout_ms);
    struct ibv_async_event ev;
    CHECK(ibv_get_async_event(c, &ev) == 0, "get_async_event: %s", strerror(errno));
    return ev;
}

/* No event waits: the fd is not readable, and a non-blocking get says EAGAIN. */
static int no_event(struct ibv_context *c) {
    struct pollfd p = {.fd = c->async_fd, .events = POLLIN};
    if (poll(&p, 1, 0) != 0) return 0;
    int fl = fcntl(c->async_fd, F_GETFL);
    CHECK(fcntl(c->async_fd, F_SETFL, fl | O_NONBLOCK) == 0, "O_NONBLOCK");
    struct ibv_async_event ev;
    errno = 0;
    int r = ibv_get_async_event(c, &ev);
    int eagain = r == -1 && errno == EAGAIN;
    CHECK(fcntl(c->async_fd, F_SETFL, fl) == 0, "restore flags");
    return eagain;
}

/* A QP connected to itself, in RTS. */
static struct ibv_qp *loop_qp(struct ep *e, struct ibv_srq *srq, int retry_cnt) {
    struct ibv_qp *qp = make_qp(e, srq, 1);
    to_init(qp);
    struct info self = my_info(e, qp);
    to_rtr(qp, &self, 1);
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_RTS, .timeout = 10, .retry_cnt = (uint8_t)retry_cnt, .rnr_retry = 7,
                            .sq_psn = 0, .max_rd_atomic = 1};
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_SQ_PSN |
                                    IBV_QP_MAX_QP_RD_ATOMIC) == 0, "to RTS");
    return qp;
}

static pid_t fork_peer(void) {
    int sv[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0, "socketpair");
    pid_t p = fork();
    CHECK(p >= 0, "fork");
    if (p == 0) {
        who = "B";
        close(sv[0]);
        sock = sv[1];
    } else {
        close(sv[1]);
        sock = sv[0];
    }
    return p;
}

static int finish_parent(pid_t child, const char *name) {
    int st = 0;
    CHECK(waitpid(child, &st, 0) == child, "waitpid");
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "target process failed (status %d)", st);
    printf("%s ok\n", name);
    return 0;
}

/* ---- cases ---- */

static int c_devices(const char *expect) {
    int n = 0;
    struct ibv_device **l = ibv_get_device_list(&n);
    CHECK(l, "device list: %s", strerror(errno));
    int want = 1;
    const char *names[8] = {"softverbs0"};
    char copy[256];
    if (expect) {
        if (expect[0] >= '0' && expect[0] <= '9') {
            want = atoi(expect);
        } else {
            snprintf(copy, sizeof copy, "%s", expect);
            want = 0;
            for (char *t = strtok(copy, ","); t && want < 8; t = strtok(NULL, ",")) names[want++] = t;
        }
    }
    CHECK(n == want, "%d devices, want %d", n, want);
    CHECK(l[n] == NULL, "list is NULL-terminated");
    int eth = getenv("SOFTVERBS_LINK_LAYER") != NULL;
    for (int i = 0; i < n; i++) {
        char buf[32];
        if (expect && expect[0] >= '0' && expect[0] <= '9') {
            snprintf(buf, sizeof buf, "softverbs%d", i);
            CHECK(strcmp(ibv_get_device_name(l[i]), buf) == 0, "name %s", ibv_get_device_name(l[i]));
        } else {
            CHECK(strcmp(ibv_get_device_name(l[i]), names[i]) == 0, "name %s", ibv_get_device_name(l[i]));
        }
        CHECK(ibv_get_device_guid(l[i]) != 0, "guid");
        struct ibv_context *c = ibv_open_device(l[i]);
        CHECK(c, "open");
        struct ibv_device_attr da;
        CHECK(ibv_query_device(c, &da) == 0, "query_device");
        CHECK(da.phys_port_cnt == 1 && da.max_qp > 0 && da.max_cqe > 0 && da.max_sge >= 1, "device attrs");
        struct ibv_port_attr pa;
        CHECK(ibv_query_port(c, 1, &pa) == 0, "query_port");
        CHECK(pa.state == IBV_PORT_ACTIVE && pa.active_mtu == IBV_MTU_4096 && pa.max_mtu == IBV_MTU_4096, "port state/mtu");
        if (eth) {
            CHECK(pa.lid == 0 && pa.link_layer == IBV_LINK_LAYER_ETHERNET, "ethernet port: lid %u ll %u", pa.lid, pa.link_layer);
        } else {
            CHECK(pa.lid == i + 1 && pa.link_layer == IBV_LINK_LAYER_INFINIBAND, "ib port: lid %u", pa.lid);
        }
        CHECK(ibv_query_port(c, 2, &pa) != 0, "port 2 does not exist");
        CHECK(ibv_get_device_index(l[i]) == i, "device index");
        CHECK(da.device_cap_flags & IBV_DEVICE_RC_RNR_NAK_GEN && da.device_cap_flags & IBV_DEVICE_PORT_ACTIVE_EVENT &&
                  da.atomic_cap == IBV_ATOMIC_HCA, "device caps");
        /* GID table: IB: the link-local GID alone; RoCE: as mlx5 fills it,
         * link-local v1/v2 then IPv4-mapped v1/v2. */
        int len = eth ? 4 : 1;
        CHECK(ibv_query_port(c, 1, &pa) == 0, "query_port");
        CHECK(pa.gid_tbl_len == len, "gid_tbl_len %d", pa.gid_tbl_len);
        CHECK(!!(pa.port_cap_flags & IBV_PORT_IP_BASED_GIDS) == eth, "IP-based GIDs on RoCE");
        struct ibv_gid_entry tab[8];
        CHECK(ibv_query_gid_table(c, tab, 8, 0) == len, "gid table");
        CHECK(ibv_query_gid_table(c, tab, (size_t)len - 1, 0) == -EINVAL, "gid table too small");
        for (int k = 0; k < len; k++) {
            union ibv_gid g;
            struct ibv_gid_entry ge;
            CHECK(ibv_query_gid(c, 1, k, &g) == 0 && memcmp(&g, &tab[k].gid, 16) == 0, "gid %d", k);
            CHECK(ibv_query_gid_ex(c, 1, (uint32_t)k, &ge, 0) == 0 && memcmp(&ge, &tab[k], sizeof ge) == 0, "gid_ex %d", k);
            int v4 = g.raw[10] == 0xff && g.raw[11] == 0xff && g.raw[12] == 127 && g.raw[15] == i + 1;
            int ll = g.raw[0] == 0xfe && g.raw[1] == 0x80;
            CHECK(tab[k].gid_index == (uint32_t)k && tab[k].port_num == 1, "entry %d", k);
            enum ibv_gid_type want = !eth ? IBV_GID_TYPE_IB : (k % 2 ? IBV_GID_TYPE_ROCE_V2 : IBV_GID_TYPE_ROCE_V1);
            CHECK(tab[k].gid_type == want, "gid %d type %u", k, tab[k].gid_type);
            CHECK(k < 2 ? ll : v4, "gid %d: link-local first, then IPv4-mapped", k);
            int sysfs;
            CHECK(ibv_query_gid_type(c, 1, (unsigned)k, &sysfs) == 0 && sysfs == (want == IBV_GID_TYPE_ROCE_V2),
                  "gid type (sysfs) %d", k);
        }
        union ibv_gid g;
        struct ibv_gid_entry ge;
        CHECK(ibv_query_gid(c, 1, len, &g) != 0, "no gid past the table");
        CHECK(ibv_query_gid_ex(c, 1, (uint32_t)len, &ge, 0) == ENODATA, "gid_ex past the table: ENODATA");
        CHECK(ibv_query_gid_ex(c, 1, 0, &ge, 1) == EOPNOTSUPP, "gid_ex flags: EOPNOTSUPP");
        __be16 pkey = 0;
        CHECK(ibv_query_pkey(c, 1, 0, &pkey) == 0 && pkey == htons(0xffff), "default pkey");
        CHECK(ibv_query_pkey(c, 1, 1, &pkey) != 0, "one pkey");
        CHECK(ibv_get_pkey_index(c, 1, htons(0xffff)) == 0 && ibv_get_pkey_index(c, 1, htons(0x8001)) < 0, "pkey index");
        if (eth) {
            /* RoCE needs a GRH with an existing source GID. */
            struct ibv_pd *pd = ibv_alloc_pd(c);
            struct ibv_cq *cq = ibv_create_cq(c, 4, NULL, NULL, 0);
            struct ibv_qp_init_attr qa = {.send_cq = cq, .recv_cq = cq, .cap = {.max_send_wr = 1, .max_recv_wr = 1,
                                          .max_send_sge = 1, .max_recv_sge = 1}, .qp_type = IBV_QPT_RC};
            struct ibv_qp *qp = ibv_create_qp(pd, &qa);
            CHECK(pd && cq && qp, "objects");
            to_init(qp);
            struct ibv_qp_attr r = {.qp_state = IBV_QPS_RTR, .path_mtu = IBV_MTU_1024, .dest_qp_num = qp->qp_num,
                                    .max_dest_rd_atomic = 1, .min_rnr_timer = 1};
            r.ah_attr.port_num = 1;
            int m = IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                    IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER;
            CHECK(ibv_modify_qp(qp, &r, m) == EINVAL, "RoCE RTR without a GRH: EINVAL");
            r.ah_attr.is_global = 1;
            r.ah_attr.grh.dgid = tab[3].gid;
            r.ah_attr.grh.sgid_index = 4;
            CHECK(ibv_modify_qp(qp, &r, m) == EINVAL, "RoCE RTR from a missing GID: EINVAL");
            r.ah_attr.grh.sgid_index = 3;
            r.ah_attr.grh.hop_limit = 64;
            CHECK(ibv_modify_qp(qp, &r, m) == 0, "RoCE RTR with GRH from GID 3");
            CHECK(ibv_destroy_cq(cq) == EBUSY && ibv_dealloc_pd(pd) == EBUSY, "in use: EBUSY");
            CHECK(ibv_destroy_qp(qp) == 0 && ibv_destroy_cq(cq) == 0 && ibv_dealloc_pd(pd) == 0, "teardown");
        }
        CHECK(ibv_close_device(c) == 0, "close");
    }
    ibv_free_device_list(l);
    printf("devices ok\n");
    return 0;
}

static int c_mr(void) {
    struct ibv_context *c = open_first();
    struct ibv_pd *pd = ibv_alloc_pd(c);
    CHECK(pd, "alloc_pd");
    char buf[256];
    struct ibv_mr *mr = ibv_reg_mr(pd, buf, sizeof buf, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    CHECK(mr && mr->lkey != 0 && mr->rkey == mr->lkey && mr->addr == buf && mr->length == sizeof buf && mr->pd == pd, "mr");
    struct ibv_mr *mr2 = ibv_reg_mr(pd, buf, 16, IBV_ACCESS_LOCAL_WRITE);
    CHECK(mr2 && mr2->lkey != mr->lkey, "second mr has its own key");
    errno = 0;
    CHECK(ibv_reg_mr(pd, buf, 16, IBV_ACCESS_REMOTE_WRITE) == NULL && errno == EINVAL, "remote write needs local write");
    errno = 0;
    CHECK(ibv_reg_mr(pd, NULL, 16, IBV_ACCESS_LOCAL_WRITE) == NULL && errno == EFAULT, "NULL address: EFAULT");
    /* Optional flags (IBV_ACCESS_OPTIONAL_RANGE) are accepted and may be
     * ignored, whether they reach ibv_reg_mr_iova2 through the header's
     * constant-folded path or a runtime value. */
    struct ibv_mr *ro = ibv_reg_mr(pd, buf, 64, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_RELAXED_ORDERING);
    CHECK(ro, "relaxed ordering accepted: %s", strerror(errno));
    volatile unsigned int dyn = IBV_ACCESS_LOCAL_WRITE | (1u << 29) | IBV_ACCESS_HUGETLB | IBV_ACCESS_MW_BIND;
    struct ibv_mr *ro2 = ibv_reg_mr(pd, buf, 64, dyn);
    CHECK(ro2, "top optional flag, hugetlb and mw_bind accepted: %s", strerror(errno));
    CHECK(ibv_dereg_mr(ro2) == 0 && ibv_dereg_mr(ro) == 0, "dereg optional");
    errno = 0;
    dyn = IBV_ACCESS_LOCAL_WRITE | (1u << 12);
    CHECK(ibv_reg_mr(pd, buf, 16, dyn) == NULL && errno == EINVAL, "unknown flag: EINVAL");
    errno = 0;
    CHECK(ibv_reg_mr(pd, buf, 16, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_ON_DEMAND) == NULL && errno == EOPNOTSUPP,
          "on-demand paging: EOPNOTSUPP");
    errno = 0;
    CHECK(ibv_reg_mr_iova(pd, buf, 16, (uintptr_t)buf + 1, IBV_ACCESS_LOCAL_WRITE) == NULL && errno == EINVAL,
          "iova with another page offset: EINVAL");
    errno = 0;
    CHECK(ibv_reg_dmabuf_mr(pd, 0, 4096, 0, 3, IBV_ACCESS_LOCAL_WRITE) == NULL && errno == EOPNOTSUPP,
          "dma-buf: EOPNOTSUPP");
    CHECK(ibv_dereg_mr(mr2) == 0 && ibv_dereg_mr(mr) == 0, "dereg");
    CHECK(ibv_dealloc_pd(pd) == 0, "dealloc_pd");
    ibv_close_device(c);
    printf("mr ok\n");
    return 0;
}

static int c_qp_state(void) {
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    CHECK(qp->state == IBV_QPS_RESET && qp->qp_num != 0, "new QP is RESET with a number");
    struct ibv_qp_attr a = {0};
    struct ibv_qp_init_attr ia;
    char x[8];
    struct ibv_sge s = {.addr = (uintptr_t)e.buf, .length = 8, .lkey = e.mr->lkey};
    struct ibv_recv_wr rwr = {.wr_id = 1, .sg_list = &s, .num_sge = 1}, *rbad = NULL;
    CHECK(ibv_post_recv(qp, &rwr, &rbad) != 0 && rbad == &rwr, "post_recv in RESET fails");
    a.qp_state = IBV_QPS_RTR;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE) != 0, "RESET->RTR is not a transition");
    a.qp_state = IBV_QPS_INIT;
    a.port_num = 1;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_ACCESS_FLAGS) != 0, "INIT needs PORT");
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_ACCESS_FLAGS | IBV_QP_PORT | IBV_QP_AV) != 0,
          "INIT refuses AV");
    a.port_num = 2;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_ACCESS_FLAGS | IBV_QP_PORT) != 0, "port 2");
    to_init(qp);
    CHECK(ibv_query_qp(qp, &a, IBV_QP_STATE, &ia) == 0 && a.qp_state == IBV_QPS_INIT && qp->state == IBV_QPS_INIT, "INIT");
    CHECK(ibv_post_recv(qp, &rwr, &rbad) == 0, "post_recv in INIT");
    CHECK(post(qp, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 2) != 0, "post_send in INIT fails");
    struct info self = my_info(&e, qp);
    struct ibv_qp_attr r = {.qp_state = IBV_QPS_RTR, .path_mtu = IBV_MTU_1024, .dest_qp_num = self.qpn, .max_dest_rd_atomic = 1};
    r.ah_attr.dlid = self.lid;
    r.ah_attr.port_num = 1;
    CHECK(ibv_modify_qp(qp, &r, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
                                    IBV_QP_MAX_DEST_RD_ATOMIC) != 0, "RTR needs MIN_RNR_TIMER");
    to_rtr(qp, &self, 1);
    CHECK(post(qp, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 2) != 0, "post_send in RTR fails");
    a.qp_state = IBV_QPS_RTS;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE) != 0, "RTS needs its attributes");
    to_rts(qp, 7);
    CHECK(ibv_query_qp(qp, &a, IBV_QP_STATE, &ia) == 0 && a.qp_state == IBV_QPS_RTS && a.dest_qp_num == self.qpn &&
              ia.cap.max_inline_data >= 64, "RTS");
    /* Loopback to itself: a send lands on its own posted receive. */
    memcpy(e.buf + 64, "loopback", 8);
    struct ibv_sge s2 = {.addr = (uintptr_t)e.buf + 64, .length = 8, .lkey = e.mr->lkey};
    CHECK(post(qp, IBV_WR_SEND, &s2, 1, 0, 0, 0, IBV_SEND_SIGNALED, 2) == 0, "post_send in RTS");
    int seen_send = 0, seen_recv = 0;
    for (int i = 0; i < 2; i++) {
        struct ibv_wc wc = wait_wc(e.cq);
        CHECK(wc.status == IBV_WC_SUCCESS, "loopback status %s", ibv_wc_status_str(wc.status));
        if (wc.opcode == IBV_WC_SEND) seen_send = 1;
        if (wc.opcode == IBV_WC_RECV) seen_recv = (wc.byte_len == 8 && memcmp(e.buf, "loopback", 8) == 0);
    }
    CHECK(seen_send && seen_recv, "loopback send and receive");
    a.qp_state = IBV_QPS_ERR;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE) == 0 && qp->state == IBV_QPS_ERR, "to ERR");
    a.qp_state = IBV_QPS_RESET;
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE) == 0 && qp->state == IBV_QPS_RESET, "to RESET");
    (void)x;
    CHECK(ibv_destroy_qp(qp) == 0, "destroy_qp");
    printf("qp-state ok\n");
    return 0;
}

static int c_cq_overflow(void) {
    struct ep e;
    ep_open(&e, 2, 0, 4096);
    CHECK(e.cq->cqe >= 2, "cqe %d", e.cq->cqe);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    to_init(qp);
    struct info self = my_info(&e, qp);
    to_rtr(qp, &self, 1);
    to_rts(qp, 7);
    struct ibv_sge s = {.addr = (uintptr_t)e.buf, .length = 16, .lkey = e.mr->lkey};
    for (int i = 0; i < e.cq->cqe + 1; i++)
        CHECK(post(qp, IBV_WR_RDMA_WRITE, &s, 1, (uintptr_t)e.buf + 1024, e.mr->rkey, 0, IBV_SEND_SIGNALED, i) == 0, "post");
    /* Let the completions arrive (without polling, which would drain). */
    usleep(200 * 1000);
    struct ibv_wc wc[8];
    CHECK(ibv_poll_cq(e.cq, 8, wc) < 0, "an overflowed CQ reports an error");
    struct ibv_async_event ev = wait_event(e.ctx, 1000);
    CHECK(ev.event_type == IBV_EVENT_CQ_ERR && ev.element.cq == e.cq, "CQ_ERR event, got %s",
          ibv_event_type_str(ev.event_type));
    ibv_ack_async_event(&ev);
    CHECK(ibv_poll_cq(e.cq, 8, wc) < 0 && no_event(e.ctx), "CQ_ERR is raised once");
    printf("cq-overflow ok\n");
    return 0;
}

static int c_ops(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 64, 0, 1 << 16);
    struct ibv_qp *qp = make_qp(&e, NULL, 4);
    if (child == 0) {
        /* B: post receives (INIT or later), then verify what lands. */
        to_init(qp);
        post_recv_buf(qp, NULL, &e, 0, 64, 100);          /* SEND */
        post_recv_buf(qp, NULL, &e, 64, 64, 101);         /* SEND_WITH_IMM */
        post_recv_buf(qp, NULL, &e, 128, 0, 102);         /* WRITE_WITH_IMM */
        post_recv_buf(qp, NULL, &e, 192, 64, 103);        /* inline SEND */
        post_recv_buf(qp, NULL, &e, 256, 64, 104);        /* unsignaled SEND */
        /* Scatter into two entries: 5 bytes then the rest. */
        struct ibv_sge ss[2] = {{(uintptr_t)e.buf + 512, 5, e.mr->lkey}, {(uintptr_t)e.buf + 600, 64, e.mr->lkey}};
        struct ibv_recv_wr rw = {.wr_id = 105, .sg_list = ss, .num_sge = 2}, *bad;
        CHECK(ibv_post_recv(qp, &rw, &bad) == 0, "post 2-sge recv");
        memcpy(e.buf + 4096, "readable-by-A", 13);
        connect_qp(&e, qp, 1, 7);
        sync_peer(); /* A works */
        sync_peer(); /* A done */
        struct ibv_wc wc;
        wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 100 && wc.opcode == IBV_WC_RECV && wc.byte_len == 5 && !(wc.wc_flags & IBV_WC_WITH_IMM) &&
                  memcmp(e.buf, "hello", 5) == 0, "SEND: id %lu op %d len %u", wc.wr_id, wc.opcode, wc.byte_len);
        wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 101 && (wc.wc_flags & IBV_WC_WITH_IMM) && ntohl(wc.imm_data) == 0xabcd0001 && wc.byte_len == 4,
              "SEND_WITH_IMM");
        wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 102 && wc.opcode == IBV_WC_RECV_RDMA_WITH_IMM && ntohl(wc.imm_data) == 7 && wc.byte_len == 6 &&
                  memcmp(e.buf + 2048, "write2", 6) == 0, "WRITE_WITH_IMM op %d", wc.opcode);
        CHECK(memcmp(e.buf + 1024, "write1", 6) == 0, "plain RDMA WRITE landed");
        wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 103 && memcmp(e.buf + 192, "inline!", 7) == 0, "inline data is what was posted");
        wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 104 && memcmp(e.buf + 256, "quiet", 5) == 0, "unsignaled send still arrives");
        wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 105 && wc.byte_len == 12 && memcmp(e.buf + 512, "gathe", 5) == 0 &&
                  memcmp(e.buf + 600, "red-up", 6) == 0, "gather/scatter");
        CHECK(!poll_one(e.cq, &wc, 50), "nothing else: a plain write makes no receive completion");
        exit(0);
    }
    struct info b = connect_qp(&e, qp, 1, 7);
    sync_peer();
    memcpy(e.buf, "hello", 5);
    struct ibv_sge s = {(uintptr_t)e.buf, 5, e.mr->lkey};
    CHECK(post(qp, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 1) == 0, "SEND");
    struct ibv_sge s4 = {(uintptr_t)e.buf, 4, e.mr->lkey};
    CHECK(post(qp, IBV_WR_SEND_WITH_IMM, &s4, 1, 0, 0, 0xabcd0001, IBV_SEND_SIGNALED, 2) == 0, "SEND_WITH_IMM");
    memcpy(e.buf + 100, "write1", 6);
    struct ibv_sge w1 = {(uintptr_t)e.buf + 100, 6, e.mr->lkey};
    CHECK(post(qp, IBV_WR_RDMA_WRITE, &w1, 1, b.addr + 1024, b.rkey, 0, IBV_SEND_SIGNALED, 3) == 0, "WRITE");
    memcpy(e.buf + 200, "write2", 6);
    struct ibv_sge w2 = {(uintptr_t)e.buf + 200, 6, e.mr->lkey};
    CHECK(post(qp, IBV_WR_RDMA_WRITE_WITH_IMM, &w2, 1, b.addr + 2048, b.rkey, 7, IBV_SEND_SIGNALED, 4) == 0, "WRITE_IMM");
    memcpy(e.buf + 300, "inline!", 7);
    struct ibv_sge si = {(uintptr_t)e.buf + 300, 7, 0 /* lkey ignored for inline */};
    CHECK(post(qp, IBV_WR_SEND, &si, 1, 0, 0, 0, IBV_SEND_SIGNALED | IBV_SEND_INLINE, 5) == 0, "inline SEND");
    memcpy(e.buf + 300, "CHANGED", 7); /* after posting: B must see the original */
    memcpy(e.buf + 400, "quiet", 5);
    struct ibv_sge sq = {(uintptr_t)e.buf + 400, 5, e.mr->lkey};
    CHECK(post(qp, IBV_WR_SEND, &sq, 1, 0, 0, 0, 0 /* unsignaled */, 6) == 0, "unsignaled SEND");
    memcpy(e.buf + 700, "gat", 3);
    memcpy(e.buf + 800, "her", 3);
    memcpy(e.buf + 900, "ed-up!", 6);
    struct ibv_sge g[3] = {{(uintptr_t)e.buf + 700, 3, e.mr->lkey}, {(uintptr_t)e.buf + 800, 3, e.mr->lkey},
                           {(uintptr_t)e.buf + 900, 6, e.mr->lkey}};
    CHECK(post(qp, IBV_WR_SEND, g, 3, 0, 0, 0, IBV_SEND_SIGNALED, 7) == 0, "3-sge SEND");
    struct ibv_sge rd = {(uintptr_t)e.buf + 8192, 13, e.mr->lkey};
    CHECK(post(qp, IBV_WR_RDMA_READ, &rd, 1, b.addr + 4096, b.rkey, 0, IBV_SEND_SIGNALED, 8) == 0, "READ");
    uint64_t want[] = {1, 2, 3, 4, 5, 7, 8};
    for (unsigned i = 0; i < sizeof want / sizeof want[0]; i++) {
        struct ibv_wc wc = wait_wc(e.cq);
        CHECK(wc.status == IBV_WC_SUCCESS && wc.wr_id == want[i], "completion %u: id %lu status %s", i, wc.wr_id,
              ibv_wc_status_str(wc.status));
        if (wc.wr_id == 8) CHECK(wc.opcode == IBV_WC_RDMA_READ && memcmp(e.buf + 8192, "readable-by-A", 13) == 0, "READ data");
    }
    struct ibv_wc wc;
    CHECK(!poll_one(e.cq, &wc, 50), "the unsignaled send made no completion");
    sync_peer();
    return finish_parent(child, "ops");
}

static int c_srq(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 64, 0, 4096);
    if (child == 0) {
        struct ibv_srq_init_attr sa = {.attr = {.max_wr = 16, .max_sge = 1}};
        struct ibv_srq *srq = ibv_create_srq(e.pd, &sa);
        CHECK(srq, "create_srq");
        struct ibv_srq_attr q;
        CHECK(ibv_query_srq(srq, &q) == 0 && q.max_wr >= 16, "query_srq");
        struct ibv_qp *q1 = make_qp(&e, srq, 1), *q2 = make_qp(&e, srq, 1);
        struct ibv_recv_wr rw = {0}, *bad;
        CHECK(ibv_post_recv(q1, &rw, &bad) != 0, "a QP on an SRQ has no receive queue of its own");
        for (int i = 0; i < 4; i++) post_recv_buf(NULL, srq, &e, (size_t)i * 64, 64, 200 + i);
        connect_qp(&e, q1, 1, 7);
        connect_qp(&e, q2, 1, 7);
        sync_peer();
        uint32_t seen[2] = {0, 0};
        for (int i = 0; i < 2; i++) {
            struct ibv_wc wc = wait_wc(e.cq);
            CHECK(wc.status == IBV_WC_SUCCESS && wc.wr_id >= 200 && wc.wr_id < 204, "srq recv %s", ibv_wc_status_str(wc.status));
            seen[i] = wc.qp_num;
        }
        CHECK((seen[0] == q1->qp_num && seen[1] == q2->qp_num) || (seen[0] == q2->qp_num && seen[1] == q1->qp_num),
              "both QPs received from the one SRQ");
        exit(0);
    }
    struct ibv_qp *a1 = make_qp(&e, NULL, 1), *a2 = make_qp(&e, NULL, 1);
    connect_qp(&e, a1, 1, 7);
    connect_qp(&e, a2, 1, 7);
    sync_peer();
    struct ibv_sge s = {(uintptr_t)e.buf, 8, e.mr->lkey};
    CHECK(post(a1, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 1) == 0, "send 1");
    CHECK(post(a2, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 2) == 0, "send 2");
    for (int i = 0; i < 2; i++) CHECK(wait_wc(e.cq).status == IBV_WC_SUCCESS, "send ok");
    return finish_parent(child, "srq");
}

/* With ARG "fd": the target waits as event loops do, in poll(2) on the
 * channel's non-blocking fd, which the initiator's process makes readable. */
static int c_channel(const char *how) {
    int by_fd = how && !strcmp(how, "fd");
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 16, 1, 4096);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    if (child == 0) {
        to_init(qp);
        post_recv_buf(qp, NULL, &e, 0, 64, 300);
        connect_qp(&e, qp, 1, 7);
        CHECK(ibv_req_notify_cq(e.cq, 0) == 0, "arm");
        sync_peer();
        double t0 = now_ms();
        struct ibv_cq *cq;
        void *cctx;
        if (by_fd) {
            CHECK(fcntl(e.ch->fd, F_SETFL, fcntl(e.ch->fd, F_GETFL) | O_NONBLOCK) == 0, "O_NONBLOCK");
            errno = 0;
            CHECK(ibv_get_cq_event(e.ch, &cq, &cctx) == -1 && errno == EAGAIN, "nothing yet: EAGAIN");
            struct pollfd p = {.fd = e.ch->fd, .events = POLLIN};
            CHECK(poll(&p, 1, 5000) == 1 && (p.revents & POLLIN), "the channel fd became readable");
        }
        CHECK(ibv_get_cq_event(e.ch, &cq, &cctx) == 0, "get_cq_event");
        double waited = now_ms() - t0;
        if (by_fd) {
            struct pollfd p = {.fd = e.ch->fd, .events = POLLIN};
            CHECK(poll(&p, 1, 0) == 0, "not readable once the event is taken");
            errno = 0;
            CHECK(ibv_get_cq_event(e.ch, &cq, &cctx) == -1 && errno == EAGAIN, "no second event");
            cq = e.cq;
        }
        CHECK(cq == e.cq && cctx == &e, "the event names our CQ and its context");
        CHECK(waited >= 150, "blocked until the write arrived (%.0f ms)", waited);
        ibv_ack_cq_events(cq, 1);
        struct ibv_wc wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 300 && ntohl(wc.imm_data) == 42, "the completion behind the event");
        CHECK(ibv_destroy_qp(qp) == 0 && ibv_destroy_cq(e.cq) == 0 && ibv_destroy_comp_channel(e.ch) == 0, "teardown");
        exit(0);
    }
    struct info b = connect_qp(&e, qp, 1, 7);
    sync_peer();
    usleep(200 * 1000);
    struct ibv_sge s = {(uintptr_t)e.buf, 4, e.mr->lkey};
    CHECK(post(qp, IBV_WR_RDMA_WRITE_WITH_IMM, &s, 1, b.addr, b.rkey, 42, IBV_SEND_SIGNALED, 1) == 0, "write imm");
    CHECK(wait_wc(e.cq).status == IBV_WC_SUCCESS, "write ok");
    return finish_parent(child, "channel");
}

static int c_rnr(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *q1 = make_qp(&e, NULL, 1), *q2 = make_qp(&e, NULL, 1);
    if (child == 0) {
        connect_qp(&e, q1, 1 /* 0.01 ms */, 7);
        connect_qp(&e, q2, 1, 7);
        sync_peer(); /* A's first write exhausts its retries: nothing posted */
        sync_peer(); /* A's second write is retrying */
        usleep(100 * 1000);
        post_recv_buf(q2, NULL, &e, 0, 64, 400);
        struct ibv_wc wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 400 && wc.status == IBV_WC_SUCCESS && ntohl(wc.imm_data) == 9, "late receive got the write");
        exit(0);
    }
    struct info b1 = connect_qp(&e, q1, 1, 2 /* two retries */);
    struct info b2 = connect_qp(&e, q2, 1, 7 /* forever */);
    (void)b2;
    sync_peer();
    struct ibv_sge s = {(uintptr_t)e.buf, 4, e.mr->lkey};
    CHECK(post(q1, IBV_WR_RDMA_WRITE_WITH_IMM, &s, 1, b1.addr, b1.rkey, 8, IBV_SEND_SIGNALED, 1) == 0, "post");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 1 && wc.status == IBV_WC_RNR_RETRY_EXC_ERR, "RNR retries exhausted: %s", ibv_wc_status_str(wc.status));
    sync_peer();
    double t0 = now_ms();
    CHECK(post(q2, IBV_WR_RDMA_WRITE_WITH_IMM, &s, 1, b1.addr, b1.rkey, 9, IBV_SEND_SIGNALED, 2) == 0, "post");
    wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 2 && wc.status == IBV_WC_SUCCESS, "retried until the receive was posted: %s",
          ibv_wc_status_str(wc.status));
    CHECK(now_ms() - t0 >= 80, "it waited for the receive");
    return finish_parent(child, "rnr");
}

static int c_rkey(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 64, 0, 4096);
    struct ibv_qp *q1 = make_qp(&e, NULL, 1), *q2 = make_qp(&e, NULL, 1);
    if (child == 0) {
        struct ibv_mr *ro = ibv_reg_mr(e.pd, e.buf + 2048, 64, IBV_ACCESS_LOCAL_WRITE); /* no remote access */
        CHECK(ro, "reg ro");
        put(&ro->rkey, 4);
        connect_qp(&e, q1, 1, 7);
        connect_qp(&e, q2, 1, 7);
        sync_peer();
        sync_peer();
        for (int i = 0; i < 64; i++) CHECK(e.buf[i] == 0 && e.buf[2048 + i] == 0, "no byte landed at %d", i);
        exit(0);
    }
    uint32_t ro_rkey;
    get(&ro_rkey, 4);
    /* A receive posted on q1 before it fails is flushed when it fails. */
    to_init(q1);
    post_recv_buf(q1, NULL, &e, 512, 64, 77);
    struct info b = connect_qp(&e, q1, 1, 7);
    connect_qp(&e, q2, 1, 7);
    sync_peer();
    struct ibv_sge s = {(uintptr_t)e.buf, 16, e.mr->lkey};
    CHECK(post(q1, IBV_WR_RDMA_WRITE, &s, 1, b.addr, b.rkey + 1, 0, 0, 1) == 0, "post bad rkey");
    int saw_err = 0, saw_flush_recv = 0;
    for (int i = 0; i < 2; i++) {
        struct ibv_wc wc = wait_wc(e.cq);
        if (wc.wr_id == 1) saw_err = wc.status == IBV_WC_REM_ACCESS_ERR;
        if (wc.wr_id == 77) saw_flush_recv = wc.status == IBV_WC_WR_FLUSH_ERR;
    }
    CHECK(saw_err && saw_flush_recv, "bad rkey: REM_ACCESS_ERR (even unsignaled) and the posted receive flushed");
    struct ibv_qp_attr a;
    struct ibv_qp_init_attr ia;
    CHECK(ibv_query_qp(q1, &a, IBV_QP_STATE, &ia) == 0 && a.qp_state == IBV_QPS_ERR, "QP in error");
    CHECK(post(q1, IBV_WR_RDMA_WRITE, &s, 1, b.addr, b.rkey, 0, 0, 2) == 0, "posting in ERR is accepted");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 2 && wc.status == IBV_WC_WR_FLUSH_ERR, "later work is flushed: %s", ibv_wc_status_str(wc.status));
    /* Out of bounds with a valid key, and a region without remote write. */
    CHECK(post(q2, IBV_WR_RDMA_WRITE, &s, 1, b.addr + 4090, b.rkey, 0, IBV_SEND_SIGNALED, 3) == 0, "post oob");
    wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 3 && wc.status == IBV_WC_REM_ACCESS_ERR, "out of bounds: %s", ibv_wc_status_str(wc.status));
    struct ibv_qp *q3 = make_qp(&e, NULL, 1);
    (void)q3;
    sync_peer();
    (void)ro_rkey;
    return finish_parent(child, "rkey");
}

/* Remote access is refused, with nothing written, for: a region without
 * REMOTE_WRITE, a region of another protection domain, a deregistered key. */
static int c_access(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *q[3] = {make_qp(&e, NULL, 1), make_qp(&e, NULL, 1), make_qp(&e, NULL, 1)};
    if (child == 0) {
        struct ibv_mr *ro = ibv_reg_mr(e.pd, e.buf + 2048, 64, IBV_ACCESS_LOCAL_WRITE);
        struct ibv_pd *other = ibv_alloc_pd(e.ctx);
        CHECK(ro && other, "reg, pd");
        struct ibv_mr *foreign = ibv_reg_mr(other, e.buf + 2304, 64, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
        struct ibv_mr *gone = ibv_reg_mr(e.pd, e.buf + 2560, 64, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
        CHECK(foreign && gone, "reg");
        uint32_t keys[3] = {ro->rkey, foreign->rkey, gone->rkey};
        CHECK(ibv_dereg_mr(gone) == 0, "dereg");
        put(keys, sizeof keys);
        for (int i = 0; i < 3; i++) connect_qp(&e, q[i], 1, 7);
        sync_peer();
        for (int i = 2048; i < 2048 + 576; i++) CHECK(e.buf[i] == 0, "nothing landed at %d", i);
        exit(0);
    }
    uint32_t keys[3];
    get(keys, sizeof keys);
    struct info b;
    for (int i = 0; i < 3; i++) b = connect_qp(&e, q[i], 1, 7);
    const char *what[3] = {"a region without REMOTE_WRITE", "a region of another PD", "a deregistered key"};
    uint64_t at[3] = {2048, 2304, 2560};
    struct ibv_sge s = {(uintptr_t)e.buf, 16, e.mr->lkey};
    for (int i = 0; i < 3; i++) {
        CHECK(post(q[i], IBV_WR_RDMA_WRITE, &s, 1, b.addr + at[i], keys[i], 0, IBV_SEND_SIGNALED, (uint64_t)i) == 0, "post");
        struct ibv_wc wc = wait_wc(e.cq);
        CHECK(wc.wr_id == (uint64_t)i && wc.status == IBV_WC_REM_ACCESS_ERR, "%s: %s", what[i], ibv_wc_status_str(wc.status));
    }
    sync_peer();
    return finish_parent(child, "access");
}

/* Several devices (SOFTVERBS_DEVICES=2): each has its own objects, as on
 * real NICs. A QP takes no CQ or SRQ of another device and a CQ no channel
 * of another; an lkey of device 0 is a local protection error on device
 * 1's QP, an rkey of device 0 a remote access error there (nothing
 * lands); device 1's own keys work. */
static struct ibv_context *open_nth(int i) {
    int n = 0;
    struct ibv_device **l = ibv_get_device_list(&n);
    CHECK(l && n > i, "device %d of %d", i, n);
    struct ibv_context *c = ibv_open_device(l[i]);
    CHECK(c, "open_device %d", i);
    ibv_free_device_list(l);
    return c;
}

static void ep_on(struct ep *e, int dev, char *buf, size_t len) {
    memset(e, 0, sizeof *e);
    e->ctx = open_nth(dev);
    e->pd = ibv_alloc_pd(e->ctx);
    CHECK(e->pd, "alloc_pd");
    e->ch = ibv_create_comp_channel(e->ctx);
    CHECK(e->ch, "create_comp_channel");
    e->cq = ibv_create_cq(e->ctx, 64, e, NULL, 0);
    CHECK(e->cq, "create_cq");
    e->len = len;
    e->buf = buf;
    e->mr = ibv_reg_mr(e->pd, buf, len, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    CHECK(e->mr, "reg_mr: %s", strerror(errno));
}

static int c_rails(void) {
    pid_t child = fork_peer();
    char *buf = calloc(1, 4096);
    struct ep d0, d1;
    ep_on(&d0, 0, buf, 4096);
    ep_on(&d1, 1, buf, 4096);
    /* Objects of one device do not mix with another's. */
    struct ibv_qp_init_attr a = {0};
    a.send_cq = d0.cq;
    a.recv_cq = d0.cq;
    a.cap.max_send_wr = 4;
    a.cap.max_recv_wr = 4;
    a.cap.max_send_sge = 1;
    a.cap.max_recv_sge = 1;
    a.qp_type = IBV_QPT_RC;
    errno = 0;
    CHECK(ibv_create_qp(d1.pd, &a) == NULL && errno == EINVAL, "a QP of device 1 with device 0's CQ: EINVAL");
    errno = 0;
    CHECK(ibv_create_cq(d1.ctx, 4, NULL, d0.ch, 0) == NULL && errno == EINVAL,
          "a CQ of device 1 on device 0's channel: EINVAL");
    CHECK(d0.mr->rkey != d1.mr->rkey && d0.mr->lkey != d1.mr->lkey, "each device has its own keys");
    struct ibv_qp *q[3] = {make_qp(&d1, NULL, 1), make_qp(&d1, NULL, 1), make_qp(&d1, NULL, 1)};
    if (child == 0) {
        uint32_t keys[2] = {d0.mr->rkey, d1.mr->rkey};
        put(keys, sizeof keys);
        for (int i = 0; i < 3; i++) connect_qp(&d1, q[i], 1, 7);
        sync_peer();
        for (int i = 0; i < 64; i++) CHECK(buf[i] == 0, "nothing landed through device 0's key at %d", i);
        for (int i = 64; i < 80; i++) CHECK(buf[i] == 'x', "device 1's key wrote byte %d", i);
        exit(0);
    }
    uint32_t keys[2];
    get(keys, sizeof keys);
    struct info b;
    for (int i = 0; i < 3; i++) b = connect_qp(&d1, q[i], 1, 7);
    memset(buf, 'x', 16);
    struct ibv_sge s = {(uintptr_t)buf, 16, d1.mr->lkey};
    CHECK(post(q[0], IBV_WR_RDMA_WRITE, &s, 1, b.addr, keys[0], 0, IBV_SEND_SIGNALED, 1) == 0, "post");
    struct ibv_wc wc = wait_wc(d1.cq);
    CHECK(wc.wr_id == 1 && wc.status == IBV_WC_REM_ACCESS_ERR, "device 0's rkey on device 1: %s",
          ibv_wc_status_str(wc.status));
    struct ibv_sge foreign = {(uintptr_t)buf, 16, d0.mr->lkey};
    CHECK(post(q[1], IBV_WR_RDMA_WRITE, &foreign, 1, b.addr + 64, keys[1], 0, IBV_SEND_SIGNALED, 2) == 0, "post");
    wc = wait_wc(d1.cq);
    CHECK(wc.wr_id == 2 && wc.status == IBV_WC_LOC_PROT_ERR, "device 0's lkey on device 1: %s",
          ibv_wc_status_str(wc.status));
    CHECK(post(q[2], IBV_WR_RDMA_WRITE, &s, 1, b.addr + 64, keys[1], 0, IBV_SEND_SIGNALED, 3) == 0, "post");
    wc = wait_wc(d1.cq);
    CHECK(wc.wr_id == 3 && wc.status == IBV_WC_SUCCESS, "device 1's own keys: %s", ibv_wc_status_str(wc.status));
    sync_peer();
    return finish_parent(child, "rails");
}

static int c_recv_len(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    if (child == 0) {
        to_init(qp);
        post_recv_buf(qp, NULL, &e, 0, 8, 500);
        connect_qp(&e, qp, 1, 7);
        struct ibv_wc wc = wait_wc(e.cq);
        CHECK(wc.wr_id == 500 && wc.status == IBV_WC_LOC_LEN_ERR, "receiver: %s", ibv_wc_status_str(wc.status));
        exit(0);
    }
    connect_qp(&e, qp, 1, 7);
    struct ibv_sge s = {(uintptr_t)e.buf, 64, e.mr->lkey};
    CHECK(post(qp, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 1) == 0, "post");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.status == IBV_WC_REM_INV_REQ_ERR, "sender: %s", ibv_wc_status_str(wc.status));
    return finish_parent(child, "recv-len");
}

static int c_one_sided(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    if (child == 0) {
        connect_qp(&e, qp, 1, 7);
        /* Block in read(2): no verbs call until A says the write is done. */
        char c;
        get(&c, 1);
        CHECK(memcmp(e.buf + 100, "landed without me", 17) == 0, "the write is in memory before any verbs call");
        exit(0);
    }
    struct info b = connect_qp(&e, qp, 1, 7);
    memcpy(e.buf, "landed without me", 17);
    struct ibv_sge s = {(uintptr_t)e.buf, 17, e.mr->lkey};
    CHECK(post(qp, IBV_WR_RDMA_WRITE, &s, 1, b.addr + 100, b.rkey, 0, IBV_SEND_SIGNALED, 1) == 0, "post");
    CHECK(wait_wc(e.cq).status == IBV_WC_SUCCESS, "write completed while the target was blocked");
    char c = 'g';
    put(&c, 1);
    return finish_parent(child, "one-sided");
}

/* Regions registered at an iova other than their address: work requests
 * name their bytes in iova space, locally (lkey) and remotely (rkey). */
static int c_iova(void) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 16, 0, 8192);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    uint64_t base = 0x100000000ull + ((uintptr_t)e.buf & 4095);
    struct ibv_mr *m = ibv_reg_mr_iova(e.pd, e.buf + 4096, 4096, base, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE);
    CHECK(m && m->addr == e.buf + 4096, "reg_mr_iova: %s", strerror(errno));
    struct info me = my_info(&e, qp), them;
    me.addr2 = base;
    me.rkey2 = m->rkey;
    if (qp->state == IBV_QPS_RESET) to_init(qp);
    put(&me, sizeof me);
    get(&them, sizeof them);
    to_rtr(qp, &them, 1);
    to_rts(qp, 7);
    if (child == 0) {
        char c;
        get(&c, 1);
        CHECK(memcmp(e.buf + 4096 + 300, "by iova", 7) == 0, "the write landed at iova + 300");
        exit(0);
    }
    /* The source, named by iova too (offset 16 of the iova region). */
    memcpy(e.buf + 4096 + 16, "by iova", 7);
    struct ibv_sge s = {base + 16, 7, m->lkey};
    CHECK(post(qp, IBV_WR_RDMA_WRITE, &s, 1, them.addr2 + 300, them.rkey2, 0, IBV_SEND_SIGNALED, 1) == 0, "post");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.status == IBV_WC_SUCCESS, "write by iova: %s", ibv_wc_status_str(wc.status));
    char c = 'g';
    put(&c, 1);
    return finish_parent(child, "iova");
}

/* SOFTVERBS_FAULT=wr:2:REM_ACCESS_ERR: the second work request of the
 * process fails with that status and is not executed; the QP is in error
 * and what follows flushes. */
static int c_fault_wr(void) {
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *qp = loop_qp(&e, NULL, 7);
    CHECK(no_event(e.ctx), "no event yet");
    for (int i = 0; i < 3; i++) {
        e.buf[i] = (char)('a' + i);
        struct ibv_sge s = {(uintptr_t)e.buf + i, 1, e.mr->lkey};
        CHECK(post(qp, IBV_WR_RDMA_WRITE, &s, 1, (uintptr_t)e.buf + 100 + i, e.mr->rkey, 0, IBV_SEND_SIGNALED, i) == 0,
              "post %d", i);
    }
    enum ibv_wc_status want[3] = {IBV_WC_SUCCESS, IBV_WC_REM_ACCESS_ERR, IBV_WC_WR_FLUSH_ERR};
    for (int i = 0; i < 3; i++) {
        struct ibv_wc wc = wait_wc(e.cq);
        CHECK(wc.wr_id == (uint64_t)i && wc.status == want[i], "wr %d: %s", i, ibv_wc_status_str(wc.status));
    }
    CHECK(e.buf[100] == 'a' && e.buf[101] == 0 && e.buf[102] == 0, "only the first write landed");
    struct ibv_qp_attr a;
    struct ibv_qp_init_attr ia;
    CHECK(ibv_query_qp(qp, &a, IBV_QP_STATE, &ia) == 0 && a.qp_state == IBV_QPS_ERR, "QP in error");
    CHECK(no_event(e.ctx), "an error completion raises no async event");
    printf("fault-wr ok\n");
    return 0;
}

/* SOFTVERBS_FAULT=qp:2:wr:1:RETRY_EXC_ERR: only the second QP's first
 * work request fails; the first QP works on. */
static int c_fault_qp(void) {
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *q1 = loop_qp(&e, NULL, 7), *q2 = loop_qp(&e, NULL, 7);
    struct ibv_sge s = {(uintptr_t)e.buf, 8, e.mr->lkey};
    CHECK(post(q1, IBV_WR_RDMA_WRITE, &s, 1, (uintptr_t)e.buf + 64, e.mr->rkey, 0, IBV_SEND_SIGNALED, 1) == 0, "post");
    CHECK(wait_wc(e.cq).status == IBV_WC_SUCCESS, "QP 1, WR 1");
    CHECK(post(q2, IBV_WR_RDMA_WRITE, &s, 1, (uintptr_t)e.buf + 64, e.mr->rkey, 0, IBV_SEND_SIGNALED, 2) == 0, "post");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 2 && wc.qp_num == q2->qp_num && wc.status == IBV_WC_RETRY_EXC_ERR, "QP 2, WR 1: %s",
          ibv_wc_status_str(wc.status));
    CHECK(post(q1, IBV_WR_RDMA_WRITE, &s, 1, (uintptr_t)e.buf + 64, e.mr->rkey, 0, IBV_SEND_SIGNALED, 3) == 0, "post");
    CHECK(wait_wc(e.cq).status == IBV_WC_SUCCESS, "QP 1, WR 2");
    printf("fault-qp ok\n");
    return 0;
}

/* SOFTVERBS_FAULT=wr:1:fatal on a QP of an SRQ: QP_FATAL and
 * QP_LAST_WQE_REACHED on the async fd, the work request flushed. */
static int c_fault_fatal(void) {
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_srq_init_attr sa = {.attr = {.max_wr = 16, .max_sge = 1}};
    struct ibv_srq *srq = ibv_create_srq(e.pd, &sa);
    CHECK(srq, "create_srq");
    struct ibv_qp *qp = loop_qp(&e, srq, 7);
    struct ibv_sge s = {(uintptr_t)e.buf, 8, e.mr->lkey};
    CHECK(post(qp, IBV_WR_RDMA_WRITE, &s, 1, (uintptr_t)e.buf + 64, e.mr->rkey, 0, 0, 7) == 0, "post (unsignaled)");
    struct ibv_async_event ev = wait_event(e.ctx, 2000);
    CHECK(ev.event_type == IBV_EVENT_QP_FATAL && ev.element.qp == qp, "QP_FATAL, got %s",
          ibv_event_type_str(ev.event_type));
    ibv_ack_async_event(&ev);
    ev = wait_event(e.ctx, 2000);
    CHECK(ev.event_type == IBV_EVENT_QP_LAST_WQE_REACHED && ev.element.qp == qp, "LAST_WQE_REACHED, got %s",
          ibv_event_type_str(ev.event_type));
    ibv_ack_async_event(&ev);
    CHECK(qp->events_completed == 2, "acks counted on the QP");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 7 && wc.status == IBV_WC_WR_FLUSH_ERR, "flushed: %s", ibv_wc_status_str(wc.status));
    CHECK(no_event(e.ctx), "nothing more");
    CHECK(ibv_destroy_qp(qp) == 0 && ibv_destroy_srq(srq) == 0, "destroy");
    printf("fault-fatal ok\n");
    return 0;
}

/* SOFTVERBS_FAULT=port-err:100,port-active:1500: PORT_ERR, the port
 * reported down, work gets no answer (RETRY_EXC_ERR), then PORT_ACTIVE. */
static int c_fault_port(void) {
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *qp = loop_qp(&e, NULL, 2);
    struct ibv_port_attr pa;
    CHECK(ibv_query_port(e.ctx, 1, &pa) == 0 && pa.state == IBV_PORT_ACTIVE, "active at first");
    struct ibv_async_event ev = wait_event(e.ctx, 1000);
    CHECK(ev.event_type == IBV_EVENT_PORT_ERR && ev.element.port_num == 1, "PORT_ERR, got %s",
          ibv_event_type_str(ev.event_type));
    ibv_ack_async_event(&ev);
    CHECK(ibv_query_port(e.ctx, 1, &pa) == 0 && pa.state == IBV_PORT_DOWN, "down: %d", pa.state);
    struct ibv_sge s = {(uintptr_t)e.buf, 8, e.mr->lkey};
    CHECK(post(qp, IBV_WR_RDMA_WRITE, &s, 1, (uintptr_t)e.buf + 64, e.mr->rkey, 0, IBV_SEND_SIGNALED, 1) == 0, "post");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.status == IBV_WC_RETRY_EXC_ERR, "no answer while down: %s", ibv_wc_status_str(wc.status));
    ev = wait_event(e.ctx, 3000);
    CHECK(ev.event_type == IBV_EVENT_PORT_ACTIVE && ev.element.port_num == 1, "PORT_ACTIVE, got %s",
          ibv_event_type_str(ev.event_type));
    ibv_ack_async_event(&ev);
    CHECK(ibv_query_port(e.ctx, 1, &pa) == 0 && pa.state == IBV_PORT_ACTIVE, "active again");
    printf("fault-port ok\n");
    return 0;
}

/* An armed SRQ limit fires once, when a receive taken leaves fewer than
 * the limit, and disarms itself. */
static int c_srq_limit(void) {
    struct ep e;
    ep_open(&e, 32, 0, 4096);
    struct ibv_srq_init_attr sa = {.attr = {.max_wr = 8, .max_sge = 1}};
    struct ibv_srq *srq = ibv_create_srq(e.pd, &sa);
    CHECK(srq, "create_srq");
    struct ibv_qp *qp = loop_qp(&e, srq, 7);
    for (int i = 0; i < 4; i++) post_recv_buf(NULL, srq, &e, (size_t)i * 64, 64, 10 + i);
    struct ibv_srq_attr at = {.srq_limit = 9};
    CHECK(ibv_modify_srq(srq, &at, IBV_SRQ_LIMIT) == EINVAL, "limit above max_wr: EINVAL");
    at.max_wr = 16;
    CHECK(ibv_modify_srq(srq, &at, IBV_SRQ_MAX_WR) == EINVAL, "no resizing");
    at.srq_limit = 2;
    CHECK(ibv_modify_srq(srq, &at, IBV_SRQ_LIMIT) == 0, "arm");
    CHECK(ibv_query_srq(srq, &at) == 0 && at.srq_limit == 2, "armed at 2");
    struct ibv_sge s = {(uintptr_t)e.buf + 1024, 8, e.mr->lkey};
    for (int i = 0; i < 3; i++) {
        CHECK(post(qp, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 100 + i) == 0, "send %d", i);
        for (int k = 0; k < 2; k++) CHECK(wait_wc(e.cq).status == IBV_WC_SUCCESS, "send %d completes", i);
        if (i < 2) CHECK(no_event(e.ctx), "%d receives left: no event", 3 - i);
    }
    struct ibv_async_event ev = wait_event(e.ctx, 1000);
    CHECK(ev.event_type == IBV_EVENT_SRQ_LIMIT_REACHED && ev.element.srq == srq, "SRQ_LIMIT_REACHED, got %s",
          ibv_event_type_str(ev.event_type));
    ibv_ack_async_event(&ev);
    CHECK(srq->events_completed == 1, "ack counted on the SRQ");
    CHECK(ibv_query_srq(srq, &at) == 0 && at.srq_limit == 0, "disarmed after firing");
    CHECK(post(qp, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 200) == 0, "send");
    for (int k = 0; k < 2; k++) wait_wc(e.cq);
    CHECK(no_event(e.ctx), "fires once");
    CHECK(ibv_destroy_srq(srq) == EBUSY, "SRQ in use: EBUSY");
    CHECK(ibv_destroy_qp(qp) == 0 && ibv_destroy_srq(srq) == 0, "teardown");
    printf("srq-limit ok\n");
    return 0;
}

static int atomic(struct ibv_qp *qp, int op, struct ibv_sge *s, uint64_t raddr, uint32_t rkey, uint64_t cmp_add,
                  uint64_t swap, uint64_t id) {
    struct ibv_send_wr wr = {0}, *bad;
    wr.wr_id = id;
    wr.sg_list = s;
    wr.num_sge = 1;
    wr.opcode = op;
    wr.send_flags = IBV_SEND_SIGNALED;
    wr.wr.atomic.remote_addr = raddr;
    wr.wr.atomic.rkey = rkey;
    wr.wr.atomic.compare_add = cmp_add;
    wr.wr.atomic.swap = swap;
    return ibv_post_send(qp, &wr, &bad);
}

/* Fetch-and-add and compare-and-swap on 8 aligned bytes; the old value
 * comes back; misalignment and a region without remote atomic access
 * fail as on a NIC. */
static int c_atomic(void) {
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    struct ibv_qp_attr a = {.qp_state = IBV_QPS_INIT, .port_num = 1,
                            .qp_access_flags = IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_ATOMIC};
    CHECK(ibv_modify_qp(qp, &a, IBV_QP_STATE | IBV_QP_PKEY_INDEX | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS) == 0, "INIT");
    struct info self = my_info(&e, qp);
    to_rtr(qp, &self, 1);
    to_rts(qp, 7);
    uint64_t *target = (uint64_t *)(e.buf + 512), *result = (uint64_t *)(e.buf + 1024);
    struct ibv_mr *am = ibv_reg_mr(e.pd, target, 8, IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_ATOMIC);
    CHECK(am, "reg atomic mr");
    *target = 40;
    struct ibv_sge s = {(uintptr_t)result, 8, e.mr->lkey};
    CHECK(atomic(qp, IBV_WR_ATOMIC_FETCH_AND_ADD, &s, (uintptr_t)target, am->rkey, 2, 0, 1) == 0, "post faa");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_FETCH_ADD && *result == 40 && *target == 42,
          "faa: %s, old %llu, now %llu", ibv_wc_status_str(wc.status), (unsigned long long)*result,
          (unsigned long long)*target);
    CHECK(atomic(qp, IBV_WR_ATOMIC_CMP_AND_SWP, &s, (uintptr_t)target, am->rkey, 42, 7, 2) == 0, "post cas");
    wc = wait_wc(e.cq);
    CHECK(wc.status == IBV_WC_SUCCESS && wc.opcode == IBV_WC_COMP_SWAP && *result == 42 && *target == 7, "cas hit");
    CHECK(atomic(qp, IBV_WR_ATOMIC_CMP_AND_SWP, &s, (uintptr_t)target, am->rkey, 1, 9, 3) == 0, "post cas");
    wc = wait_wc(e.cq);
    CHECK(wc.status == IBV_WC_SUCCESS && *result == 7 && *target == 7, "cas miss leaves it");
    struct ibv_sge shortsge = {(uintptr_t)result, 4, e.mr->lkey};
    CHECK(atomic(qp, IBV_WR_ATOMIC_FETCH_AND_ADD, &shortsge, (uintptr_t)target, am->rkey, 1, 0, 4) == EINVAL,
          "an atomic needs 8 local bytes");
    /* The regular region has no remote atomic access. */
    CHECK(atomic(qp, IBV_WR_ATOMIC_FETCH_AND_ADD, &s, (uintptr_t)e.buf + 8, e.mr->rkey, 1, 0, 5) == 0, "post");
    wc = wait_wc(e.cq);
    CHECK(wc.status == IBV_WC_REM_ACCESS_ERR, "no REMOTE_ATOMIC: %s", ibv_wc_status_str(wc.status));
    printf("atomic ok\n");
    return 0;
}

static int c_peer_exit(const char *how) {
    pid_t child = fork_peer();
    struct ep e;
    ep_open(&e, 16, 0, 4096);
    struct ibv_qp *qp = make_qp(&e, NULL, 1);
    if (child == 0) {
        connect_qp(&e, qp, 1, 7);
        sync_peer();
        if (how && strcmp(how, "kill") == 0) raise(SIGKILL);
        _exit(0); /* leaves without cleaning up, like a crash */
    }
    struct info b = connect_qp(&e, qp, 1, 7);
    sync_peer();
    int st;
    waitpid(child, &st, 0);
    struct ibv_sge s = {(uintptr_t)e.buf, 16, e.mr->lkey};
    double t0 = now_ms();
    CHECK(post(qp, IBV_WR_RDMA_WRITE, &s, 1, b.addr, b.rkey, 0, IBV_SEND_SIGNALED, 1) == 0, "post");
    CHECK(post(qp, IBV_WR_SEND, &s, 1, 0, 0, 0, IBV_SEND_SIGNALED, 2) == 0, "post");
    struct ibv_wc wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 1 && wc.status == IBV_WC_RETRY_EXC_ERR, "dead peer: %s", ibv_wc_status_str(wc.status));
    wc = wait_wc(e.cq);
    CHECK(wc.wr_id == 2 && wc.status == IBV_WC_WR_FLUSH_ERR, "then flushed: %s", ibv_wc_status_str(wc.status));
    CHECK(now_ms() - t0 < 2000, "no hang");
    printf("peer-exit ok\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s CASE [ARG]\n", argv[0]);
        return 2;
    }
    const char *c = argv[1], *arg = argc > 2 ? argv[2] : NULL;
    if (!strcmp(c, "devices")) return c_devices(arg);
    if (!strcmp(c, "mr")) return c_mr();
    if (!strcmp(c, "qp-state")) return c_qp_state();
    if (!strcmp(c, "cq-overflow")) return c_cq_overflow();
    if (!strcmp(c, "ops")) return c_ops();
    if (!strcmp(c, "srq")) return c_srq();
    if (!strcmp(c, "channel")) return c_channel(arg);
    if (!strcmp(c, "rnr")) return c_rnr();
    if (!strcmp(c, "rkey")) return c_rkey();
    if (!strcmp(c, "access")) return c_access();
    if (!strcmp(c, "rails")) return c_rails();
    if (!strcmp(c, "recv-len")) return c_recv_len();
    if (!strcmp(c, "one-sided")) return c_one_sided();
    if (!strcmp(c, "peer-exit")) return c_peer_exit(arg);
    if (!strcmp(c, "iova")) return c_iova();
    if (!strcmp(c, "atomic")) return c_atomic();
    if (!strcmp(c, "srq-limit")) return c_srq_limit();
    if (!strcmp(c, "fault-wr")) return c_fault_wr();
    if (!strcmp(c, "fault-qp")) return c_fault_qp();
    if (!strcmp(c, "fault-fatal")) return c_fault_fatal();
    if (!strcmp(c, "fault-port")) return c_fault_port();
    if (!strcmp(c, "fault-typo")) {
        errno = 0;
        CHECK(ibv_get_device_list(NULL) == NULL && errno == EINVAL, "a malformed SOFTVERBS_FAULT fails device listing");
        printf("fault-typo ok\n");
        return 0;
    }
    fprintf(stderr, "unknown case %s\n", c);
    return 2;
}
