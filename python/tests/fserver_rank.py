"""One process of a StepMesh-style fserver job (spawned by
test_fserver.py); the role comes from DMLC_ROLE, as in StepMesh's tests.
argv: iterations. Prints "ok", or the afmesh exception's class name.

With DMLC_GROUP_SIZE > 1, instance g (STEPMESH_GPU) of each node is in
group g's mesh: every value a worker pushes carries its group and node
(g*1000 + node*100 + ...), every server checks each pushed tensor came
from its own group and the worker it is indexed by, and answers with a
factor naming its group and node (node + 1 + 10*g) that the workers
check: group g saw only group g's data, both ways."""

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
G = int(os.environ.get("DMLC_GROUP_SIZE", "1"))
GPU = int(os.environ.get("STEPMESH_GPU", "0"))
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
                push = [np.full((rows, 8), GPU * 1000 + me * 100 + it * 10 + mb, np.float32),
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
                        # Answered by respond_vec from one buffer of 42 + s + 10 g.
                        assert (pull[s] == 42 + s + 10 * GPU).all(), (it, s, pull[s])
                        continue
                    # Server s of group g answers (s + 1 + 10 g) * (sum of the
                    # pushed tensors).
                    want = (s + 1 + 10 * GPU) * (push[0] + push[1])
                    assert np.array_equal(pull[s], want), (it, s, pull[s][0, 0], want[0, 0])
                t = f.fetch_trace(h)
                assert len(t) == 8 and t[0] > 0 and t[-1] >= t[0], t
            if it == 0:
                print("running", flush=True)
                # The workers of this group, after traffic.
                f.barrier(False, True)
    elif role == "server":
        me = int(os.environ["DMLC_NODE_RANK"])
        # Worker w's first tensor of microbatch 0 is delivered into part w.
        recv = np.zeros((W * 4, 8), np.float32)
        f.register_recv_buffer(recv, list(range(W)), [gen_push_key(0, 0, w) for w in range(W)])
        ret_buffer = np.full((4, 8), 42 + me + 10 * GPU, np.float32)
        try:
            f.barrier(False, True)
            raise AssertionError("a server entered a workers-only barrier")
        except afmesh.InvalidArgument:
            pass
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
                # From this group's instance of worker node w, nobody else.
                v = int(np.asarray(tensors[0]).reshape(-1)[0])
                assert (v // 1000, v % 1000 // 100) == (GPU, w), (GPU, w, v)
                if keys[0] == gen_push_key(0, 0, w):
                    part = recv[w * 4:(w + 1) * 4]
                    assert np.shares_memory(tensors[0], part), "not the registered buffer"
                f.respond([(me + 1 + 10 * GPU) * (tensors[0] + tensors[1])], handler)
    if role != "scheduler":
        # Every rank of the group, after traffic.
        f.barrier(True, True)
    f.stop()
    print("ok", flush=True)
except afmesh.Error as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(3)
