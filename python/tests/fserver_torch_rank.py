"""One process of an afmesh.fserver job with torch CPU tensors (spawned by
test_torch.py): 2 workers, 1 server, a scheduler, from DMLC_* alone.
Prints "ok", or the failure."""

import os
import sys

import torch

import afmesh
import afmesh.fserver as f

role = os.environ["DMLC_ROLE"]
W = int(os.environ["DMLC_NUM_WORKER"])


def push_key(k, mb, w):
    return k + mb * (1 << 8) + w * (1 << 16)


try:
    f.init()
    if role == "worker":
        me = int(os.environ["DMLC_NODE_RANK"])
        for mb in range(3):
            push = [torch.full((2, 8), float(me * 10 + mb)),                  # 64 bytes
                    torch.arange(16, dtype=torch.float32).to(torch.bfloat16)]  # 32 bytes
            pull = [torch.zeros(2, 8)]
            before = pull[0].data_ptr()
            h = f.push_pull(push, [push_key(0, mb, me), push_key(1, mb, me)],
                            pull, [push_key(0, mb, me) + (1 << 24)])
            f.wait(h)
            # The answer landed in this process's own pull tensor.
            assert pull[0].data_ptr() == before
            want = push[0] + push[1].float()[:8].repeat(2, 1)
            assert torch.equal(pull[0], want), (pull[0], want)
    elif role == "server":
        recv = torch.zeros(W * 2, 8)
        f.register_recv_buffer(recv, list(range(W)), [push_key(0, 0, w) for w in range(W)])
        for mb in range(3):
            batches = f.get_batch()
            assert len(batches) == W
            for w, (handler, tensors, keys) in enumerate(batches):
                t0, t1 = tensors
                assert isinstance(t0, torch.Tensor) and isinstance(t1, torch.Tensor)
                assert t0.dtype == torch.float32 and t1.dtype == torch.bfloat16, (t0.dtype, t1.dtype)
                assert t1.shape == (16,) and torch.equal(t1.float(), torch.arange(16.0))
                assert (t0 == w * 10 + mb).all()
                if mb == 0:
                    # The registered tensor's part, filled.
                    assert t0.data_ptr() == recv[2 * w].data_ptr()
                else:
                    # Both tensors view the one receive slot in place:
                    # the second starts where the first's 64 bytes end.
                    assert t1.data_ptr() - t0.data_ptr() == 64, (t0.data_ptr(), t1.data_ptr())
                f.respond([t0 + t1.float()[:8].repeat(2, 1)], handler)
    f.stop()
    print("ok", flush=True)
except (afmesh.Error, AssertionError) as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(3)
