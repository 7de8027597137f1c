"""Turning objects without the buffer protocol into numpy views of the same
memory (no copy), for afmesh's buffer arguments: torch CPU tensors (every
dtype, bfloat16 included, viewed as bytes) and DLPack producers."""

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


def _torch(t, writable, what):
    if t.device.type != "cpu":
        raise Unsupported(
            f"{what}: a {t.device.type} tensor; this build moves host memory only "
            "(device memory comes with the GPU transport)")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what}: the tensor is not contiguous (afmesh never copies it)")
    t = t.detach()
    if t.numel() == 0:
        return np.empty(0, dtype=np.uint8)
    import torch

    # Bytes view of the same storage: works for every dtype, bfloat16 too.
    return t.reshape(-1).view(torch.uint8).numpy()
