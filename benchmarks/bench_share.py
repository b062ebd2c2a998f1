"""Time `share` (1-D k-means) on a 4096×4096 float32 matrix into 256 clusters, and compare its
error with scikit-learn's KMeans from the same linear start, run to convergence, in one run.

    .venv/bin/python benchmarks/bench_share.py                  # timing only (no sklearn there)
    .venv-bench/bin/python benchmarks/bench_share.py            # + scikit-learn comparison
    .venv-bench/bin/python benchmarks/bench_share.py --plain    # + plain Lloyd on the full matrix

scikit-learn's Lloyd costs O(n·k) per iteration (about 5 s here for 16.7M values × 256) and
needs hundreds to thousands of iterations to converge, so by default it runs on a seeded
random subset of the matrix (`--sklearn-size`, 2^18 values: under a minute), with `share`
on the same subset; `--sklearn-size 0` uses the whole matrix (hours). `.venv-bench` is a
separate venv: `python3.11 -m venv .venv-bench && .venv-bench/bin/pip install numpy scipy
ml_dtypes scikit-learn && .venv-bench/bin/pip install -e .`
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform


def weights(size: int, dist: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "t":  # heavy tails, as trained weights have
        return (rng.standard_t(3, size=(size, size)) * 0.02).astype(np.float32)
    return rng.standard_normal((size, size), dtype=np.float32) * np.float32(0.02)


def run_share(x: np.ndarray, k: int, accelerate: bool = True) -> tuple[np.ndarray, dict, float]:
    ctx = Context(TensorInfo("bench.weight", "F32", x.shape))
    step = Transform.create("share", {"clusters": k, "accelerate": accelerate, "iters": 1_000_000})
    start = time.perf_counter()
    out = step.apply(x, ctx)
    return out, ctx.extras, time.perf_counter() - start


def mse(x: np.ndarray, y: np.ndarray) -> float:
    diff = x.astype(np.float64) - y.astype(np.float64)
    return float(np.mean(diff * diff))


def compare_sklearn(x: np.ndarray, k: int, size: int, dtype: str, max_iter: int, seed: int) -> None:
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        print("  scikit-learn not installed here: comparison skipped (run with .venv-bench/bin/python)")
        return
    flat = x.reshape(-1)
    if size and size < flat.size:
        flat = np.random.default_rng(seed + 1).choice(flat, size, replace=False)
    column = flat.reshape(-1, 1)
    ours, extras, seconds = run_share(column, k)
    print(f"  subset of {flat.size:,} values: share {seconds:.2f} s, {extras['iterations']} iterations, "
          f"MSE {mse(column, ours):.6e}")
    start_centroids = np.linspace(float(flat.min()), float(flat.max()), k).reshape(-1, 1)
    data = column.astype(dtype)
    start = time.perf_counter()
    km = KMeans(n_clusters=k, init=start_centroids.astype(dtype), n_init=1, tol=0.0,
                max_iter=max_iter, algorithm="lloyd").fit(data)
    seconds = time.perf_counter() - start
    theirs = km.cluster_centers_[km.predict(data)]
    converged = "converged" if km.n_iter_ < max_iter else f"NOT converged (max_iter={max_iter})"
    print(f"  scikit-learn KMeans ({dtype}): {seconds:.1f} s, {km.n_iter_} iterations, {converged}, "
          f"MSE {mse(column, theirs):.6e}")
    print(f"  MSE ratio share / scikit-learn: {mse(column, ours) / mse(column, theirs):.4f} "
          f"(must be <= 1.01)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="matrix side (default 4096)")
    parser.add_argument("--clusters", type=int, default=256)
    parser.add_argument("--dist", choices=["normal", "t"], default="normal")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of share (best is shown)")
    parser.add_argument("--plain", action="store_true", help="also run plain Lloyd (accelerate=false) in full")
    parser.add_argument("--sklearn-size", type=int, default=1 << 18,
                        help="values scikit-learn clusters (a seeded subset; 0 = all)")
    parser.add_argument("--sklearn-dtype", choices=["float64", "float32"], default="float64")
    parser.add_argument("--sklearn-max-iter", type=int, default=100_000)
    args = parser.parse_args()

    x = weights(args.size, args.dist, args.seed)
    print(f"share: {args.size}×{args.size} float32 ({args.dist}) into {args.clusters} clusters, init=linear")
    times = []
    for _ in range(args.repeat):
        out, extras, seconds = run_share(x, args.clusters)
        times.append(seconds)
    print(f"  time: best {min(times):.2f} s, median {np.median(times):.2f} s over {args.repeat} runs; "
          f"{extras['iterations']} iterations, converged={extras['converged']}, "
          f"{extras['distinct']} distinct values, MSE {mse(x, out):.6e}")
    if args.plain:
        plain, plain_extras, seconds = run_share(x, args.clusters, accelerate=False)
        print(f"  plain Lloyd (scikit-learn's path): {seconds:.1f} s, {plain_extras['iterations']} iterations, "
              f"converged={plain_extras['converged']}, "
              f"MSE {mse(x, plain):.6e}; ratio accelerated / plain {mse(x, out) / mse(x, plain):.4f}")
    compare_sklearn(x, args.clusters, args.sklearn_size, args.sklearn_dtype, args.sklearn_max_iter, args.seed)


if __name__ == "__main__":
    main()
