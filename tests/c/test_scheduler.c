/* The rendezvous server from C, as a StepMesh launch starts its scheduler
 * process: test_scheduler PORT
 *
 * The environment is StepMesh's (DMLC_ROLE=scheduler, DMLC_PS_ROOT_URI,
 * DMLC_PS_ROOT_PORT, two worker and two server nodes of one process):
 * afmesh_env_role says scheduler, joining as a rank is
 * refused, afmesh_scheduler_new_from_env listens where the ranks connect
 * and admits 2 + 2 ranks, which join from four threads, run verified
 * layers and leave; then the server reports success. Misuse (NULLs, a
 * second server on the same port) fails by name. Exit 0 on success. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "afmesh.h"

#define TOKENS 4
#define HIDDEN 8
#define LAYERS 3

static const char *addr;

static int fail(const char *what, afmesh_result r) {
    fprintf(stderr, "%s: %s (%d): %s\n", what, afmesh_result_str(r), (int)r, afmesh_last_error_message());
    return r == AFMESH_OK ? 101 : (int)r;
}

#define EXPECT(what, call, code)                  \
    do {                                          \
        afmesh_result r_ = (call);                \
        if (r_ != (code)) return fail(what, r_);  \
    } while (0)

static afmesh_config rank_config(unsigned rank) {
    afmesh_config cfg = AFMESH_CONFIG_INIT;
    cfg.scheduler = addr;
    cfg.num_attention = 2;
    cfg.num_ffn = 2;
    cfg.rank = (int32_t)rank;
    return cfg;
}

static const afmesh_stage_spec spec = {1, TOKENS, HIDDEN * 4, HIDDEN * 4, 0};

static int attention(unsigned rank) {
    afmesh_config cfg = rank_config(rank);
    afmesh_attention *a = NULL;
    EXPECT("attention join", afmesh_attention_new(&cfg, &spec, &a), AFMESH_OK);
    float x[TOKENS * HIDDEN], y[TOKENS * HIDDEN];
    for (int layer = 0; layer < LAYERS; layer++) {
        for (int i = 0; i < TOKENS * HIDDEN; i++) x[i] = (float)(rank * 100 + layer * 10 + i);
        afmesh_dispatch h;
        EXPECT("dispatch", afmesh_attention_dispatch(a, 0, x, sizeof x, NULL, 0, &h), AFMESH_OK);
        EXPECT("combine", afmesh_attention_wait_combine_sum(a, h, AFMESH_DTYPE_F32, 5000, y, sizeof y), AFMESH_OK);
        for (int i = 0; i < TOKENS * HIDDEN; i++)
            if (y[i] != 3.0f * x[i]) {
                fprintf(stderr, "A%u layer %d: y[%d] = %f, want %f\n", rank, layer, i, y[i], 3.0f * x[i]);
                return 100;
            }
    }
    EXPECT("attention finalize", afmesh_attention_finalize(a), AFMESH_OK);
    afmesh_attention_free(a);
    return 0;
}

static int ffn(unsigned rank) {
    afmesh_config cfg = rank_config(rank);
    afmesh_ffn *f = NULL;
    EXPECT("ffn join", afmesh_ffn_new(&cfg, &spec, &f), AFMESH_OK);
    float out[2][TOKENS * HIDDEN];
    for (int layer = 0; layer < LAYERS; layer++) {
        afmesh_batch *b;
        EXPECT("get_batch", afmesh_ffn_get_batch(f, 5000, &b), AFMESH_OK);
        const void *outs[2];
        size_t lens[2];
        for (uint32_t s = 0; s < 2; s++) {
            afmesh_sender_view v;
            EXPECT("sender", afmesh_batch_sender(b, s, &v), AFMESH_OK);
            const float *in = v.tokens;
            for (uint32_t i = 0; i < v.token_count * HIDDEN; i++) out[s][i] = in[i] * (float)(rank + 1);
            outs[s] = out[s];
            lens[s] = v.token_count * v.row_bytes;
        }
        afmesh_result r = afmesh_ffn_respond(f, b, outs, lens, 2);
        afmesh_batch_free(b);
        if (r != AFMESH_OK) return fail("respond", r);
    }
    EXPECT("ffn finalize", afmesh_ffn_finalize(f), AFMESH_OK);
    afmesh_ffn_free(f);
    return 0;
}

struct job {
    int attention;
    unsigned rank;
    int rc;
};

static void *run(void *p) {
    struct job *j = p;
    j->rc = j->attention ? attention(j->rank) : ffn(j->rank);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    setenv("DMLC_ROLE", "scheduler", 1);
    setenv("DMLC_PS_ROOT_URI", "127.0.0.1", 1);
    setenv("DMLC_PS_ROOT_PORT", argv[1], 1);
    setenv("DMLC_NUM_WORKER", "2", 1);
    setenv("DMLC_NUM_SERVER", "2", 1);
    setenv("DMLC_NODE_RANK", "0", 1);

    uint32_t role = 99;
    EXPECT("env role", afmesh_env_role(&role), AFMESH_OK);
    if (role != AFMESH_ROLE_SCHEDULER) {
        fprintf(stderr, "env role %u, want AFMESH_ROLE_SCHEDULER\n", role);
        return 102;
    }
    EXPECT("env role NULL", afmesh_env_role(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    afmesh_attention *not_a_rank = NULL;
    EXPECT("rank from a scheduler's env", afmesh_attention_new_from_env(&spec, &not_a_rank), AFMESH_ERR_CONFIG);
    if (!strstr(afmesh_last_error_message(), "scheduler")) {
        fprintf(stderr, "refusal does not say why: %s\n", afmesh_last_error_message());
        return 103;
    }

    EXPECT("new NULL out", afmesh_scheduler_new_from_env(NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT("new NULL cfg", afmesh_scheduler_new(NULL, NULL), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT("address NULL", afmesh_scheduler_address(NULL, &addr), AFMESH_ERR_INVALID_ARGUMENT);
    EXPECT("wait NULL", afmesh_scheduler_wait(NULL, 0), AFMESH_ERR_INVALID_ARGUMENT);
    afmesh_scheduler_free(NULL);

    afmesh_scheduler *s = NULL;
    EXPECT("scheduler from env", afmesh_scheduler_new_from_env(&s), AFMESH_OK);
    EXPECT("address", afmesh_scheduler_address(s, &addr), AFMESH_OK);
    char want[64];
    snprintf(want, sizeof want, "127.0.0.1:%s", argv[1]);
    if (strcmp(addr, want) != 0) {
        fprintf(stderr, "listening on %s, want %s\n", addr, want);
        return 104;
    }
    afmesh_scheduler *twice = NULL;
    EXPECT("second server on the port", afmesh_scheduler_new_from_env(&twice), AFMESH_ERR_IO);
    if (!strstr(afmesh_last_error_message(), "bind")) {
        fprintf(stderr, "bind failure does not say so: %s\n", afmesh_last_error_message());
        return 105;
    }
    EXPECT("wait before any rank", afmesh_scheduler_wait(s, 0), AFMESH_ERR_TIMEOUT);

    struct job jobs[4] = {{1, 0, -1}, {1, 1, -1}, {0, 0, -1}, {0, 1, -1}};
    pthread_t t[4];
    for (int i = 0; i < 4; i++) pthread_create(&t[i], NULL, run, &jobs[i]);
    for (int i = 0; i < 4; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < 4; i++)
        if (jobs[i].rc != 0) {
            fprintf(stderr, "%s %u failed: %d\n", jobs[i].attention ? "attention" : "ffn", jobs[i].rank, jobs[i].rc);
            return jobs[i].rc;
        }
    EXPECT("wait for the mesh to end", afmesh_scheduler_wait(s, 10000), AFMESH_OK);
    EXPECT("wait again", afmesh_scheduler_wait(s, 0), AFMESH_OK);
    afmesh_scheduler_free(s);
    printf("scheduler ok\n");
    return 0;
}
