"""Multi-process meshes through the Python API: values verified with
several stages in flight, and a killed peer surfacing as PeerLost."""

import signal
import time

import pytest

import afmesh
from conftest import free_port


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_2a2f_numpy_values(procs, transport):
    sched = afmesh.Scheduler(f"127.0.0.1:{free_port()}", 2, 2, join_timeout=20)
    env = {"AFMESH_SCHEDULER": sched.addr, "AFMESH_TRANSPORT": transport}
    ranks = [procs.spawn("rank_api.py", env, role, i, 5)
             for role in ("attention", "ffn") for i in range(2)]
    for p in ranks:
        code, out = procs.finish(p, 30)
        assert code == 0 and out.strip().endswith("ok"), out
    summary = sched.wait(10)
    assert (summary["attention"], summary["ffn"]) == (2, 2)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_2a2f_matrix_layout(procs, transport):
    """Every stage's rows as one matrix: the FFN ranks answer from its
    rows, checked against each sender's view."""
    sched = afmesh.Scheduler(f"127.0.0.1:{free_port()}", 2, 2, join_timeout=20)
    env = {"AFMESH_SCHEDULER": sched.addr, "AFMESH_TRANSPORT": transport, "LAYOUT": "matrix"}
    ranks = [procs.spawn("rank_api.py", env, role, i, 5)
             for role in ("attention", "ffn") for i in range(2)]
    for p in ranks:
        code, out = procs.finish(p, 30)
        assert code == 0 and out.strip().endswith("ok"), out
    sched.wait(10)


def test_killed_peer_is_peer_lost_everywhere(procs):
    sched = afmesh.Scheduler(f"127.0.0.1:{free_port()}", 2, 2, join_timeout=20)
    # Many rounds; the waits' own bound (20 s) is far beyond what the test allows.
    env = {"AFMESH_SCHEDULER": sched.addr, "AFMESH_TRANSPORT": "tcp", "WAIT_S": "20"}
    a = [procs.spawn("rank_api.py", env, "attention", i, 10**6) for i in range(2)]
    f = [procs.spawn("rank_api.py", env, "ffn", i, 10**6) for i in range(2)]
    # The mesh is running once an attention rank has dispatched.
    line = a[0].stdout.readline()
    assert line.strip() == "dispatched", line
    f[1].send_signal(signal.SIGKILL)
    start = time.monotonic()
    for p in (a[0], a[1], f[0]):
        code, out = procs.finish(p, 15)
        assert code == 3 and "PeerLost" in out, out
    assert time.monotonic() - start < 15
