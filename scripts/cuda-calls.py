#!/usr/bin/env python3
"""Host cost of each CUDA driver call afmesh's device path makes, timed
alone (through ctypes; the first line is a trivial call, i.e. what ctypes
itself adds to each). Needs two GPUs with peer access and libcuda; no
afmesh. Run on the GPU machine: `python3 scripts/cuda-calls.py`.

It shows where a message's host time goes (ARCHITECTURE.md, the cuda
section): the copy within one GPU that fills a send slot costs several
times a copy to the peer."""
import ctypes as C
import time

cu = C.CDLL("libcuda.so.1")


def ok(rc, what):
    if rc != 0:
        raise SystemExit(f"{what}: CUresult {rc}")


ok(cu.cuInit(0), "cuInit")
dev = [C.c_int(), C.c_int()]
ctx = [C.c_void_p(), C.c_void_p()]
for i in range(2):
    ok(cu.cuDeviceGet(C.byref(dev[i]), i), "cuDeviceGet")
    ok(cu.cuDevicePrimaryCtxRetain(C.byref(ctx[i]), dev[i]), "cuDevicePrimaryCtxRetain")
ok(cu.cuCtxSetCurrent(ctx[1]), "cuCtxSetCurrent")
peer = C.c_uint64()
ok(cu.cuMemAlloc_v2(C.byref(peer), 4 << 20), "cuMemAlloc on GPU 1")
ok(cu.cuCtxSetCurrent(ctx[0]), "cuCtxSetCurrent")
ok(cu.cuCtxEnablePeerAccess(ctx[1], 0), "cuCtxEnablePeerAccess")
a, b = C.c_uint64(), C.c_uint64()
ok(cu.cuMemAlloc_v2(C.byref(a), 4 << 20), "cuMemAlloc")
ok(cu.cuMemAlloc_v2(C.byref(b), 4 << 20), "cuMemAlloc")
host = C.c_void_p()
ok(cu.cuMemHostAlloc(C.byref(host), 4096, 2), "cuMemHostAlloc")
hdev = C.c_uint64()
ok(cu.cuMemHostGetDevicePointer_v2(C.byref(hdev), host, 0), "cuMemHostGetDevicePointer")
s1, s2 = C.c_void_p(), C.c_void_p()
ok(cu.cuStreamCreate(C.byref(s1), 1), "cuStreamCreate")
ok(cu.cuStreamCreate(C.byref(s2), 1), "cuStreamCreate")
ev = C.c_void_p()
ok(cu.cuEventCreate(C.byref(ev), 2), "cuEventCreate")


def timed(name, f, n=2000, sync=True):
    for _ in range(50):
        f()
    if sync:
        cu.cuCtxSynchronize()
    t0 = time.perf_counter_ns()
    for _ in range(n):
        f()
    t1 = time.perf_counter_ns()
    if sync:
        cu.cuCtxSynchronize()
    print(f"{name:60s} {(t1 - t0) / n / 1e3:7.2f} us per call")


cur = C.c_void_p()
mt = C.c_uint()
timed("cuCtxGetCurrent (what ctypes adds)", lambda: cu.cuCtxGetCurrent(C.byref(cur)))
timed("cuCtxSetCurrent", lambda: cu.cuCtxSetCurrent(ctx[0]))
timed("cuEventRecord", lambda: cu.cuEventRecord(ev, s1))
timed("cuStreamWaitEvent", lambda: cu.cuStreamWaitEvent(s2, ev, 0))
timed("cuEventQuery", lambda: cu.cuEventQuery(ev))
timed("cuPointerGetAttribute", lambda: cu.cuPointerGetAttribute(C.byref(mt), 2, a))
for n in (8, 917504):
    timed(f"cuMemcpyAsync within GPU 0, {n} B", lambda: cu.cuMemcpyAsync(b, a, C.c_size_t(n), s1))
    timed(f"cuMemcpyAsync GPU 0 -> GPU 1, {n} B", lambda: cu.cuMemcpyAsync(peer, a, C.c_size_t(n), s1))
    timed(
        f"cuMemcpyPeerAsync GPU 0 -> GPU 1, {n} B",
        lambda: cu.cuMemcpyPeerAsync(peer, ctx[1], a, ctx[0], C.c_size_t(n), s1),
    )
timed("cuMemcpyHtoDAsync 64 B from pinned memory", lambda: cu.cuMemcpyHtoDAsync_v2(b, host, C.c_size_t(64), s1))
timed("cuStreamWriteValue32_v2 to mapped host memory", lambda: cu.cuStreamWriteValue32_v2(s1, hdev, 1, 0))


def floor_hop():
    cu.cuMemcpyAsync(peer, a, C.c_size_t(8), s1)
    cu.cuStreamSynchronize(s1)


def afmesh_hop():
    # What a dispatch_device of 8 bytes enqueues, then the completion poll.
    cu.cuMemcpyAsync(b, a, C.c_size_t(8), s2)
    cu.cuMemcpyHtoDAsync_v2(b, host, C.c_size_t(64), s2)
    cu.cuEventRecord(ev, s2)
    cu.cuStreamWaitEvent(s1, ev, 0)
    cu.cuMemcpyAsync(peer, b, C.c_size_t(8), s1)
    cu.cuEventRecord(ev, s1)
    while cu.cuEventQuery(ev) != 0:
        pass


timed("floor hop: copy 8 B to the peer, cuStreamSynchronize", floor_hop, 500, False)
timed("afmesh hop: slot fill, header, event, wait, copy, event, poll", afmesh_hop, 500, False)
