"""One pipeline over many checkpoints: `wtool batch`.

The unit of work is `convert(task)`: a pure function of one input, the pipeline, the output
path and the options (a picklable `Task`), returning that input's `BatchItem` with its full
apply report, or its one-line error. It depends on no global state, so any executor can
run it: `serial`, `threads` and `processes` are concurrent.futures pools, `ray` sends the same
function to a Ray cluster. Everything that can be refused (existing outputs, two inputs
landing on one output, outputs overlapping inputs) is refused by `Batch.plan`, before
anything runs.

>>> pipe = Pipeline.from_specs(["quantize:bits=4"])
>>> job = Batch.plan(["runs/"], "quantized/", pipe, executor="processes", workers=2)  # doctest: +SKIP
>>> job.run().summary["failed"]                                                     # doctest: +SKIP
0
"""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from wtool import __version__
from wtool.errors import UsageError, WtoolError
from wtool.io import checkpoint_file, is_checkpoint_folder, open_checkpoint
from wtool.io.atomic import as_output_error
from wtool.pipeline import Pipeline, Progress, run
from wtool.report import BatchItem, BatchReport
from wtool.tensor import TensorInfo

# ------------------------------------------------------------------ the unit of work

@dataclass(frozen=True)
class Task:
    """Everything one conversion needs; pickled as is to process and Ray workers."""

    source: Path
    pipeline: Pipeline
    output: Path
    force: bool = False
    copy_model_files: bool = True


def convert(task: Task, progress: Progress | None = None) -> BatchItem:
    """Apply the pipeline to one input exactly as `wtool apply` would (the output's folder
    exists); a failure is returned as the item's error line, never raised, so it cannot stop
    the other inputs."""
    started = time.perf_counter()
    try:
        result = run(task.pipeline, task.source, task.output, force=task.force,
                     copy_model_files=task.copy_model_files, progress=progress)
    except WtoolError as exc:
        return _item(task, "failed", started, error=str(exc))
    except Exception as exc:  # a bug met on one input must not stop the others
        return _item(task, "failed", started, error=f"internal error: {type(exc).__name__}: {exc}")
    return _item(task, "ok", started, report=result)


def _item(task: Task, status: str, started: float | None = None, **fields: Any) -> BatchItem:
    seconds = 0.0 if started is None else round(time.perf_counter() - started, 3)
    return BatchItem(str(task.source), str(task.output), status, seconds, **fields)


def task_memory(source: Path) -> int:
    """Bytes one conversion may need (the README's bound: 8 × the largest tensor in float32
    + 100 MiB), declared to Ray so it does not pack too many big checkpoints on one node."""
    try:
        with open_checkpoint(source) as reader:
            largest = max((t.numel * max(4, t.dtype_info.itemsize) for t in reader.tensors), default=0)
    except WtoolError:  # the task itself will report it
        largest = 0
    return 8 * largest + 100 * 2**20


# ------------------------------------------------------------------ executors

class Executor(Protocol):
    """The seam: submit tasks, stop what is in flight (Ctrl-C), close."""

    def submit(self, task: Task) -> Future[BatchItem]: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class Stopped(BaseException):
    """Raised inside a conversion (in a thread or a worker process) when the batch stops, so
    that its writer removes the temp."""


class _StopSignal:
    """A `progress` for `run` that aborts between two tensors once the batch is stopping."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def start(self, tensors: int, nbytes: int) -> None:
        self._check()

    def advance(self, info: TensorInfo) -> None:
        self._check()

    def _check(self) -> None:
        if self.event.is_set():
            raise Stopped()


class SerialExecutor:
    """Runs each task when it is submitted, in this thread: the plain loop."""

    def __init__(self, workers: int) -> None:
        """One at a time, whatever `workers` says."""

    def submit(self, task: Task) -> Future[BatchItem]:
        future: Future[BatchItem] = Future()
        future.set_result(convert(task))
        return future

    def stop(self) -> None:
        """Nothing to do: Ctrl-C unwinds the running conversion itself."""

    def close(self) -> None:
        """Nothing to release."""


class ThreadExecutor:
    """Tasks in threads (numpy releases the GIL in its kernels)."""

    def __init__(self, workers: int) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="wtool-batch")
        self.stopping = threading.Event()

    def submit(self, task: Task) -> Future[BatchItem]:
        return self.pool.submit(convert, task, _StopSignal(self.stopping))

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


_pool_stopping: Any = None  # in a worker process only: its pool's stop event


def _start_worker(stopping: Any) -> None:
    """In a worker process: what the terminal sends the whole group (Ctrl-C, hang-up, quit) is
    the parent's to handle (it sets `stopping`); a SIGTERM sent to the worker itself unwinds
    its task, so the writer removes the temp."""
    global _pool_stopping
    _pool_stopping = stopping
    for name in ("SIGINT", "SIGHUP", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _unwind)


def _unwind(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _convert_in_worker(task: Task) -> BatchItem:
    return convert(task, _StopSignal(_pool_stopping))


class ProcessExecutor:
    """Tasks in worker processes that inherit nothing from this one: forked from a fresh server
    that has imported wtool once (`forkserver`), or started with `spawn` where there is no
    fork. `stop` sets an event the running tasks check between tensors, so finished results
    still come back."""

    def __init__(self, workers: int) -> None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["wtool.batch"])
        else:
            context = multiprocessing.get_context("spawn")
        self.stopping = context.Event()
        self.pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                        initargs=(self.stopping,))

    def submit(self, task: Task) -> Future[BatchItem]:
        return self.pool.submit(_convert_in_worker, task)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayExecutor:
    """The same `convert` as Ray tasks, each declaring the memory it may need.

    `ray.init()` joins the cluster named by RAY_ADDRESS, or starts a local one; inputs and
    outputs must then be on storage every node sees. A Ray session opened by the caller
    (`ray.init(address=...)` before `Batch.run`) is used as is and left open.
    """

    def __init__(self, workers: int) -> None:
        import ray

        self.ray = ray
        self.owned = not ray.is_initialized()
        if self.owned:
            try:
                ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            except Exception as exc:  # an unreachable RAY_ADDRESS, a cluster of another Ray version
                raise UsageError(f"cannot start or join a Ray cluster (RAY_ADDRESS="
                                 f"{os.environ.get('RAY_ADDRESS', 'unset')}): {exc}") from None
        self.remote = ray.remote(convert)
        self.refs: list[Any] = []
        self.largest_node = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node["Alive"]),
                                default=0)

    def submit(self, task: Task) -> Future[BatchItem]:
        memory = task_memory(task.source)
        if memory > self.largest_node:  # Ray would wait for such a node forever
            future: Future[BatchItem] = Future()
            future.set_result(_item(task, "failed", error=f"{task.source}: needs about {memory / 2**30:.1f} GiB; "
                                    f"the largest Ray node has {self.largest_node / 2**30:.1f} GiB"))
            return future
        ref = self.remote.options(num_cpus=1, memory=memory).remote(task)
        self.refs.append(ref)
        return ref.future()

    def stop(self) -> None:
        """Cancel every task (a KeyboardInterrupt inside it, so its writer removes the temp)."""
        for ref in self.refs:
            self.ray.cancel(ref)
        if self.refs:
            self.ray.wait(self.refs, num_returns=len(self.refs), timeout=10)

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


EXECUTORS: dict[str, Callable[[int], Executor]] = {
    "serial": SerialExecutor, "threads": ThreadExecutor, "processes": ProcessExecutor, "ray": RayExecutor,
}


def check_executor(name: str) -> None:
    """UsageError for an unknown executor, or `ray` when Ray is not installed."""
    if name not in EXECUTORS:
        raise UsageError(f"--executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    if name == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--executor ray needs Ray: pip install 'wtool[ray]'") from None


# ------------------------------------------------------------------ inputs and outputs

@dataclass(frozen=True)
class Entry:
    """One input, where its output goes, and what to do: `run`, `replace` (an existing
    output) or `skip` (`--resume`: the output is complete and made by this pipeline)."""

    source: Path
    output: Path
    nbytes: int
    action: str = "run"
    note: str | None = None


def expand(arguments: Sequence[str], out_dir: Path | None = None) -> list[tuple[Path, Path]]:
    """Each input with its path relative to the output folder, in the order given.

    A file, or a folder that is itself a checkpoint (it holds a `*.safetensors.index.json` or
    a `model.safetensors`), is one input named after itself (an index after its folder).
    Any other folder stands for every checkpoint inside it (`*.safetensors`, `*.npz` and
    checkpoint folders, found recursively, hidden names skipped), named relative to it.
    An argument that does not exist but holds `*`, `?` or `[` is a glob (`**` recursive).
    A folder that is walked must not hold `out_dir`: the next run would take outputs for inputs.
    """
    found: list[tuple[Path, Path]] = []
    for argument in arguments:
        path = Path(argument)
        if path.exists() or path.is_symlink():
            found.extend(_expand_path(path, out_dir))
        elif any(char in argument for char in "*?["):
            matches = sorted(glob.glob(argument, recursive=True))
            if not matches:
                raise UsageError(f"{argument}: no file or folder matches")
            for match in matches:
                found.extend(_expand_path(Path(match), out_dir))
        else:
            raise UsageError(f"{argument}: no such file or folder")
    return found


def _expand_path(path: Path, out_dir: Path | None) -> list[tuple[Path, Path]]:
    if path.is_dir() and not is_checkpoint_folder(path):
        if out_dir is not None and path.resolve() in (out_dir.resolve(), *out_dir.resolve().parents):
            raise UsageError(f"--out-dir {out_dir} is inside the input folder {path}; choose a folder outside it")
        inside = [(found, found.relative_to(path)) for found in _checkpoints_in(path)]
        if not inside:
            raise UsageError(f"{path}: folder holds no checkpoint (*.safetensors, *.npz or a model folder)")
        return inside
    absolute = Path(os.path.abspath(path))
    return [(path, Path(absolute.parent.name if path.name.endswith(".index.json") else absolute.name))]


def _checkpoints_in(folder: Path) -> list[Path]:
    found: list[Path] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            if is_checkpoint_folder(path):
                found.append(path)
            elif not path.is_symlink():
                found.extend(_checkpoints_in(path))
        elif checkpoint_file(path):
            found.append(path)
    return found


def _size(path: Path) -> int:
    folder = path.parent if path.name.endswith(".index.json") else path
    if folder.is_dir():
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return path.stat().st_size if path.is_file() else 0


def _make_folders(outputs: Sequence[Path]) -> list[Path]:
    """Create the missing folders the outputs go into, parents first, and list them. Made
    here, before any task runs, so no task removes a folder another is writing into."""
    created: list[Path] = []
    for output in outputs:
        for folder in reversed([p for p in (output.parent, *output.parent.parents) if not p.exists()]):
            with as_output_error(folder):
                folder.mkdir()
            created.append(folder)
    return created


def made_by(output: Path, pipe: Pipeline) -> bool:
    """Whether `output` opens as a complete checkpoint whose recorded provenance (the `wtool`
    metadata entry: version, steps, patterns) is this pipeline's; timestamps play no part."""
    try:
        with open_checkpoint(output) as reader:
            recorded = json.loads(reader.metadata.get("wtool", "null"))
    except (WtoolError, ValueError):
        return False
    return recorded == json.loads(json.dumps(pipe.provenance()))


def _check_overlaps(pairs: Sequence[tuple[Path, Path]], reports: Sequence[Path]) -> None:
    """Outputs and reports must not be, contain or sit inside an input, nor reports be or sit
    inside an output: refuse before anything runs."""
    inputs = {source.resolve() for source, _ in pairs}
    outputs: dict[Path, Path] = {}
    for source, output in pairs:
        if output in outputs:
            raise UsageError(f"{outputs[output]} and {source} would both be written to {output}; "
                             "batch them separately or rename one")
        outputs[output] = source
    around = inputs | {parent for source in inputs for parent in source.parents}
    for source, output in pairs:
        target = output.resolve()
        if target in around or any(parent in inputs for parent in target.parents):
            raise UsageError(f"output {output} (for {source}) overlaps an input; choose another --out-dir")
    targets = {output.resolve() for _, output in pairs}
    for report in reports:
        target = report.resolve()
        if target in around or any(p in inputs or p in targets for p in (target, *target.parents)):
            raise UsageError(f"report {report} overlaps an input or an output; write it elsewhere")


# ------------------------------------------------------------------ the batch

class Batch:
    """A planned batch: every input, its output and its action, then `run` with an executor."""

    def __init__(self, entries: list[Entry], pipe: Pipeline, out_dir: Path, *, executor: str = "serial",
                 workers: int = 1, copy_model_files: bool = True) -> None:
        check_executor(executor)
        if workers < 1:
            raise UsageError(f"jobs={workers}: must be at least 1")
        self.entries, self.pipeline, self.out_dir = entries, pipe, out_dir
        self.executor, self.copy_model_files = executor, copy_model_files
        self.workers = 1 if executor == "serial" else workers
        self.items: dict[int, BatchItem] = {}
        self.seconds = 0.0

    @classmethod
    def plan(cls, arguments: Sequence[str], out_dir: str | Path, pipe: Pipeline, *, force: bool = False,
             resume: bool = False, reports: Sequence[Path] = (), **options: Any) -> Batch:
        """Expand the inputs and decide each one's action; every refusal happens here
        (`reports`: files the caller will write, checked against inputs and outputs)."""
        if force and resume:
            raise UsageError("give --force (replace every output) or --resume (skip finished ones), not both")
        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UsageError(f"--out-dir {out_dir} is not a folder")
        pairs = [(source, out_dir / relative) for source, relative in expand(arguments, out_dir)]
        _check_overlaps(pairs, reports)
        entries, existing = [], []
        for source, output in pairs:
            action, note = "run", None
            if output.exists() or output.is_symlink():
                if resume and made_by(output, pipe):
                    action, note = "skip", "output complete, made by this pipeline"
                elif resume or force:
                    action = "replace"
                    note = "replaced an output made by another pipeline" if resume else "replaced"
                else:
                    existing.append(output)
            entries.append(Entry(source, output, _size(source), action, note))
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise UsageError(f"{existing[0]} exists{more}; pass --resume to skip finished outputs "
                             "or --force to replace them")
        return cls(entries, pipe, out_dir, **options)

    def run(self, on_done: Callable[[Entry, BatchItem], None] | None = None) -> BatchReport:
        """Convert every input; `on_done` hears of each as it ends. Ctrl-C (or any exception
        raised here) stops what is in flight, leaving no partial output, records what had
        finished in `self.items`, and propagates: `report()` then says what ran."""
        started = time.perf_counter()

        def finish(index: int, item: BatchItem) -> None:
            item.note = item.note or self.entries[index].note
            self.items[index] = item
            if on_done:
                on_done(self.entries[index], item)

        todo = []
        for index, entry in enumerate(self.entries):
            if entry.action == "skip":
                finish(index, BatchItem(str(entry.source), str(entry.output), "skipped"))
            else:
                todo.append(index)
        created = _make_folders([self.entries[index].output for index in todo])
        try:
            if todo:
                self._drive(EXECUTORS[self.executor](self.workers), todo, finish)
        finally:
            for folder in reversed(created):  # those no output went into
                with contextlib.suppress(OSError):
                    folder.rmdir()
            self.seconds = time.perf_counter() - started
        return self.report()

    def _task(self, index: int) -> Task:
        entry = self.entries[index]
        return Task(entry.source, self.pipeline, entry.output, entry.action == "replace", self.copy_model_files)

    def _drive(self, executor: Executor, todo: list[int], finish: Callable[[int, BatchItem], None]) -> None:
        """Keep `workers` tasks in flight, in input order, and record each as it ends."""
        running: dict[Future[BatchItem], int] = {}
        upcoming = iter(todo)
        submitting: int | None = None
        try:
            while True:
                for index in islice(upcoming, self.workers - len(running)):
                    submitting = index
                    running[executor.submit(self._task(index))] = index
                    submitting = None
                if not running:
                    break
                completed, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in completed:
                    index = running.pop(future)
                    finish(index, self._outcome(index, future))
        except BaseException:
            executor.stop()
            executor.close()
            for future, index in running.items():  # one that did not return its item was stopped
                returned = future.done() and not future.cancelled() and future.exception() is None
                finish(index, future.result() if returned else self._stopped(index))
            if submitting is not None:
                finish(submitting, self._stopped(submitting))
            raise
        executor.close()

    def _outcome(self, index: int, future: Future[BatchItem]) -> BatchItem:
        """A finished future's item; a crashed worker is that input's failure."""
        try:
            return future.result()
        except Exception as exc:  # e.g. a worker process killed by the system, a Ray node lost
            return _item(self._task(index), "failed", error=f"worker failed: {type(exc).__name__}: {exc}")
        except BaseException:
            return self._stopped(index)

    def _stopped(self, index: int) -> BatchItem:
        """`interrupted`, unless the output had been committed just before the stop."""
        entry = self.entries[index]
        if entry.action == "run" and made_by(entry.output, self.pipeline):
            return _item(self._task(index), "ok", note="committed as the batch stopped; its report was lost")
        return _item(self._task(index), "interrupted")

    def report(self) -> BatchReport:
        """Every input in order: its item, or `not run` when it never started."""
        items = [self.items.get(index) or BatchItem(str(entry.source), str(entry.output), "not run")
                 for index, entry in enumerate(self.entries)]
        return BatchReport(__version__, self.pipeline.describe(), str(self.out_dir), self.executor, self.workers,
                           items, round(self.seconds, 3))
