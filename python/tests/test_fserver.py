"""afmesh.fserver as StepMesh's tests drive fserver_lib: a scheduler
process, 2 workers and 2 servers from DMLC_* alone, several stages in
flight, values verified; nodes of 2 processes (DMLC_GROUP_SIZE=2), each
instance group its own mesh; a lost server is an exception, not an
abort."""

import signal

from conftest import free_port


def env(role, rank, port, extra=None):
    e = {
        "DMLC_ROLE": role,
        "DMLC_NUM_WORKER": 2,
        "DMLC_NUM_SERVER": 2,
        "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": port,
        "STEPMESH_GPU": 0,
        "AFMESH_FSERVER_MAX_BYTES": 4096,
        "AFMESH_SETUP_TIMEOUT_MS": 20000,
    }
    if rank is not None:
        e["DMLC_NODE_RANK"] = rank
    e.update(extra or {})
    return e


def test_fserver_2_workers_2_servers(procs):
    port = free_port()
    sched = procs.spawn("fserver_rank.py", env("scheduler", None, port), 4)
    ranks = [procs.spawn("fserver_rank.py", env(role, i, port), 4)
             for role in ("worker", "server") for i in range(2)]
    for p in ranks + [sched]:
        code, out = procs.finish(p, 30)
        assert code == 0 and out.strip().endswith("ok"), out


def test_fserver_instance_groups_are_separate_meshes(procs):
    """StepMesh's multi-GPU launch: 2 worker nodes and 2 server nodes of 2
    processes each (STEPMESH_GPU 0 and 1). Instance g of every node is in
    group g's 2x2 mesh; fserver_rank.py checks that each server saw only
    its group's workers, and each worker only its group's servers."""
    port = free_port()
    extra = {"DMLC_GROUP_SIZE": 2}
    sched = procs.spawn("fserver_rank.py", env("scheduler", None, port, extra), 3)
    ranks = [procs.spawn("fserver_rank.py",
                         env(role, node, port, dict(extra, STEPMESH_GPU=gpu)), 3)
             for role in ("worker", "server") for node in range(2) for gpu in range(2)]
    for p in ranks + [sched]:
        code, out = procs.finish(p, 60)
        assert code == 0 and out.strip().endswith("ok"), out


def test_fserver_lost_server_is_an_exception(procs):
    port = free_port()
    extra = {"AFMESH_FSERVER_TIMEOUT_MS": 20000}
    procs.spawn("fserver_rank.py", env("scheduler", None, port), 10**6)
    workers = [procs.spawn("fserver_rank.py", env("worker", i, port, extra), 10**6)
               for i in range(2)]
    servers = [procs.spawn("fserver_rank.py", env("server", i, port, extra), 10**6)
               for i in range(2)]
    # The job runs once a worker has waited for its first push_pulls.
    line = workers[0].stdout.readline()
    assert line.strip() == "running", line
    servers[1].send_signal(signal.SIGKILL)
    for p in workers + servers[:1]:
        code, out = procs.finish(p, 15)
        assert code == 3 and "PeerLost" in out, out


def test_fserver_instance_barrier_spans_groups(procs):
    """barrier(..., instance_barrier=True) waits for every process of the
    job's 2 instance groups, False for this group's only: in
    fserver_barrier_rank.py group 1's server comes late to an instance
    barrier, which holds all four processes until it enters; then group 1
    comes late to a group barrier, which group 0 leaves before then."""
    port = free_port()
    extra = {"DMLC_GROUP_SIZE": 2, "DMLC_NUM_WORKER": 1, "DMLC_NUM_SERVER": 1,
             "AFMESH_FSERVER_TIMEOUT_MS": 10000}
    sched = procs.spawn("fserver_barrier_rank.py", env("scheduler", None, port, extra))
    ranks = {(role, gpu): procs.spawn("fserver_barrier_rank.py",
                                      env(role, 0, port, dict(extra, STEPMESH_GPU=gpu)))
             for role in ("worker", "server") for gpu in range(2)}
    seen = {}
    for key, p in ranks.items():
        code, out = procs.finish(p, 30)
        assert code == 0 and out.strip().endswith("ok"), out
        for line in out.splitlines()[:-1]:
            name, entered, left = line.split()
            seen[key + (name,)] = (float(entered), float(left))
    code, out = procs.finish(sched, 30)
    assert code == 0 and out.strip().endswith("ok"), out
    late = seen[("server", 1, "all")][0]
    for (role, gpu) in ranks:
        assert seen[(role, gpu, "all")][1] >= late, (role, gpu, seen)
    g1_entered = min(seen[(role, 1, "group")][0] for role in ("worker", "server"))
    for role in ("worker", "server"):
        assert seen[(role, 0, "group")][1] < g1_entered, (role, seen)
