"""One rank of a multi-process mesh through the Python API (spawned by
test_mesh.py). argv: role rank rounds. Prints "ok" on success, the
exception's class name on an afmesh error. LAYOUT=matrix: the FFN ranks
read each sender's rows from the stage's matrix and check them against
the sender's view."""

import os
import sys

import numpy as np

import afmesh

role, rank, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
M, N, S, T, H = 2, 2, 3, 4, 8  # ranks, stages, tokens, hidden (f32)
spec = afmesh.StageSpec(S, T, H * 4, H * 4, 16)
layout = os.environ.get("LAYOUT")
mesh = afmesh.Mesh(os.environ["AFMESH_SCHEDULER"], M, N, rank=rank,
                   transport=os.environ.get("AFMESH_TRANSPORT", "auto"), setup_timeout=20,
                   layout=layout)
timeout = float(os.environ.get("WAIT_S", "10"))


def tokens(a, rnd, s):
    return (np.arange(T * H, dtype=np.float32).reshape(T, H) + 1000 * a + 100 * rnd + 10 * s)


try:
    if role == "attention":
        r = mesh.attention(spec)
        assert (r.rank, r.attention_ranks, r.ffn_ranks) == (rank, M, N)
        out = np.empty((T, H), np.float32)
        for rnd in range(rounds):
            # Every stage in flight at once.
            hs = [r.dispatch(s, tokens(rank, rnd, s), np.array([rnd, s], np.int64))
                  for s in range(S)]
            if rnd == 0:
                print("dispatched", flush=True)
            for s, h in enumerate(hs):
                if s % 2 == 0:
                    n = r.wait_combine_sum(h, out, timeout=timeout)
                    assert n == out.nbytes
                    # FFN j answers (j + 1) * x: the sum is 3x.
                    assert np.array_equal(out, 3 * tokens(rank, rnd, s)), (rnd, s, out)
                else:
                    c = r.wait_combine(h, timeout=timeout)
                    for f in range(N):
                        assert np.array_equal(c.partial(f, np.float32),
                                              (f + 1) * tokens(rank, rnd, s)), (rnd, s, f)
                        assert c.trace(f).back_ns >= c.trace(f).post_ns > 0
        st = r.stats()
        assert [p["peer"] for p in st["peers"]] == ["F0", "F1"]
        assert all(p["received"] == rounds * S for p in st["peers"]), st
        # Each stage of each round named the FFN rank that answered last.
        assert sum(x["count"] for x in st["stragglers"]) == rounds * S, st
        assert sum(p["late_ns"]["count"] for p in st["peers"]) == rounds * S, st
        g = st["spin_gaps"]
        assert 0 <= g["lost_ns"] <= g["spun_ns"] and (g["count"] == 0) == (g["lost_ns"] == 0), g
        r.shutdown()
    else:
        r = mesh.ffn(spec)
        for _ in range(rounds * S):
            b = r.get_batch(timeout)
            assert b.senders == M
            outs = []
            mx = b.matrix(np.float32) if layout == "matrix" else None
            if mx is not None:
                assert mx.shape == (M * T, H) and b.max_tokens == T, mx.shape
            for a in range(M):
                x = b.tokens(a, np.float32)
                if mx is not None:
                    start, count = b.sender_rows(a)
                    assert (start, count) == (a * T, b.token_count(a))
                    assert np.array_equal(mx[start:start + count], x), a
                    x = mx[start:start + count]
                rnd, s = b.side(a, np.int64)
                assert s == b.stage
                assert np.array_equal(x, tokens(a, rnd, s)), (a, rnd, s)
                outs.append((rank + 1) * x)
            r.respond(b, outs)
        r.shutdown()
    print("ok", flush=True)
except afmesh.Error as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(3)
