"""One process of a StepMesh-style fserver job (spawned by
test_fserver.py); the role comes from DMLC_ROLE, as in StepMesh's tests.
argv: iterations. Prints "ok", or the afmesh exception's class name."""

import os
import sys

import numpy as np

import afmesh
import afmesh.fserver as f


def gen_push_key(private_key, microbatch, worker_rank):
    return private_key + microbatch * (1 << 8) + worker_rank * (1 << 16)


def gen_pull_key(private_key, microbatch, worker_rank):
    return gen_push_key(private_key, microbatch, worker_rank) + (1 << 24)


iters = int(sys.argv[1])
role = os.environ["DMLC_ROLE"]
W, S = int(os.environ["DMLC_NUM_WORKER"]), int(os.environ["DMLC_NUM_SERVER"])
STAGES = 3

try:
    f.init()
    f.barrier(True, True)
    if role == "worker":
        me = int(os.environ["DMLC_NODE_RANK"])
        for it in range(iters):
            pending = []
            # Every stage in flight before the first wait.
            for mb in range(STAGES):
                rows = 1 + (it + mb) % 4
                push = [np.full((rows, 8), me * 100 + it * 10 + mb, np.float32),
                        np.arange(rows * 8, dtype=np.float32).reshape(rows, 8)]
                pull = [np.zeros((rows, 8), np.float32) for _ in range(S)]
                h = f.push_pull(push, [gen_push_key(k, mb, me) for k in range(2)],
                                pull, [gen_pull_key(0, mb, me) + s for s in range(S)])
                assert f.get_all_handlers(h)[0] == h
                pending.append((h, push, pull))
            for h, push, pull in pending:
                f.wait(h, timeout_ms=10000)
                for s in range(S):
                    if it == 1:
                        # Answered by respond_vec from one buffer of 42 + s.
                        assert (pull[s] == 42 + s).all(), (it, s, pull[s])
                        continue
                    # Server s answers (s + 1) * (sum of the pushed tensors).
                    assert np.array_equal(pull[s], (s + 1) * (push[0] + push[1])), (it, s)
                t = f.fetch_trace(h)
                assert len(t) == 8 and t[0] > 0 and t[-1] >= t[0], t
            if it == 0:
                print("running", flush=True)
    elif role == "server":
        me = int(os.environ["DMLC_NODE_RANK"])
        # Worker w's first tensor of microbatch 0 is delivered into part w.
        recv = np.zeros((W * 4, 8), np.float32)
        f.register_recv_buffer(recv, list(range(W)), [gen_push_key(0, 0, w) for w in range(W)])
        ret_buffer = np.full((4, 8), 42 + me, np.float32)
        for i in range(iters * STAGES):
            batches = f.get_batch()
            assert len(batches) == W
            if i // STAGES == 1:
                f.respond_vec(ret_buffer, [t[0] for _, t, _ in batches],
                              [h for h, _, _ in batches])
                continue
            for w, (handler, tensors, keys) in enumerate(batches):
                assert [(k >> 16) & 0xFF for k in keys] == [w, w], keys
                assert [k & 0xFF for k in keys] == [0, 1], keys
                if keys[0] == gen_push_key(0, 0, w):
                    part = recv[w * 4:(w + 1) * 4]
                    assert np.shares_memory(tensors[0], part), "not the registered buffer"
                f.respond([(me + 1) * (tensors[0] + tensors[1])], handler)
    f.stop()
    print("ok", flush=True)
except afmesh.Error as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(3)
