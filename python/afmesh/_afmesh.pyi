"""Type stubs of the afmesh extension module (re-exported by ``afmesh``)."""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._views import View

__version__: str

Buffer = Any  # numpy array, bytes/bytearray/memoryview, torch CPU tensor, DLPack producer
DType = Any  # "f32" | "f16" | "bf16", a numpy or torch dtype
# A CUDA stream: an int CUstream handle, or an object with .cuda_stream
# (torch.cuda.Stream, cupy's Stream). Device ranks only.
Stream = Any

class Error(Exception): ...
class Timeout(Error): ...
class PeerLost(Error): ...
class StageBusy(Error): ...
class BadFrame(Error): ...
class Backpressure(Error): ...
class AuthError(Error): ...
class ConfigError(Error): ...
class InvalidArgument(Error): ...
class BufferSize(InvalidArgument): ...
class StaleView(InvalidArgument): ...
class Busy(Error): ...
class Unsupported(Error): ...
class ShutdownError(Error): ...
class Interrupted(Error): ...
class IoError(Error): ...

def get_nanosecond() -> int: ...

class StageSpec:
    stages: int
    max_tokens: int
    row_bytes: int
    out_row_bytes: int
    side_bytes: int
    def __init__(
        self, stages: int, max_tokens: int, row_bytes: int, out_row_bytes: int, side_bytes: int = 0
    ) -> None: ...

class Trace:
    post_ns: int
    land_ns: int
    process_ns: int
    respond_ns: int
    back_ns: int
    def network_ns(self) -> int: ...
    def ffn_ns(self) -> int: ...

class DispatchHandle:
    stage: int
    sequence: int
    def __init__(self, stage: int, sequence: int) -> None: ...

class Mesh:
    scheduler: str
    attention_ranks: int
    ffn_ranks: int
    role: Optional[str]
    rank: Optional[int]
    group: int
    groups: int
    def __init__(
        self,
        scheduler: str,
        attention: int,
        ffn: int,
        *,
        role: Optional[str] = None,
        rank: Optional[int] = None,
        job: Optional[str] = None,
        host_id: Optional[str] = None,
        transport: Optional[str] = None,
        poll: Optional[str] = None,
        setup_timeout: Optional[float] = None,
        io_timeout: Optional[float] = None,
        embed_scheduler: bool = False,
        token: Optional[str] = None,
        cpu: Optional[int] = None,
        layout: Optional[str] = None,
    ) -> None: ...
    @staticmethod
    def from_env() -> "Mesh": ...
    def attention_memory_len(self, spec: StageSpec) -> int: ...
    def ffn_memory_len(self, spec: StageSpec) -> int: ...
    def attention(
        self, spec: StageSpec, memory: Optional[Buffer] = None, device: Optional[int] = None
    ) -> "AttentionRank": ...
    def ffn(
        self, spec: StageSpec, memory: Optional[Buffer] = None, device: Optional[int] = None
    ) -> "FfnRank": ...
    def join(
        self, spec: StageSpec, memory: Optional[Buffer] = None, device: Optional[int] = None
    ) -> Union["AttentionRank", "FfnRank"]: ...

class Scheduler:
    addr: str
    finished: bool
    def __init__(
        self,
        addr: str,
        attention: int,
        ffn: int,
        *,
        job: Optional[str] = None,
        token: Optional[str] = None,
        join_timeout: float = 60.0,
        groups: int = 1,
    ) -> None: ...
    @staticmethod
    def from_env() -> "Scheduler": ...
    def wait(self, timeout: float = 600.0) -> Dict[str, int]: ...

class DeviceView:
    """Stage memory on a GPU, for CUDA consumers: ``torch.as_tensor(v,
    device="cuda")`` views it in place."""
    __cuda_array_interface__: Dict[str, Any]
    shape: Tuple[int, ...]
    ptr: int
    nbytes: int
    valid: bool

class Combined:
    stage: int
    tokens: int
    valid: bool
    def __len__(self) -> int: ...
    def partial(self, f: int, dtype: Optional[DType] = None) -> Union[View, DeviceView]: ...
    def partials(self, dtype: Optional[DType] = None) -> List[Union[View, DeviceView]]: ...
    def trace(self, f: int) -> Trace: ...

class AttentionRank:
    rank: int
    attention_ranks: int
    ffn_ranks: int
    spec: StageSpec
    closed: bool
    def dispatch(
        self,
        stage: int,
        tokens: Buffer,
        side: Optional[Buffer] = None,
        stream: Optional[Stream] = None,
    ) -> DispatchHandle:
        """On a device rank the copy of the CUDA ``tokens`` waits for
        ``stream`` (default: torch's current stream on the tensor's device,
        else its ``__cuda_array_interface__`` stream, else the legacy
        default stream); ``tokens`` is held until the stage's combine is
        taken. ``stream`` is ignored on host ranks."""
    def dispatch_parts(
        self,
        stage: int,
        tokens: int,
        parts: Sequence[Tuple[int, Buffer]],
        side: Optional[Buffer] = None,
    ) -> DispatchHandle: ...
    def wait_combine(self, handle: DispatchHandle, timeout: float = 10.0) -> Combined: ...
    def wait_combine_sum(
        self,
        handle: DispatchHandle,
        out: Buffer,
        dtype: Optional[DType] = None,
        timeout: float = 10.0,
    ) -> int: ...
    def try_combine(self, handle: DispatchHandle) -> Optional[Combined]: ...
    def try_combine_sum(
        self, handle: DispatchHandle, out: Buffer, dtype: Optional[DType] = None
    ) -> Optional[int]: ...
    def wait_all(self, handles: Sequence[DispatchHandle], timeout: float = 10.0) -> None: ...
    def last_trace(self, stage: int, f: int) -> Optional[Trace]: ...
    def progress(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...
    def barrier(self, attention: bool = True, ffn: bool = True, timeout: float = 30.0,
                all_groups: bool = False) -> None: ...
    def interrupt(self) -> None: ...
    def shutdown(self) -> None: ...
    def __enter__(self) -> "AttentionRank": ...
    def __exit__(self, *exc: Any) -> bool: ...

class Batch:
    stage: int
    sequence: int
    senders: int
    row_bytes: int
    max_tokens: int
    total_tokens: int
    valid: bool
    def token_count(self, a: int) -> int: ...
    def matrix(self, dtype: Optional[DType] = None) -> Union[View, DeviceView]: ...
    def sender_rows(self, a: int) -> Tuple[int, int]: ...
    def posted_ns(self, a: int) -> int: ...
    def landed_ns(self, a: int) -> int: ...
    def tokens(self, a: int, dtype: Optional[DType] = None) -> Union[View, DeviceView]: ...
    def side(self, a: int, dtype: Optional[DType] = None) -> Union[View, np.ndarray]: ...

class FfnRank:
    rank: int
    attention_ranks: int
    ffn_ranks: int
    spec: StageSpec
    closed: bool
    def get_batch(self, timeout: float = 10.0) -> Batch: ...
    def try_get_batch(self) -> Optional[Batch]: ...
    def respond(
        self, batch: Batch, outputs: Sequence[Buffer], stream: Optional[Stream] = None
    ) -> None:
        """On a device rank the copies of the CUDA ``outputs`` wait for
        ``stream`` (default: torch's current stream on their device, else
        their ``__cuda_array_interface__`` stream, one for all, else the
        legacy default stream); the outputs are held until the stage's
        next batch is handed out. ``stream`` is ignored on host ranks."""
    def respond_parts(
        self, batch: Batch, parts: Sequence[Sequence[Tuple[int, Buffer]]]
    ) -> None: ...
    def progress(self) -> None: ...
    def stats(self) -> Dict[str, Any]: ...
    def barrier(self, attention: bool = True, ffn: bool = True, timeout: float = 30.0,
                all_groups: bool = False) -> None: ...
    def interrupt(self) -> None: ...
    def shutdown(self) -> None: ...
    def __enter__(self) -> "FfnRank": ...
    def __exit__(self, *exc: Any) -> bool: ...
