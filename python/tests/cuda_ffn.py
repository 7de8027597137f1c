"""The FFN rank of test_torch.py's CUDA tests, in a process of its own:
stage memory on GPU 0, each batch viewed in place by torch through
``__cuda_array_interface__``, answered with a CUDA tensor (twice the
rows, as bf16). AFMESH_TEST_BATCHES batches (default 1); with
AFMESH_TEST_SIDE_STREAM=1 each answer is made on a side stream behind a
slow kernel, answered from inside that stream's context (so respond's
default stream is it), and dropped at once, its memory handed straight
to a new tensor filled with garbage on the same stream: the answer must
still carry the rows. Prints "ok", or the failure."""

import os
import sys

import torch

import afmesh

SPEC = afmesh.StageSpec(stages=2, max_tokens=4, row_bytes=16, out_row_bytes=16, side_bytes=8)
BATCHES = int(os.environ.get("AFMESH_TEST_BATCHES", "1"))
SIDE = os.environ.get("AFMESH_TEST_SIDE_STREAM") == "1"

try:
    r = afmesh.Mesh.from_env().ffn(SPEC, device=0)
    side = torch.cuda.Stream() if SIDE else None
    junk = []
    for _ in range(BATCHES):
        b = r.get_batch(30)
        v = b.tokens(0)
        iface = v.__cuda_array_interface__
        assert iface["shape"] == (b.token_count(0), 16), iface
        t = torch.as_tensor(v, device="cuda")
        assert t.data_ptr() == iface["data"][0]  # the receive slot itself
        if side is None:
            out = (t.view(torch.bfloat16) * 2).contiguous()
            r.respond(b, [out])
        else:
            with torch.cuda.stream(side):
                out = torch.zeros(t.shape[0], 8, dtype=torch.bfloat16, device="cuda")
                torch.cuda._sleep(100_000_000)  # ~50 ms: the answer comes late
                out.add_(t.view(torch.bfloat16) * 2)
                r.respond(b, [out])  # ordered after `side`, the current stream
                del out
                # The freed block would go to this tensor at once, written
                # on `side` while the copy may still read it.
                junk.append(torch.full((t.shape[0], 8), 99.0, dtype=torch.bfloat16,
                                       device="cuda"))
        torch.cuda.synchronize()
        try:
            v.__cuda_array_interface__
            raise AssertionError("a device view of an answered batch is still usable")
        except afmesh.StaleView:
            pass
    r.shutdown()
    print("ok", flush=True)
except (afmesh.Error, AssertionError) as e:
    print(type(e).__name__, e, flush=True)
    sys.exit(3)
