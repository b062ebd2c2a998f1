"""Recycled buffers (wtool.buffers): reused only when nothing holds them."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from wtool import buffers as _recycle
from wtool.transforms import Context, Transform

BIG = np.zeros((1024, 1024), np.float32)  # 4 MiB: above _recycle.SMALL


@pytest.fixture(autouse=True)
def fresh_pool():
    _recycle._pools.clear()
    yield
    _recycle._pools.clear()


def test_a_dead_output_is_reused():
    address = _recycle.empty_like(BIG).ctypes.data
    again = _recycle.empty_like(BIG)
    assert again.ctypes.data == address and again.shape == BIG.shape and again.dtype == BIG.dtype


@pytest.mark.parametrize("hold", [lambda a: a, lambda a: a[3:], lambda a: a.reshape(-1).view(np.uint8),
                                  lambda a: memoryview(a), lambda a: [a.T]],
                         ids=["array", "slice", "view", "memoryview", "list"])
def test_an_output_anything_still_holds_is_not_reused(hold):
    first = _recycle.empty_like(BIG)
    address, held = first.ctypes.data, hold(first)
    del first
    assert _recycle.empty_like(BIG).ctypes.data != address
    del held
    assert _recycle.empty_like(BIG).ctypes.data == address


@pytest.mark.parametrize("spec", ["clip:c=0.5", "decay:lr=0.1,wd=0.5", "sparsify:threshold=0.3"])
def test_a_kept_result_survives_the_next_call(spec):
    name, _, options = spec.partition(":")
    transform = Transform.create(name, dict(item.split("=") for item in options.split(",")))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1024, 512)).astype(np.float32), rng.normal(size=(1024, 512)).astype(np.float32)
    first = transform.apply(x, Context.of(x))
    expected = first.copy()
    second = transform.apply(y, Context.of(y))
    assert np.array_equal(first, expected) and not np.shares_memory(first, second)
    del first
    third = transform.apply(x, Context.of(x))
    assert np.array_equal(third, expected)


def test_small_arrays_are_plain_and_threads_share_buffers_but_never_one_at_once():
    assert _recycle.empty_like(np.zeros(10, np.float32)).base is None
    theirs = []

    def work():
        theirs.append(_recycle.empty_like(BIG).ctypes.data)  # its array dies in the thread
        theirs.append(_recycle.empty_like(BIG))  # and this one it hands over, alive
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    address, alive = theirs
    assert alive.ctypes.data == address  # the thread reused its own dead array's buffer
    assert _recycle.empty_like(BIG).ctypes.data != address  # held by `alive`: not taken again
    del alive, theirs[:]
    assert _recycle.empty_like(BIG).ctypes.data == address  # free now, for this thread too


def test_a_larger_array_replaces_an_unused_smaller_buffer_and_roles_are_apart():
    smalls = [_recycle.empty((1 << 19,), np.float32, "output") for _ in range(_recycle.KEEP)]
    del smalls  # the pool is full of unused small buffers
    large = _recycle.empty((1 << 20,), np.float32, "output")
    address = large.ctypes.data
    del large
    sizes = sorted(buffer.nbytes for buffer in _recycle._pools["output"])
    assert len(sizes) == _recycle.KEEP and sizes[-1] == 4 << 20
    held = _recycle.empty((1 << 20,), np.float32, "output")
    assert held.ctypes.data == address
    assert _recycle.empty((1 << 20,), np.float32, "read").ctypes.data != held.ctypes.data
    others = [_recycle.empty((1 << 20,), np.float32, "output") for _ in range(_recycle.KEEP + 1)]
    assert len(_recycle._pools["output"]) == _recycle.KEEP
    assert len({a.ctypes.data for a in [held, *others]}) == _recycle.KEEP + 2


def test_shared_buffers_are_memfds_reused_while_free_and_closed_when_dropped():
    """`share`: a role's large buffers become shared memory another process can map, two kept:
    one is handed out again only once nothing holds it; dropped, its file is closed."""
    import gc
    import os

    if not hasattr(os, "memfd_create"):
        pytest.skip("shared buffers need Linux's memfd")
    _recycle.share("t", keep=2)
    try:
        first = _recycle.empty((1 << 20,), np.float32, "t")
        found = _recycle.shared_file(first[10:])
        assert found is not None and found[1] == 40 and found[0].size == first.nbytes
        file = found[0]
        assert os.fstat(file.fd).st_size == first.nbytes and _recycle.alive(file.serial)
        second = _recycle.empty((1 << 20,), np.float32, "t")  # `first` is held: a second one, kept
        assert _recycle.shared_file(second)[0].serial != file.serial
        address = first.ctypes.data
        del first
        again = _recycle.empty((1 << 20,), np.float32, "t")  # the free one of the two
        assert again.ctypes.data == address and _recycle.shared_file(again)[0] is file
        third = _recycle.empty((1 << 20,), np.float32, "t")  # both held: one more, not kept
        assert _recycle.shared_file(third)[0].serial not in (file.serial, _recycle.shared_file(second)[0].serial)
        assert len(_recycle._pools["t"]) == 2
        assert _recycle.shared_file(np.zeros(4)) is None
    finally:
        _recycle.unshare("t")
    del again, second, third
    gc.collect()
    assert not _recycle.alive(file.serial) and _recycle._shared == {}
    with pytest.raises(OSError):
        os.fstat(file.fd)


def test_a_shared_buffer_the_kernel_will_not_make_is_a_private_one(monkeypatch):
    import os

    def refuse(*args):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", refuse, raising=False)
    _recycle.share("t")
    try:
        array = _recycle.empty((1 << 20,), np.float32, "t")
        assert array.shape == (1 << 20,) and _recycle.shared_file(array) is None
    finally:
        _recycle.unshare("t")
