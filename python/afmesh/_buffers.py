"""Turning objects without the buffer protocol into numpy views of the same
memory (no copy), for afmesh's buffer arguments: torch CPU tensors (every
dtype, bfloat16 included, viewed as bytes) and DLPack producers; and, for
ranks whose stage memory is on a GPU, the device address and length of a
CUDA tensor or any ``__cuda_array_interface__`` object (``device_parts``),
and the CUDA stream its producer used (``device_stream``)."""

import numpy as np

from ._afmesh import InvalidArgument, Unsupported


def as_buffer(obj, writable, what):
    """A C-contiguous numpy view of `obj`'s memory, or a clear error."""
    mod = type(obj).__module__ or ""
    if mod.startswith("torch"):
        return _torch(obj, writable, what)
    if hasattr(obj, "__dlpack__"):
        try:
            a = np.from_dlpack(obj)
        except Exception as e:  # noqa: BLE001 - reported with the argument's name
            raise InvalidArgument(f"{what}: {type(obj).__name__} via DLPack: {e}") from None
        if not a.flags.c_contiguous:
            raise InvalidArgument(f"{what}: the array is not C-contiguous (afmesh never copies it)")
        if writable and not a.flags.writeable:
            raise InvalidArgument(f"{what}: the array is read-only")
        return a
    raise InvalidArgument(
        f"{what}: {type(obj).__name__} has neither the buffer protocol nor DLPack "
        "(pass a numpy array, bytes/bytearray/memoryview, a torch CPU tensor or a DLPack producer)"
    )


def device_parts(obj, what):
    """(device address, bytes) of a C-contiguous CUDA tensor or array, in
    place (no copy), or a clear error."""
    mod = type(obj).__module__ or ""
    if mod.startswith("torch") and hasattr(obj, "data_ptr"):
        # torch's own fields: its __cuda_array_interface__ refuses bfloat16.
        if obj.device.type != "cuda":
            raise InvalidArgument(
                f"{what}: a {obj.device.type} tensor; this rank's stage memory is on a GPU "
                "(pass a CUDA tensor)")
        if not obj.is_contiguous():
            raise InvalidArgument(f"{what}: the tensor is not contiguous (afmesh never copies it)")
        return obj.data_ptr(), obj.numel() * obj.element_size()
    try:
        iface = obj.__cuda_array_interface__
    except AttributeError:
        raise InvalidArgument(
            f"{what}: {type(obj).__name__} is not device memory; this rank's stage memory is on "
            "a GPU: pass a CUDA tensor (an object with __cuda_array_interface__)") from None
    shape = tuple(iface["shape"])
    item = int(iface["typestr"][2:])
    n = item
    for d in shape:
        n *= d
    strides = iface.get("strides")
    if strides is not None:
        want, acc = [], item
        for d in reversed(shape):
            want.append(acc)
            acc *= d
        if tuple(reversed(want)) != tuple(strides) and n:
            raise InvalidArgument(f"{what}: the array is not C-contiguous (afmesh never copies it)")
    return int(iface["data"][0]), n


def stream_handle(stream, what):
    """The ``CUstream`` handle of a ``stream=`` argument: an int, or an
    object with ``.cuda_stream`` (``torch.cuda.Stream``, cupy's stream)."""
    h = getattr(stream, "cuda_stream", stream)
    if isinstance(h, bool) or not isinstance(h, int):
        raise InvalidArgument(
            f"{what}: stream= must be an int CUstream handle or an object with .cuda_stream, "
            f"not {type(stream).__name__}")
    if h < 0 or h >= 1 << 64:
        raise InvalidArgument(f"{what}: stream={h} is not a CUstream handle (0 .. 2**64-1)")
    return h


def device_stream(obj, stream, what, device=None):
    """The CUDA stream the copy of `obj` must wait for: `stream` when given
    (``stream_handle``); for a torch CUDA tensor, torch's current stream on
    its device; for a ``__cuda_array_interface__`` object, its ``stream``
    field where present (1 legacy default, 2 per-thread default, else a
    handle; None: no wait needed); else 0, the legacy default stream. A
    torch tensor on another GPU than `device` (the rank's) is refused."""
    mod = type(obj).__module__ or ""
    is_torch = mod.startswith("torch") and hasattr(obj, "data_ptr")
    if is_torch and device is not None and obj.device.index != device:
        raise InvalidArgument(
            f"{what}: a tensor on {obj.device}; this rank's stage memory is on cuda:{device}")
    if stream is not None:
        return stream_handle(stream, what)
    if is_torch:
        import torch  # lazily: only here is there a torch tensor at all

        return int(torch.cuda.current_stream(obj.device).cuda_stream)
    try:
        iface = obj.__cuda_array_interface__
    except AttributeError:
        return 0
    s = iface.get("stream") if isinstance(iface, dict) else None
    if s is None:
        return 0
    if isinstance(s, bool) or not isinstance(s, int) or s <= 0 or s >= 1 << 64:
        raise InvalidArgument(
            f"{what}: __cuda_array_interface__ stream {s!r} is not a stream handle "
            "(1 legacy default, 2 per-thread default, or a CUstream)")
    return s


def _torch(t, writable, what):
    if t.device.type != "cpu":
        raise Unsupported(
            f"{what}: a {t.device.type} tensor on a rank whose stage memory is host memory; "
            "join with device= (Mesh.attention(spec, device=N), Mesh.ffn(spec, device=N)) "
            "to move CUDA tensors")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what}: the tensor is not contiguous (afmesh never copies it)")
    t = t.detach()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    import torch

    # Bytes view of the same storage: works for every dtype, bfloat16 too.
    return t.reshape(-1).view(torch.uint8).numpy()
