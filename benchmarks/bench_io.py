"""Throughput of wtool's streaming path, side by side in one run with memcpy, `cp` and the peer tool.

The peer is the safetensors library itself (load_file + save_file: the whole checkpoint in
memory). All runs read from the page cache (a warm-up read comes first), so the ratios
compare the tools, not the disk. Usage: python benchmarks/bench_io.py [GiB]
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wtool.io import create_writer
from wtool.tensor import TensorInfo

TENSOR = (4096, 4096)  # 64 MiB of float32


def timed(label: str, func) -> float:
    start = time.perf_counter()
    func()
    seconds = time.perf_counter() - start
    print(f"  {label:<44} {seconds:7.2f} s")
    return seconds


def child(command: list[str]) -> None:
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    count = max(1, round(gib * 16))
    work = Path(tempfile.mkdtemp(prefix="wtool-bench-"))
    try:
        source = work / "in.safetensors"
        infos = [TensorInfo(f"layers.{i}.weight", "F32", TENSOR) for i in range(count)]
        rng = np.random.default_rng(0)
        with create_writer(source, infos, {"format": "pt"}) as writer:
            for info in infos:
                writer.write(info.name, rng.standard_normal(TENSOR, dtype=np.float32))
        size = source.stat().st_size
        source.read_bytes()  # warm the page cache
        print(f"checkpoint: {count} tensors, {size / 2**30:.2f} GiB")
        buffer = np.frombuffer(source.read_bytes(), dtype=np.uint8)
        target = np.zeros_like(buffer)
        target[:] = 1  # touch every page first: the timing below is the copy, not page faults
        wtool = [sys.executable, "-m", "wtool"]
        peer = ("import sys; from safetensors.numpy import load_file, save_file; "
                "save_file(load_file(sys.argv[1]), sys.argv[2])")
        results = {
            "memcpy": timed("memcpy of the same bytes (numpy)", lambda: np.copyto(target, buffer)),
            "cp": timed("cp of the file", lambda: child(["cp", str(source), str(work / "cp.safetensors")])),
            "copy": timed("wtool apply, no steps (copy)",
                          lambda: child([*wtool, "apply", str(source), str(work / "w.safetensors"), "-q"])),
            "peer": timed("safetensors load_file + save_file (peer)",
                          lambda: child([sys.executable, "-c", peer, str(source), str(work / "p.safetensors")])),
            "quantize": timed("wtool apply -t quantize:bits=4 (group 128)",
                              lambda: child([*wtool, "apply", str(source), str(work / "q.safetensors"), "-q", "-t",
                                             "quantize:bits=4,granularity=group,group_size=128"])),
            "quantize -j2": timed("the same with --jobs 2",
                                  lambda: child([*wtool, "apply", str(source), str(work / "q2.safetensors"), "-q",
                                                 "-j", "2", "-t", "quantize:bits=4,granularity=group,group_size=128"])),
        }
        print("ratios (lower is faster):")
        for key in ("copy", "peer", "quantize", "quantize -j2"):
            print(f"  {key:<12} / cp = {results[key] / results['cp']:6.2f}   / memcpy = "
                  f"{results[key] / results['memcpy']:7.1f}")
        print(f"  wtool copy / peer = {results['copy'] / results['peer']:.2f}")
        print(f"  throughput: wtool copy {size / results['copy'] / 2**30:.2f} GiB/s, "
              f"quantize {size / results['quantize'] / 2**30:.2f} GiB/s")
        print(f"  peak RSS of the children: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB "
              "(the largest of all runs, the peer's included)")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
