/* Every NULL argument, bad config, result strings, version, a join that
 * times out: no crash, the right code, a message that says what. */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "afmesh.h"

static int failures = 0;

#define EXPECT(call, code)                                                          \
    do {                                                                            \
        afmesh_result r_ = (call);                                                  \
        const char *m_ = afmesh_last_error_message();                               \
        if (r_ != (code) || m_ == NULL || (r_ != AFMESH_OK && m_[0] == '\0')) {     \
            fprintf(stderr, "FAIL %s:%d: %s -> %d (%s), want %d\n", __FILE__,       \
                    __LINE__, #call, (int)r_, m_ ? m_ : "(null)", (int)(code));     \
            failures++;                                                             \
        }                                                                           \
    } while (0)

#define EXPECT_MSG(needle)                                                          \
    do {                                                                            \
        if (strstr(afmesh_last_error_message(), (needle)) == NULL) {                \
            fprintf(stderr, "FAIL %s:%d: message \"%s\" lacks \"%s\"\n", __FILE__,  \
                    __LINE__, afmesh_last_error_message(), (needle));               \
            failures++;                                                             \
        }                                                                           \
    } while (0)

int main(void) {
    afmesh_config cfg = AFMESH_CONFIG_INIT;
    cfg.scheduler = "127.0.0.1:1"; /* nothing listens there */
    cfg.num_attention = 1;
    cfg.num_ffn = 1;
    cfg.setup_timeout_ms = 300;
    afmesh_stage_spec spec = {2, 8, 16, 16, 8};
    afmesh_attention *a = NULL;
    afmesh_ffn *f = NULL;
    afmesh_batch *b = NULL;
    size_t n = 0;
    char buf[64];

    /* Version and result strings. */
    if (strcmp(afmesh_version(), "0.1.0") != 0) { fprintf(stderr, "FAIL version\n"); failures++; }
    if (strcmp(afmesh_result_str(AFMESH_ERR_TIMEOUT), "timeout") != 0) { fprintf(stderr, "FAIL result_str\n"); failures++; }
    if (strcmp(afmesh_result_str(999), "unknown result code") != 0) { fprintf(stderr, "FAIL result_str 999\n"); failures++; }

    /* Constructors. */
    EXPECT(afmesh_attention_new(NULL, &spec, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("config is NULL");
    EXPECT(afmesh_attention_new(&cfg, NULL, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("spec is NULL");
    EXPECT(afmesh_attention_new(&cfg, &spec, NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_new_from_env(NULL, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_new_with_buffer(&cfg, &spec, NULL, 64, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("buffer is NULL");
    EXPECT(afmesh_ffn_new(NULL, &spec, &f), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_new(&cfg, NULL, &f), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_new(&cfg, &spec, NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_new_from_env(NULL, &f), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_new_with_buffer(&cfg, &spec, NULL, 64, &f), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_memory_len(NULL, &spec, &n), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_memory_len(&cfg, NULL, &n), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_memory_len(&cfg, &spec, NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_memory_len(&cfg, &spec, NULL), AFMESH_ERR_INVALID_ARGUMENT);
    if (a != NULL || f != NULL) { fprintf(stderr, "FAIL output written on failure\n"); failures++; }

    /* Sizes. */
    EXPECT(afmesh_attention_memory_len(&cfg, &spec, &n), AFMESH_OK);
    if (n != 2 * 1 * 192) { fprintf(stderr, "FAIL attention memory_len %zu\n", n); failures++; }
    EXPECT(afmesh_ffn_memory_len(&cfg, &spec, &n), AFMESH_OK);
    if (n != 2 * 1 * 256) { fprintf(stderr, "FAIL ffn memory_len %zu\n", n); failures++; }

    /* Config checks. */
    afmesh_config bad = cfg;
    bad.size = 8;
    EXPECT(afmesh_attention_new(&bad, &spec, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("size");
    bad = cfg;
    bad.version = 99;
    EXPECT(afmesh_attention_new(&bad, &spec, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("version");
    bad = cfg;
    bad.scheduler = NULL;
    EXPECT(afmesh_attention_new(&bad, &spec, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("scheduler");
    bad = cfg;
    bad.transport = "carrier-pigeon";
    EXPECT(afmesh_attention_new(&bad, &spec, &a), AFMESH_ERR_CONFIG);
    EXPECT_MSG("carrier-pigeon");
    bad = cfg;
    bad.poll = "sometimes";
    EXPECT(afmesh_ffn_new(&bad, &spec, &f), AFMESH_ERR_CONFIG);
    EXPECT_MSG("AFMESH_POLL");
    /* Memory kind (config version 2). Without a CUDA driver a device rank
     * is refused by name, before any rendezvous. */
    bad = cfg;
    bad.memory_kind = 7;
    EXPECT(afmesh_attention_new(&bad, &spec, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("memory_kind");
    bad = cfg;
    bad.memory_kind = AFMESH_MEMORY_CUDA;
    bad.device = -1;
    EXPECT(afmesh_ffn_new(&bad, &spec, &f), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("device");
    if (getenv("AFMESH_TEST_HAS_CUDA") == NULL) {
        bad.device = 0;
        EXPECT(afmesh_attention_new(&bad, &spec, &a), AFMESH_ERR_UNSUPPORTED);
        EXPECT_MSG("CUDA");
        EXPECT(afmesh_ffn_new(&bad, &spec, &f), AFMESH_ERR_UNSUPPORTED);
        EXPECT_MSG("CUDA");
        char dev_buf[64];
        EXPECT(afmesh_attention_new_with_buffer(&bad, &spec, dev_buf, sizeof dev_buf, &a),
               AFMESH_ERR_UNSUPPORTED);
        EXPECT_MSG("CUDA");
    }
    /* A version 1 config (of version 1's size) still works: its missing
     * fields mean host memory, whatever lies beyond it. */
    bad = cfg;
    bad.version = 1;
    bad.size = (uint32_t)offsetof(afmesh_config, memory_kind);
    bad.memory_kind = AFMESH_MEMORY_CUDA;
    EXPECT(afmesh_attention_memory_len(&bad, &spec, &n), AFMESH_OK);
    bad.version = 2;
    EXPECT(afmesh_attention_memory_len(&bad, &spec, &n), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("size");
    /* Layout (config version 3); a version 2 config of version 2's size
     * means the slots layout, whatever lies beyond it. */
    bad = cfg;
    bad.layout = 7;
    EXPECT(afmesh_attention_new(&bad, &spec, &a), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("layout");
    afmesh_stage_spec odd = {2, 3, 24, 16, 8};
    size_t slots_len = 0, matrix_len = 0;
    bad = cfg;
    bad.num_attention = 2;
    EXPECT(afmesh_ffn_memory_len(&bad, &odd, &slots_len), AFMESH_OK);
    bad.layout = AFMESH_LAYOUT_MATRIX;
    EXPECT(afmesh_ffn_memory_len(&bad, &odd, &matrix_len), AFMESH_OK);
    /* Slots: 2 x (64 + 64 + 72, rounded to 256) per stage; the matrix: 2
     * heads of 128, then 2 x 3 rows of 24 bytes (rounded to 192). */
    if (slots_len != 2 * 512 || matrix_len != 2 * 448) {
        fprintf(stderr, "FAIL memory_len slots %zu, matrix %zu\n", slots_len, matrix_len);
        failures++;
    }
    bad.version = 2;
    bad.size = (uint32_t)offsetof(afmesh_config, layout);
    EXPECT(afmesh_ffn_memory_len(&bad, &odd, &n), AFMESH_OK);
    if (n != slots_len) { fprintf(stderr, "FAIL version 2 config: %zu, want %zu\n", n, slots_len); failures++; }
    bad.version = 3;
    EXPECT(afmesh_ffn_memory_len(&bad, &odd, &n), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("size");
    if (a != NULL || f != NULL) { fprintf(stderr, "FAIL output written on failure\n"); failures++; }
    afmesh_stage_spec nostages = spec;
    nostages.stages = 0;
    EXPECT(afmesh_attention_new(&cfg, &nostages, &a), AFMESH_ERR_CONFIG);
    EXPECT_MSG("stages");

    /* A join with no scheduler times out, bounded. */
    EXPECT(afmesh_attention_new(&cfg, &spec, &a), AFMESH_ERR_TIMEOUT);
    EXPECT_MSG("scheduler");
    if (a != NULL) { fprintf(stderr, "FAIL output written on timeout\n"); failures++; }

    /* Methods on NULL handles. */
    afmesh_dispatch h = {0, 0};
    const void *parts[4];
    uint32_t tokens = 0;
    afmesh_rank_info info;
    afmesh_peer_stats st[4];
    afmesh_batch_meta meta;
    afmesh_sender_view view;
    const void *outs[1] = {buf};
    size_t lens[1] = {0};
    EXPECT(afmesh_attention_dispatch(NULL, 0, buf, 16, NULL, 0, &h), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("a is NULL");
    EXPECT(afmesh_attention_wait_combine(NULL, h, 10, parts, 4, &tokens), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_wait_combine_sum(NULL, h, AFMESH_DTYPE_F32, 10, buf, 16), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_info(NULL, &info), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_stats(NULL, st, 4, &n), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_finalize(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_abort(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_interrupt(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_get_batch(NULL, 10, &b), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_respond(NULL, b, outs, lens, 1), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_info(NULL, &info), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_stats(NULL, st, 4, &n), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_finalize(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_abort(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_interrupt(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_batch_info(NULL, &meta), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_batch_sender(NULL, 0, &view), AFMESH_ERR_INVALID_ARGUMENT);
    afmesh_matrix_view mview;
    size_t rstart = 0, rcount = 0;
    EXPECT(afmesh_batch_matrix(NULL, &mview), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("b is NULL");
    EXPECT(afmesh_batch_sender_rows(NULL, 0, &rstart, &rcount), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("b is NULL");
    bool done = false;
    afmesh_trace tr[4];
    EXPECT(afmesh_attention_try_combine_sum(NULL, h, AFMESH_DTYPE_F32, buf, 16, &done), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("a is NULL");
    EXPECT(afmesh_attention_wait_all(NULL, &h, 1, 10), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_dispatch_with(NULL, 0, 1, NULL, NULL, &h), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("a is NULL");
    EXPECT(afmesh_attention_trace(NULL, 0, tr, 4, &n), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_attention_progress(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT(afmesh_ffn_try_get_batch(NULL, &b), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT_MSG("f is NULL");
    EXPECT(afmesh_ffn_progress(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    if (b != NULL || done) { fprintf(stderr, "FAIL output written on failure\n"); failures++; }

    /* _free(NULL) is a no-op. */
    afmesh_attention_free(NULL);
    afmesh_ffn_free(NULL);
    afmesh_batch_free(NULL);

    if (failures) {
        fprintf(stderr, "%d failures\n", failures);
        return 1;
    }
    printf("args ok\n");
    return 0;
}
