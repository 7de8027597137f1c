/* One rank of a C mesh: test_mesh ROLE RANK SCHEDULER M N MODE [LAYERS]
 *
 * MODE run       verified layers (copied and in-place dispatches, partials,
 *                f32 sums blocking and polled, traces, stats, misuse of the
 *                newer calls), then finalize
 *      buffer    the same with caller-provided slot memory
 *      matrix    the same under the matrix stage layout: the FFN ranks
 *                also read each sender's rows from the stage's matrix
 *      forever   verified layers until something fails; exits with the code
 *      stall     (ffn) take one batch, never answer, wait to be killed
 *      timeout   (attention) a combine that times out, then use after
 *                finalize
 * Attention rank 0 runs the rendezvous server. Exit 0 on success, else
 * the afmesh_result that failed (or 100 for a wrong byte). */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "afmesh.h"

#define STAGES 2
#define MAX_TOKENS 8
#define HIDDEN 4
#define ROW (HIDDEN * 4)

static const char *role, *mode;
static unsigned me, M, N;
static int matrix;

static int fail(const char *what, afmesh_result r) {
    fprintf(stderr, "%s %u: %s: %s (%d): %s\n", role, me, what, afmesh_result_str(r), (int)r,
            afmesh_last_error_message());
    return (int)r;
}

#define CHECK(what, call)                        \
    do {                                         \
        afmesh_result r_ = (call);               \
        if (r_ != AFMESH_OK) return fail(what, r_); \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A call that must fail with `code` (misuse): anything else fails the run. */
#define MISUSE(what, call, code)                                  \
    do {                                                          \
        afmesh_result r_ = (call);                                \
        if (r_ != (code)) {                                       \
            fail(what, r_);                                       \
            return 103;                                           \
        }                                                         \
    } while (0)

/* A latency summary with `want` samples, ordered and non-zero. */
static int check_latency(const char *what, const afmesh_latency *l, uint64_t want) {
    if (l->count != want || l->count == 0 || l->min_ns == 0 || l->min_ns > l->p50_ns || l->p50_ns > l->p90_ns ||
        l->p90_ns > l->p99_ns || l->p99_ns > l->p999_ns || l->p999_ns > l->max_ns || l->mean_ns < l->min_ns ||
        l->mean_ns > l->max_ns) {
        fprintf(stderr, "%s latency: count %llu (want %llu) min %llu p50 %llu p90 %llu p99 %llu p999 %llu max %llu mean %llu\n",
                what, (unsigned long long)l->count, (unsigned long long)want, (unsigned long long)l->min_ns,
                (unsigned long long)l->p50_ns, (unsigned long long)l->p90_ns, (unsigned long long)l->p99_ns,
                (unsigned long long)l->p999_ns, (unsigned long long)l->max_ns, (unsigned long long)l->mean_ns);
        return 1;
    }
    return 0;
}

static int check_sum(const float *sum, const float *rows, unsigned t) {
    float k = (float)(N * (N + 1) / 2);
    for (unsigned i = 0; i < t * HIDDEN; i++)
        if (sum[i] != rows[i] * k) {
            fprintf(stderr, "wrong sum at %u: %f\n", i, sum[i]);
            return 100;
        }
    return 0;
}

/* What a fill callback writes: the rows of one stage and its side block,
 * or (side_len over the capacity) a side block the library must refuse. */
struct fill_job {
    const float *rows;
    unsigned tokens;
    uint32_t side[2];
    size_t side_len;
    unsigned calls;
};

static size_t fill_rows(void *user, void *rows, size_t rows_len, void *side, size_t side_cap) {
    struct fill_job *j = user;
    j->calls++;
    if (rows_len != j->tokens * ROW || (rows_len == 0) != (rows == NULL) || side_cap != 8 || side == NULL) return 1000;
    memcpy(rows, j->rows, rows_len);
    memcpy(side, j->side, sizeof j->side);
    return j->side_len;
}

static unsigned tokens_of(unsigned a, unsigned layer, unsigned stage) {
    return 1 + (a + layer + stage) % MAX_TOKENS;
}

static float value(unsigned a, unsigned layer, unsigned stage, unsigned r, unsigned k) {
    return (float)(a * 1000 + layer * 10 + stage) + 0.5f * (float)r + (float)k;
}

static int check_counters(afmesh_attention *a, afmesh_ffn *f);

static int attention(afmesh_attention *a, unsigned layers) {
    afmesh_rank_info info;
    CHECK("info", afmesh_attention_info(a, &info));
    if (info.rank != me || info.num_ffn != N || info.num_attention != M) return fail("info", AFMESH_ERR_CONFIG);
    {
        /* NULL arguments on a live handle. */
        afmesh_trace tr[16];
        size_t nt = 0;
        bool done = false;
        afmesh_dispatch none = {0, 0};
        float out[HIDDEN];
        MISUSE("wait_all, NULL handles", afmesh_attention_wait_all(a, NULL, 1, 10), AFMESH_ERR_INVALID_ARGUMENT);
        CHECK("wait_all of nothing", afmesh_attention_wait_all(a, NULL, 0, 10));
        MISUSE("trace, NULL out", afmesh_attention_trace(a, 0, NULL, 16, &nt), AFMESH_ERR_INVALID_ARGUMENT);
        MISUSE("trace, NULL count_out", afmesh_attention_trace(a, 0, tr, 16, NULL), AFMESH_ERR_INVALID_ARGUMENT);
        MISUSE("try_combine_sum, NULL done_out", afmesh_attention_try_combine_sum(a, none, AFMESH_DTYPE_F32, out, ROW, NULL),
               AFMESH_ERR_INVALID_ARGUMENT);
        MISUSE("try_combine_sum, NULL out", afmesh_attention_try_combine_sum(a, none, AFMESH_DTYPE_F32, NULL, ROW, &done),
               AFMESH_ERR_INVALID_ARGUMENT);
        MISUSE("try_combine_sum, nothing dispatched", afmesh_attention_try_combine_sum(a, none, AFMESH_DTYPE_F32, out, ROW, &done),
               AFMESH_ERR_INVALID_ARGUMENT);
        CHECK("trace before any combine", afmesh_attention_trace(a, 0, tr, 16, &nt));
        if (nt != N || tr[0].post_ns != 0) return fail("trace before any combine", AFMESH_ERR_BAD_FRAME);
    }
    float rows[STAGES][MAX_TOKENS * HIDDEN];
    float sum[MAX_TOKENS * HIDDEN];
    for (unsigned layer = 0; layer < layers; layer++) {
        afmesh_dispatch h[STAGES];
        for (unsigned s = 0; s < STAGES; s++) {
            unsigned t = tokens_of(me, layer, s);
            for (unsigned r = 0; r < t; r++)
                for (unsigned k = 0; k < HIDDEN; k++) rows[s][r * HIDDEN + k] = value(me, layer, s, r, k);
            uint32_t side[2] = {layer, s};
            if (layer % 3 == 1) {
                /* In place: a refused side length sends nothing and leaves
                 * the stage idle, then the real fill goes out. */
                struct fill_job job = {rows[s], t, {layer, s}, 9, 0};
                MISUSE("dispatch_with, side too long", afmesh_attention_dispatch_with(a, s, t, fill_rows, &job, &h[s]),
                       AFMESH_ERR_INVALID_ARGUMENT);
                MISUSE("dispatch_with, NULL fill", afmesh_attention_dispatch_with(a, s, t, NULL, &job, &h[s]),
                       AFMESH_ERR_INVALID_ARGUMENT);
                MISUSE("dispatch_with, NULL out", afmesh_attention_dispatch_with(a, s, t, fill_rows, &job, NULL),
                       AFMESH_ERR_INVALID_ARGUMENT);
                MISUSE("dispatch_with, too many tokens",
                       afmesh_attention_dispatch_with(a, s, MAX_TOKENS + 1, fill_rows, &job, &h[s]),
                       AFMESH_ERR_BUFFER_SIZE);
                MISUSE("dispatch_with, no such stage", afmesh_attention_dispatch_with(a, STAGES, t, fill_rows, &job, &h[s]),
                       AFMESH_ERR_INVALID_ARGUMENT);
                if (job.calls != 1) return fail("fill runs only once the checks pass", AFMESH_ERR_BAD_FRAME);
                job.side_len = sizeof side;
                CHECK("dispatch_with", afmesh_attention_dispatch_with(a, s, t, fill_rows, &job, &h[s]));
                if (job.calls != 2) return fail("fill calls", AFMESH_ERR_BAD_FRAME);
                MISUSE("dispatch_with, stage busy", afmesh_attention_dispatch_with(a, s, t, fill_rows, &job, &h[s]),
                       AFMESH_ERR_STAGE_BUSY);
            } else {
                CHECK("dispatch", afmesh_attention_dispatch(a, s, rows[s], t * ROW, side, sizeof side, &h[s]));
            }
        }
        for (unsigned s = 0; s < STAGES; s++) {
            unsigned t = tokens_of(me, layer, s);
            if (layer % 2 == 0) {
                const void *parts[16];
                uint32_t got = 0;
                CHECK("wait_combine", afmesh_attention_wait_combine(a, h[s], 10000, parts, 16, &got));
                if (got != t) return fail("token count", AFMESH_ERR_BAD_FRAME);
                for (unsigned j = 0; j < N; j++) {
                    const float *p = parts[j];
                    for (unsigned i = 0; i < t * HIDDEN; i++)
                        if (p[i] != rows[s][i] * (float)(j + 1)) {
                            fprintf(stderr, "wrong partial from F%u at %u: %f\n", j, i, p[i]);
                            return 100;
                        }
                }
                afmesh_trace tr[16];
                size_t nt = 0;
                CHECK("trace", afmesh_attention_trace(a, s, tr, 16, &nt));
                if (nt != N) return fail("trace count", AFMESH_ERR_BAD_FRAME);
                for (unsigned j = 0; j < N; j++)
                    if (tr[j].post_ns == 0 || tr[j].back_ns < tr[j].post_ns || tr[j].respond_ns < tr[j].land_ns)
                        return fail("trace stamps", AFMESH_ERR_BAD_FRAME);
                MISUSE("trace with a short array", afmesh_attention_trace(a, s, tr, N - 1, &nt), AFMESH_ERR_BUFFER_SIZE);
                MISUSE("trace of a missing stage", afmesh_attention_trace(a, STAGES, tr, 16, &nt), AFMESH_ERR_INVALID_ARGUMENT);
            } else if (layer % 4 == 1) {
                CHECK("wait_combine_sum",
                      afmesh_attention_wait_combine_sum(a, h[s], AFMESH_DTYPE_F32, 10000, sum, t * ROW));
                if (check_sum(sum, rows[s], t)) return 100;
            } else {
                /* Polled: misuse first (nothing is consumed), then
                 * wait_all, then try_combine_sum, which must be done. */
                bool done = true;
                afmesh_trace tr[16];
                size_t nt = 0;
                MISUSE("trace while in flight", afmesh_attention_trace(a, s, tr, 16, &nt), AFMESH_ERR_INVALID_ARGUMENT);
                MISUSE("try_combine_sum, short out",
                       afmesh_attention_try_combine_sum(a, h[s], AFMESH_DTYPE_F32, sum, t * ROW - 1, &done),
                       AFMESH_ERR_BUFFER_SIZE);
                MISUSE("try_combine_sum, bad dtype",
                       afmesh_attention_try_combine_sum(a, h[s], (afmesh_dtype)7, sum, t * ROW, &done),
                       AFMESH_ERR_INVALID_ARGUMENT);
                afmesh_dispatch wrong = h[s];
                wrong.sequence += 5;
                MISUSE("wait_all, a handle not in flight", afmesh_attention_wait_all(a, &wrong, 1, 10), AFMESH_ERR_INVALID_ARGUMENT);
                if (!done) return fail("done written on failure", AFMESH_ERR_BAD_FRAME);
                if (s == 0) CHECK("wait_all", afmesh_attention_wait_all(a, h, STAGES, 10000));
                done = false;
                CHECK("try_combine_sum", afmesh_attention_try_combine_sum(a, h[s], AFMESH_DTYPE_F32, sum, t * ROW, &done));
                if (!done) return fail("try_combine_sum after wait_all", AFMESH_ERR_TIMEOUT);
                if (check_sum(sum, rows[s], t)) return 100;
                MISUSE("try_combine_sum, stale handle",
                       afmesh_attention_try_combine_sum(a, h[s], AFMESH_DTYPE_F32, sum, t * ROW, &done),
                       AFMESH_ERR_INVALID_ARGUMENT);
                MISUSE("wait_all, stale handle", afmesh_attention_wait_all(a, &h[s], 1, 10), AFMESH_ERR_INVALID_ARGUMENT);
                CHECK("trace after the combine", afmesh_attention_trace(a, s, tr, 16, &nt));
            }
            CHECK("progress", afmesh_attention_progress(a));
        }
    }
    afmesh_peer_stats st[16] = {AFMESH_PEER_STATS_INIT};
    size_t n = 0;
    st[0].size = 8;
    MISUSE("stats with a short size", afmesh_attention_stats(a, st, 16, &n), AFMESH_ERR_INVALID_ARGUMENT);
    st[0].size = sizeof st[0];
    MISUSE("stats with a short array", afmesh_attention_stats(a, st, N - 1, &n), AFMESH_ERR_BUFFER_SIZE);
    CHECK("stats", afmesh_attention_stats(a, st, 16, &n));
    if (n != N || st[0].role != 2 || st[0].received != (uint64_t)layers * STAGES) return fail("stats", AFMESH_ERR_CONFIG);
    for (unsigned j = 0; j < N; j++) {
        if (st[j].size != sizeof st[0] || st[j].rank != j || st[j].sent_bytes == 0 || st[j].copied_bytes == 0) {
            fprintf(stderr, "stats of F%u: size %u rank %u sent_bytes %llu copied_bytes %llu\n", j, st[j].size, st[j].rank,
                    (unsigned long long)st[j].sent_bytes, (unsigned long long)st[j].copied_bytes);
            return 104;
        }
        /* Every combine of this peer timed, none of the FFN side. */
        if (check_latency("round trip", &st[j].round_trip, st[j].received) || st[j].ffn.count != 0) return 105;
        /* Every combine's way back timed, one way. */
        if (check_latency("combine arrival", &st[j].arrival, st[j].received)) return 107;
    }
    /* Every stage named one straggler (with more than one FFN rank). */
    uint64_t last = 0;
    for (unsigned j = 0; j < N; j++) {
        const afmesh_latency *l = &st[j].straggler;
        if (l->count > 0 && (l->min_ns > l->p50_ns || l->p50_ns > l->max_ns || l->mean_ns > l->max_ns))
            return fail("straggler summary out of order", AFMESH_ERR_CONFIG);
        last += l->count;
    }
    if (last != (N > 1 ? (uint64_t)layers * STAGES : 0)) {
        fprintf(stderr, "stragglers named in %llu stages of %u\n", (unsigned long long)last, layers * STAGES);
        return 106;
    }
    /* A caller built against the first header (56-byte elements, no
     * latency fields) gets what it has, nothing past its elements. */
    uint32_t v1 = (uint32_t)offsetof(afmesh_peer_stats, round_trip);
    if (v1 != 56) return fail("first header's afmesh_peer_stats size", AFMESH_ERR_CONFIG);
    uint64_t old[16 * 7 + 1];
    memset(old, 0xAB, sizeof old);
    memcpy(old, &v1, sizeof v1);
    CHECK("stats, first header's size", afmesh_attention_stats(a, (afmesh_peer_stats *)(void *)old, 16, &n));
    for (unsigned j = 0; j < N; j++) {
        afmesh_peer_stats e;
        memset(&e, 0, sizeof e);
        memcpy(&e, (unsigned char *)old + j * v1, v1);
        if (e.size != v1 || e.rank != j || e.received != st[j].received) return fail("stats, first header's size", AFMESH_ERR_CONFIG);
    }
    if (((unsigned char *)old)[N * v1] != 0xAB) return fail("stats wrote past the first header's elements", AFMESH_ERR_CONFIG);
    return check_counters(a, NULL);
}

/* The rank's counters (of `a`, else of `f`): the size rule both ways, and
 * gap time within spinning time. */
static int check_counters(afmesh_attention *a, afmesh_ffn *f) {
#define COUNTERS(out) (a ? afmesh_attention_counters(a, (out)) : afmesh_ffn_counters(f, (out)))
    afmesh_rank_counters c = AFMESH_RANK_COUNTERS_INIT;
    MISUSE("counters, NULL out", COUNTERS(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    c.size = 8;
    MISUSE("counters with a short size", COUNTERS(&c), AFMESH_ERR_INVALID_ARGUMENT);
    c.size = sizeof c;
    CHECK("counters", COUNTERS(&c));
    if (c.size != sizeof c || c.reserved != 0 || c.spin_gap_ns > c.spun_ns || (c.spin_gaps == 0) != (c.spin_gap_ns == 0)) {
        fprintf(stderr, "counters: size %u spun %llu ns, %llu gaps of %llu ns\n", c.size, (unsigned long long)c.spun_ns,
                (unsigned long long)c.spin_gaps, (unsigned long long)c.spin_gap_ns);
        return fail("counters", AFMESH_ERR_CONFIG);
    }
    /* A caller built against a newer, longer header: its later fields stay. */
    struct {
        afmesh_rank_counters c;
        uint64_t later;
    } newer;
    memset(&newer, 0xAB, sizeof newer);
    newer.c.size = (uint32_t)sizeof newer;
    CHECK("counters, a newer header's size", COUNTERS(&newer.c));
    if (newer.c.size != sizeof newer || newer.later != 0xABABABABABABABABull || newer.c.spun_ns < c.spun_ns)
        return fail("counters, a newer header's size", AFMESH_ERR_CONFIG);
#undef COUNTERS
    return 0;
}

static int ffn(afmesh_ffn *f, unsigned layers, int stall) {
    afmesh_rank_info info;
    CHECK("info", afmesh_ffn_info(f, &info));
    MISUSE("try_get_batch, NULL out", afmesh_ffn_try_get_batch(f, NULL), AFMESH_ERR_INVALID_ARGUMENT);
    float out[16][MAX_TOKENS * HIDDEN];
    for (unsigned i = 0; i < layers * STAGES; i++) {
        afmesh_batch *b = NULL;
        if (i % 2 == 0 || stall) {
            CHECK("get_batch", afmesh_ffn_get_batch(f, 10000, &b));
        } else {
            /* Polled: "nothing yet" is AFMESH_OK with a NULL batch. */
            double deadline = now_s() + 10;
            for (;;) {
                b = (afmesh_batch *)&b; /* a sentinel the call must replace */
                CHECK("try_get_batch", afmesh_ffn_try_get_batch(f, &b));
                if (b != NULL) break;
                if (now_s() > deadline) return fail("try_get_batch", AFMESH_ERR_TIMEOUT);
                CHECK("progress", afmesh_ffn_progress(f));
                struct timespec pause_50us = {0, 50000};
                nanosleep(&pause_50us, NULL);
            }
        }
        if (stall) {
            /* The timeout test dispatches no side block: its view is
             * NULL with length 0. */
            afmesh_sender_view v;
            CHECK("batch_sender", afmesh_batch_sender(b, 0, &v));
            if (v.side != NULL || v.side_len != 0 || v.tokens == NULL) return fail("empty view", AFMESH_ERR_BAD_FRAME);
            printf("stalling\n");
            fflush(stdout);
            for (;;) pause();
        }
        afmesh_batch_meta meta;
        CHECK("batch_info", afmesh_batch_info(b, &meta));
        const void *outs[16];
        size_t lens[16];
        afmesh_matrix_view mx;
        size_t start = 99, count = 99;
        if (matrix) {
            CHECK("batch_matrix", afmesh_batch_matrix(b, &mx));
            if (mx.rows != meta.senders * MAX_TOKENS || mx.row_bytes != ROW || mx.max_tokens != MAX_TOKENS ||
                mx.data == NULL || (uintptr_t)mx.data % 64 != 0) {
                afmesh_batch_free(b);
                return fail("matrix view", AFMESH_ERR_BAD_FRAME);
            }
            MISUSE("sender_rows out of range", afmesh_batch_sender_rows(b, meta.senders, &start, &count),
                   AFMESH_ERR_INVALID_ARGUMENT);
            MISUSE("sender_rows, NULL out", afmesh_batch_sender_rows(b, 0, NULL, &count), AFMESH_ERR_INVALID_ARGUMENT);
        } else {
            MISUSE("batch_matrix without the layout", afmesh_batch_matrix(b, &mx), AFMESH_ERR_INVALID_ARGUMENT);
            MISUSE("sender_rows without the layout", afmesh_batch_sender_rows(b, 0, &start, &count),
                   AFMESH_ERR_INVALID_ARGUMENT);
        }
        if (start != 99 || count != 99) return fail("outputs written on failure", AFMESH_ERR_BAD_FRAME);
        for (unsigned a = 0; a < meta.senders; a++) {
            afmesh_sender_view v;
            CHECK("batch_sender", afmesh_batch_sender(b, a, &v));
            if (matrix) {
                /* The sender's view is its rows of the matrix: the same
                 * memory, at row a * max_tokens. */
                CHECK("batch_sender_rows", afmesh_batch_sender_rows(b, a, &start, &count));
                const char *mine = (const char *)mx.data + start * mx.row_bytes;
                if (start != a * MAX_TOKENS || count != v.token_count ||
                    (count > 0 && (v.tokens != mine || memcmp(mine, v.tokens, count * ROW) != 0))) {
                    afmesh_batch_free(b);
                    return fail("matrix rows differ from the sender's view", AFMESH_ERR_BAD_FRAME);
                }
            }
            const uint32_t *side = v.side;
            if (v.side_len != 8 || side[1] != meta.stage || v.token_count != tokens_of(a, side[0], meta.stage)) {
                afmesh_batch_free(b);
                return fail("side block", AFMESH_ERR_BAD_FRAME);
            }
            const float *in = v.tokens;
            for (unsigned k = 0; k < v.token_count * HIDDEN; k++) {
                if (in[k] != value(a, side[0], meta.stage, k / HIDDEN, k % HIDDEN)) {
                    afmesh_batch_free(b);
                    return 100;
                }
                out[a][k] = in[k] * (float)(me + 1);
            }
            outs[a] = out[a];
            lens[a] = v.token_count * ROW;
        }
        if (meta.senders > 0) {
            /* A refused respond gives the batch back: nothing is sent. */
            size_t good = lens[0];
            lens[0] = good + 1;
            afmesh_result bad = afmesh_ffn_respond(f, b, outs, lens, meta.senders);
            lens[0] = good;
            if (bad != AFMESH_ERR_BUFFER_SIZE) {
                afmesh_batch_free(b);
                fail("respond with a wrong length", bad);
                return 101;
            }
        }
        afmesh_result r = afmesh_ffn_respond(f, b, outs, lens, meta.senders);
        /* Once answered, the batch and its views are gone. */
        afmesh_result again = afmesh_batch_info(b, &meta);
        afmesh_batch_free(b);
        if (r != AFMESH_OK) return fail("respond", r);
        if (again != AFMESH_ERR_INVALID_ARGUMENT) {
            fail("batch_info after respond", again);
            return 102;
        }
    }
    /* Every answer to each attention rank timed, no round trips. */
    afmesh_peer_stats st[16] = {AFMESH_PEER_STATS_INIT};
    size_t n = 0;
    CHECK("stats", afmesh_ffn_stats(f, st, 16, &n));
    if (n != M) return fail("stats count", AFMESH_ERR_CONFIG);
    for (unsigned j = 0; j < M; j++)
        if (st[j].role != 1 || st[j].received != (uint64_t)layers * STAGES ||
            check_latency("ffn", &st[j].ffn, st[j].received) || st[j].round_trip.count != 0 || st[j].straggler.count != 0 ||
            check_latency("dispatch arrival", &st[j].arrival, st[j].received))
            return 105;
    return check_counters(NULL, f);
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s ROLE RANK SCHEDULER M N MODE [LAYERS]\n", argv[0]);
        return 2;
    }
    role = argv[1];
    me = (unsigned)atoi(argv[2]);
    M = (unsigned)atoi(argv[4]);
    N = (unsigned)atoi(argv[5]);
    mode = argv[6];
    unsigned layers = argc > 7 ? (unsigned)atoi(argv[7]) : 20;
    if (strcmp(mode, "forever") == 0) layers = 100000000;
    int attn = strcmp(role, "attention") == 0;

    afmesh_config cfg = AFMESH_CONFIG_INIT;
    cfg.scheduler = argv[3];
    cfg.num_attention = M;
    cfg.num_ffn = N;
    cfg.rank = (int32_t)me;
    cfg.setup_timeout_ms = 20000;
    cfg.embed_scheduler = attn && me == 0;
    const char *job = getenv("TEST_JOB");
    if (job) cfg.job = job;
    afmesh_stage_spec spec = {STAGES, MAX_TOKENS, ROW, ROW, 8};
    int buffered = strcmp(mode, "buffer") == 0;
    matrix = strcmp(mode, "matrix") == 0;
    if (matrix) cfg.layout = AFMESH_LAYOUT_MATRIX;
    void *mem = NULL;
    int rc;
    if (attn) {
        afmesh_attention *a = NULL;
        if (buffered) {
            size_t n = 0;
            CHECK("memory_len", afmesh_attention_memory_len(&cfg, &spec, &n));
            mem = malloc(n);
            CHECK("new_with_buffer", afmesh_attention_new_with_buffer(&cfg, &spec, mem, n, &a));
        } else {
            CHECK("new", afmesh_attention_new(&cfg, &spec, &a));
        }
        fprintf(stderr, "attention %u joined\n", me);
        if (strcmp(mode, "timeout") == 0) {
            float row[HIDDEN] = {1, 2, 3, 4};
            afmesh_dispatch h;
            const void *parts[16];
            uint32_t t;
            CHECK("dispatch", afmesh_attention_dispatch(a, 0, row, ROW, NULL, 0, &h));
            /* The FFN never answers: polling says "not yet", as a success. */
            float sum[HIDDEN];
            bool done = true;
            CHECK("try_combine_sum", afmesh_attention_try_combine_sum(a, h, AFMESH_DTYPE_F32, sum, ROW, &done));
            if (done) return fail("try_combine_sum done without an answer", AFMESH_ERR_BAD_FRAME);
            afmesh_result r = afmesh_attention_wait_all(a, &h, 1, 200);
            if (r != AFMESH_ERR_TIMEOUT) return fail("expected wait_all to time out", r);
            r = afmesh_attention_wait_combine(a, h, 300, parts, 16, &t);
            if (r != AFMESH_ERR_TIMEOUT) return fail("expected a timeout", r);
            if (!strstr(afmesh_last_error_message(), "F0")) return fail("timeout names F0", r);
            r = afmesh_attention_dispatch(a, 0, row, ROW, NULL, 0, &h);
            if (r != AFMESH_ERR_STAGE_BUSY) return fail("expected stage busy", r);
            CHECK("finalize", afmesh_attention_finalize(a));
            r = afmesh_attention_dispatch(a, 1, row, ROW, NULL, 0, &h);
            if (r != AFMESH_ERR_SHUTDOWN) return fail("expected shutdown", r);
            r = afmesh_attention_finalize(a);
            if (r != AFMESH_ERR_SHUTDOWN) return fail("expected shutdown on second finalize", r);
            if ((r = afmesh_attention_progress(a)) != AFMESH_ERR_SHUTDOWN) return fail("progress after finalize", r);
            if ((r = afmesh_attention_wait_all(a, &h, 1, 10)) != AFMESH_ERR_SHUTDOWN) return fail("wait_all after finalize", r);
            if ((r = afmesh_attention_try_combine_sum(a, h, AFMESH_DTYPE_F32, sum, ROW, &done)) != AFMESH_ERR_SHUTDOWN)
                return fail("try_combine_sum after finalize", r);
            afmesh_trace tr[4];
            size_t nt;
            if ((r = afmesh_attention_trace(a, 0, tr, 4, &nt)) != AFMESH_ERR_SHUTDOWN) return fail("trace after finalize", r);
            afmesh_attention_free(a);
            printf("timeout ok\n");
            return 0;
        }
        rc = attention(a, layers);
        if (rc == 0) CHECK("finalize", afmesh_attention_finalize(a));
        afmesh_attention_free(a);
    } else {
        afmesh_ffn *f = NULL;
        if (buffered) {
            size_t n = 0;
            CHECK("memory_len", afmesh_ffn_memory_len(&cfg, &spec, &n));
            mem = malloc(n);
            CHECK("new_with_buffer", afmesh_ffn_new_with_buffer(&cfg, &spec, mem, n, &f));
        } else {
            CHECK("new", afmesh_ffn_new(&cfg, &spec, &f));
        }
        fprintf(stderr, "ffn %u joined\n", me);
        rc = ffn(f, layers, strcmp(mode, "stall") == 0);
        if (rc == 0) CHECK("finalize", afmesh_ffn_finalize(f));
        afmesh_ffn_free(f);
    }
    free(mem);
    if (rc == 0) printf("%s %u ok\n", role, me);
    return rc;
}
