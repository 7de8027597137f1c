"""A drop-in for StepMesh's ``fserver_lib`` over afmesh.

``import afmesh.fserver as f`` instead of ``import fserver_lib as f``; the
functions, arguments and semantics are StepMesh's:

* ``init()`` reads the role and sizes from ``DMLC_ROLE`` (``worker``,
  ``server`` or ``scheduler``), ``DMLC_NUM_WORKER``, ``DMLC_NUM_SERVER``,
  ``DMLC_PS_ROOT_URI``, ``DMLC_PS_ROOT_PORT``, ``DMLC_NODE_RANK``,
  ``DMLC_GROUP_SIZE``, ``STEPMESH_GPU`` (through afmesh's own configuration,
  so ``AFMESH_*`` names work too). A scheduler process runs the rendezvous
  from ``init()`` to ``stop()``. As in StepMesh, a node runs
  ``DMLC_GROUP_SIZE`` processes (one per GPU), and instance ``g``
  (``STEPMESH_GPU + DMLC_RANK_OFFSET``) of a worker node talks only to
  instance ``g`` of each server node: each instance group is its own
  ``DMLC_NUM_WORKER`` x ``DMLC_NUM_SERVER`` mesh, worker and server ranks
  are node ranks (``DMLC_NODE_RANK``), and ``num_servers`` below is
  ``DMLC_NUM_SERVER``.
* Workers (attention): ``push_pull(push_tensors, push_keys, pull_tensors,
  pull_keys, need_event=True) -> handler``: every push tensor goes to every
  server; ``pull_tensors`` is server-major (with ``k = len // num_servers``,
  slot ``j`` of server ``i`` is ``i*k + j``) and each server's reply lands
  in its slots. ``wait(handler, timeout_ms=10000)``,
  ``get_all_handlers(handler)``, ``fetch_trace(handler)``.
* Servers (FFN): ``get_batch() -> [(handler, tensors, keys)]``, one entry
  per worker, indexed by worker rank, tensors zero-copy views of the
  received bytes (valid until that batch is answered);
  ``respond(tensors, handler, need_event=False)`` (fresh arrays are fine),
  ``respond_vec(ret_buffer, tensors_vec, handler_vec)``,
  ``register_recv_buffer(tensor, worker_ranks, push_keys)``.
* ``barrier(include_server, include_client, instance_barrier=True)``
  (any time, through the scheduler), ``stop()``, ``get_nanosecond()``.

Unlike StepMesh, ``get_batch`` waits with the GIL released (no spinning in
Python), and a timeout or a lost peer is an exception (``afmesh.Timeout``,
``afmesh.PeerLost``), never a process abort.

How it maps onto afmesh: each ``push_pull`` is one dispatch on the next
idle stage (``AFMESH_FSERVER_STAGES`` stages, default 3, so that many
``push_pull`` may be in flight; one more raises ``afmesh.StageBusy``). The
tensors travel as 64-byte rows with a side block naming each tensor's key,
dtype, shape and offset, and the pull slots' sizes; the servers' answers
come back as that worker's rows and are copied into the pull tensors by
``wait``. Every rank registers its slots once at ``init()``, sized by
``AFMESH_FSERVER_MAX_BYTES`` (default 4 MiB: the most bytes one
``push_pull`` pushes, or one server returns to it) and
``AFMESH_FSERVER_SIDE_BYTES`` (default 4096: the tensor descriptions);
every process of the job must use the same values. A server answers a
batch once every worker's handler of it has been answered.

Tensors are torch tensors (CPU) when the workers push torch tensors and
torch is installed, else numpy arrays. ``need_event`` is accepted and has
nothing to do on the host. CUDA tensors (StepMesh's usual case) are
refused with ``afmesh.Unsupported``: this module keeps its slots in host
memory; the rank classes move CUDA tensors (``Mesh.attention(spec,
device=N)``, ``Mesh.ffn(spec, device=N)``).
"""

import os
import struct
import threading

import numpy as np

import afmesh
from afmesh import _buffers

__all__ = [
    "init", "stop", "push_pull", "wait", "get_batch", "respond", "respond_vec",
    "barrier", "register_recv_buffer", "get_all_handlers", "fetch_trace",
    "get_nanosecond",
]

UNIT = 64  # bytes of one row; every tensor starts on a row boundary

_DTYPES = ["float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16",
           "int32", "int64", "bool", "uint16", "uint32", "uint64",
           "float8_e4m3fn", "float8_e5m2"]
_CODE = {n: i for i, n in enumerate(_DTYPES)}

_HEAD = struct.Struct("<HHHH")      # push count, pull slots per server, servers, flags
_PUSH = struct.Struct("<QQQBB")     # key, offset, nbytes, dtype code, ndim
_DIM = struct.Struct("<q")
_PULL = struct.Struct("<QQ")        # key, nbytes
_TORCH = 1

_lock = threading.Lock()
_st = None


class _State:
    def __init__(self):
        self.role = None
        self.rank = None          # afmesh rank object (worker: attention, server: ffn)
        self.scheduler = None
        self.workers = 0
        self.servers = 0
        self.stages = 0
        self.max_bytes = 0
        self.busy = set()         # worker: stages in flight
        self.next_stage = 0
        self.next_handler = 0
        self.flight = {}          # worker: handler -> in-flight push_pull
        self.traces = {}          # worker: handler -> 8 stamps, after wait
        self.pending = {}         # server: handler -> (batch state, worker rank)
        self.recv = []            # server: registered receive tensors


def _env_int(name, default):
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return default
    try:
        n = int(v)
    except ValueError:
        raise afmesh.ConfigError(f"{name}={v!r} is not an integer") from None
    if n <= 0:
        raise afmesh.ConfigError(f"{name}={v!r} must be positive")
    return n


def _spec():
    stages = _env_int("AFMESH_FSERVER_STAGES", 3)
    max_bytes = _env_int("AFMESH_FSERVER_MAX_BYTES", 4 << 20)
    side = _env_int("AFMESH_FSERVER_SIDE_BYTES", 4096)
    rows = -(-max_bytes // UNIT)
    return afmesh.StageSpec(stages, rows, UNIT, UNIT, side), rows * UNIT


def _need(role):
    st = _st
    if st is None:
        raise afmesh.InvalidArgument("afmesh.fserver: call init() first")
    if role is not None and st.role != role:
        raise afmesh.InvalidArgument(
            f"afmesh.fserver: this process is a {st.role}; that call is for a {role}")
    return st


def init():
    """Joins the job in the role ``DMLC_ROLE`` names (default ``server``,
    as StepMesh). Blocks until every rank has joined (the setup barrier)."""
    global _st
    with _lock:
        if _st is not None:
            raise afmesh.InvalidArgument("afmesh.fserver: init() was already called")
        role = os.environ.get("DMLC_ROLE", "server").strip()
        st = _State()
        if role == "scheduler":
            st.role = "scheduler"
            st.scheduler = afmesh.Scheduler.from_env()
            _st = st
            return
        if role not in ("worker", "server"):
            raise afmesh.ConfigError(
                f"DMLC_ROLE={role!r}: expected worker, server or scheduler")
        spec, st.max_bytes = _spec()
        mesh = afmesh.Mesh.from_env()
        st.role = role
        st.workers, st.servers = mesh.attention_ranks, mesh.ffn_ranks
        st.stages = spec.stages
        st.rank = mesh.attention(spec) if role == "worker" else mesh.ffn(spec)
        _st = st


def stop():
    """Leaves the job. A scheduler waits (GIL released, Ctrl-C ends it) for
    every rank to leave, up to ``AFMESH_FSERVER_STOP_TIMEOUT_MS`` (default
    600000)."""
    global _st
    with _lock:
        st = _need(None)
        try:
            if st.scheduler is not None:
                st.scheduler.wait(_env_int("AFMESH_FSERVER_STOP_TIMEOUT_MS", 600000) / 1000)
            elif st.rank is not None:
                st.rank.shutdown()
        finally:
            _st = None


def barrier(include_server, include_client, instance_barrier=True):
    """StepMesh's barrier: returns once every server (``include_server``)
    and/or worker (``include_client``) has called it, before or after
    traffic — of every instance group of the job with
    ``instance_barrier=True`` (the default, as in StepMesh), of this
    process's instance group only with ``False``; the two are numbered
    apart, and in a job of one group they are the same barrier. It runs
    through the scheduler (``SyncEnter``/``SyncRelease``, whose scope says
    which), waits with the GIL released, and
    raises ``afmesh.Timeout`` after ``AFMESH_FSERVER_TIMEOUT_MS`` (default
    30000; calling it again waits on for the same barrier) or
    ``afmesh.PeerLost`` if the scheduler is gone. A process whose role the
    barrier leaves out gets ``afmesh.InvalidArgument`` (StepMesh aborts);
    the scheduler process returns at once (it is not a rank here)."""
    st = _need(None)
    if st.rank is None:
        return
    if not include_server and not include_client:
        raise afmesh.InvalidArgument("barrier: include_server or include_client must be true")
    mine = include_client if st.role == "worker" else include_server
    if not mine:
        raise afmesh.InvalidArgument(
            f"barrier(include_server={include_server}, include_client={include_client}): "
            f"this process is a {st.role}, which that barrier leaves out")
    st.rank.barrier(attention=bool(include_client), ffn=bool(include_server),
                    timeout=_env_int("AFMESH_FSERVER_TIMEOUT_MS", 30000) / 1000,
                    all_groups=bool(instance_barrier))


def get_nanosecond():
    """Nanoseconds on the clock the traces use."""
    return afmesh.get_nanosecond()


# ---------------------------------------------------------------- worker


def _kind(t):
    return "torch" if (type(t).__module__ or "").startswith("torch") else "numpy"


def _describe(t):
    """(dtype name, shape, nbytes) of a tensor or array."""
    if _kind(t) == "torch":
        name = str(t.dtype).replace("torch.", "")
        shape = tuple(t.shape)
        nbytes = t.numel() * t.element_size()
    else:
        a = t if isinstance(t, np.ndarray) else np.asarray(memoryview(t))
        name, shape, nbytes = a.dtype.name, a.shape, a.nbytes
    if name not in _CODE:
        raise afmesh.InvalidArgument(f"afmesh.fserver: dtype {name} is not supported")
    return name, shape, nbytes


def _bytes_of(t, writable, what):
    """A flat uint8 numpy view of `t`'s memory (no copy)."""
    if isinstance(t, np.ndarray):
        if not t.flags.c_contiguous:
            raise afmesh.InvalidArgument(f"{what}: the array is not C-contiguous")
        if writable and not t.flags.writeable:
            raise afmesh.InvalidArgument(f"{what}: the array is read-only")
        return t.reshape(-1).view(np.uint8)
    if _kind(t) == "torch":
        if t.device.type != "cpu":
            raise afmesh.Unsupported(
                f"{what}: a {t.device.type} tensor; afmesh.fserver moves host tensors only "
                "(its slots are host memory): pass CPU tensors, or use the rank classes with "
                "device= for CUDA tensors")
        return _buffers.as_buffer(t, writable, what)
    return np.frombuffer(memoryview(t), dtype=np.uint8)


def _align(n):
    return -(-n // UNIT) * UNIT


def push_pull(push_tensors, push_keys, pull_tensors, pull_keys, need_event=True):
    """Sends every push tensor to every server and returns a handler for
    ``wait``; each server's reply lands in its ``pull_tensors`` slots."""
    st = _need("worker")
    if len(push_tensors) != len(push_keys):
        raise afmesh.InvalidArgument(
            f"push_pull: {len(push_tensors)} push tensors, {len(push_keys)} push keys")
    if len(pull_tensors) != len(pull_keys):
        raise afmesh.InvalidArgument(
            f"push_pull: {len(pull_tensors)} pull tensors, {len(pull_keys)} pull keys")
    n = st.servers
    if len(pull_tensors) % n:
        raise afmesh.InvalidArgument(
            f"push_pull: {len(pull_tensors)} pull tensors is not a multiple of {n} servers")
    k = len(pull_tensors) // n
    side = bytearray(_HEAD.pack(len(push_tensors), k, n,
                                _TORCH if any(_kind(t) == "torch" for t in push_tensors) else 0))
    parts, off = [], 0
    for i, (t, key) in enumerate(zip(push_tensors, push_keys)):
        if _kind(t) == "torch" and t.device.type != "cpu":
            _bytes_of(t, False, f"push_pull: push_tensors[{i}]")  # raises, naming it
        name, shape, nbytes = _describe(t)
        side += _PUSH.pack(int(key), off, nbytes, _CODE[name], len(shape))
        for d in shape:
            side += _DIM.pack(int(d))
        if nbytes:
            parts.append((off, t))
        off += _align(nbytes)
    push_len = off
    pulls, pull_len = [], 0
    for i in range(n):
        o = 0
        for j in range(k):
            t = pull_tensors[i * k + j]
            dst = _bytes_of(t, True, f"push_pull: pull_tensors[{i * k + j}]")
            side += _PULL.pack(int(pull_keys[i * k + j]), dst.nbytes)
            pulls.append((i, o, dst))
            o += _align(dst.nbytes)
        pull_len = max(pull_len, o)
    need = max(push_len, pull_len)
    if need > st.max_bytes:
        raise afmesh.BufferSize(
            f"push_pull: {need} bytes (push {push_len}, pull per server {pull_len}) exceed "
            f"AFMESH_FSERVER_MAX_BYTES={st.max_bytes}")
    stage = _idle_stage(st)
    h = st.rank.dispatch_parts(stage, need // UNIT, parts, bytes(side))
    st.busy.add(stage)
    first = st.next_handler
    count = len(push_tensors) + k if len(push_tensors) + k > 0 else 1
    st.next_handler += count
    st.flight[first] = (h, pulls, list(range(first, first + count)))
    return first


def _idle_stage(st):
    for i in range(st.stages):
        s = (st.next_stage + i) % st.stages
        if s not in st.busy:
            st.next_stage = (s + 1) % st.stages
            return s
    raise afmesh.StageBusy(
        f"push_pull: all {st.stages} stages are in flight; wait() for one first "
        "(or set AFMESH_FSERVER_STAGES higher on every process)")


def wait(handler, timeout_ms=10000):
    """Waits up to ``timeout_ms`` for every server's reply to ``handler``
    and copies each into its pull tensors. Raises ``afmesh.Timeout`` or
    ``afmesh.PeerLost``; on a timeout the push_pull stays in flight."""
    st = _need("worker")
    try:
        h, pulls, _ = st.flight[handler]
    except KeyError:
        raise afmesh.InvalidArgument(
            f"wait: handler {handler} is not in flight (already waited for, or not a push_pull)"
        ) from None
    try:
        c = st.rank.wait_combine(h, timeout_ms / 1000)
    except afmesh.PeerLost:
        # The combine can never complete: the stage was freed.
        del st.flight[handler]
        st.busy.discard(h.stage)
        raise
    for i, o, dst in pulls:
        src = c.partial(i).reshape(-1)
        np.copyto(dst, src[o:o + dst.nbytes].view(np.ndarray))
    traces = [c.trace(i) for i in range(len(c))]
    t = max(traces, key=lambda x: x.back_ns)
    st.traces[handler] = [t.post_ns, t.post_ns, t.land_ns, t.process_ns,
                          t.respond_ns, t.respond_ns, t.back_ns, t.back_ns]
    if len(st.traces) > 4096:
        st.traces.pop(next(iter(st.traces)))
    del st.flight[handler]
    st.busy.discard(h.stage)


def get_all_handlers(handler):
    """Every handler of a push_pull in flight (the one returned first), as
    StepMesh numbers them: one per push tensor and per pull slot."""
    st = _need("worker")
    f = st.flight.get(handler)
    return list(f[2]) if f else [handler]


def fetch_trace(handler):
    """Eight ns stamps of a waited push_pull, StepMesh's order: request
    start, post-send, post-recv, process; response start, post-send,
    post-recv, process. afmesh stamps a message when posted and when seen,
    so start = post-send, and the response's post-recv = process (the
    worker saw it). Of several servers, the last to answer's."""
    st = _need("worker")
    return list(st.traces.get(handler, [0] * 8))


# ---------------------------------------------------------------- server


class _Served:
    """A batch being answered, one worker's handler at a time."""

    def __init__(self, batch, metas):
        self.batch = batch
        self.metas = metas        # per worker: parsed side block
        self.answers = [None] * len(metas)
        self.left = len(metas)


def _parse(side):
    b = side.tobytes()
    npush, k, n, flags = _HEAD.unpack_from(b, 0)
    o = _HEAD.size
    push = []
    for _ in range(npush):
        key, off, nbytes, code, ndim = _PUSH.unpack_from(b, o)
        o += _PUSH.size
        shape = tuple(_DIM.unpack_from(b, o + 8 * d)[0] for d in range(ndim))
        o += 8 * ndim
        push.append((key, off, nbytes, _DTYPES[code], shape))
    pull = []
    for _ in range(n * k):
        pull.append(_PULL.unpack_from(b, o))
        o += _PULL.size
    return push, pull, k, flags


def _tensor(raw, name, shape, torch_out):
    if torch_out:
        import torch

        t = torch.from_numpy(raw.view(np.ndarray))
        return t.view(getattr(torch, name)).reshape(shape)
    if name == "bfloat16" or name.startswith("float8"):
        name = "uint16" if name == "bfloat16" else "uint8"
    return raw.view(np.dtype(name)).reshape(shape)


def get_batch():
    """The oldest stage every worker has pushed: one ``(handler, tensors,
    keys)`` per worker, indexed by worker rank, tensors zero-copy. Waits
    (GIL released) up to ``AFMESH_FSERVER_TIMEOUT_MS`` (default 30000),
    then raises ``afmesh.Timeout``; a lost worker raises
    ``afmesh.PeerLost``."""
    st = _need("server")
    batch = st.rank.get_batch(_env_int("AFMESH_FSERVER_TIMEOUT_MS", 30000) / 1000)
    out, metas = [], []
    have_torch = None
    for a in range(batch.senders):
        push, pull, k, flags = _parse(batch.side(a))
        me = st.rank.rank
        metas.append(pull[me * k:(me + 1) * k])
        if flags & _TORCH and have_torch is None:
            try:
                import torch  # noqa: F401

                have_torch = True
            except ImportError:
                have_torch = False
        rows = batch.tokens(a).reshape(-1)
        tensors, keys = [], []
        for key, off, nbytes, name, shape in push:
            raw = rows[off:off + nbytes]
            t = _tensor(raw, name, shape, bool(flags & _TORCH) and have_torch)
            t = _registered(st, a, key, t)
            tensors.append(t)
            keys.append(key)
        handler = st.next_handler
        st.next_handler += 1
        out.append((handler, tensors, keys))
    served = _Served(batch, metas)
    for a, (handler, _, _) in enumerate(out):
        st.pending[handler] = (served, a)
    return out


def _registered(st, worker, key, t):
    """The registered receive tensor for (worker, key), filled, if any."""
    for tensor, ranks, keys in st.recv:
        for i, (r, k) in enumerate(zip(ranks, keys)):
            if r == worker and k == key:
                part = tensor.chunk(len(ranks))[i] if hasattr(tensor, "chunk") \
                    else np.array_split(tensor, len(ranks))[i]
                dst = _bytes_of(part, True, "register_recv_buffer tensor")
                src = _bytes_of(t, False, "pushed tensor")
                if dst.nbytes < src.nbytes:
                    raise afmesh.BufferSize(
                        f"register_recv_buffer: worker {worker} key {key}: "
                        f"{src.nbytes} bytes pushed, {dst.nbytes} registered")
                np.copyto(dst[:src.nbytes], src.view(np.ndarray))
                # The pushed tensor's dtype and shape, over the part's bytes.
                if _kind(t) == "torch":
                    import torch

                    return part.reshape(-1).view(torch.uint8)[:src.nbytes] \
                        .view(t.dtype).reshape(t.shape)
                return dst[:src.nbytes].view(t.dtype).reshape(t.shape)
    return t


def register_recv_buffer(tensor, worker_ranks, push_keys):
    """Names where a worker's pushed tensor should be delivered: ``tensor``
    is split along its first dimension into ``len(worker_ranks)`` parts,
    and part ``i`` receives the tensor worker ``worker_ranks[i]`` pushes
    with key ``push_keys[i]``; ``get_batch`` returns a tensor over the
    start of that part, with the pushed tensor's dtype and shape.

    The bytes are copied once, in ``get_batch``, from the slot the worker
    wrote into the part (StepMesh lets the NIC write the part). They
    cannot land there directly, because of where afmesh's writes go:

    * the FFN rank registers one receive region when it joins, inside
      ``init()``; StepMesh's code calls ``register_recv_buffer`` after
      ``init()``, when the region and its remote keys are already in every
      worker's hands;
    * a worker's push goes to the slot of (stage, worker) in that region,
      and the stage is the next idle one when ``push_pull`` runs (the
      stages rotate), not a function of the key: the same key lands at a
      different address from one ``push_pull`` to the next, while the
      registered part is one fixed address;
    * writing the part directly would need the worker to target a region
      per (server, key), registered after the mesh formed: a remote key
      exchange after setup and one posted write per registered key, with
      the stage's completion notice ordered after all of them, which the
      stage protocol (one block and one notice per stage and worker) does
      not have.

    The copy is a ``memcpy`` of the pushed bytes while the batch is taken:
    on the 2-core test host (busy), p50 1.4 µs for 32 KiB (a 1 x 8192
    float32 tensor), 38-42 µs for 1 MiB and 300-310 µs for 4 MiB, three
    runs of ``python -m afmesh.bench --recv-copy``, which measures it
    wherever it runs."""
    st = _need("server")
    if len(worker_ranks) != len(push_keys):
        raise afmesh.InvalidArgument(
            f"register_recv_buffer: {len(worker_ranks)} worker ranks, {len(push_keys)} keys")
    for r in worker_ranks:
        if not 0 <= r < st.workers:
            raise afmesh.InvalidArgument(
                f"register_recv_buffer: worker rank {r} is not in 0..{st.workers}")
    _bytes_of(tensor, True, "register_recv_buffer tensor")
    st.recv.append((tensor, list(worker_ranks), [int(k) for k in push_keys]))


def respond(tensors, handler, need_event=False):
    """Answers one worker's request: ``tensors`` fill its pull slots on this
    server, in order (sizes must match the worker's pull tensors). The
    batch goes back once each of its workers is answered; then its
    ``get_batch`` tensors are stale."""
    st = _need("server")
    try:
        served, a = st.pending[handler]
    except KeyError:
        raise afmesh.InvalidArgument(
            f"respond: handler {handler} is not waiting for an answer") from None
    slots = served.metas[a]
    if len(tensors) != len(slots):
        raise afmesh.InvalidArgument(
            f"respond: {len(tensors)} tensors for worker {a}'s {len(slots)} pull slots")
    parts, o = [], 0
    for j, (t, (key, nbytes)) in enumerate(zip(tensors, slots)):
        src = _bytes_of(t, False, f"respond: tensors[{j}]")
        if src.nbytes != nbytes:
            raise afmesh.BufferSize(
                f"respond: tensors[{j}] has {src.nbytes} bytes; worker {a}'s pull tensor "
                f"(key {key}) has {nbytes}")
        if nbytes:
            parts.append((o, src))
        o += _align(nbytes)
    del st.pending[handler]
    served.answers[a] = parts
    served.left -= 1
    if served.left == 0:
        st.rank.respond_parts(served.batch, served.answers)


def respond_vec(ret_buffer, tensors_vec, handler_vec):
    """For each handler ``i``: ``respond([ret_buffer[:len(tensors_vec[i])]],
    handler_vec[i])``, as StepMesh."""
    if len(tensors_vec) != len(handler_vec):
        raise afmesh.InvalidArgument(
            f"respond_vec: {len(tensors_vec)} tensors, {len(handler_vec)} handlers")
    for t, h in zip(tensors_vec, handler_vec):
        respond([ret_buffer[:t.shape[0]]], h, False)
