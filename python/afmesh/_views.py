"""Zero-copy views over afmesh's registered memory, checked on use.

A view is an :class:`View` (a numpy ndarray subclass) whose memory is the
rank's registered region; the region stays allocated for as long as any
array over it lives, so no view can touch freed memory. Each view carries a
*lease*; the package revokes it when the library may write the bytes again
(the batch was answered, the stage dispatched again, the rank shut down).
After that, every use of the view that goes through numpy's dispatch
raises :class:`afmesh.StaleView`: indexing and assignment, iteration,
arithmetic and every ufunc (``v + 1``, ``v.sum()``, ``np.exp(v)``), numpy
functions (``np.concatenate``, ``np.array_equal`` ...), ``copy``,
``astype``, ``tobytes``, ``tolist``, ``item``, ``repr``/``str``, pickling.
Views derived from a view (slices, reshapes) carry the same lease.

Not checked: handing the raw memory to another owner while the view is
valid — ``np.asarray(v)``, ``v.view(np.ndarray)``, ``memoryview(v)``,
``torch.from_numpy(v)``. Those aliases stay memory-safe but are plain
arrays: after the lease ends they show whatever the next message wrote.
"""

import numpy as np

from ._afmesh import InvalidArgument, StaleView


def _stale(lease):
    raise StaleView(f"afmesh view used after its memory was handed back: {lease.why}")


def _check(obj):
    lease = getattr(obj, "_afmesh_lease", None)
    if lease is not None and not lease.alive:
        _stale(lease)


def _plain(x):
    """`x` as a plain ndarray when it is a live View; checks it."""
    if isinstance(x, View):
        _check(x)
        return x.view(np.ndarray)
    if isinstance(x, (tuple, list)):
        return type(x)(_plain(i) for i in x)
    return x


class View(np.ndarray):
    """A numpy array over afmesh memory, valid while its lease lives."""

    _afmesh_lease = None

    def __array_finalize__(self, obj):
        if obj is not None:
            self._afmesh_lease = getattr(obj, "_afmesh_lease", None)

    @property
    def valid(self):
        """Whether the view may still be used."""
        lease = self._afmesh_lease
        return lease is None or lease.alive

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        inputs = tuple(_plain(i) for i in inputs)
        if "out" in kwargs:
            kwargs["out"] = _plain(kwargs["out"])
        return getattr(ufunc, method)(*inputs, **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        for a in args:
            _check(a)
            if isinstance(a, (tuple, list)):
                for b in a:
                    _check(b)
        for v in kwargs.values():
            _check(v)
        return super().__array_function__(func, types, args, kwargs)

    def __getitem__(self, key):
        _check(self)
        return super().__getitem__(key)

    def __setitem__(self, key, value):
        _check(self)
        _check(value)
        return super().__setitem__(key, value)

    def __iter__(self):
        _check(self)
        return super().__iter__()

    def __array__(self, dtype=None, copy=None):
        _check(self)
        a = self.view(np.ndarray)
        if dtype is not None:
            a = a.astype(dtype, copy=False)
        return a.copy() if copy else a

    def __repr__(self):
        _check(self)
        return "afmesh.View(" + repr(self.view(np.ndarray)) + ")"

    def __str__(self):
        _check(self)
        return str(self.view(np.ndarray))

    def __reduce__(self):
        _check(self)
        return np.ndarray.__reduce__(self.view(np.ndarray).copy())

    def __bool__(self):
        _check(self)
        return super().__bool__()

    def __float__(self):
        _check(self)
        return super().__float__()

    def __int__(self):
        _check(self)
        return super().__int__()

    def __index__(self):
        _check(self)
        return super().__index__()

    def __dlpack__(self, *args, **kwargs):
        _check(self)
        return self.view(np.ndarray).__dlpack__(*args, **kwargs)


def _checked(name):
    base = getattr(np.ndarray, name)

    def method(self, *args, **kwargs):
        _check(self)
        return base(self.view(np.ndarray), *args, **kwargs)

    method.__name__ = name
    method.__doc__ = base.__doc__
    return method


for _name in ("copy", "astype", "tobytes", "tolist", "item", "tofile", "dump", "dumps",
              "sum", "mean", "max", "min", "any", "all", "argmax", "argmin", "prod",
              "std", "var", "cumsum", "dot", "fill", "sort", "byteswap"):
    setattr(View, _name, _checked(_name))


def make_view(root, offset, nbytes, dtype, rows, lease):
    """A View of `nbytes` at `offset` of `root` (a rank's region as uint8),
    as `dtype`, shaped (rows, -1) when `rows` is given."""
    dtype = np.dtype(dtype)
    if nbytes % dtype.itemsize:
        raise InvalidArgument(f"{nbytes} bytes are not a whole number of {dtype} elements")
    count = nbytes // dtype.itemsize
    if rows is not None and rows > 0 and count % rows == 0:
        shape = (rows, count // rows)
    elif rows == 0:
        shape = (0, 0)
    else:
        shape = (count,)
    v = np.ndarray.__new__(View, shape, dtype=dtype, buffer=root, offset=offset)
    v._afmesh_lease = lease
    return v
