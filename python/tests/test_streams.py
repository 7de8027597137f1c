"""How a device rank picks the CUDA stream its copies wait for
(``afmesh._buffers.device_stream``), without a GPU: the ``stream=``
argument, a ``__cuda_array_interface__`` producer's ``stream`` field, and
the legacy default stream otherwise. (torch's current stream, and the
ordering itself, are checked on a GPU by test_torch.py.)"""

import pytest

import afmesh
from afmesh import _buffers


class Cai:
    """A CUDA array as a non-torch producer publishes it (version 3)."""

    def __init__(self, **extra):
        self.__cuda_array_interface__ = {
            "shape": (2, 16), "typestr": "|u1", "data": (0x7000_0000, False), "version": 3,
            **extra,
        }


class StreamObj:
    def __init__(self, handle):
        self.cuda_stream = handle


def test_stream_argument_int_or_object():
    assert _buffers.device_stream(Cai(), 0x1234, "t") == 0x1234
    assert _buffers.device_stream(Cai(), StreamObj(0xabc), "t") == 0xabc
    # stream= wins over the producer's field.
    assert _buffers.device_stream(Cai(stream=7), 9, "t") == 9
    assert _buffers.device_stream(Cai(stream=7), 0, "t") == 0


def test_producer_stream_field_else_legacy_default():
    assert _buffers.device_stream(Cai(stream=0x5555), None, "t") == 0x5555
    assert _buffers.device_stream(Cai(stream=1), None, "t") == 1  # legacy default
    assert _buffers.device_stream(Cai(stream=2), None, "t") == 2  # per-thread default
    assert _buffers.device_stream(Cai(stream=None), None, "t") == 0
    assert _buffers.device_stream(Cai(), None, "t") == 0


@pytest.mark.parametrize("bad", ["s", 1.5, True, -1, 1 << 64, StreamObj("x"), object()])
def test_a_bad_stream_argument_is_refused_by_name(bad):
    with pytest.raises(afmesh.InvalidArgument, match="tokens: stream="):
        _buffers.device_stream(Cai(), bad, "tokens")


@pytest.mark.parametrize("bad", [0, -3, "x", 2.0])
def test_a_bad_producer_stream_is_refused_by_name(bad):
    with pytest.raises(afmesh.InvalidArgument, match="__cuda_array_interface__ stream"):
        _buffers.device_stream(Cai(stream=bad), None, "tokens")


def test_host_ranks_ignore_stream(pair):
    spec = afmesh.StageSpec(stages=1, max_tokens=2, row_bytes=4, out_row_bytes=4)
    a, f = pair(spec)
    h = a.dispatch(0, b"abcd", stream=0x1234)
    b = f.get_batch(5)
    assert bytes(b.tokens(0)) == b"abcd"
    f.respond(b, [b"wxyz"], stream=StreamObj(5))
    assert bytes(a.wait_combine(h, 5).partial(0)) == b"wxyz"
