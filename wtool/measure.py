"""Statistics in a second process: large tensors measured on the other core.

Counting a 16-bit tensor's bit patterns (`wtool.stats`) is one numpy `bincount` per chunk,
and bincount holds the GIL for all its work: in a thread it runs instead of the next
tensor's quantization, not beside it (a packed 4-bit run of 8 bfloat16 tensors of 64 MiB
took as long with its statistics in a thread as in line). A process has an interpreter of
its own. It measures a pair (`stats.compare`) or one tensor (`stats.tensor_stats`) in memory
both processes map, with no pickling; the figures, a few hundred bytes, come back over a
socket. What the run made in shared memory is measured where it lies, with no copy: the
run `share`s the roles of `wtool.buffers` the process reads (a tensor as read, a bfloat16
weight as stored, a compressed weight as decoded), whose buffers are then a Linux memfd
each, two kept per role, so the next tensor takes one while the process reads the other.
A tensor the run has not read (`tensor.Stored`: an untouched tensor as stored in its input
file) the process reads itself, into memory of its own; those queue up (`QUEUE`), so the
process never waits for the run while the run copies. Other arrays are copied into a slot of
the process's own, one measurement at a time, so memory grows by their bytes. `Behind` keeps
the measurements in flight while the run goes on.

The process is
`python -P -m wtool.measure FD`: not started through multiprocessing, which would run the
caller's main script again in it, and with -P so that nothing in the working folder shadows
wtool. It inherits no file of this one but its end of the socket. Arrays under `MIN_BYTES`,
and all where there is no memfd (not Linux) or no interpreter to start, are for the caller
to measure in line (`takes` says which; `measure` and `describe` do either).

>>> import numpy as np
>>> measurer = Measurer()
>>> measurer.takes(np.zeros(4, np.float32), np.ones(4, np.float32))   # too small to be worth a process
False
>>> measurer.close()
"""

from __future__ import annotations

import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

import numpy as np

from wtool import buffers
from wtool.errors import InputError, WtoolError
from wtool.tensor import Stored, read_exactly
from wtool.stats import Comparison, compare, tensor_stats, use_blas_dot

#: What the process sends back: a pair's `Comparison`, or one tensor's statistics.
Measured = Comparison | dict[str, Any]
#: What it does with what it is sent, by the message's name.
_TASKS = {"compare": compare, "stats": tensor_stats}

#: The process's BLAS runs one thread: its sums of squares are BLAS dots (`stats.use_blas_dot`).
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MIN_BYTES = 8 << 20  # the arrays of one measurement together: below this, a process costs more than it saves
#: Stored tensors in flight at most: one measured, one waiting, so the process never idles
#: while the run copies (the run counts the next one itself when both are out).
QUEUE = 2
_ALIGN = 64


class Measurer:
    """A process that measures pairs of tensors (`stats.compare`) and single ones
    (`stats.tensor_stats`) in order, one at a time: stored tensors queue (`room`), anything
    else goes when the process is free."""

    def __init__(self, advice: str = "run again, or with --no-stats") -> None:
        self.advice = advice  # what the error says to do when the process dies
        self.process: subprocess.Popen[bytes] | None = None
        self.connection: Connection | None = None
        self.slot: mmap.mmap | None = None
        self.failed = False  # the process could not be started: every pair is measured in line
        self.shared: list[str] = []  # the roles whose buffers are shared memory while the process runs
        self.out: deque[object] = deque()  # each measurement in flight, oldest first: the arrays it holds
        self.mapped: set[int] = set()  # the shared buffers the process maps, by serial number
        self._lock = threading.Lock()  # `measure`'s callers, one at a time

    @staticmethod
    def worth(nbytes: int) -> bool:
        """Whether arrays of `nbytes` in all are measured in the process (large enough, memfd at hand)."""
        return nbytes >= max(MIN_BYTES, 1) and hasattr(os, "memfd_create")

    def takes(self, *arrays: np.ndarray | Stored) -> bool:
        """Whether these arrays (a pair, or one tensor) would be measured in the process (False
        for all once the process could not be started)."""
        return self.worth(sum(a.nbytes for a in arrays)) and self.start()

    def start(self) -> bool:
        """Start the process now (the first `compare` does otherwise): it then imports numpy
        while the first tensors are computed. False when it cannot be started (no interpreter
        at `sys.executable`, as in an embedded Python): the caller then measures in line."""
        if self.process is None and not self.failed:
            ours, theirs = socket.socketpair()
            with ours, theirs:
                home = str(Path(__file__).resolve().parent.parent)  # where this wtool is imported from
                path = os.pathsep.join(filter(None, [home, os.environ.get("PYTHONPATH")]))
                try:
                    self.process = subprocess.Popen(
                        # -P: the working folder is not put on sys.path, so nothing there shadows wtool or numpy
                        [sys.executable, "-P", "-m", "wtool.measure", str(theirs.fileno())], pass_fds=[theirs.fileno()],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        env={**os.environ, "PYTHONPATH": path, **ONE_THREAD})
                except OSError:
                    self.failed = True
                    return False
                self.connection = Connection(os.dup(ours.fileno()))
        return self.process is not None

    def lies_shared(self, *arrays: np.ndarray | Stored) -> bool:
        """Whether the process reads these arrays where they lie (`submit` then copies nothing)."""
        return all(isinstance(a, Stored) or (a.flags.c_contiguous and buffers.shared_file(a)) for a in arrays)

    def share(self, role: str, keep: int = 2) -> None:
        """Make `role`'s buffers shared memory until `close` (`buffers.share`, `keep` of them
        kept: one the process reads, the others for the tensors being computed), once the
        process runs: an array read into one ("read") is measured where it lies, with no copy."""
        if self.process is not None and role not in self.shared:
            buffers.share(role, keep)
            self.shared.append(role)

    @property
    def busy(self) -> bool:
        """Whether a measurement is in flight (its result may be in)."""
        return bool(self.out)

    def room(self, *arrays: np.ndarray | Stored) -> bool:
        """Whether `submit` would send these at once, waiting for nothing: stored tensors, which
        hold no memory of the run, may queue up to `QUEUE` deep; anything else goes alone."""
        return len(self.out) - self.done() < self._limit(arrays)

    @staticmethod
    def _limit(arrays: Sequence[np.ndarray | Stored]) -> int:
        return QUEUE if all(isinstance(a, Stored) for a in arrays) else 1

    def submit(self, *arrays: np.ndarray | Stored) -> list[Measured]:
        """Start measuring in the process, a pair (before, after) with `stats.compare` or one
        tensor with `stats.tensor_stats`; return what was measured before and had to be waited
        for to make room (`room`), oldest first. The caller may drop its arrays at once.

        Arrays that all lie in shared buffers (`wtool.buffers`, for the roles the run `share`s:
        a tensor as read, a weight as stored or decoded) are read there, not copied: each
        buffer is held until the result is in, and the run's next tensor takes the other one
        kept. A `Stored` tensor the process reads from its file. Others are copied into the
        process's own slot, once the last measurement is in: memory grows by their bytes."""
        if len(arrays) not in (1, 2):
            raise ValueError(f"Measurer.submit: 1 or 2 arrays, not {len(arrays)}")
        previous = []
        if self.start() and self.lies_shared(*arrays):
            specs = [self._where(a) for a in arrays]
            held: object = arrays
        else:
            while self.out:  # the slot may still be the process's
                previous.append(self.result())
            specs, held = self._copy(arrays), None
        while len(self.out) >= self._limit(arrays):
            previous.append(self.result())
        self._forget_dead()
        self._send(("compare" if len(arrays) == 2 else "stats", specs))
        self.out.append(held)
        return previous

    def _copy(self, arrays: Sequence[np.ndarray]) -> list[tuple]:
        """Copy `arrays` into the process's slot, one after the other; their specs for it."""
        offsets, size = _packed(arrays)
        self._reserve(size)
        specs = []
        for array, offset in zip(arrays, offsets):
            flat = np.ascontiguousarray(array).reshape(-1)
            view = np.frombuffer(self.slot, np.uint8, flat.nbytes, offset)
            np.copyto(view, flat.view(np.uint8))
            del view  # no view of the slot may outlive this call: the slot could not be closed
            specs.append(("slot", array.dtype, array.shape, offset))
        return specs

    def measure(self, before: np.ndarray, after: np.ndarray) -> Comparison:
        """`stats.compare(before, after)`, in the process when it takes the pair, one caller at a
        time: jobs in threads each wait for their own pair (the GIL free) while the others
        compute, instead of taking turns at a `bincount` that holds it."""
        if self.worth(before.nbytes + after.nbytes):
            with self._lock:
                if self.start():
                    self.submit(before, after)
                    return self.result()
        return compare(before, after)

    def describe(self, array: np.ndarray) -> dict[str, Any]:
        """`stats.tensor_stats(array)`, in the process when it is large and the process is free,
        else in line: with `--jobs`, one job's tensor is counted there while another's is
        counted here, so both cores count."""
        if self.worth(array.nbytes) and self._lock.acquire(blocking=False):
            try:
                if self.start() and not self.out:
                    self.submit(array)
                    return self.result()
            finally:
                self._lock.release()
        return tensor_stats(array)

    def done(self) -> bool:
        """Whether the oldest result is in (so `result` will not wait)."""
        return bool(self.out) and self.connection is not None and self.connection.poll()

    def result(self) -> Measured:
        """The oldest measurement in flight, once the process has made it (its error, raised here, if any)."""
        if not self.out or self.connection is None:
            raise RuntimeError("Measurer.result: nothing was started")
        self.out.popleft()  # the shared buffers its arrays were in are free again
        try:
            status, value = self.connection.recv()
        except (EOFError, OSError):
            raise self._stopped() from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """Stop the process (at once when a measurement is still running), free the slot and
        make the shared roles private again."""
        if self.process is not None:
            if self.busy:
                self.process.terminate()
            else:
                try:
                    self._send(None)
                except WtoolError:
                    pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.slot is not None:
            self.slot.close()
            self.slot = None
        for role in self.shared:
            buffers.unshare(role)
        self.shared = []
        self.out, self.mapped = deque(), set()

    def __enter__(self) -> Measurer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reserve(self, size: int) -> None:
        """Start the process if need be; map a slot of at least `size` bytes in both processes."""
        if not self.start():
            raise WtoolError(f"the statistics process could not be started with {sys.executable}")
        if self.slot is not None and len(self.slot) >= size:
            return
        if self.slot is not None:
            self.slot.close()
        descriptor = os.memfd_create("wtool-stats")
        try:
            os.ftruncate(descriptor, size)
            self.slot = mmap.mmap(descriptor, size)
            self._send(("map", "slot", size))
            send_handle(self.connection, descriptor, self.process.pid)
        except OSError:
            raise self._stopped() from None
        finally:
            os.close(descriptor)

    def _where(self, array: np.ndarray | Stored) -> tuple:
        """Where the process reads an array that lies shared, or a stored tensor: its spec."""
        if isinstance(array, Stored):
            return (array.file, array.dtype, array.shape, array.offset, array.where)
        file, base = buffers.shared_file(array)
        return (self._map(file), array.dtype, array.shape, base)

    def _map(self, file: buffers.SharedFile) -> int:
        """Have the process map a shared buffer, the first time it gets a pair there; its key."""
        if file.serial not in self.mapped:
            self._send(("map", file.serial, file.size))
            try:
                send_handle(self.connection, file.fd, self.process.pid)
            except OSError:
                raise self._stopped() from None
            self.mapped.add(file.serial)
        return file.serial

    def _forget_dead(self) -> None:
        """Have the process unmap the shared buffers freed here: its mapping would keep their pages."""
        for serial in [s for s in self.mapped if not buffers.alive(s)]:
            self._send(("unmap", serial))
            self.mapped.discard(serial)

    def _send(self, message: object) -> None:
        assert self.connection is not None
        try:
            self.connection.send(message)
        except OSError:
            raise self._stopped() from None

    def _stopped(self) -> WtoolError:
        code = self.process.poll() if self.process is not None else None
        return WtoolError(f"the statistics process stopped (exit code {code}); {self.advice}")


class Behind:
    """Measurements taken in the process while the run goes on, each handed to its `then` as it
    comes in: one in flight, or up to `QUEUE` for tensors the process reads itself. The run's
    items (its records) are released in order, each complete, as the measurements they wait
    for come in.

    >>> behind = Behind(Measurer())
    >>> behind.one("w", print, np.zeros(4, np.float32))   # too small: for the caller, in line
    False
    >>> behind.release("w", last=True)
    ['w']
    """

    def __init__(self, measurer: Measurer) -> None:
        self.measurer = measurer
        self.waiting: deque[tuple[object, Callable[[Any], None]]] = deque()  # (item, then), oldest first
        self.held: list[Any] = []

    def pair(self, item: object, then: Callable[[Comparison], None], before: np.ndarray, after: np.ndarray,
             copy: bool = True) -> bool:
        """Start comparing `before` with `after` for `item`; False (nothing started) when the pair
        is for the caller to measure in line: too small, or, unless `copy`, not lying where the
        process reads it (a copy of the pair would be one tensor more in memory)."""
        if not (copy or self.measurer.lies_shared(before, after)) or not self.measurer.takes(before, after):
            return False  # (`takes` starts the process: asked last)
        self._submit(item, then, before, after)
        return True

    def one(self, item: object, then: Callable[[dict[str, Any]], None], array: np.ndarray | Stored) -> bool:
        """Start the statistics of `array` for `item` when the process has room for it (`Measurer.room`);
        False (nothing started) when the caller is to count it in line: the two cores then count in turns."""
        if not (self.measurer.room(array) and self.measurer.takes(array)):
            return False
        self._submit(item, then, array)
        return True

    def _submit(self, item: object, then: Callable[[Any], None], *arrays: np.ndarray | Stored) -> None:
        for previous in self.measurer.submit(*arrays):
            self.waiting.popleft()[1](previous)
        self.waiting.append((item, then))

    def wait(self) -> None:
        """Wait for the measurements in flight, if any, and hand them over."""
        while self.waiting:
            self.waiting.popleft()[1](self.measurer.result())

    def release(self, item: object = None, last: bool = False) -> list[Any]:
        """Hold `item` (if any) back with the others; hand out those complete, in order (all of
        them when `last`)."""
        if item is not None:
            self.held.append(item)
        if last:
            self.wait()
        while self.waiting and self.measurer.done():
            self.waiting.popleft()[1](self.measurer.result())
        blocking = self.waiting[0][0] if self.waiting else None
        cut = next((at for at, held in enumerate(self.held) if held is blocking), len(self.held))
        released, self.held = self.held[:cut], self.held[cut:]
        return released


def _packed(arrays: Sequence[np.ndarray]) -> tuple[list[int], int]:
    """Where each array goes in one buffer (aligned offsets), and the buffer's size (never 0: a
    mapping is never empty)."""
    offsets, end = [], 0
    for array in arrays:
        offsets.append(end)
        end = -(-(end + array.nbytes) // _ALIGN) * _ALIGN
    return offsets, max(offsets[-1] + arrays[-1].nbytes, _ALIGN)


def serve(connection: Connection) -> None:
    """The process: map the slots it is sent, compare the pairs in them, send each result back.

    What the terminal sends the whole group (Ctrl-C, hang-up, quit) is the parent's to
    handle: the parent stops this process when it stops. It ends when the parent closes the
    pipe, whatever the reason."""
    for name in ("SIGINT", "SIGHUP", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    use_blas_dot()
    maps: dict[object, mmap.mmap] = {}  # the process's own slot ("slot") and the shared buffers, by key
    reading = _Reading()
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        if message[0] == "map":
            _, key, size = message
            if key in maps:
                maps.pop(key).close()
            descriptor = recv_handle(connection)
            maps[key] = mmap.mmap(descriptor, size)
            os.close(descriptor)
            continue
        if message[0] == "unmap":
            maps.pop(message[1]).close()
            continue
        arrays: list[np.ndarray] = []
        try:
            arrays = [_read(reading, *spec) if isinstance(spec[0], Path) else
                      np.frombuffer(maps[spec[0]], spec[1], int(np.prod(spec[2])), spec[3]).reshape(spec[2])
                      for spec in message[1]]
            reply: tuple[str, object] = ("ok", _TASKS[message[0]](*arrays))
        except Exception as exc:  # handed to the parent, which raises it; its traceback would keep views of the slot
            reply = ("error", exc.with_traceback(None))
        del arrays
        connection.send(reply)


class _Reading:
    """The file the process last read stored tensors from, kept open: tensors come in file order."""

    def __init__(self) -> None:
        self.file: Path | None = None
        self.descriptor = -1


def _read(reading: _Reading, file: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int,
          where: str) -> np.ndarray:
    """A stored tensor, read from its file into the pages of the last one read (`buffers.empty`);
    an InputError naming `where` when it cannot be read whole."""
    if file != reading.file:
        if reading.descriptor >= 0:
            os.close(reading.descriptor)
            reading.file, reading.descriptor = None, -1
        try:
            reading.descriptor = os.open(file, os.O_RDONLY)
        except OSError as exc:
            raise InputError(f"{file}: cannot read: {exc.strerror or exc}") from None
        reading.file = file
    array = buffers.empty(shape, dtype, "read")
    read_exactly(reading.descriptor, memoryview(array.reshape(-1).view(np.uint8)), offset, where)
    return array


if __name__ == "__main__":  # started by Measurer: python -m wtool.measure FD
    serve(Connection(int(sys.argv[1])))
