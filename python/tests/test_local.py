"""One process, a 1A1F pair: views, stale views, errors, the GIL released
during a wait, interrupt() from another thread."""

import threading
import time

import numpy as np
import pytest

import afmesh

SPEC = afmesh.StageSpec(stages=2, max_tokens=4, row_bytes=16, out_row_bytes=16, side_bytes=8)


def test_version_and_exceptions():
    assert afmesh.__version__ == "0.1.0"
    for e in (afmesh.Timeout, afmesh.PeerLost, afmesh.StageBusy, afmesh.ConfigError,
              afmesh.InvalidArgument, afmesh.Interrupted, afmesh.StaleView):
        assert issubclass(e, afmesh.Error)
    assert issubclass(afmesh.StaleView, afmesh.InvalidArgument)
    with pytest.raises(afmesh.ConfigError, match="transport"):
        afmesh.Mesh("127.0.0.1:1", 1, 1, transport="pigeon")


def test_matrix_view_equals_the_sender_views(pair):
    a, f = pair(SPEC, layout="matrix")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    h = a.dispatch(1, x, b"s")
    b = f.get_batch(5)
    m = b.matrix(np.float32)
    assert isinstance(m, afmesh.View) and m.shape == (SPEC.max_tokens, 4)
    start, count = b.sender_rows(0)
    assert (start, count, b.max_tokens) == (0, 2, 4)
    assert np.array_equal(m[start:start + count], b.tokens(0, np.float32))
    assert np.array_equal(m[:2], x)
    # The same memory: the matrix is a view, not a copy.
    assert m[:2].__array_interface__["data"][0] == b.tokens(0).__array_interface__["data"][0]
    with pytest.raises(afmesh.InvalidArgument, match="attention rank 1"):
        b.sender_rows(1)
    f.respond(b, [m[:2] * 3])
    with pytest.raises(afmesh.StaleView):
        m.sum()
    with pytest.raises(afmesh.StaleView):
        b.matrix()
    assert np.array_equal(a.wait_combine(h, 5).partial(0, np.float32), 3 * x)


def test_the_slots_layout_has_no_matrix(pair):
    a, f = pair(SPEC)
    h = a.dispatch(0, np.zeros((1, 4), np.float32))
    b = f.get_batch(5)
    with pytest.raises(afmesh.InvalidArgument, match="slots layout"):
        b.matrix()
    with pytest.raises(afmesh.InvalidArgument, match="slots layout"):
        b.sender_rows(0)
    f.respond(b, [np.zeros((1, 4), np.float32)])
    a.wait_combine(h, 5)
    with pytest.raises(afmesh.InvalidArgument, match="layout"):
        afmesh.Mesh("127.0.0.1:1", 1, 1, layout="diagonal")


def test_batch_views_end_at_respond(pair):
    a, f = pair(SPEC)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    h = a.dispatch(0, x, b"side")
    b = f.get_batch(5)
    v = b.tokens(0, np.float32)
    assert isinstance(v, afmesh.View) and v.shape == (2, 4)
    assert np.array_equal(v, x) and bytes(b.side(0)) == b"side"
    row = v[1]  # a derived view shares the lease
    f.respond(b, [v * 2])
    for use in (lambda: v[0], lambda: v + 1, lambda: row.sum(), lambda: np.sum(v),
                lambda: v.copy(), lambda: repr(v), lambda: b.tokens(0), lambda: list(row)):
        with pytest.raises(afmesh.StaleView, match="respond"):
            use()
    assert not b.valid and not v.valid
    with pytest.raises(afmesh.StaleView, match="already answered"):
        f.respond(b, [x])
    c = a.wait_combine(h, 5)
    p = c.partial(0, np.float32)
    assert np.array_equal(p, 2 * x)
    # The combine's views end when the stage is dispatched again.
    h = a.dispatch(0, x)
    with pytest.raises(afmesh.StaleView, match="dispatched again"):
        p.max()
    f.respond(f.get_batch(5), [x])
    out = np.zeros((2, 4), np.float32)
    assert a.wait_combine_sum(h, out, timeout=5) == x.nbytes
    assert np.array_equal(out, x)


def test_bad_arguments_are_clear_errors(pair):
    a, f = pair(SPEC)
    with pytest.raises(afmesh.BufferSize, match="whole number of 16-byte rows"):
        a.dispatch(0, b"123")
    with pytest.raises(afmesh.InvalidArgument, match="contiguous"):
        a.dispatch(0, np.zeros((4, 8), np.float32)[:, ::2])
    with pytest.raises(afmesh.InvalidArgument, match="stage 7"):
        a.dispatch(7, b"")
    h = a.dispatch(1, np.ones(4, np.float32))
    with pytest.raises(afmesh.StageBusy):
        a.dispatch(1, np.ones(4, np.float32))
    b = f.get_batch(5)
    with pytest.raises(afmesh.InvalidArgument, match="2 output blocks for 1"):
        f.respond(b, [b"", b""])
    with pytest.raises(afmesh.BufferSize):
        f.respond(b, [np.zeros(3, np.float32)])
    f.respond(b, [np.full(4, 5, np.float32)])  # the refused batch was answered afterwards
    with pytest.raises(afmesh.BufferSize):
        a.wait_combine_sum(h, np.zeros(1, np.float32), timeout=5)
    with pytest.raises(afmesh.InvalidArgument, match="dtype"):
        a.wait_combine_sum(h, np.zeros(4, np.int32), timeout=5)
    out = np.zeros(4, np.float32)
    a.wait_combine_sum(h, out, timeout=5)
    assert (out == 5).all()
    with pytest.raises(afmesh.InvalidArgument, match="not in flight"):
        a.wait_combine(h, 1)


def test_wait_releases_the_gil_and_times_out(pair):
    a, f = pair(SPEC)
    h = a.dispatch(0, np.ones(4, np.float32))
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        start = time.monotonic()
        with pytest.raises(afmesh.Timeout, match="combine"):
            a.wait_combine(h, 0.5)
        took = time.monotonic() - start
    finally:
        stop.set()
        t.join(5)
    assert 0.45 < took < 2, took
    # A thread that ran Python all along: thousands of iterations, not a few.
    assert count[0] > 10000, count[0]
    # Nothing was consumed: the combine can still be taken.
    f.respond(f.get_batch(5), [np.ones(4, np.float32)])
    assert a.wait_combine(h, 5).tokens == 1


def test_interrupt_from_another_thread(pair):
    a, f = pair(SPEC)
    threading.Timer(0.2, f.interrupt).start()
    start = time.monotonic()
    with pytest.raises(afmesh.Interrupted):
        f.get_batch(10)
    assert time.monotonic() - start < 2
    # The rank stays usable.
    a.dispatch(0, np.ones(4, np.float32))
    assert f.get_batch(5).total_tokens == 1


def test_one_call_at_a_time(pair):
    a, f = pair(SPEC)
    err = []
    t = threading.Thread(target=lambda: err.append(pytest.raises(afmesh.Timeout, f.get_batch, 1)))
    t.start()
    busy = None
    while t.is_alive() and busy is None:  # until the thread is inside get_batch
        try:
            f.progress()
        except afmesh.Busy as e:
            busy = e
    t.join(5)
    assert busy is not None and "one call at a time" in str(busy)
    assert err


def test_other_buffer_kinds(pair):
    a, f = pair(SPEC)
    x = np.arange(4, dtype=np.float32)
    h = a.dispatch(1, memoryview(x.tobytes()))
    f.respond(f.get_batch(5), [bytearray(x.tobytes())])
    out = bytearray(16)
    assert a.wait_combine_sum(h, out, dtype="f32", timeout=5) == 16
    assert np.array_equal(np.frombuffer(out, np.float32), x)

    class DLPackOnly:  # a producer without the buffer protocol
        def __init__(self, arr):
            self.arr = arr

        def __dlpack__(self, **kw):
            return self.arr.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.arr.__dlpack_device__()

    h = a.dispatch(0, DLPackOnly(2 * x))
    b = f.get_batch(5)
    assert np.array_equal(b.tokens(0, np.float32).reshape(-1), 2 * x)
    f.respond(b, [DLPackOnly(3 * x)])
    assert np.array_equal(a.wait_combine(h, 5).partial(0, np.float32).reshape(-1), 3 * x)
    with pytest.raises(afmesh.InvalidArgument, match="neither the buffer protocol"):
        a.dispatch(0, object())
    with pytest.raises(afmesh.InvalidArgument, match="writable"):
        a.wait_combine_sum(a.dispatch(0, x), b"read-only bytes.", dtype="f32", timeout=1)


def test_caller_memory_receives_the_combine(pair):
    mesh = afmesh.Mesh("127.0.0.1:1", 1, 1)
    mem = np.zeros(mesh.attention_memory_len(SPEC), np.uint8)
    a, f = pair(SPEC, memory=mem)
    x = np.full(4, 7, np.float32)
    h = a.dispatch(0, x)
    f.respond(f.get_batch(5), [x])
    p = a.wait_combine(h, 5).partial(0, np.float32)
    assert np.array_equal(p.reshape(-1), x)
    # The partial is a view of the caller's array: the combine landed there.
    start = mem.__array_interface__["data"][0]
    at = p.__array_interface__["data"][0]
    assert start <= at < start + mem.nbytes
    assert (mem.view(np.uint8) != 0).any()
    with pytest.raises(afmesh.InvalidArgument, match="writable"):
        afmesh.Mesh("127.0.0.1:1", 1, 1).attention(SPEC, memory=bytes(10))


def test_a_sum_into_the_ranks_own_memory_is_refused(pair):
    # The partials live in the caller's array: summing into that same array
    # would read partials while overwriting them.
    mesh = afmesh.Mesh("127.0.0.1:1", 1, 1)
    mem = np.zeros(mesh.attention_memory_len(SPEC), np.uint8)
    a, f = pair(SPEC, memory=mem)
    x = np.full(4, 7, np.float32)
    h = a.dispatch(0, x)
    f.respond(f.get_batch(5), [x])
    with pytest.raises(afmesh.InvalidArgument, match="overlaps"):
        a.wait_combine_sum(h, out=mem[: x.nbytes].view(np.float32), timeout=5)
    # Nothing was consumed: a separate output works.
    out = np.zeros(4, np.float32)
    a.wait_combine_sum(h, out=out, timeout=5)
    assert np.array_equal(out, x)


def test_a_refused_dispatch_leaves_the_last_combine_views_valid(pair):
    a, f = pair(SPEC)
    x = np.full(4, 3, np.float32)
    h = a.dispatch(0, x)
    f.respond(f.get_batch(5), [x])
    p = a.wait_combine(h, 5).partial(0, np.float32)
    too_many = np.zeros(SPEC.max_tokens * SPEC.row_bytes // 4 + SPEC.row_bytes // 4, np.float32)
    with pytest.raises(afmesh.Error):
        a.dispatch(0, too_many)
    assert np.array_equal(p.reshape(-1), x), "the refused dispatch revoked nothing"


def test_barrier_after_traffic(pair):
    """A barrier of the running mesh, through the (embedded) scheduler:
    it waits for every rank of the named roles, times out when one is
    missing (and can then be waited on again), and refuses a rank the
    barrier leaves out."""
    a, f = pair(SPEC)
    x = np.ones((1, 4), np.float32)
    h = a.dispatch(0, x)
    b = f.get_batch(5)
    f.respond(b, [b.tokens(0, np.float32)])
    a.wait_combine(h, 5)
    # Attention ranks only: this is the only one.
    a.barrier(attention=True, ffn=False, timeout=5)
    # Both roles: the FFN rank has not entered yet.
    t0 = time.monotonic()
    with pytest.raises(afmesh.Timeout, match="barrier"):
        a.barrier(timeout=0.2)
    assert time.monotonic() - t0 < 2
    # Still inside: the FFN rank's entry releases it.
    done = []
    t = threading.Thread(target=lambda: done.append(f.barrier(timeout=5)))
    t.start()
    a.barrier(timeout=5)
    t.join(5)
    assert done == [None]
    # Numbered per role set: the next one is a fresh barrier, and works too.
    t = threading.Thread(target=lambda: f.barrier(timeout=5))
    t.start()
    a.barrier(timeout=5)
    t.join(5)
    assert not t.is_alive()
    with pytest.raises(afmesh.InvalidArgument, match="ffn rank"):
        f.barrier(attention=True, ffn=False, timeout=1)
    with pytest.raises(afmesh.InvalidArgument, match="at least one role"):
        f.barrier(attention=False, ffn=False)
