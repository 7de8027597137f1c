/* One rank of a C mesh: test_mesh ROLE RANK SCHEDULER M N MODE [LAYERS]
 *
 * MODE run       verified layers (partials and f32 sums), then finalize
 *      buffer    the same with caller-provided slot memory
 *      forever   verified layers until something fails; exits with the code
 *      stall     (ffn) take one batch, never answer, wait to be killed
 *      timeout   (attention) a combine that times out, then use after
 *                finalize
 * Attention rank 0 runs the rendezvous server. Exit 0 on success, else
 * the afmesh_result that failed (or 100 for a wrong byte). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "afmesh.h"

#define STAGES 2
#define MAX_TOKENS 8
#define HIDDEN 4
#define ROW (HIDDEN * 4)

static const char *role, *mode;
static unsigned me, M, N;

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

static unsigned tokens_of(unsigned a, unsigned layer, unsigned stage) {
    return 1 + (a + layer + stage) % MAX_TOKENS;
}

static float value(unsigned a, unsigned layer, unsigned stage, unsigned r, unsigned k) {
    return (float)(a * 1000 + layer * 10 + stage) + 0.5f * (float)r + (float)k;
}

static int attention(afmesh_attention *a, unsigned layers) {
    afmesh_rank_info info;
    CHECK("info", afmesh_attention_info(a, &info));
    if (info.rank != me || info.num_ffn != N || info.num_attention != M) return fail("info", AFMESH_ERR_CONFIG);
    float rows[STAGES][MAX_TOKENS * HIDDEN];
    float sum[MAX_TOKENS * HIDDEN];
    for (unsigned layer = 0; layer < layers; layer++) {
        afmesh_dispatch h[STAGES];
        for (unsigned s = 0; s < STAGES; s++) {
            unsigned t = tokens_of(me, layer, s);
            for (unsigned r = 0; r < t; r++)
                for (unsigned k = 0; k < HIDDEN; k++) rows[s][r * HIDDEN + k] = value(me, layer, s, r, k);
            uint32_t side[2] = {layer, s};
            CHECK("dispatch", afmesh_attention_dispatch(a, s, rows[s], t * ROW, side, sizeof side, &h[s]));
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
            } else {
                CHECK("wait_combine_sum",
                      afmesh_attention_wait_combine_sum(a, h[s], AFMESH_DTYPE_F32, 10000, sum, t * ROW));
                float k = (float)(N * (N + 1) / 2);
                for (unsigned i = 0; i < t * HIDDEN; i++)
                    if (sum[i] != rows[s][i] * k) {
                        fprintf(stderr, "wrong sum at %u: %f\n", i, sum[i]);
                        return 100;
                    }
            }
        }
    }
    afmesh_peer_stats st[16];
    size_t n = 0;
    CHECK("stats", afmesh_attention_stats(a, st, 16, &n));
    if (n != N || st[0].role != 2 || st[0].received != (uint64_t)layers * STAGES) return fail("stats", AFMESH_ERR_CONFIG);
    return 0;
}

static int ffn(afmesh_ffn *f, unsigned layers, int stall) {
    afmesh_rank_info info;
    CHECK("info", afmesh_ffn_info(f, &info));
    float out[16][MAX_TOKENS * HIDDEN];
    for (unsigned i = 0; i < layers * STAGES; i++) {
        afmesh_batch *b = NULL;
        CHECK("get_batch", afmesh_ffn_get_batch(f, 10000, &b));
        if (stall) {
            printf("stalling\n");
            fflush(stdout);
            for (;;) pause();
        }
        afmesh_batch_meta meta;
        CHECK("batch_info", afmesh_batch_info(b, &meta));
        const void *outs[16];
        size_t lens[16];
        for (unsigned a = 0; a < meta.senders; a++) {
            afmesh_sender_view v;
            CHECK("batch_sender", afmesh_batch_sender(b, a, &v));
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
    return 0;
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
            afmesh_result r = afmesh_attention_wait_combine(a, h, 300, parts, 16, &t);
            if (r != AFMESH_ERR_TIMEOUT) return fail("expected a timeout", r);
            if (!strstr(afmesh_last_error_message(), "F0")) return fail("timeout names F0", r);
            r = afmesh_attention_dispatch(a, 0, row, ROW, NULL, 0, &h);
            if (r != AFMESH_ERR_STAGE_BUSY) return fail("expected stage busy", r);
            CHECK("finalize", afmesh_attention_finalize(a));
            r = afmesh_attention_dispatch(a, 1, row, ROW, NULL, 0, &h);
            if (r != AFMESH_ERR_SHUTDOWN) return fail("expected shutdown", r);
            r = afmesh_attention_finalize(a);
            if (r != AFMESH_ERR_SHUTDOWN) return fail("expected shutdown on second finalize", r);
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
