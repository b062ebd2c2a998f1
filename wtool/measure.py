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
Other arrays are copied into a slot of the process's own, one measurement at a time, so
memory grows by their bytes. `Behind` keeps one measurement in flight while the run goes on.

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
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any

import numpy as np

from wtool import buffers
from wtool.errors import WtoolError
from wtool.stats import Comparison, compare, tensor_stats, use_blas_dot

#: What the process sends back: a pair's `Comparison`, or one tensor's statistics.
Measured = Comparison | dict[str, Any]
#: What it does with what it is sent, by the message's name.
_TASKS = {"compare": compare, "stats": tensor_stats}

#: The process's BLAS runs one thread: its sums of squares are BLAS dots (`stats.use_blas_dot`).
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
MIN_BYTES = 8 << 20  # the arrays of one measurement together: below this, a process costs more than it saves
_ALIGN = 64


class Measurer:
    """A process that measures pairs of tensors (`stats.compare`) and single ones
    (`stats.tensor_stats`), one at a time, in order."""

    def __init__(self, advice: str = "run again, or with --no-stats") -> None:
        self.advice = advice  # what the error says to do when the process dies
        self.process: subprocess.Popen[bytes] | None = None
        self.connection: Connection | None = None
        self.slot: mmap.mmap | None = None
        self.busy = False
        self.failed = False  # the process could not be started: every pair is measured in line
        self.shared: list[str] = []  # the roles whose buffers are shared memory while the process runs
        self.held: object = None  # the shared buffers the arrays in flight are in
        self.mapped: set[int] = set()  # the shared buffers the process maps, by serial number
        self._lock = threading.Lock()  # `measure`'s callers, one at a time

    @staticmethod
    def worth(nbytes: int) -> bool:
        """Whether arrays of `nbytes` in all are measured in the process (large enough, memfd at hand)."""
        return nbytes >= max(MIN_BYTES, 1) and hasattr(os, "memfd_create")

    def takes(self, *arrays: np.ndarray) -> bool:
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

    def lies_shared(self, *arrays: np.ndarray) -> bool:
        """Whether the process reads these arrays where they lie (`submit` then copies nothing)."""
        return all(a.flags.c_contiguous and buffers.shared_file(a) for a in arrays)

    def share(self, role: str, keep: int = 2) -> None:
        """Make `role`'s buffers shared memory until `close` (`buffers.share`, `keep` of them
        kept: one the process reads, the others for the tensors being computed), once the
        process runs: an array read into one ("read") is measured where it lies, with no copy."""
        if self.process is not None and role not in self.shared:
            buffers.share(role, keep)
            self.shared.append(role)

    def submit(self, *arrays: np.ndarray) -> Measured | None:
        """Start measuring in the process, a pair (before, after) with `stats.compare` or one
        tensor with `stats.tensor_stats`; return what was measured before, if it was still out
        (waited for). The caller may drop its arrays at once.

        Arrays that all lie in shared buffers (`wtool.buffers`, for the roles the run `share`s:
        a tensor as read, a weight as stored or decoded) are read there, not copied: each
        buffer is held until the result is in, and the run's next tensor takes the other one
        kept. Others are copied into the process's own slot, once the last measurement is in:
        memory grows by their bytes."""
        if len(arrays) not in (1, 2):
            raise ValueError(f"Measurer.submit: 1 or 2 arrays, not {len(arrays)}")
        previous = None
        if self.start() and self.lies_shared(*arrays):
            specs = [(self._map(file), a.dtype, a.shape, base)
                     for a, (file, base) in zip(arrays, map(buffers.shared_file, arrays))]
            held: object = arrays
        else:
            if self.busy:
                previous = self.result()  # the slot is still the process's
            specs, held = self._copy(arrays), None
        if self.busy:
            previous = self.result()
        self._forget_dead()
        self._send(("compare" if len(arrays) == 2 else "stats", specs))
        self.busy, self.held = True, held
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
                if self.start() and not self.busy:
                    self.submit(array)
                    return self.result()
            finally:
                self._lock.release()
        return tensor_stats(array)

    def free(self) -> bool:
        """Whether nothing is being measured (a result that is in counts as nothing)."""
        return not self.busy or self.done()

    def done(self) -> bool:
        """Whether the result is in (so `result` will not wait)."""
        return self.busy and self.connection is not None and self.connection.poll()

    def result(self) -> Measured:
        """What was submitted last, once the process has measured it (its error, raised here, if any)."""
        if not self.busy or self.connection is None:
            raise RuntimeError("Measurer.result: nothing was started")
        self.busy = False
        self.held = None  # the shared buffers the arrays were in are free again
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
        self.busy, self.held, self.mapped = False, None, set()

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
    """Measurements taken in the process while the run goes on: one in flight, each handed to
    its `then` as it comes in. The run's items (its records) are released in order, each
    complete, as the measurements they wait for come in.

    >>> behind = Behind(Measurer())
    >>> behind.one("w", print, np.zeros(4, np.float32))   # too small: for the caller, in line
    False
    >>> behind.release("w", last=True)
    ['w']
    """

    def __init__(self, measurer: Measurer) -> None:
        self.measurer = measurer
        self.blocking: object = None  # the item the measurement in flight completes
        self.then: Callable[[Any], None] | None = None  # and what takes that measurement
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

    def one(self, item: object, then: Callable[[dict[str, Any]], None], array: np.ndarray) -> bool:
        """Start the statistics of `array` for `item` when the process is free; False (nothing
        started) when the caller is to count it in line: the two cores then count in turns."""
        if not (self.measurer.free() and self.measurer.takes(array)):
            return False
        self._submit(item, then, array)
        return True

    def _submit(self, item: object, then: Callable[[Any], None], *arrays: np.ndarray) -> None:
        previous = self.measurer.submit(*arrays)
        if previous is not None and self.then is not None:
            self.then(previous)
        self.blocking, self.then = item, then

    def wait(self) -> None:
        """Wait for the measurement in flight, if any, and hand it over."""
        if self.then is not None:
            then, self.blocking, self.then = self.then, None, None
            then(self.measurer.result())

    def release(self, item: object = None, last: bool = False) -> list[Any]:
        """Hold `item` (if any) back with the others; hand out those complete, in order (all of
        them when `last`)."""
        if item is not None:
            self.held.append(item)
        if last or self.measurer.done():
            self.wait()
        cut = next((at for at, held in enumerate(self.held) if held is self.blocking), len(self.held))
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
        arrays = [np.frombuffer(maps[key], dtype, int(np.prod(shape)), offset).reshape(shape)
                  for key, dtype, shape, offset in message[1]]
        try:
            reply: tuple[str, object] = ("ok", _TASKS[message[0]](*arrays))
        except Exception as exc:  # handed to the parent, which raises it; its traceback would keep views of the slot
            reply = ("error", exc.with_traceback(None))
        del arrays
        connection.send(reply)


if __name__ == "__main__":  # started by Measurer: python -m wtool.measure FD
    serve(Connection(int(sys.argv[1])))
