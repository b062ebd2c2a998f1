"""One output tensor, computed: its value in its storage dtype and its record for the report.

`materialise` evaluates a planned chain (`wtool.steps.Chain`), casts the result back to the
tensor's storage dtype (refusing values that overflow it) and measures it against the input
tensor of the same name, in one pass over the pair where the shapes agree (`stats.compare`);
`materialise_in_order` does so for every output tensor, `jobs` of them at once.

>>> import numpy as np
>>> from wtool.tensor import TensorInfo
>>> to_storage_checked(np.array([1e5], np.float32), TensorInfo("w", "F16", (1,)))
Traceback (most recent call last):
wtool.errors.InputError: tensor 'w': 1 value(s) overflow float16 after the pipeline; add a cast step with \
saturate=true or clip first
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any

import numpy as np

from wtool.compressed import Scheme
from wtool.dtypes import by_code, to_storage
from wtool.errors import InputError
from wtool.io import Reader, Stored
from wtool.report import TensorRecord
from wtool.measure import Behind, Measurer
from wtool.stats import Comparison, compare, histogram, same_bytes, tensor_stats
from wtool.steps import Chain, GroupOutput
from wtool.tensor import TensorInfo, values


def materialise(reader: Reader, node: Chain, *, stats: bool = True, behind: Behind | None = None,
                measure: Measure = compare,
                describe: Describe = tensor_stats) -> tuple[np.ndarray | Stored, TensorRecord | None]:
    """Evaluate one output tensor in its storage dtype, with its before/after statistics.

    The input tensor of the same name, if any, is the "before" of the report. A tensor of
    the same shape is compared in one pass over the pair (`stats.compare`). A weight stored in
    a compressed layout is one record, made with its first piece (`layout_record`; None for the
    others). With `behind` (one job), statistics are taken in the statistics process when they
    can be: a compressed weight's pair, a pair that lies in memory that process maps (a
    bfloat16 weight read and stored in shared buffers), an untouched tensor's whenever the
    process has room (it reads the tensor from its file itself: `_untouched`). The rest are
    taken with `measure` for pairs (`stats.compare`, or
    `Measurer.measure` with jobs) and `describe` for untouched tensors (`stats.tensor_stats`,
    or `Measurer.describe`).
    """
    info = node.info
    if node.untouched:
        return _untouched(reader, info, stats, behind, describe)
    source = _source(reader, info.name)
    before = reader.read(info.name) if source is not None else None
    value, extras = node.evaluate()
    try:
        stored = to_storage_checked(value, info)
    except InputError as exc:
        raise InputError(f"{reader.path}: {exc}") from None
    del value
    piece = node.compressed_piece
    if piece is not None and isinstance(piece.evaluation.group.data, Scheme):
        return stored, layout_record(reader, piece, node.ops(), stats, behind, measure)
    comparable = source is not None and source.shape == info.shape
    sizes = {"bytes_before": source.nbytes if source else None, "bytes_after": info.nbytes}
    if not stats:
        changed = not comparable or source.dtype != info.dtype or not same_bytes(before, stored)
        return stored, TensorRecord(info.name, info.dtype, list(info.shape), node.ops(), changed,
                                    None, None, None, extras,
                                    dtype_before=source.dtype if source else None, **sizes)
    if comparable:
        record = TensorRecord(info.name, info.dtype, list(info.shape), node.ops(), True, None, None, None, extras,
                              dtype_before=source.dtype, **sizes)
        fill = partial(_fill, record, retyped=source.dtype != info.dtype)
        if behind is None or not behind.pair(record, fill, before, stored, copy=False):
            fill(measure(before, stored))
        return stored, record
    before_stats = tensor_stats(before) if before is not None else None
    after_stats = tensor_stats(stored)
    return stored, TensorRecord(info.name, info.dtype, list(info.shape), node.ops(), True,
                                before_stats, after_stats, None, extras,
                                dtype_before=source.dtype if source else None,
                                histogram=_histograms(before, before_stats, stored, after_stats), **sizes)


def _untouched(reader: Reader, info: TensorInfo, stats: bool, behind: Behind | None,
               describe: Describe) -> tuple[np.ndarray | Stored, TensorRecord]:
    """An input tensor written as it is, with its statistics. Where its file holds it as
    stored, the writer copies it file to file, and it is read here only to be counted here:
    not without statistics, nor when the statistics process has room to read it itself."""
    record = TensorRecord(info.name, info.dtype, list(info.shape), [], False, None, None, None, {},
                          bytes_before=info.nbytes, bytes_after=info.nbytes)
    tensor = reader.stored(info.name) or reader.read(info.name)
    if stats and (behind is None or not behind.one(record, partial(_fill_one, record), tensor)):
        _fill_one(record, describe(values(tensor)))
    return tensor, record


Measure = Callable[[np.ndarray, np.ndarray], Comparison]
Describe = Callable[[np.ndarray], dict[str, Any]]


def materialise_in_order(reader: Reader, nodes: Sequence[Chain], jobs: int, stats: bool,
                         done: Callable[[TensorRecord], None]) -> Iterator[tuple[Chain, np.ndarray | Stored]]:
    """Materialise the output tensors in order, up to `jobs` of them at once in threads
    (numpy releases the GIL in its kernels); memory grows with `jobs`. One job computes in
    the calling thread: overlapping the next tensor with the writing would double its memory,
    but a large compressed weight's statistics run behind it, in a second process (`Behind`),
    as do a bfloat16 weight's pair and a large untouched tensor's whenever that process has
    room (the others are counted here meanwhile: a copy counts on both cores). That process
    is then one of the `jobs`: it keeps a core busy, and a second thread computing beside it
    made a 1 GiB bfloat16 quantization slower (4.0 against 2.9 s). With more jobs, each
    compares its large pairs in that process and waits for them there (`Measurer.measure`):
    their `bincount`s then no longer take turns at the GIL; an untouched tensor goes there
    when the process is free (`Measurer.describe`).

    Records go to `done` as they are complete, in checkpoint order: a tensor's may be held
    back behind statistics still in the process, and the last ones are waited for once the
    last tensor is written, so its writing overlaps them; all are out when the iteration ends.
    The threads are daemons and nothing waits for them when the run stops early: Ctrl-C or
    SIGTERM takes effect at once, not after every tensor in flight.
    """
    beside = stats and _beside(reader, nodes)
    threads = jobs - 1 if beside else jobs
    if threads <= 1:
        with Measurer() as measurer:
            if beside:
                _start(measurer, reader, nodes)
            behind = Behind(measurer)
            work = partial(materialise, reader, stats=stats, behind=behind)
            for node in nodes:
                stored, record = work(node)
                for complete in behind.release(record):
                    done(complete)
                yield node, stored
                del stored  # the written tensor is freed before the next one is computed
            for complete in behind.release(last=True):
                done(complete)
        return
    with Measurer() as measurer:
        if stats and any(Measurer.worth(2 * max(node.info.nbytes, _layout_bytes(node))) for node in nodes):
            _start(measurer, reader, nodes, keep=threads)  # the process measures a pair its job holds
        work = partial(materialise, reader, stats=stats, measure=measurer.measure, describe=measurer.describe)
        pending: deque[tuple[Chain, Future]] = deque()
        upcoming = iter(nodes)
        for node in upcoming:
            pending.append((node, _in_thread(work, node)))
            if len(pending) >= threads:
                break
        while pending:
            node, future = pending.popleft()
            stored, record = future.result()
            if record is not None:
                done(record)
            yield node, stored
            del future, stored  # the written tensor is freed before the next one starts: `jobs` tensors at most
            following = next(upcoming, None)
            if following is not None:
                pending.append((following, _in_thread(work, following)))


def _beside(reader: Reader, nodes: Sequence[Chain]) -> bool:
    """Whether one job has work for the statistics process: large untouched tensors (which it
    reads from the input itself) or tensors it would read where they lie (`_shared_roles`)."""
    return any(node.untouched and Measurer.worth(node.info.nbytes) for node in nodes) \
        or bool(_shared_roles(reader, nodes))


def _shared_roles(reader: Reader, nodes: Sequence[Chain]) -> list[str]:
    """The buffers to make shared memory for one job, so that the statistics process reads
    what it measures where it lies: "read" for large untouched tensors the input does not
    hold as stored (`Reader.stored`: an npz member), narrowed weights (converted to a
    narrower dtype to be stored) and compressed weights, "stored" for the last two and
    "decoded" for compressed weights (what their layout decodes to). The run's other reads
    stay private memory, where huge pages keep them fast."""
    untouched = any(node.untouched and Measurer.worth(node.info.nbytes) and reader.stored(node.info.name) is None
                    for node in nodes)
    narrowed = any(_narrowed(node) and Measurer.worth(2 * node.info.nbytes) for node in nodes)
    layouts = any(Measurer.worth(2 * _layout_bytes(node)) for node in nodes)
    return ["read"] * (untouched or narrowed or layouts) + ["stored"] * (narrowed or layouts) + ["decoded"] * layouts


def _start(measurer: Measurer, reader: Reader, nodes: Sequence[Chain], keep: int = 2) -> None:
    """Start the statistics process now, so its imports overlap the first tensor, with the
    buffers it reads made shared memory, `keep` kept of each kind, one for each tensor in
    flight (more would be made anew, and mapped page by page, each time)."""
    measurer.start()
    for role in _shared_roles(reader, nodes):
        measurer.share(role, keep)


def _narrowed(node: Chain) -> bool:
    """Whether `node` is computed in a wider dtype than it is stored in (a bfloat16 weight), and
    stored whole: its stored value is then a conversion of its own."""
    dtype = node.info.dtype_info
    return (not node.untouched and not _layout_bytes(node) and dtype.is_float
            and dtype.itemsize < dtype.compute.itemsize)


def _layout_bytes(node: Chain) -> int:
    """The bytes of the dense weight `node` stores a piece of, in a compressed layout (else 0)."""
    piece = node.compressed_piece
    return piece.history.info.nbytes if piece is not None and isinstance(piece.evaluation.group.data, Scheme) else 0


def _in_thread(function: Callable[..., Any], *args: Any) -> Future:
    """Run `function(*args)` in a new daemon thread; its result or exception arrives in the future."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            future.set_exception(exc)

    threading.Thread(target=work, name="wtool-job", daemon=True).start()
    return future


def layout_record(reader: Reader, piece: GroupOutput, steps: list[str], stats: bool,
                  behind: Behind | None = None, measure: Measure = compare) -> TensorRecord | None:
    """The report's one row for a weight stored in a compressed layout, made with its first piece
    (None for the others): the dense weight before, what the layout decodes to after, bytes
    before → the sum of the pieces. Its statistics are taken `behind` the run when given."""
    group = piece.evaluation.group
    if piece.info.name != group.outputs[0].name:
        return None
    name = group.inputs[0]
    dense = piece.history.info
    source = _source(reader, name)
    measured = piece.evaluation.take_measured() if stats else None
    op = piece.evaluation.run.step.op
    stored_bytes = sum(o.nbytes for o in group.outputs)
    extras = {f"{op}.layout": group.data.label(), f"{op}.bits_per_weight": 8 * stored_bytes / max(dense.numel, 1)}
    record = TensorRecord(name, dense.dtype, list(dense.shape), steps, True, None, None, None, extras,
                          dtype_before=source.dtype if source else None,
                          bytes_before=source.nbytes if source else None, bytes_after=stored_bytes)
    if measured is not None:
        before, after = measured
        if before is None and source is not None:
            before = reader.read(name)
        if before is None or before.shape != after.shape:
            record.after = tensor_stats(after)
            record.histogram = _histograms(None, None, after, record.after)
        elif behind is None or not behind.pair(record, partial(_fill, record), before, after):
            _fill(record, measure(before, after))
    return record


def _fill_one(record: TensorRecord, figures: dict[str, Any]) -> None:
    """An untouched tensor's record, completed with its statistics (the same before and after)."""
    record.before = record.after = figures


def _fill(record: TensorRecord, pair: Comparison, retyped: bool = True) -> None:
    """A record completed with its comparison: a tensor before and after (changed when `retyped`
    or its bytes differ; only then with histograms), or a compressed weight's dense values
    against what its layout decodes to."""
    record.changed = retyped or not pair.same_bytes
    record.before, record.after, record.error = pair.before, pair.after, pair.error
    record.histogram = pair.histogram if record.changed else None


def planned_record(reader: Reader, node: Chain) -> TensorRecord | None:
    """The record of a tensor a dry run only plans: its steps, no statistics (None for a piece
    of a compressed layout but the first, which speaks for the weight)."""
    info = node.info
    source = _source(reader, info.name)
    steps = node.ops()
    piece = node.compressed_piece
    if piece is not None and isinstance(piece.evaluation.group.data, Scheme):
        return layout_record(reader, piece, steps, stats=False)
    return TensorRecord(info.name, info.dtype, list(info.shape), steps, bool(steps),
                        None, None, None, {}, dtype_before=source.dtype if source else None)


def _source(reader: Reader, name: str) -> TensorInfo | None:
    """The input tensor of this name, if there is one."""
    return reader.info(name) if name in reader else None


def _histograms(before: np.ndarray | None, before_stats: dict[str, Any] | None,
                after: np.ndarray, after_stats: dict[str, Any]) -> dict[str, Any] | None:
    """Before/after value histograms on one shared range, for tensors `compare` cannot pair
    (created, or reshaped by a group transform)."""
    ends = [v for s in (before_stats, after_stats) if s for v in (s["min"], s["max"]) if v is not None]
    if not ends:
        return None
    low, high = min(ends), max(ends)
    return {"low": low, "high": high,
            "before": histogram(before, low, high) if before is not None else None,
            "after": histogram(after, low, high)}


def to_storage_checked(value: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Cast a computed tensor back to its storage dtype, refusing values that overflow it."""
    dtype = by_code(info.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        stored = to_storage(value, dtype)
    value = np.asarray(value)
    if dtype.is_float and dtype.itemsize < value.dtype.itemsize and _may_overflow(value, dtype.numpy):
        overflow = int(np.count_nonzero(~np.isfinite(stored))) - int(np.count_nonzero(~np.isfinite(value)))
        if overflow > 0:
            raise InputError(f"tensor {info.name!r}: {overflow} value(s) overflow {dtype.user_name} after the "
                             f"pipeline; add a cast step with saturate=true or clip first")
    return stored


def _may_overflow(value: np.ndarray, dtype: np.dtype) -> bool:
    """Whether casting `value` to `dtype` may create NaN/Inf: rounding is monotonic, so only
    the extremes can overflow (two fast reductions instead of counting every element)."""
    if not value.size:
        return False
    extremes = np.array([value.min(), value.max()])
    with np.errstate(over="ignore", invalid="ignore"):
        return not (np.isfinite(extremes).all() and np.isfinite(extremes.astype(dtype)).all())
