"""The statistics process: the same figures as in line, every error back in the parent, nothing left running."""

from __future__ import annotations

import json
import math
import os
import re
import signal
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import wtool
import wtool.measure
from wtool.errors import InputError, WtoolError
from wtool.measure import Measurer
from wtool.stats import compare, tensor_stats
from wtool.tensor import Stored

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="the statistics process needs Linux's memfd")


def _pair(dtype: type, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    before = (rng.standard_normal(shape) * 0.05).astype(dtype)
    after = (np.round(before.astype(np.float64) * 40) / 40).astype(dtype)
    if before.size > 3 and np.dtype(dtype).kind in "fV":
        flat = before.reshape(-1)
        flat[0], flat[1], flat[2] = np.nan, np.inf, 0.0  # NaN/Inf are counted, not measured
    return before, after


def _same(a: object, b: object) -> bool:
    """The same figures, floats to 1e-12: the process sums squares with a BLAS dot, in line
    they are a multiply and a sum (the same to float64 rounding)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _timeless(report: dict) -> dict:
    """A run's JSON report without what two runs of the same work differ in: the output's path
    and the timings."""
    report.pop("output"), report.pop("seconds", None), report["totals"].pop("seconds", None)
    return report


def _same_bytes(tmp_path) -> bool:
    """Whether the runs into a.safetensors and b.safetensors wrote the same bytes."""
    return (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _sent(monkeypatch, copies: bool = True) -> list[tuple]:
    """What the run sends the process to measure, (name, specs) in order, as it sends it; with
    `copies=False`, a copy into the process's slot fails the test."""
    sent: list[tuple] = []
    real_send = Measurer._send

    def send(self: Measurer, message: object) -> None:
        if isinstance(message, tuple) and message[0] in ("compare", "stats"):
            sent.append(message[:2])
        real_send(self, message)

    def copy(*args: object) -> None:
        raise AssertionError("copied")

    monkeypatch.setattr(Measurer, "_send", send)
    if not copies:
        monkeypatch.setattr(Measurer, "_copy", copy)
    return sent


def _keys(sent: list[tuple], name: str) -> list[object]:
    """Where the arrays of the `name` measurements lay: shared buffers' serial numbers, or "slot"."""
    return [key for sent_name, specs in sent if sent_name == name for key, *_ in specs]


def _figures(comparison: object) -> dict:
    return json.loads(json.dumps(vars(comparison)))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, np.float32, np.float64, ml_dtypes.float8_e4m3fn,
                                   np.int8])
@pytest.mark.parametrize("shape", [(0,), (5,), (33, 70)])
def test_the_process_gives_the_figures_of_compare_in_line(dtype, shape):
    before, after = _pair(dtype, shape)
    with Measurer() as measurer:
        measurer.submit(before, after)
        assert _same(_figures(measurer.result()), _figures(compare(before, after)))


def test_pairs_of_growing_size_and_dtype_go_through_one_process_in_order():
    """A larger pair maps a larger slot; each result is the one of its own pair."""
    pairs = [_pair(dtype, shape) for dtype, shape in
             [(np.float32, (10,)), (ml_dtypes.bfloat16, (300, 301)), (np.float64, (4,)), (np.float32, (1000, 999))]]
    with Measurer() as measurer:
        for before, after in pairs:
            measurer.submit(before, after)
            before[...] = 0  # the process has its own copy: the caller may reuse its arrays at once
            assert _same(measurer.result().after, compare(before, after).after)
        pid = measurer.process.pid
    assert measurer.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # ended and reaped: no zombie either


def test_an_error_in_the_process_is_raised_in_the_parent():
    with Measurer() as measurer:
        measurer.submit(np.zeros(3, np.float32), np.zeros(4, np.float32))
        with pytest.raises(ValueError, match="3 elements before, 4 after"):
            measurer.result()
        measurer.submit(*_pair(np.float32, (6,)))  # and the process goes on
        assert measurer.result().before["numel"] == 6


def test_a_process_that_dies_is_a_one_line_error_not_a_hang():
    with Measurer() as measurer:
        measurer.start()
        os.kill(measurer.process.pid, signal.SIGKILL)
        measurer.process.wait()
        with pytest.raises(WtoolError, match=r"statistics process stopped \(exit code -9\).*--no-stats"):
            measurer.submit(*_pair(np.float32, (6,)))
            measurer.result()


def test_inspect_whose_statistics_process_dies_says_so_in_one_line_without_advising_no_stats(tmp_path,
                                                                                             monkeypatch):
    """`inspect` has no --no-stats: its error says to run again, and names nothing it lacks."""
    from wtool.analyze import inspect

    source = _checkpoint(tmp_path, "bfloat16")
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    real_submit = Measurer.submit

    def submit(self: Measurer, *arrays: np.ndarray):
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        return real_submit(self, *arrays)

    monkeypatch.setattr(Measurer, "submit", submit)
    with pytest.raises(WtoolError, match=r"statistics process stopped \(exit code -9\); run again$"):
        inspect(source)


def test_closing_with_a_comparison_running_stops_the_process_at_once():
    before, after = _pair(np.float64, (4096, 1024))
    measurer = Measurer()
    measurer.submit(before, after)
    process = measurer.process
    measurer.close()
    assert process.poll() is not None and measurer.process is None and measurer.slot is None


def test_small_pairs_stay_in_line_and_start_nothing():
    with Measurer() as measurer:
        assert not measurer.takes(np.zeros(16, np.float32), np.zeros(16, np.float32))
        assert measurer.process is None
        assert measurer.takes(np.zeros(1 << 20, np.float32), np.zeros(1 << 20, np.float32))  # 8 MiB: started
        assert measurer.process is not None


@pytest.mark.parametrize("spec", ["quantize:bits=4,granularity=group,group_size=8,storage=packed",
                                  "quantize:type=fp8", "clip:c=0.05,include=*.q_proj.weight"])
def test_a_run_measured_in_the_process_reports_what_one_measured_in_line_does(llama, tmp_path, monkeypatch, spec):
    """Every compressed weight, and every untouched tensor the process is free for, goes to
    the process (MIN_BYTES 0); the report, records spilled to disk at once included, is the
    one of a run that measures everything in line."""
    from wtool.report import Records

    monkeypatch.setattr(Records, "KEEP", 0)
    pipeline = wtool.Pipeline.from_specs([spec])
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 1 << 62)
    in_line = wtool.run(pipeline, llama, tmp_path / "a.safetensors").to_json()
    started: list[int] = []
    real_start = Measurer.start

    def start(self: Measurer) -> None:
        real_start(self)
        started.append(self.process.pid)

    monkeypatch.setattr(Measurer, "start", start)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    behind = wtool.run(pipeline, llama, tmp_path / "b.safetensors").to_json()
    assert _same(_timeless(behind), _timeless(in_line))
    assert _same_bytes(tmp_path)
    assert len(set(started)) == 1  # one process: for the layouts, and for the untouched tensors


def test_every_public_name_of_the_package_resolves_and_the_statistics_process_imports_little():
    """`wtool`'s names are imported on first use: each in __all__ resolves to its module's
    object, and importing wtool.measure (what the statistics process runs) leaves the
    pipeline, the CLI and the transforms unimported."""
    import subprocess
    import sys

    import wtool.pipeline
    import wtool.transforms

    assert sorted(dir(wtool)) == sorted(wtool.__all__)
    assert wtool.run is wtool.pipeline.run and wtool.TRANSFORMS is wtool.transforms.REGISTRY
    assert all(getattr(wtool, name) is not None for name in wtool.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        wtool.nothing  # noqa: B018
    loaded = subprocess.run([sys.executable, "-c", "import sys, wtool.measure; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert "wtool.stats" in loaded
    assert not {"wtool.pipeline", "wtool.cli", "wtool.transforms", "rich", "typer"} & set(loaded)


def _children() -> set[int]:
    found: set[int] = set()
    for tasks in os.scandir("/proc/self/task"):
        with open(f"{tasks.path}/children") as handle:
            found.update(int(pid) for pid in handle.read().split())
    return found


@pytest.mark.parametrize("stop", [KeyboardInterrupt, WtoolError])
def test_a_run_stopped_with_a_comparison_in_flight_leaves_no_process_and_no_output(llama, tmp_path, monkeypatch,
                                                                                      stop):
    """Ctrl-C (or an error) while the process measures a weight: the run stops at once, the
    process with it (nothing left running, no zombie), and the output is not written."""
    import wtool.materialise

    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    real, calls, started = wtool.materialise.materialise, [], []
    real_submit = Measurer.submit

    def submit(self: Measurer, *arrays: np.ndarray):
        previous = real_submit(self, *arrays)
        started.append(self.process.pid)
        return previous

    def materialise(*args, **kwargs):
        calls.append(1)
        if started and len(calls) > 6:  # a comparison was started and may still run
            raise stop("stopped")
        return real(*args, **kwargs)

    monkeypatch.setattr(Measurer, "submit", submit)
    monkeypatch.setattr(wtool.materialise, "materialise", materialise)
    before = _children()
    out = tmp_path / "out.safetensors"
    with pytest.raises(stop, match="stopped"):
        wtool.run(wtool.Pipeline.from_specs(["quantize:bits=4,granularity=group,group_size=8,storage=packed"]),
                  llama, out)
    assert started and _children() == before
    with pytest.raises(ProcessLookupError):
        os.kill(started[0], 0)
    assert not out.exists() and [p for p in tmp_path.iterdir() if p != llama] == []  # no temporary either


def test_without_an_interpreter_to_start_the_statistics_are_taken_in_line(llama, tmp_path, monkeypatch):
    """An embedded Python has no interpreter at sys.executable: the run measures in line, and
    its report is the one of a run that never tried the process."""
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 1 << 62)
    pipeline = wtool.Pipeline.from_specs(["quantize:bits=4,granularity=group,group_size=8,storage=packed"])
    in_line = wtool.run(pipeline, llama, tmp_path / "a.safetensors").to_json()
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    monkeypatch.setattr(wtool.measure.sys, "executable", str(tmp_path / "no-python"))
    measurer = Measurer()
    assert not measurer.start() and measurer.failed and not measurer.takes(*_pair(np.float32, (9,)))
    without = wtool.run(pipeline, llama, tmp_path / "b.safetensors").to_json()
    assert _timeless(without) == _timeless(in_line)


def test_a_wtool_folder_in_the_working_directory_does_not_shadow_the_process(tmp_path, monkeypatch):
    """The process imports the wtool the run imported, whatever the working folder holds."""
    (tmp_path / "wtool").mkdir()
    (tmp_path / "wtool" / "__init__.py").write_text("raise SystemExit('the wrong wtool')\n")
    monkeypatch.chdir(tmp_path)
    with Measurer() as measurer:
        measurer.submit(*_pair(np.float32, (5,)))
        assert measurer.result().before["numel"] == 5


def test_jobs_measure_their_large_pairs_in_the_process_with_the_figures_of_one_job(llama, tmp_path, monkeypatch):
    """With jobs in threads, every pair large enough goes to the process (each job waits for its
    own); the output bytes and the report are those of one job measuring in line."""
    pipeline = wtool.Pipeline.from_specs(["clip:c=0.05", "quantize:bits=4,granularity=group,group_size=8"])
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 1 << 62)
    one = wtool.run(pipeline, llama, tmp_path / "a.safetensors").to_json()
    measured: list[int] = []
    real = Measurer.submit

    def submit(self: Measurer, *arrays: np.ndarray):
        measured.append(len(arrays))
        return real(self, *arrays)

    monkeypatch.setattr(Measurer, "submit", submit)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    two = wtool.run(pipeline, llama, tmp_path / "b.safetensors", jobs=3).to_json()  # 2 threads + the process
    assert _same(_timeless(two), _timeless(one))
    assert _same_bytes(tmp_path)
    assert measured.count(2) == sum(r["changed"] for r in two["tensors"]) > 1  # each changed pair, in the process


def test_a_packed_weight_is_measured_where_it_was_read_and_decoded(tmp_path, monkeypatch):
    """bfloat16 weights stored packed: each pair is measured in the buffers it was read and
    decoded into (shared memory while the process runs), never copied, two buffers of each
    taking turns so the process reads one while the next weight fills the other; the report
    is the one measured in line, and every shared buffer is freed, and its file closed, with
    the run."""
    import gc

    from wtool import buffers

    source = _checkpoint(tmp_path, "bfloat16")  # 1 MiB a weight: recycled buffers
    pipeline = wtool.Pipeline.from_specs(["quantize:bits=4,granularity=group,group_size=128,storage=packed"])
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 1 << 62)
    in_line = wtool.run(pipeline, source, tmp_path / "a.safetensors").to_json()
    sent = _sent(monkeypatch, copies=False)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    shared = wtool.run(pipeline, source, tmp_path / "b.safetensors").to_json()
    keys = _keys(sent, "compare")
    assert _same(_timeless(shared), _timeless(in_line))
    assert _same_bytes(tmp_path)
    # two sides a pair, in two buffers each (read, decoded) taking turns
    assert len(keys) == 8 and all(isinstance(key, int) for key in keys)
    befores, afters = keys[0::2], keys[1::2]
    assert len(set(befores)) == len(set(afters)) == 2 and not set(befores) & set(afters)
    assert befores[0] != befores[1] and afters[0] != afters[1]
    gc.collect()
    assert buffers._shared == {} and not buffers._shared_roles


def _checkpoint(tmp_path, dtype: str, suffix: str = ".safetensors", count: int = 4) -> Path:
    from wtool import new_checkpoint

    spec = tmp_path / f"{dtype}.toml"
    spec.write_text(f'[defaults]\ndtype = "{dtype}"\nscheme = "he"\n'
                    f'[[tensors]]\nname = "layers.{{i}}.mlp.weight"\ncount = {count}\nshape = [512, 1024]\n')
    source = tmp_path / f"{dtype}{suffix}"
    new_checkpoint(spec, source)
    return source


@pytest.mark.parametrize(("dtype", "spec", "sent"), [
    ("bfloat16", None, "stats"),  # a copy: untouched tensors, which the process reads from the input
    ("float32", None, "stats"),
    ("bfloat16", "clip:c=0.05", "compare"),  # bfloat16 pairs: read and stored in shared memory
    ("bfloat16", "quantize:bits=4,granularity=group,group_size=128", "compare"),
    ("float32", "clip:c=0.05", None),  # float32 pairs would need a copy (one tensor more): in line
])
def test_what_lies_in_shared_memory_is_measured_there_without_a_copy(tmp_path, monkeypatch, dtype, spec, sent):
    """Pairs both of whose sides the run made in shared memory go to the process as they lie,
    and untouched tensors as stored in the input file, which the process reads itself: nothing
    is copied for them (no slot, no spare buffer), each message names shared buffers or the
    input file only, and the report and the bytes are those of a run measured in line."""
    source = _checkpoint(tmp_path, dtype)
    pipeline = wtool.Pipeline.from_specs([spec] if spec else [])
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 1 << 62)
    in_line = wtool.run(pipeline, source, tmp_path / "a.safetensors").to_json()
    started: list[int] = []
    real_start = Measurer.start

    def start(self: Measurer) -> bool:
        if real_start(self) and self.process.pid not in started:
            started.append(self.process.pid)
        return self.process is not None

    messages = _sent(monkeypatch, copies=False)
    monkeypatch.setattr(Measurer, "start", start)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    shared = wtool.run(pipeline, source, tmp_path / "b.safetensors").to_json()
    assert _same(_timeless(shared), _timeless(in_line))
    assert _same_bytes(tmp_path)
    assert {name for name, _ in messages} == ({sent} if sent else set())
    assert len(started) == bool(sent)  # no process for a run that has no work for it (its memory)
    where = {source.resolve()} if spec is None else {int} if sent else set()  # the input, shared buffers: no slot
    assert {key if isinstance(key, Path) else type(key) for _, specs in messages for key, *_ in specs} == where


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_inspect_counts_on_both_cores_with_the_figures_of_one(tmp_path, monkeypatch, suffix):
    """`inspect` hands a tensor to the process whenever it has room (as stored in a safetensors
    file, which the process reads itself with no copy; an npz member as read) and counts the
    others itself: the report is the one counted in line, rows in checkpoint order."""
    from wtool.analyze import inspect

    source = _checkpoint(tmp_path, "bfloat16", suffix)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 1 << 62)
    in_line = inspect(source).to_json()
    sent: list[str] = []
    real_submit = Measurer.submit

    def submit(self: Measurer, *arrays: np.ndarray | Stored):
        assert suffix == ".npz" or self.lies_shared(*arrays)
        sent.append(type(arrays[0]))
        return real_submit(self, *arrays)

    monkeypatch.setattr(Measurer, "submit", submit)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    both = inspect(source).to_json()
    assert set(sent) == {Stored if suffix == ".safetensors" else np.ndarray}
    assert _same(both, in_line)
    assert list(both["tensors"][0]) == list(in_line["tensors"][0])  # the keys in the same order


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
@pytest.mark.parametrize("command", ["copy", "inspect"])
def test_reads_are_shared_memory_only_for_what_the_process_cannot_read_itself(tmp_path, monkeypatch, suffix,
                                                                               command):
    """Untouched tensors of a safetensors input go to the process as stored: the run's own reads
    (of those it counts itself) stay private memory. An npz member it must be handed as read."""
    from wtool.analyze import inspect

    source = _checkpoint(tmp_path, "bfloat16", suffix)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    shared, real_share = [], Measurer.share
    monkeypatch.setattr(Measurer, "share", lambda self, role, keep=2: (shared.append(role), real_share(self, role, keep)))
    if command == "copy":
        wtool.run(wtool.Pipeline(), source, tmp_path / "out.safetensors")
    else:
        inspect(source)
    assert shared == ([] if suffix == ".safetensors" else ["read"])


def test_stored_tensors_are_read_by_the_process_in_order_a_few_at_a_time(tmp_path, monkeypatch):
    """Tensors the run has not read queue up to QUEUE deep (they hold no memory of the run);
    each result is its own tensor's `tensor_stats`, in the order they were sent."""
    from wtool.io import open_checkpoint

    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    results = []
    with open_checkpoint(_checkpoint(tmp_path, "bfloat16", count=6)) as reader, Measurer() as measurer:
        stored = [reader.stored(info.name) for info in reader.tensors]
        for tensor in stored:
            results += measurer.submit(tensor)
            assert len(measurer.out) <= wtool.measure.QUEUE
        assert len(results) == len(stored) - wtool.measure.QUEUE
        pair = _pair(np.float32, (1024, 1024))
        assert not measurer.room(*pair)  # arrays of the run's go alone: they would wait for what is queued
        while measurer.busy:
            results.append(measurer.result())
        assert measurer.room(*pair)
        for tensor, figures in zip(stored, results, strict=True):
            assert _same(figures, tensor_stats(tensor.read()))


def test_a_stored_tensor_whose_file_shrank_is_an_input_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    from wtool.io import open_checkpoint

    source = _checkpoint(tmp_path, "bfloat16")
    with open_checkpoint(source) as reader:
        last = reader.stored(reader.tensors[-1].name)
    os.truncate(source, source.stat().st_size - 10)
    with Measurer() as measurer:
        measurer.submit(last)
        with pytest.raises(InputError, match=rf"^{re.escape(last.where)}: changed during the run"):
            measurer.result()


def test_the_last_tensor_is_written_while_its_statistics_are_taken(tmp_path, monkeypatch):
    """The run waits for the last measurements only once the last tensor is written (the
    writing overlaps them), and every record is in the report, in order."""
    from wtool.io.safetensors import SafetensorsWriter

    source = _checkpoint(tmp_path, "bfloat16")
    events: list[str] = []
    real_result, real_write = Measurer.result, SafetensorsWriter._write
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    monkeypatch.setattr(Measurer, "result", lambda self: (events.append("result"), real_result(self))[1])
    monkeypatch.setattr(SafetensorsWriter, "_write",
                        lambda self, info, array: (events.append("write"), real_write(self, info, array))[1])
    report = wtool.run(wtool.Pipeline.from_specs(["clip:c=0.05"]), source, tmp_path / "out.safetensors").to_json()
    assert events.count("write") == 4 and events[-1] == "result" and "write" in events[events.index("result"):]
    assert [t["name"] for t in report["tensors"]] == [f"layers.{i}.mlp.weight" for i in range(4)]
    assert all(t["after"] is not None for t in report["tensors"])


@pytest.mark.parametrize(("dtype", "threads"), [("bfloat16", False), ("float32", True)])
def test_the_statistics_process_is_one_of_the_jobs(tmp_path, monkeypatch, dtype, threads):
    """--jobs 2 where one job keeps the process busy (bfloat16 pairs beside the work) is that
    job and the process, no thread; float32 pairs, measured in line by one job, get two
    threads. Either way, the bytes and the report of one job."""
    import wtool.materialise

    source = _checkpoint(tmp_path, dtype)
    pipeline = wtool.Pipeline.from_specs(["clip:c=0.05"])
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    one = wtool.run(pipeline, source, tmp_path / "a.safetensors").to_json()
    started: list[object] = []
    real = wtool.materialise._in_thread

    def in_thread(*args: object):
        started.append(args)
        return real(*args)

    monkeypatch.setattr(wtool.materialise, "_in_thread", in_thread)
    two = wtool.run(pipeline, source, tmp_path / "b.safetensors", jobs=2).to_json()
    assert _same(_timeless(two), _timeless(one))
    assert _same_bytes(tmp_path)
    assert bool(started) == threads


def test_tensors_not_read_into_shared_memory_are_copied_there_with_the_same_figures(tmp_path, monkeypatch):
    """An .npz input (read by numpy, not into the run's buffers) and the dense weights `inspect`
    decodes from a packed checkpoint do not lie in shared memory: they are copied into the
    process's slot, and the figures are those counted in line."""
    from wtool.analyze import inspect

    source = _checkpoint(tmp_path, "float32")
    packed = tmp_path / "packed.safetensors"
    wtool.run(wtool.Pipeline.from_specs(["quantize:bits=4,granularity=group,group_size=128,storage=packed"]),
              source, packed)
    npz = tmp_path / "in.npz"
    wtool.run(wtool.Pipeline(), source, npz)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 1 << 62)
    copy_in_line = wtool.run(wtool.Pipeline(), npz, tmp_path / "a.npz").to_json()
    inspect_in_line = inspect(packed).to_json()
    sent = _sent(monkeypatch)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    copy_behind = wtool.run(wtool.Pipeline(), npz, tmp_path / "b.npz").to_json()
    assert _same(_timeless(copy_behind), _timeless(copy_in_line))
    assert _keys(sent, "stats") and set(_keys(sent, "stats")) == {"slot"}
    sent.clear()
    assert _same(inspect(packed).to_json(), inspect_in_line)
    assert _keys(sent, "stats") and set(_keys(sent, "stats")) == {"slot"}


def test_jobs_in_threads_keep_a_shared_buffer_for_each_tensor_in_flight(tmp_path, monkeypatch):
    """--jobs 4 on bfloat16 pairs: three threads (and the process, which measures a pair one
    of them holds), each holding a tensor read and one stored. Each kind keeps a buffer for
    each thread, so no tensor gets a new memfd (mapped anew, page by page) once the first
    three are made."""
    from wtool import buffers, new_checkpoint

    spec = tmp_path / "spec.toml"
    spec.write_text('[defaults]\ndtype = "bfloat16"\nscheme = "he"\n'
                    '[[tensors]]\nname = "layers.{i}.mlp.weight"\ncount = 12\nshape = [512, 1024]\n')
    source = tmp_path / "bf16.safetensors"
    new_checkpoint(spec, source)
    made: list[int] = []
    real = buffers._shared_buffer

    def shared_buffer(size: int):
        made.append(size)
        return real(size)

    monkeypatch.setattr(buffers, "_shared_buffer", shared_buffer)
    monkeypatch.setattr(wtool.measure, "MIN_BYTES", 0)
    wtool.run(wtool.Pipeline.from_specs(["clip:c=0.05"]), source, tmp_path / "out.safetensors", jobs=4)
    assert 0 < len(made) <= 2 * 3  # "read" and "stored", three of each at most
