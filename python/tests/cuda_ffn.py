"""The FFN rank of test_torch.py's CUDA test, in a process of its own:
stage memory on GPU 0, the batch viewed in place by torch through
``__cuda_array_interface__``, answered with a CUDA tensor (twice the
rows, as bf16). Prints "ok", or the failure."""

import sys

import torch

import afmesh

SPEC = afmesh.StageSpec(stages=2, max_tokens=4, row_bytes=16, out_row_bytes=16, side_bytes=8)

try:
    r = afmesh.Mesh.from_env().ffn(SPEC, device=0)
    b = r.get_batch(30)
    v = b.tokens(0)
    iface = v.__cuda_array_interface__
    assert iface["shape"] == (b.token_count(0), 16), iface
    t = torch.as_tensor(v, device="cuda")
    assert t.data_ptr() == iface["data"][0]  # the receive slot itself
    out = (t.view(torch.bfloat16) * 2).contiguous()
    r.respond(b, [out])
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
