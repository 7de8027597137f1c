"""afmesh: M-to-N dispatch and combine for attention-FFN disaggregated LLM
inference, from Python.

M attention ranks each *dispatch* a token block to every one of N FFN ranks;
each FFN rank *combines* its results back, several stages (micro-batches) in
flight. This package mirrors the Rust API:

>>> import numpy as np, afmesh
>>> spec = afmesh.StageSpec(stages=2, max_tokens=4, row_bytes=8, out_row_bytes=8, side_bytes=8)
>>> mesh = afmesh.Mesh.from_env()            # or Mesh("127.0.0.1:8123", 1, 1, ...)
>>> a = mesh.attention(spec)                 # FFN side: mesh.ffn(spec)
>>> h = a.dispatch(0, np.ones((2, 2), np.float32))
>>> out = np.empty((2, 2), np.float32)
>>> a.wait_combine_sum(h, out)               # sum of the N partials, f32

Buffers go in without a copy through the buffer protocol (numpy arrays,
bytes, memoryviews), torch CPU tensors or DLPack; views come out as numpy
arrays over the registered memory (:class:`View`), valid until the library
may write it again (see :mod:`afmesh._views` for exactly what is checked).
A rank joined with ``device=N`` keeps its stage memory on GPU ``N``: it
takes CUDA tensors (``__cuda_array_interface__``) and hands out
:class:`DeviceView` objects that ``torch.as_tensor(v, device="cuda")``
views in place.
Every blocking call releases the GIL, and Ctrl-C ends it with
KeyboardInterrupt within a few tens of milliseconds. Errors are
:class:`Error` subclasses carrying the library's message.

``afmesh.fserver`` is a drop-in for StepMesh's ``fserver_lib``.
"""

from ._afmesh import (
    AttentionRank,
    AuthError,
    Backpressure,
    BadFrame,
    Batch,
    BufferSize,
    Busy,
    Combined,
    ConfigError,
    DeviceView,
    DispatchHandle,
    Error,
    FfnRank,
    Interrupted,
    InvalidArgument,
    IoError,
    Mesh,
    PeerLost,
    Scheduler,
    ShutdownError,
    StageBusy,
    StageSpec,
    StaleView,
    Timeout,
    Trace,
    Unsupported,
    __version__,
    get_nanosecond,
)
from ._views import View

__all__ = [
    "AttentionRank",
    "AuthError",
    "Backpressure",
    "BadFrame",
    "Batch",
    "BufferSize",
    "Busy",
    "Combined",
    "ConfigError",
    "DeviceView",
    "DispatchHandle",
    "Error",
    "FfnRank",
    "Interrupted",
    "InvalidArgument",
    "IoError",
    "Mesh",
    "PeerLost",
    "Scheduler",
    "ShutdownError",
    "StageBusy",
    "StageSpec",
    "StaleView",
    "Timeout",
    "Trace",
    "Unsupported",
    "View",
    "__version__",
    "get_nanosecond",
]
