"""`make bench`: wtool's speed and memory against `cp`, a numpy memcpy and the peers, in one run.

Builds its own synthetic bfloat16 checkpoint with `wtool new` (a sharded folder of
4096×8192 tensors with a config.json, so the peers can read it too), runs every case
`--repeat` times after one warm-up, alternating with its baseline so both see the same
machine (end to end, every round runs `cp` and then each case once), and prints one table: case, size, median wall, GB/s of
input, peak RSS, and the ratio to the baseline measured in the same run. Each target of
issue 11 is flagged met or not; everything goes to benchmarks/results.json as well.

    python benchmarks/run.py            # 1 GiB, 5 rounds, the peer at 3 GiB (< 10 minutes on a quiet machine)
    python benchmarks/run.py --quick    # 256 MiB, 3 runs, no llm-compressor: a one-minute look

Baselines: `cp -r` of the checkpoint for end-to-end runs (warm page cache: the ratios
compare the tools, not the disk); for kernels, a numpy copy into a new array of the same
bytes (fresh pages; clip, decay and threshold sparsify write into a recycled buffer, as they
do in a run, so each kernel row's note also gives its ratio to a copy into mapped pages); for the
statistics, the same pipeline run with --no-stats. Kernel and statistics rows also give the
CPU time of the thread (`time.thread_time`), which other processes on the machine disturb
far less than the wall time the targets are judged on. Peers, when installed (`make
bench-env`): llm-compressor's model-free PTQ (W4A16, writes packed int4), run against wtool on
a checkpoint of its own at issue 12's size (`--peer-tensors`, 48: 3 GiB), and gguf-py's
numpy Q4_0 quantizer; absent, their rows say "skipped". Peak memory counts wtool's
statistics process too (`run_child`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

from wtool import stats
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform

HERE = Path(__file__).parent
FIXTURE = HERE.parent / "fixtures" / "tiny-llama.safetensors"
SHAPE = (4096, 8192)  # one bfloat16 tensor: 64 MiB stored, 128 MiB in float32
KERNEL = (4096, 4096)  # float32, 64 MiB
QUANTIZE = "quantize:bits=4,scheme=sym,granularity=group,group_size=128"
# What llm-compressor's W4A16 writes: the same grid (absmax/7.5) stored as packed int4 with a config.json
PACKED = QUANTIZE + ",sym_range=full,storage=packed"
MIB = 2 ** 20
PEER_RUNS = 3  # llm-compressor imports torch for ~20 s a run: fewer runs than the other cases


@dataclass
class Row:
    """One line of the table; `ratio` is case/baseline wall time (or as the target states)."""

    case: str
    size: int
    median: float
    peak_rss: int | None = None
    baseline: str = ""
    baseline_median: float | None = None
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""
    runs: list[float] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.size / self.median / 1e9 if self.median else 0.0


class Run(NamedTuple):
    """One child process: wall seconds, peak memory (bytes), CPU seconds (user + system, its
    statistics process included: wait4 counts the children it waited for)."""

    seconds: float
    rss: int
    cpu: float


def run_child(command: Sequence[str], env: dict[str, str] | None = None) -> Run:
    """Wall time, peak memory and CPU time of one child process, which must succeed. The disks are
    synced first, untimed: no run pays for the writeback of what the run before it wrote
    (`cp` leaves its copy dirty in the page cache; llm-compressor frees 2–5 GB as it exits).

    Peak memory is the larger of the process's own peak RSS (its VmHWM, which starts at its
    exec: the RSS that wait4 reports would count this process's own, inherited at the fork)
    and the peak, sampled every 20 ms, of what the process and its descendants hold: their
    anonymous and file pages summed, the shared memory they map counted once (wtool's
    statistics process maps what wtool hands it). The kernel's counters in /proc/PID/status
    are read, not the page tables, so sampling does not slow the process down.
    """
    if env is None:  # children keep their compiled bytecode, as an installed tool does (pip compiles what it
        # installs): with PYTHONDONTWRITEBYTECODE, which some machines set, every run compiles wtool again
        env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    os.sync()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    sampler = TreeMemory(child.pid)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    sampler.stop()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({child.returncode}): {child.stderr.read().decode()[-2000:]}")
    child.stderr.close()
    return Run(seconds, sampler.peak, usage.ru_utime + usage.ru_stime)


class TreeMemory:
    """The peak memory of a process and its descendants, sampled in a thread (Linux /proc; 0 elsewhere)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self.running = pid, 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.running = False
        self.thread.join()

    def _sample(self) -> None:
        while self.running:
            held = [_held(pid) for pid in _tree(self.pid)]
            tree = sum(own for own, _, _ in held) + max((shared for _, shared, _ in held), default=0)
            self.peak = max(self.peak, tree, held[0][2])  # held[0]: the process itself
            time.sleep(0.02)


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in children.read_text().split())
            except OSError:
                pass
    return found


def _held(pid: int) -> tuple[int, int, int]:
    """(anonymous + file pages, shared memory pages, peak RSS since exec) of `pid`, in bytes."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # gone, or not Linux
        return 0, 0, 0
    kib = {line.split(":")[0]: int(line.split()[1]) for line in lines
           if line.startswith(("RssAnon", "RssFile", "RssShmem", "VmHWM"))}
    return (1024 * (kib.get("RssAnon", 0) + kib.get("RssFile", 0)), 1024 * kib.get("RssShmem", 0),
            1024 * kib.get("VmHWM", 0))


def timings(func: Callable[[], object], repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (this thread) seconds of `repeat` calls after a warm-up."""
    func()
    walls, cpus = [], []
    for _ in range(repeat):
        start, cpu = time.perf_counter(), time.thread_time()
        func()
        walls.append(time.perf_counter() - start)
        cpus.append(time.thread_time() - cpu)
    return walls, cpus


class Suite:
    def __init__(self, work: Path, repeat: int, tensors: int, peer_python: str | None, peer_tensors: int) -> None:
        self.work, self.repeat, self.tensors, self.peer_python = work, repeat, tensors, peer_python
        self.peer_tensors = peer_tensors
        self.rows: list[Row] = []
        self.floor: dict[str, float] = {}  # CPU seconds per value of the counting each statistics row needs
        self.kernel: dict[str, float] = {}  # seconds per value of each kernel row
        self.end_to_end: dict[str, tuple[float, float]] = {}  # median wall and CPU seconds of each case
        self.source = work / "in"
        self.wtool = [sys.executable, "-m", "wtool"]

    # ---------------------------------------------------------------- end to end
    def build(self) -> None:
        self.size = self.checkpoint(self.source, self.tensors)
        self.largest_f32 = SHAPE[0] * SHAPE[1] * 4

    def checkpoint(self, folder: Path, tensors: int) -> int:
        """A sharded folder of `tensors` bfloat16 tensors with a config.json (the peers read
        folders), made with `wtool new`; its bytes."""
        spec = self.work / "spec.toml"
        spec.write_text('[metadata]\nformat = "pt"\n[defaults]\ndtype = "bfloat16"\nscheme = "he"\n'
                        f'[[tensors]]\nname = "model.layers.{{i}}.mlp.down_proj.weight"\ncount = {tensors}\n'
                        f"shape = [{SHAPE[0]}, {SHAPE[1]}]\n")
        subprocess.run([*self.wtool, "new", str(spec), str(folder), "--max-shard-size", "100GB", "-q"], check=True)
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))

    def cp(self) -> Run:
        target = self.work / "cp"
        shutil.rmtree(target, ignore_errors=True)
        return run_child(["cp", "-r", str(self.source), str(target)])

    def durable_cp(self) -> Run:
        """cp, then fsync of what it wrote: wtool fsyncs before it commits, cp does not."""
        target = self.work / "cp-sync"
        shutil.rmtree(target, ignore_errors=True)
        return run_child(["sh", "-c", 'cp -r "$0" "$1" && sync "$1"/*', str(self.source), str(target)])

    def startup(self) -> Run:
        """What every wtool run pays before its first byte: Python, the imports, the arguments'
        parsing and opening a checkpoint (an inspect of the repository's tiny fixture)."""
        report = self.work / "fixture.json"
        report.unlink(missing_ok=True)
        return run_child([*self.wtool, "inspect", str(FIXTURE), "--json", str(report), "-q"])

    def inspect(self) -> Run:
        report = self.work / "inspect.json"
        report.unlink(missing_ok=True)
        return run_child([*self.wtool, "inspect", str(self.source), "--json", str(report), "-q"])

    def wtool_apply(self, name: str, *options: str, source: Path | None = None) -> Callable[[], tuple[float, int]]:
        target = self.work / name

        def go() -> Run:
            shutil.rmtree(target, ignore_errors=True)
            return run_child([*self.wtool, "apply", str(source or self.source), str(target), "-q", *options])
        return go

    def end_to_end_cases(self) -> None:
        """Every end-to-end case once per round, rounds repeated: each case runs right after its
        baseline in every round, so all ratios come from the same minutes of the machine."""
        runs = {"cp": self.cp, "cp+sync": self.durable_cp, "start-up": self.startup, "copy": self.wtool_apply("copy"),
                "copy --no-stats": self.wtool_apply("bare-copy", "--no-stats"), "inspect": self.inspect,
                "clip": self.wtool_apply("clip", "-t", "clip:c=0.05"),
                "quantize --no-stats": self.wtool_apply("bare", "-t", QUANTIZE, "--no-stats"),
                "quantize": self.wtool_apply("q1", "-t", QUANTIZE),
                "quantize -j2": self.wtool_apply("q2", "-t", QUANTIZE, "-j", "2"),
                "packed": self.wtool_apply("p1", "-t", PACKED)}
        times: dict[str, list[float]] = {name: [] for name in runs}
        peaks = dict.fromkeys(runs, 0)
        cpus: dict[str, list[float]] = {name: [] for name in runs}
        for round_ in range(self.repeat + 1):  # round 0 warms up
            for name, run in runs.items():
                seconds, rss, cpu = run()
                if round_:
                    times[name].append(seconds)
                    cpus[name].append(cpu)
                    peaks[name] = max(peaks[name], rss)
        median = {name: statistics.median(values) for name, values in times.items()}
        self.end_to_end = {name: (median[name], statistics.median(cpus[name])) for name in runs}

        def row(case: str, name: str, baseline: str, limit: float, target: str = "", note: str = "") -> Row:
            ratio = median[name] / median[baseline]
            if baseline == "cp":
                note = "; ".join(filter(None, [note, f"{median[name] / median['cp+sync']:.2f}× cp+sync, "
                                                     f"{median[name] - median['start-up']:.2f} s after start-up"]))
            made = Row(case, self.size, median[name], peaks[name], baseline, median[baseline], ratio,
                       target or f"≤ {limit:g}× {baseline}", ratio <= limit, note, times[name])
            self.rows.append(made)
            return made

        self.rows.append(Row("cp -r of the checkpoint (baseline)", self.size, median["cp"], runs=times["cp"]))
        self.rows.append(Row("cp -r, then sync of the copy (durable, as wtool's commit)", self.size,
                             median["cp+sync"], runs=times["cp+sync"]))
        self.rows.append(Row("start-up: inspect of fixtures/tiny-llama (imports, arguments)", 0,
                             median["start-up"], runs=times["start-up"]))
        row("apply, no steps (copy)", "copy", "cp", 1.3)
        self.rows.append(Row("  the same with --no-stats (the copy without the report)", self.size,
                             median["copy --no-stats"], peaks["copy --no-stats"], "cp", median["cp"],
                             median["copy --no-stats"] / median["cp"], runs=times["copy --no-stats"],
                             note=f"{median['copy --no-stats'] / median['cp+sync']:.2f}× cp+sync"))
        row("inspect --json", "inspect", "cp", 1.5)
        row("apply clip:c=0.05", "clip", "cp", 2.0)
        row(f"apply {QUANTIZE}", "quantize", "cp", 4.0)
        row(f"apply {PACKED}", "packed", "cp", 4.0)
        row("  the same with statistics vs --no-stats", "quantize", "quantize --no-stats", 1.3,
            "report adds ≤ 30%", "every statistic, error metric and histogram")
        same = _digest(self.work / "q1") == _digest(self.work / "q2")
        speedup = median["quantize"] / median["quantize -j2"]
        self.rows.append(Row("  the same with --jobs 2 (ratio: speed-up over --jobs 1)", self.size,
                             median["quantize -j2"], peaks["quantize -j2"], "--jobs 1", median["quantize"], speedup,
                             "≥ 1.5× faster, same bytes", speedup >= 1.5 and same,
                             "bytes identical" if same else "BYTES DIFFER", times["quantize -j2"]))
        bound = 3 * self.largest_f32 + 200 * MIB
        for label, name, jobs in (("--jobs 1", "quantize", 1), ("--jobs 2", "quantize -j2", 2)):
            self.rows.append(Row(f"  peak RSS of the quantize run, {label}", self.size, 0.0, peaks[name],
                                 target=f"≤ {jobs} × (3 × largest f32 + 200 MiB) = {jobs * bound / MIB:.0f} MiB",
                                 met=peaks[name] <= jobs * bound))

    def llm_compressor(self) -> None:
        """The peer against wtool writing the same layout (packed int4, group 128), on a
        checkpoint of its own at issue 12's size (48 tensors, 3 GiB, by default): runs of the
        peer, wtool and wtool --no-stats alternate, so all three see the same minutes."""
        case = "llm-compressor model_free_ptq W4A16 (peer)"
        source = self.work / "peer-in"
        if not self.peer_python:
            self.rows.append(Row(case, 0, 0.0, note="skipped: llmcompressor not installed (make bench-env)"))
            return
        size = self.checkpoint(source, self.peer_tensors)
        script = HERE / "peer_llm_compressor.py"
        runs: dict[str, list[Run]] = {"peer": [], "wtool": [], "bare": []}
        for _ in range(PEER_RUNS):  # no warm-up: the checkpoint is in the page cache already
            runs["peer"].append(self._peer(script, source))
            runs["wtool"].append(self.wtool_apply("p1", "-t", PACKED, source=source)())
            runs["bare"].append(self.wtool_apply("p2", "-t", PACKED, "--no-stats", source=source)())
        median = {name: statistics.median(run.seconds for run in values) for name, values in runs.items()}
        peak = {name: max(run.rss for run in values) for name, values in runs.items()}
        times = [run.seconds for run in runs["peer"]]
        seconds = json.loads((self.work / "peer.json").read_text())["seconds"]
        shutil.rmtree(source, ignore_errors=True)
        for label, name, note in (("wtool packed W4A16", "wtool", f"peer's own timer without its imports: {seconds:.1f} s"),
                                  ("wtool --no-stats", "bare", "")):
            faster, lighter = median["peer"] / median[name], peak["peer"] / max(peak[name], 1)
            self.rows.append(Row(case if name == "wtool" else "  the same against wtool packed W4A16 --no-stats",
                                 size, median["peer"], peak["peer"], label, median[name], faster,
                                 "wtool ≥ 4× faster, ≤ 1/8 of its memory", faster >= 4 and lighter >= 8,
                                 "; ".join(filter(None, [f"wtool {faster:.2f}× faster ({median[name]:.1f} s), at "
                                                         f"{peak[name] / MIB:.0f} MiB: 1/{lighter:.1f} of the peer's",
                                                         note])), times))

    def _peer(self, script: Path, source: Path) -> Run:
        target = self.work / "peer"
        shutil.rmtree(target, ignore_errors=True)
        return run_child([self.peer_python, str(script), str(source), str(target), str(self.work / "peer.json")])

    # ---------------------------------------------------------------- kernels, in this process
    def kernels(self) -> None:
        """Each transform's own work, as a run without the report does it (`Context.measure`
        off: figures a step takes for the report, such as sparsify's energy, are the report's
        cost, given in the row's note), then the statistics."""
        x = np.random.default_rng(0).standard_normal(KERNEL, dtype=np.float32) * np.float32(0.02)
        ctx = Context(TensorInfo("model.layers.0.mlp.down_proj.weight", "F32", KERNEL), measure=False)
        repeat = max(5, self.repeat)
        self.kernel_rows(x, ctx, repeat)
        self.statistics_rows(x, repeat)

    def kernel_rows(self, x: np.ndarray, ctx: Context, repeat: int) -> None:
        memcpy = statistics.median(timings(x.copy, repeat)[0])
        target = np.empty_like(x)
        target[...] = 1
        into = statistics.median(timings(lambda: np.copyto(target, x), repeat)[0])
        self.rows.append(Row("kernel: numpy copy into a new array (baseline)", x.nbytes, memcpy,
                             note=f"copy into a touched array: {x.nbytes / into / 1e9:.1f} GB/s"))
        cases = [("clip:c=0.05", 1.0), ("sparsify:threshold=0.01", 0.45), ("decay:lr=0.1,wd=0.1", 0.45),
                 (QUANTIZE, None), ("sparsify:fraction=0.5", None)]
        for spec, share in cases:
            name, _, options = spec.partition(":")
            transform = Transform.create(name, dict(item.split("=") for item in options.split(",")))
            median = statistics.median(alternate_inline(lambda: transform.apply(x, ctx), x.copy, repeat))
            self.kernel[spec] = median / x.size
            row = Row(f"kernel: {spec}", x.nbytes, median, baseline="memcpy", baseline_median=memcpy,
                      ratio=memcpy / median, note=f"{into / median:.2f}x a copy into mapped pages")
            if name == "sparsify":
                reported = statistics.median(alternate_inline(lambda: transform.apply(x, replace(ctx, measure=True)),
                                                              x.copy, repeat))
                row.note += f"; with its energy figures, as with the report: {memcpy / reported:.2f}× memcpy"
            if share is not None:
                row.target, row.met = f"≥ {share:g}× memcpy GB/s", row.ratio >= share
            elif name == "quantize":
                row.target, row.met = "≥ 1.5 GB/s", row.gbps >= 1.5
                self.gguf(x, median)
            else:
                row.note += "; exact selection (a radix select over the bit patterns), no sort"
            self.rows.append(row)

    def gguf(self, x: np.ndarray, ours: float) -> None:
        case = "kernel: gguf-py Q4_0 numpy quantizer (peer)"
        try:
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize
        except ImportError:
            self.rows.append(Row(case, x.nbytes, 0.0, note="skipped: gguf not installed (make bench-env)"))
            return
        theirs = statistics.median(timings(lambda: quantize(x, GGMLQuantizationType.Q4_0), max(3, self.repeat))[0])
        self.rows.append(Row(case, x.nbytes, theirs, baseline="wtool quantize", baseline_median=ours,
                             ratio=theirs / ours, target="wtool ≥ 2.5× faster", met=theirs / ours >= 2.5,
                             note="its blocks of 32 (wtool: groups of 128); quantize only, no dequantize"))

    def statistics_rows(self, x: np.ndarray, repeat: int) -> None:
        """The statistics on one 4096² tensor, and beside each missed target the least numpy
        work it takes (`_counting`, `_difference`), measured here too: where that alone is
        under 2 GB/s, the target is out of numpy's reach."""
        changed = Transform.create("quantize", {"bits": "4", "scheme": "sym", "granularity": "group"}).apply(x, Context.of(x))
        narrow = x.astype(ml_dtypes.bfloat16)
        narrow_changed = changed.astype(ml_dtypes.bfloat16)
        wide = np.empty_like(x)

        def as_float32() -> None:
            stats.tensor_stats(np.copyto(wide, narrow) or wide)
        floors: list[list[tuple[float, str]]] = [
            [],
            [self._counting(narrow), (statistics.median(timings(as_float32, 3)[1]),
                                      "converted to float32 and measured as float32")],
            [self._counting(x, changed, extra=self._difference(x, changed))],
            [self._counting(narrow, narrow_changed)]]
        cases = [(f"statistics: every STATS field, {label}", lambda a=array: stats.tensor_stats(a), array.nbytes, "")
                 for label, array in (("float32", x), ("bfloat16", narrow))]
        cases += [(f"statistics: both sides + error + histograms, {label}", lambda a=a, b=b: stats.compare(a, b),
                   a.nbytes + b.nbytes, "input = both sides' bytes; ")
                  for label, a, b in (("float32", x, changed), ("bfloat16", narrow, narrow_changed))]
        for (case, func, size, note), least in zip(cases, floors):
            walls, cpus = timings(func, repeat)
            wall, cpu = statistics.median(walls), statistics.median(cpus)
            notes = [f"{note}CPU time alone: {size / cpu / 1e9:.2f} GB/s"]
            notes += [f"{how} alone: {size / seconds / 1e9:.2f} GB/s" for seconds, how in least]
            if least:
                self.floor[case] = min(seconds for seconds, _ in least) / x.size
                if all(size / seconds < 2e9 for seconds, _ in least):
                    notes.append("below the target" if len(least) == 1 else "both below the target")
            self.rows.append(Row(case, size, wall, target="≥ 2 GB/s of input on one core", met=size / wall / 1e9 >= 2,
                                 note="; ".join(notes), runs=walls))

    @staticmethod
    def _counting(*sides: np.ndarray, extra: tuple[float, str] = (0.0, "")) -> tuple[float, str]:
        """CPU seconds of the least numpy work a histogram of these tensors takes, a floor for
        any statistics with histograms: for 16-bit values, the bincount of their bit patterns
        (as `stats` counts them); for others, the bins' index (subtract, multiply, truncate)
        and its bincount, in cache-sized chunks, with no range check; plus `extra`."""
        if sides[0].dtype.itemsize == 2:
            def count() -> None:
                for side in sides:
                    bits = side.view(np.uint16).reshape(-1)
                    for start in range(0, bits.size, 1 << 18):
                        np.bincount(bits[start:start + (1 << 18)], minlength=1 << 16)
            how = "numpy's bincount of the bit patterns"
        else:
            chunk = 1 << 16
            work, index = np.empty(chunk, sides[0].dtype), np.empty(chunk, np.intp)

            def count() -> None:
                for side in sides:
                    flat, low = side.reshape(-1), side.min()
                    scale = side.dtype.type(stats.BINS / (float(side.max()) - float(low)))
                    for start in range(0, flat.size, chunk):
                        part = flat[start:start + chunk]
                        scaled = np.multiply(np.subtract(part, low, out=work[:part.size]), scale, out=work[:part.size])
                        np.copyto(index[:part.size], scaled, casting="unsafe")
                        np.bincount(index[:part.size], minlength=stats.BINS + 1)
            how = "numpy's binning and bincount"
        seconds = statistics.median(timings(count, 3)[1]) + extra[0]
        return seconds, how + (" of both sides" if len(sides) == 2 else "") + extra[1]

    @staticmethod
    def _difference(before: np.ndarray, after: np.ndarray) -> tuple[float, str]:
        """CPU seconds of the exact difference the error metrics need: both sides widened to
        float64 and subtracted, chunk by chunk (nothing summed)."""
        chunk = 1 << 16
        a, b = np.empty(chunk), np.empty(chunk)
        flats = before.reshape(-1), after.reshape(-1)

        def subtract() -> None:
            for start in range(0, flats[0].size, chunk):
                parts = [flat[start:start + chunk] for flat in flats]
                np.copyto(a[:parts[0].size], parts[0])
                np.copyto(b[:parts[1].size], parts[1])
                np.subtract(b[:parts[1].size], a[:parts[0].size], out=a[:parts[0].size])
        return statistics.median(timings(subtract, 3)[1]), ", and the float64 difference"

    def bounds(self) -> None:
        """What bounds each end-to-end case, from figures measured in this run: start-up, then
        the least work it needs, spread perfectly over all cores: the counting its report
        needs at numpy's floor (`_counting`), the transform's kernel at its measured speed, and
        `cp`'s copy for a copy (reads, conversions and writes left out); and for --jobs, how
        many cores one job already keeps busy."""
        cores = os.cpu_count() or 1
        startup, (cp, _) = self.end_to_end["start-up"][0], self.end_to_end["cp"]
        values = self.size // 2  # bfloat16
        one = values * self.floor["statistics: every STATS field, bfloat16"]
        pair = values * self.floor["statistics: both sides + error + histograms, bfloat16"]
        clip, quantize = (values * self.kernel[spec] for spec in ("clip:c=0.05", QUANTIZE))
        counted, compared = "every value's bit pattern counted", "both sides' bit patterns counted"
        cases = [("apply, no steps (copy)", "copy", 1.3, cp + one, f"cp's copy + {counted}"),
                 ("inspect --json", "inspect", 1.5, one, counted),
                 ("apply clip:c=0.05", "clip", 2.0, pair + clip, f"{compared} + the clip kernel"),
                 ("apply quantize", "quantize", 4.0, pair + quantize, f"{compared} + the quantize kernel"),
                 ("apply packed", "packed", 4.0, pair + quantize, f"{compared} + the quantize kernel")]
        for case, name, limit, work, what in cases:
            floor, measured = startup + work / cores, self.end_to_end[name][0]
            self.rows.append(Row(f"  floor of {case}", self.size, floor, baseline="cp", baseline_median=cp,
                                 ratio=floor / cp, note=f"start-up + {what}, at the rates measured above, "
                                 f"spread over {cores} cores; the run is {measured / floor:.2f}× this"
                                 + (f"; the ≤ {limit:g}× target is below it" if floor / cp > limit else "")))
        wall, cpu = self.end_to_end["quantize"]
        bound = cores * wall / cpu
        self.rows.append(Row("  bound of --jobs 2's speed-up", self.size, 0.0, ratio=bound,
                             note=f"one job keeps {cpu / wall:.2f} of the {cores} cores busy ({cpu:.2f} s of CPU "
                                  f"in {wall:.2f} s)" + ("; the ≥ 1.5× target is above it" if bound < 1.5 else "")))


def alternate_inline(func: Callable[[], object], baseline: Callable[[], object], repeat: int) -> list[float]:
    """Time `func` `repeat` times, each right after one run of `baseline` (after a warm-up)."""
    func(), baseline()
    times = []
    for _ in range(repeat):
        baseline()
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return times


def _digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            while block := handle.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def peer_python(requested: str | None) -> str | None:
    """A Python that can import llmcompressor: --peer-python, else this one, else .venv-bench's."""
    for candidate in filter(None, (requested, sys.executable, str(HERE.parent / ".venv-bench" / "bin" / "python"))):
        if Path(candidate).exists() and subprocess.run([candidate, "-c", "import llmcompressor"],
                                                       capture_output=True).returncode == 0:
            return candidate
    return None


def table(rows: Sequence[Row]) -> str:
    head = f"{'case':<58} {'size':>9} {'median':>8} {'GB/s':>6} {'peak RSS':>9} {'ratio':>12}  target"
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r.size / MIB:.0f} MiB" if r.size else ""
        median = f"{r.median:.3f} s" if r.median else "-"
        gbps = f"{r.gbps:.2f}" if r.median else "-"
        rss = f"{r.peak_rss / MIB:.0f} MiB" if r.peak_rss else "-"
        ratio = f"{r.ratio:.2f} {r.baseline}" if r.ratio is not None else "-"
        flag = "" if r.met is None else ("MET " if r.met else "NOT MET ")
        target = f"{flag}{r.target}" + (f" ({r.note})" if r.note else "")
        lines.append(f"{r.case:<58} {size:>9} {median:>8} {gbps:>6} {rss:>9} {ratio[:12]:>12}  {target}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB, 3 runs per case, no llm-compressor")
    parser.add_argument("--repeat", type=int, help="timed runs per case (default 5, 3 with --quick)")
    parser.add_argument("--tensors", type=int, help="4096×8192 bfloat16 tensors (default 16: 1 GiB, about 5 minutes here; 4 with --quick)")
    parser.add_argument("--peer-python", help="a Python with llmcompressor installed (default: found)")
    parser.add_argument("--peer-tensors", type=int, default=48,
                        help="tensors of the checkpoint the peer and wtool both quantize (default 48: 3 GiB, issue 12's)")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    repeat = args.repeat or (3 if args.quick else 5)
    tensors = args.tensors or (4 if args.quick else 16)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="wtool-bench-"))
    try:
        suite = Suite(work, repeat, tensors, None if args.quick else peer_python(args.peer_python), args.peer_tensors)
        suite.build()
        print(f"checkpoint: {tensors} bfloat16 tensors of {SHAPE[0]}×{SHAPE[1]}, {suite.size / MIB:.0f} MiB; "
              f"{repeat} runs per case after a warm-up", flush=True)
        suite.end_to_end_cases()
        suite.kernels()
        suite.bounds()
        suite.llm_compressor()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(suite.rows))
    missed = [r.case.strip() for r in suite.rows if r.met is False]
    print(f"\n{sum(r.met is True for r in suite.rows)} targets met, {len(missed)} not"
          + (f": {'; '.join(missed)}" if missed else "") + f"  ({time.perf_counter() - started:.0f} s)")
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
               "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version(),
                           "numpy": np.__version__},
               "checkpoint": {"tensors": tensors, "shape": SHAPE, "dtype": "BF16", "bytes": suite.size},
               "repeat": repeat, "rows": [asdict(r) | {"gbps": r.gbps} for r in suite.rows]}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
