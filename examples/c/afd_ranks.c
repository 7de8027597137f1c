/* A 2 attention x 2 FFN exchange from C.
 *   ./afd_ranks attention|ffn RANK HOST:PORT
 * Attention rank 0 also runs the rendezvous server at HOST:PORT. Each FFN
 * rank multiplies what it gets by (its rank + 1); each attention rank sums
 * the two partials and checks that it got 3x what it sent. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "afmesh.h"

#define TOKENS 4
#define HIDDEN 8
#define LAYERS 5

static int die(const char *what, afmesh_result r) {
    fprintf(stderr, "%s: %s: %s\n", what, afmesh_result_str(r), afmesh_last_error_message());
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s attention|ffn RANK HOST:PORT\n", argv[0]);
        return 2;
    }
    int attention = strcmp(argv[1], "attention") == 0;
    int rank = atoi(argv[2]);
    afmesh_config cfg = AFMESH_CONFIG_INIT;
    cfg.scheduler = argv[3];
    cfg.num_attention = 2;
    cfg.num_ffn = 2;
    cfg.rank = rank;
    cfg.embed_scheduler = attention && rank == 0;
    afmesh_stage_spec spec = {1, TOKENS, HIDDEN * 4, HIDDEN * 4, 0};
    afmesh_result r;

    if (attention) {
        afmesh_attention *a = NULL;
        if ((r = afmesh_attention_new(&cfg, &spec, &a)) != AFMESH_OK) return die("join", r);
        float x[TOKENS * HIDDEN], y[TOKENS * HIDDEN];
        for (int layer = 0; layer < LAYERS; layer++) {
            for (int i = 0; i < TOKENS * HIDDEN; i++) x[i] = (float)(rank * 100 + layer * 10 + i);
            afmesh_dispatch h;
            if ((r = afmesh_attention_dispatch(a, 0, x, sizeof x, NULL, 0, &h)) != AFMESH_OK) return die("dispatch", r);
            r = afmesh_attention_wait_combine_sum(a, h, AFMESH_DTYPE_F32, 5000, y, sizeof y);
            if (r != AFMESH_OK) return die("combine", r);
            for (int i = 0; i < TOKENS * HIDDEN; i++)
                if (y[i] != 3.0f * x[i]) {
                    fprintf(stderr, "A%d layer %d: y[%d] = %f, want %f\n", rank, layer, i, y[i], 3.0f * x[i]);
                    return 1;
                }
        }
        afmesh_attention_finalize(a);
        afmesh_attention_free(a);
        printf("A%d: %d layers verified\n", rank, LAYERS);
    } else {
        afmesh_ffn *f = NULL;
        if ((r = afmesh_ffn_new(&cfg, &spec, &f)) != AFMESH_OK) return die("join", r);
        float out[2][TOKENS * HIDDEN];
        for (int layer = 0; layer < LAYERS; layer++) {
            afmesh_batch *b;
            if ((r = afmesh_ffn_get_batch(f, 5000, &b)) != AFMESH_OK) return die("get_batch", r);
            const void *outs[2];
            size_t lens[2];
            for (uint32_t s = 0; s < 2; s++) {
                afmesh_sender_view v;
                afmesh_batch_sender(b, s, &v);
                const float *in = v.tokens;
                for (uint32_t i = 0; i < v.token_count * HIDDEN; i++) out[s][i] = in[i] * (float)(rank + 1);
                outs[s] = out[s];
                lens[s] = v.token_count * v.row_bytes;
            }
            r = afmesh_ffn_respond(f, b, outs, lens, 2);
            afmesh_batch_free(b);
            if (r != AFMESH_OK) return die("respond", r);
        }
        afmesh_ffn_finalize(f);
        afmesh_ffn_free(f);
        printf("F%d: %d layers served\n", rank, LAYERS);
    }
    return 0;
}
