"""Time spectral-norm's Lanczos (method=power) against an exact SVD (method=svd) on one matrix.

    .venv/bin/python benchmarks/bench_spectral.py            # 4096×4096 float32, the figure in the README
    .venv/bin/python benchmarks/bench_spectral.py --size 1024 --close

`--close` plants σ2 = σ1·(1 - 1e-4), the case where plain power iteration crawls.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform


def matrix(size: int, close: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((size, size), dtype=np.float32)
    if close:  # two nearly equal top singular values on top of the random bulk
        bulk = float(np.sqrt(size)) * 2.0
        left, right = rng.standard_normal((2, size, 2), dtype=np.float32)
        left, right = np.linalg.qr(left)[0], np.linalg.qr(right)[0]
        weight += (left * np.array([3.0, 3.0 * (1 - 1e-4)], np.float32) * bulk) @ right.T
    return weight


def timed(method: str, weight: np.ndarray) -> tuple[float, float]:
    ctx = Context(TensorInfo("bench.weight", "F32", weight.shape))
    transform = Transform.create("spectral-norm", {"method": method})
    start = time.perf_counter()
    transform.apply(weight, ctx)
    return time.perf_counter() - start, ctx.extras["sigma_before"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--close", action="store_true", help="make σ1 ≈ σ2 (relative gap 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    weight = matrix(args.size, args.close, args.seed)
    power_time, power_sigma = timed("power", weight)
    svd_time, svd_sigma = timed("svd", weight)
    print(f"{args.size}×{args.size} float32{' (σ1≈σ2)' if args.close else ''}")
    print(f"  method=power  {power_time:8.3f} s   σ = {power_sigma:.9g}")
    print(f"  method=svd    {svd_time:8.3f} s   σ = {svd_sigma:.9g}")
    gap = abs(power_sigma - svd_sigma) / svd_sigma
    print(f"  relative difference {gap:.2e};  svd/power = {svd_time / power_time:.1f}x")


if __name__ == "__main__":
    main()
