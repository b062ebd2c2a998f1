"""Speed-up of `wtool batch --executor processes --jobs 2` (and threads) over serial, 8 small checkpoints.

Each run is the whole command (`python -m wtool batch ...`, so worker start-up is counted), on
the same inputs, executors interleaved, repeated; the load average before and after, and the
share of a core the serial run got, are printed because a shared machine makes the figures noisy. Usage: python benchmarks/bench_batch.py [repeats]
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wtool.io import create_writer
from wtool.tensor import TensorInfo

CHECKPOINTS = 8
TENSORS = 8
SHAPE = (1024, 512)  # 2 MiB of float32: 16 MiB per checkpoint
STEPS = ["-t", "clip:percentile=99.9", "-t", "quantize:bits=4,granularity=group,group_size=64",
         "-t", "sparsify:fraction=0.5"]
RUNS = {"serial": ["--executor", "serial"], "threads --jobs 2": ["--executor", "threads", "--jobs", "2"],
        "processes --jobs 2": ["--executor", "processes", "--jobs", "2"]}


def make_inputs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    infos = [TensorInfo(f"layers.{i}.weight", "F32", SHAPE) for i in range(TENSORS)]
    for index in range(CHECKPOINTS):
        with create_writer(folder / f"ckpt-{index}.safetensors", infos, {}) as writer:
            for info in infos:
                writer.write(info.name, rng.normal(size=SHAPE).astype(np.float32))


def timed_run(inputs: Path, out: Path, args: list[str]) -> tuple[float, float]:
    """Wall-clock seconds and CPU seconds (user + system of the command; not of forkserver workers,
    which it does not reap itself)."""
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "wtool", "batch", str(inputs), "--out-dir", str(out), "-q", *STEPS, *args],
                   check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    print(f"{os.cpu_count()} cores; load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        inputs, out = Path(tmp) / "in", Path(tmp) / "out"
        inputs.mkdir()
        make_inputs(inputs)
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in RUNS}
        for _ in range(repeats):
            for label, args in RUNS.items():
                times[label].append(timed_run(inputs, out, args))
    serial = statistics.median(wall for wall, _ in times["serial"])
    for label, runs in times.items():
        walls = [wall for wall, _ in runs]
        median = statistics.median(walls)
        print(f"  {label:<20} median {median:6.2f} s  (min {min(walls):.2f}, max {max(walls):.2f})  "
              f"speed-up {serial / median:4.2f}x")
    cpu = statistics.median(cpu for _, cpu in times["serial"])
    print(f"serial used {cpu:.2f} CPU s: {cpu / serial:.2f} of a core while it ran (1.00 on an idle machine)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
