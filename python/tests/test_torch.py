"""torch tensors through afmesh: CPU tensors through the API and through
afmesh.fserver without a copy (proved by addresses and by writes that
show through), bfloat16, and, where a GPU is, CUDA tensors on ranks whose
stage memory is on the GPU.

Skipped where torch cannot be imported: PyPI's torch wheel pulls GBs of
CUDA packages, so scripts/test does not install it;
scripts/gpu-python-check runs this file on a machine with PyTorch."""

import os

import numpy as np
import pytest

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    pytest.skip(
        f"`import torch` failed ({e}): torch is not installed here (PyPI's wheel pulls GBs "
        "of CUDA packages); scripts/gpu-python-check runs these tests where it is",
        allow_module_level=True)

import afmesh
from afmesh import _buffers
from conftest import free_port

SPEC = afmesh.StageSpec(stages=2, max_tokens=4, row_bytes=16, out_row_bytes=16, side_bytes=8)


def addr(a):
    """The address of a numpy array's first byte."""
    return a.__array_interface__["data"][0]


def test_cpu_tensors_are_used_in_place(pair):
    # Buffers in: the binding's view of a tensor is the tensor's memory.
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    assert addr(_buffers.as_buffer(x, False, "x")) == x.data_ptr()
    # Caller memory for the combine slots: a torch tensor.
    n = afmesh.Mesh("127.0.0.1:1", 1, 1).attention_memory_len(SPEC)
    mem = torch.zeros(n, dtype=torch.uint8)
    a, f = pair(SPEC, memory=mem)
    h = a.dispatch(0, x)
    b = f.get_batch(5)
    assert np.array_equal(b.tokens(0, np.float32), x.numpy())
    f.respond(b, [torch.full((2, 4), 3.0)])
    c = a.wait_combine(h, 5)
    p = c.partial(0, np.float32)
    assert (p == 3.0).all()
    # The combine view is over the tensor's memory, and the tensor holds
    # what arrived.
    off = addr(p) - mem.data_ptr()
    assert 0 <= off and off + 32 <= n
    assert torch.equal(mem[off:off + 32].view(torch.float32), torch.full((8,), 3.0))
    # And a torch tensor over the view is the same memory.
    t = torch.from_numpy(p.view(np.ndarray))
    assert t.data_ptr() == addr(p)


def test_bfloat16_tensors(pair):
    a, f = pair(SPEC)
    x = torch.randn(2, 8).to(torch.bfloat16)  # 16-byte rows
    h = a.dispatch(1, x)
    b = f.get_batch(5)
    got = torch.from_numpy(b.tokens(0, np.uint16).view(np.ndarray)).view(torch.bfloat16)
    assert torch.equal(got, x)
    f.respond(b, [(got * 2).contiguous()])
    out = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert a.wait_combine_sum(h, out, torch.bfloat16, 5) == 32
    assert torch.equal(out, x * 2)


def fserver_env(role, node, port):
    return {
        "DMLC_ROLE": role,
        "DMLC_NUM_WORKER": 2,
        "DMLC_NUM_SERVER": 1,
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": port,
        "DMLC_NODE_RANK": node if node is not None else 0,
        "AFMESH_FSERVER_MAX_BYTES": 4096,
        "AFMESH_SETUP_TIMEOUT_MS": 20000,
    }


def test_fserver_with_torch_tensors(procs):
    """fserver_torch_rank.py checks, on the server, that pushed tensors
    arrive as torch tensors of their dtype (bf16 too) viewing the receive
    slot in place, and the registered one is the registered part; on the
    worker, that answers land in its own pull tensors."""
    port = free_port()
    sched = procs.spawn("fserver_torch_rank.py", fserver_env("scheduler", None, port))
    ranks = [procs.spawn("fserver_torch_rank.py", fserver_env(role, i, port))
             for role, n in (("worker", 2), ("server", 1)) for i in range(n)]
    for p in ranks + [sched]:
        code, out = procs.finish(p, 60)
        assert code == 0 and out.strip().endswith("ok"), out


def test_a_cuda_tensor_on_a_host_rank_is_refused_by_name(pair):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    a, _ = pair(SPEC)
    x = torch.ones(1, 4, device="cuda")
    with pytest.raises(afmesh.Unsupported, match="device="):
        a.dispatch(0, x)


def test_cuda_tensors_on_device_ranks(procs):
    """An attention rank (here) and an FFN rank (a child process: CUDA IPC
    does not open a process's own memory) with stage memory on GPU 0, over
    the cuda transport: a CUDA bf16 tensor dispatched, the FFN's batch
    viewed in place by torch (``__cuda_array_interface__``), answered with
    a CUDA tensor, the combine viewed in place."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    port = free_port()
    addr_ = f"127.0.0.1:{port}"
    env = {"AFMESH_SCHEDULER": addr_, "AFMESH_NUM_ATTENTION": 1, "AFMESH_NUM_FFN": 1,
           "AFMESH_TRANSPORT": "cuda", "AFMESH_SETUP_TIMEOUT_MS": 30000}
    child = procs.spawn("cuda_ffn.py", env)
    mesh = afmesh.Mesh(addr_, 1, 1, transport="cuda", embed_scheduler=True, setup_timeout=30)
    a = mesh.attention(SPEC, device=0)
    try:
        x = torch.randn(3, 8, device="cuda").to(torch.bfloat16)  # 16-byte rows
        h = a.dispatch(0, x)
        c = a.wait_combine(h, 30)
        v = c.partial(0)
        iface = v.__cuda_array_interface__
        assert iface["shape"] == (3, 16) and iface["typestr"] == "|u1"
        t = torch.as_tensor(v, device="cuda")
        assert t.data_ptr() == iface["data"][0]  # the combine slot itself
        got = t.view(torch.bfloat16)
        assert torch.equal(got, x * 2), (got, x * 2)
        # A dispatch from a host tensor on a device rank is refused by name.
        with pytest.raises(afmesh.InvalidArgument, match="__cuda_array_interface__"):
            a.dispatch(1, np.zeros((1, 16), np.uint8))
    finally:
        a.shutdown()
    code, out = procs.finish(child, 30)
    assert code == 0 and out.strip().endswith("ok"), out


def test_cuda_tensors_made_on_a_side_stream(procs):
    """Tensors produced on a non-blocking side stream behind a slow kernel,
    dispatched (and, in the child, answered) at once, then dropped: the
    copies wait for the producer's stream (torch's current stream by
    default, or stream=), and the rank holds the tensors, so the caching
    allocator does not hand their memory to the garbage written next."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    port = free_port()
    addr_ = f"127.0.0.1:{port}"
    env = {"AFMESH_SCHEDULER": addr_, "AFMESH_NUM_ATTENTION": 1, "AFMESH_NUM_FFN": 1,
           "AFMESH_TRANSPORT": "cuda", "AFMESH_SETUP_TIMEOUT_MS": 30000,
           "AFMESH_TEST_BATCHES": 2, "AFMESH_TEST_SIDE_STREAM": 1}
    child = procs.spawn("cuda_ffn.py", env)
    mesh = afmesh.Mesh(addr_, 1, 1, transport="cuda", embed_scheduler=True, setup_timeout=30)
    a = mesh.attention(SPEC, device=0)
    side = torch.cuda.Stream()
    junk = []

    def slow_rows(value):
        # Zeros until a ~50 ms kernel on `side` is done, then `value`.
        x = torch.zeros(3, 8, dtype=torch.bfloat16, device="cuda")
        torch.cuda._sleep(100_000_000)
        x.add_(value)
        return x

    try:
        with torch.cuda.stream(side):
            # Stage 0: the default stream= is torch's current one, `side`.
            h0 = a.dispatch(0, slow_rows(1.5))
            junk.append(torch.full((3, 8), 99.0, dtype=torch.bfloat16, device="cuda"))
        with torch.cuda.stream(side):
            x1 = slow_rows(2.5)
        # Stage 1: outside the context, named by stream= (the object).
        h1 = a.dispatch(1, x1, stream=side)
        del x1
        with torch.cuda.stream(side):
            junk.append(torch.full((3, 8), 99.0, dtype=torch.bfloat16, device="cuda"))
        for h, value in ((h0, 1.5), (h1, 2.5)):
            c = a.wait_combine(h, 30)
            got = torch.as_tensor(c.partial(0), device="cuda").view(torch.bfloat16)
            want = torch.full((3, 8), value * 2, dtype=torch.bfloat16, device="cuda")
            assert torch.equal(got, want), (h, got)
        # A stream= that is no stream is refused by name.
        with pytest.raises(afmesh.InvalidArgument, match="stream="):
            a.dispatch(0, torch.zeros(1, 8, dtype=torch.bfloat16, device="cuda"), stream="side")
    finally:
        a.shutdown()
    code, out = procs.finish(child, 30)
    assert code == 0 and out.strip().endswith("ok"), out
