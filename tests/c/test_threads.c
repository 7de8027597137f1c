/* Threads on one handle: test_threads SCHEDULER
 *
 * One process joins a 1A x 1F mesh over tcp (a thread per rank), then:
 *   busy       a second thread blocks in afmesh_attention_wait_combine;
 *              the main thread's calls on that handle fail at once with
 *              AFMESH_ERR_BUSY (naming the handle) and change nothing; the
 *              combine still reaches the waiting thread
 *   interrupt  a second thread blocks in afmesh_ffn_get_batch (nothing is
 *              sent); afmesh_ffn_interrupt ends it with
 *              AFMESH_ERR_INTERRUPTED within BOUND_MS; the handle still
 *              serves the next batch
 *   abort      the same wait ended by afmesh_ffn_abort: AFMESH_ERR_SHUTDOWN
 *              within BOUND_MS, no crash; later calls are SHUTDOWN; free
 * Exit 0 on success ("threads ok"), else the afmesh_result that failed, or
 * 100 and up for a wrong outcome. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "afmesh.h"

#define ROW 16
#define BOUND_MS 100.0

static const char *scheduler;

static int fail(const char *what, afmesh_result r) {
    fprintf(stderr, "%s: %s (%d): %s\n", what, afmesh_result_str(r), (int)r,
            afmesh_last_error_message());
    return (int)r;
}

#define CHECK(what, call)                           \
    do {                                            \
        afmesh_result r_ = (call);                  \
        if (r_ != AFMESH_OK) return fail(what, r_); \
    } while (0)

#define EXPECT(what, got, want)                                   \
    do {                                                          \
        afmesh_result g_ = (got);                                 \
        if (g_ != (want)) {                                       \
            fprintf(stderr, "%s: want %s, ", what, afmesh_result_str(want)); \
            fail("got", g_);                                      \
            return 101;                                           \
        }                                                         \
    } while (0)

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e3 * (double)ts.tv_sec + 1e-6 * (double)ts.tv_nsec;
}

static afmesh_config config(unsigned attention) {
    afmesh_config cfg = AFMESH_CONFIG_INIT;
    cfg.scheduler = scheduler;
    cfg.num_attention = 1;
    cfg.num_ffn = 1;
    cfg.rank = 0;
    cfg.transport = "tcp";
    cfg.setup_timeout_ms = 20000;
    cfg.embed_scheduler = attention;
    cfg.job = "c-threads";
    return cfg;
}

static const afmesh_stage_spec spec = {2, 4, ROW, ROW, 0};

static afmesh_attention *a;
static afmesh_ffn *f;

static void *join_attention(void *res) {
    afmesh_config cfg = config(1);
    *(afmesh_result *)res = afmesh_attention_new(&cfg, &spec, &a);
    return NULL;
}

/* What a second thread did: its result and when it returned. */
struct waiter {
    pthread_t thread;
    atomic_int started;
    afmesh_result r;
    double returned_ms;
    afmesh_dispatch h;
    const void *partial;
    uint32_t tokens;
};

static void *wait_combine(void *p) {
    struct waiter *w = p;
    atomic_store(&w->started, 1);
    /* The main thread's probes may hold the handle as this call starts:
     * that is the busy refusal under test, so try again. */
    do {
        w->r = afmesh_attention_wait_combine(a, w->h, 30000, &w->partial, 1, &w->tokens);
    } while (w->r == AFMESH_ERR_BUSY);
    w->returned_ms = now_ms();
    return NULL;
}

static void *get_batch(void *p) {
    struct waiter *w = p;
    afmesh_batch *b = NULL;
    atomic_store(&w->started, 1);
    do {
        w->r = afmesh_ffn_get_batch(f, 30000, &b);
    } while (w->r == AFMESH_ERR_BUSY); /* as in wait_combine */
    w->returned_ms = now_ms();
    afmesh_batch_free(b);
    return NULL;
}

/* Waits until the waiter's thread is inside its call on the handle: until
 * `probe` (a call that changes nothing) is refused as busy. */
#define UNTIL_BUSY(what, probe)                                          \
    do {                                                                 \
        double until_ = now_ms() + 10000;                                \
        afmesh_result p_;                                                \
        while ((p_ = (probe)) == AFMESH_OK && now_ms() < until_) {       \
        }                                                                \
        EXPECT(what, p_, AFMESH_ERR_BUSY);                               \
    } while (0)

/* One batch served by the main thread: each row answered with itself. */
static int serve_one(void) {
    afmesh_batch *b;
    CHECK("get_batch", afmesh_ffn_get_batch(f, 10000, &b));
    afmesh_sender_view v;
    CHECK("batch sender", afmesh_batch_sender(b, 0, &v));
    unsigned char out[4 * ROW];
    size_t len = (size_t)v.token_count * ROW;
    if (len) memcpy(out, v.tokens, len);
    const void *outs[1] = {out};
    CHECK("respond", afmesh_ffn_respond(f, b, outs, &len, 1));
    afmesh_batch_free(b);
    return 0;
}

static int busy(void) {
    unsigned char rows[2 * ROW];
    for (unsigned i = 0; i < sizeof rows; i++) rows[i] = (unsigned char)(i + 1);
    struct waiter w = {0};
    CHECK("dispatch", afmesh_attention_dispatch(a, 0, rows, sizeof rows, NULL, 0, &w.h));
    if (pthread_create(&w.thread, NULL, wait_combine, &w)) return 102;
    while (!atomic_load(&w.started)) {
    }
    afmesh_rank_info info;
    UNTIL_BUSY("info while another thread waits", afmesh_attention_info(a, &info));
    if (!strstr(afmesh_last_error_message(), "in use by another thread")) {
        fprintf(stderr, "busy message: %s\n", afmesh_last_error_message());
        return 103;
    }
    /* A dispatch on the other stage is refused, not half-done. */
    afmesh_dispatch h1;
    EXPECT("dispatch while another thread waits",
           afmesh_attention_dispatch(a, 1, rows, ROW, NULL, 0, &h1), AFMESH_ERR_BUSY);
    /* The FFN answers: the combine reaches the waiting thread, whole. */
    int e = serve_one();
    if (e) return e;
    pthread_join(w.thread, NULL);
    CHECK("wait_combine on the second thread", w.r);
    if (w.tokens != 2 || memcmp(w.partial, rows, sizeof rows) != 0) return 104;
    /* The handle is free again, and stage 1 was never sent. */
    CHECK("info", afmesh_attention_info(a, &info));
    bool done = true;
    unsigned char sum[ROW];
    afmesh_dispatch never = {1, 0};
    afmesh_result r = afmesh_attention_try_combine_sum(a, never, AFMESH_DTYPE_F32, sum, ROW, &done);
    if (r == AFMESH_OK) return 105;
    printf("busy ok\n");
    return 0;
}

static int interrupt(void) {
    struct waiter w = {0};
    if (pthread_create(&w.thread, NULL, get_batch, &w)) return 102;
    while (!atomic_load(&w.started)) {
    }
    afmesh_rank_info info;
    UNTIL_BUSY("ffn info while another thread waits", afmesh_ffn_info(f, &info));
    double at = now_ms();
    CHECK("interrupt", afmesh_ffn_interrupt(f));
    pthread_join(w.thread, NULL);
    EXPECT("get_batch interrupted", w.r, AFMESH_ERR_INTERRUPTED);
    double took = w.returned_ms - at;
    printf("interrupt woke get_batch after %.2f ms\n", took);
    if (took > BOUND_MS) return 106;
    /* One interrupt, one wait: the handle serves the next batch. */
    unsigned char rows[ROW] = {9};
    afmesh_dispatch h;
    CHECK("dispatch", afmesh_attention_dispatch(a, 1, rows, ROW, NULL, 0, &h));
    int e = serve_one();
    if (e) return e;
    const void *partial;
    uint32_t tokens;
    CHECK("wait_combine", afmesh_attention_wait_combine(a, h, 10000, &partial, 1, &tokens));
    if (tokens != 1 || memcmp(partial, rows, ROW) != 0) return 107;
    printf("interrupt ok\n");
    return 0;
}

static int abort_wait(void) {
    struct waiter w = {0};
    if (pthread_create(&w.thread, NULL, get_batch, &w)) return 102;
    while (!atomic_load(&w.started)) {
    }
    afmesh_rank_info info;
    UNTIL_BUSY("ffn info while another thread waits", afmesh_ffn_info(f, &info));
    double at = now_ms();
    CHECK("abort", afmesh_ffn_abort(f));
    pthread_join(w.thread, NULL);
    EXPECT("get_batch aborted", w.r, AFMESH_ERR_SHUTDOWN);
    double took = w.returned_ms - at;
    printf("abort woke get_batch after %.2f ms\n", took);
    if (took > BOUND_MS) return 108;
    afmesh_batch *b;
    EXPECT("get_batch after abort", afmesh_ffn_get_batch(f, 0, &b), AFMESH_ERR_SHUTDOWN);
    afmesh_ffn_free(f);
    printf("abort ok\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test_threads SCHEDULER\n");
        return 2;
    }
    scheduler = argv[1];
    pthread_t t;
    afmesh_result ar = AFMESH_ERR_PANIC;
    if (pthread_create(&t, NULL, join_attention, &ar)) return 102;
    afmesh_config cfg = config(0);
    afmesh_result fr = afmesh_ffn_new(&cfg, &spec, &f);
    pthread_join(t, NULL);
    CHECK("attention_new", ar);
    CHECK("ffn_new", fr);
    int e = busy();
    if (!e) e = interrupt();
    if (!e) e = abort_wait();
    if (e) return e;
    afmesh_attention_abort(a);
    afmesh_attention_free(a);
    printf("threads ok\n");
    return 0;
}
