"""Weight sharing (Deep Compression): 1-D k-means over a tensor's values, each weight replaced by its centroid.

Exact Lloyd iterations, made cheap by the one dimension: after one sort, every cluster is a
contiguous run of the sorted values whose edges are the midpoints between neighbouring
centroids, so an iteration is k binary searches plus k differences of a float64 prefix sum
(O(k log n), against O(n k) for a general k-means). Plain Lloyd still creeps in 1-D, so after
a first stretch of plain steps it runs with Nesterov momentum, restarted whenever the error
would rise; it stops, either way, only at a Lloyd fixed point. The final mapping of values
to centroids goes through a lookup table on the values' leading bits, not a search per value.

>>> import numpy as np
>>> from wtool.transforms import Context, Transform
>>> w = np.array([[0.0, 0.1, 0.9], [1.0, 2.0, 2.2]], dtype=np.float32)
>>> Transform.create("share", {"clusters": 3}).apply(w, Context.of(w))
array([[0.05, 0.05, 0.95],
       [0.95, 2.1 , 2.1 ]], dtype=float32)
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from wtool.compressed import Scheme
from wtool.dtypes import to_storage
from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms.base import Context, Group, Transform, param

DEFAULT_CLUSTERS = 16
#: Leading key bits of the lookup table that maps values to centroids (2^20 buckets).
_LUT_BITS = 20


@dataclass(frozen=True)
class ShareParams:
    clusters: int | None = param(None, f"number of centroids k (default {DEFAULT_CLUSTERS})",
                                 low=1, high=1 << 24)
    bits: int | None = param(None, "index bits per weight: k = 2^bits (instead of clusters)",
                             low=1, high=24)
    init: str = param("linear", "initial centroids: linear (evenly spaced between min and max), "
                      "density (quantiles of the values), random (k distinct sampled values)",
                      choices=("linear", "density", "random"))
    iters: int = param(10_000, "cap on Lloyd iterations (they stop earlier, at the fixed point)",
                       low=1, high=10_000_000)
    accelerate: bool = param(True, "Nesterov momentum with restarts: the same kind of fixed point in "
                             "~50x fewer iterations; false = plain Lloyd, step for step")
    seed: int = param(0, "seed of the random init (mixed with the tensor name)", low=0)
    storage: str = param("fake", "fake: centroid values stored in the tensor's dtype; codebook: P_indices "
                         "(uint8 for k <= 256, else uint16) and P_codebook (k values, ascending)",
                         choices=("fake", "codebook"))


class Share(Transform, name="share"):
    """Weight sharing: k-means the values of each tensor into k centroids (Deep Compression).

    Lloyd's algorithm run to its fixed point: every weight sits on its nearest centroid and
    every centroid is the mean of its weights. A cluster that empties is moved onto the
    value farthest from its centroid, as scikit-learn does, so no cluster is lost. A tensor
    with at most k distinct values is already shared and comes out unchanged. NaN and Inf
    (if the --nonfinite policy lets them through) stay where they are. Reports `distinct`,
    `mse`, `iterations` and `converged` per tensor.
    """

    Params = ShareParams
    formula = "w' = c[argmin_j |w - c_j|], c = Lloyd fixed point of 1-D k-means"
    spreads_nonfinite = True
    example = "share:bits=4,init=density"

    def check(self) -> None:
        p = self.params
        if p.clusters is not None and p.bits is not None:
            raise UsageError("share: give clusters or bits, not both "
                             f"(clusters={p.clusters}, bits={p.bits})")
        if p.storage == "codebook" and self.k > 1 << 16:
            raise UsageError(f"share: storage=codebook holds at most 65536 centroids, not {self.k}")

    def split(self, info: TensorInfo) -> Group | None:
        """storage=codebook: the weight becomes indices into a per-tensor codebook."""
        if self.params.storage != "codebook":
            return None
        index_dtype = "U8" if self.k <= 256 else "U16"
        outputs = (TensorInfo(info.name + "_indices", index_dtype, info.shape),
                   TensorInfo(info.name + "_codebook", info.dtype, (self.k,)))
        scheme = Scheme("codebook", 8 if index_dtype == "U8" else 16, "float", False, "tensor")
        return Group((info.name,), outputs, note=f"{info.name} stored as {scheme.label()}", data=scheme)

    def apply_split(self, array: np.ndarray, ctx: Context) -> dict[str, np.ndarray]:
        """The shared values, rounded to the tensor's dtype, as sorted distinct values and indices;
        the codebook is padded with zeros to k entries."""
        shared = to_storage(self.apply(array, ctx), ctx.info.dtype_info)
        values, indices = np.unique(shared.reshape(-1), return_inverse=True)
        codebook = np.zeros(self.k, dtype=shared.dtype)
        codebook[:values.size] = values
        index_dtype = np.uint8 if self.k <= 256 else np.uint16
        return {ctx.name + "_indices": indices.astype(index_dtype).reshape(array.shape),
                ctx.name + "_codebook": codebook}

    @property
    def k(self) -> int:
        p = self.params
        if p.bits is not None:
            return 1 << p.bits
        return p.clusters if p.clusters is not None else DEFAULT_CLUSTERS

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        p = self.params
        work = array if array.dtype in (np.float32, np.float64) else array.astype(np.float32)
        flat = np.ascontiguousarray(work).reshape(-1)
        data = np.sort(flat)
        low, high = _finite_span(data)
        data = data[low:high]
        distinct = 1 + int(np.count_nonzero(data[1:] != data[:-1])) if data.size else 0
        if distinct <= self.k:
            ctx.extras.update(distinct=distinct, mse=0.0, iterations=0, converged=True)
            return array.copy()
        start = _initial(data, self.k, p.init, ctx.rng(p.seed))
        fit, prefix = _lloyd(data, start, p.iters, p.accelerate)
        outputs = fit.centroids.astype(flat.dtype)
        out = _map_to_centroids(flat, fit.centroids, outputs)
        if data.size < flat.size:
            out = np.where(np.isfinite(flat), out, flat)
        used = np.diff(fit.edges) > 0
        ctx.extras.update(distinct=int(np.unique(outputs[used]).size),
                          mse=max(prefix.sse(outputs.astype(np.float64), fit.edges), 0.0) / data.size,
                          iterations=fit.iterations, converged=fit.converged)
        return out.reshape(array.shape).astype(array.dtype, copy=False)


# ---------------------------------------------------------------- 1-D k-means on sorted data

_PLAIN_FIRST = 100  # plain Lloyd iterations before momentum: the coarse layout settles as plain Lloyd would
_BLOCK = 16        # prefix sums are kept per block of sorted values: 2n/16 float64s, not 2n
_CHUNK = 1 << 22   # values per pass when streaming over the whole tensor


@dataclass
class _Fit:
    centroids: np.ndarray  # float64, ascending
    edges: np.ndarray      # cluster j is data[edges[j]:edges[j + 1]]
    iterations: int
    converged: bool


def _finite_span(data: np.ndarray) -> tuple[int, int]:
    """Sorted data keeps -inf first, +inf and NaN last: the finite values are one slice."""
    if data.size == 0 or (np.isfinite(data[0]) and np.isfinite(data[-1])):
        return 0, data.size
    return (int(np.searchsorted(data, -np.inf, side="right")),
            int(np.searchsorted(data, np.inf, side="left")))


def _initial(data: np.ndarray, k: int, init: str, rng: np.random.Generator) -> np.ndarray:
    """k ascending starting centroids (float64) for sorted `data` with more than k distinct values."""
    if init == "linear":
        return np.linspace(float(data[0]), float(data[-1]), k)
    if init == "density":
        # the CDF cut into k equal steps, each taken at its middle: quantiles (j + 1/2) / k
        positions = ((np.arange(k) + 0.5) * (data.size / k)).astype(np.int64)
        return data[np.minimum(positions, data.size - 1)].astype(np.float64)
    starts = np.flatnonzero(np.concatenate(([True], data[1:] != data[:-1])))
    counts = np.diff(np.append(starts, data.size))
    # drawing data points, not distinct values: a frequent value is more likely picked
    chosen = rng.choice(starts.size, size=k, replace=False, p=counts / data.size)
    return np.sort(data[starts[chosen]].astype(np.float64))


def _floor_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The largest number of `dtype` <= each float64 value: comparing data of that dtype
    against it gives the same answer as comparing against the exact value."""
    cast = values.astype(dtype)
    above = cast > values
    if above.any():
        cast[above] = np.nextafter(cast[above], dtype.type(-np.inf))
    return cast


def _midpoints(centroids: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return _floor_to((centroids[:-1] + centroids[1:]) * 0.5 + 0.0, dtype)  # + 0.0: no -0.0


def _edges(data: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Cluster boundaries in sorted `data` for ascending centroids; a value exactly on a
    midpoint goes to the lower centroid (as argmin does)."""
    inner = np.searchsorted(data, _midpoints(centroids, data.dtype), side="right")
    return np.concatenate(([0], inner, [data.size]))


class _Prefix:
    """Sums and sums of squares of the first i sorted values, for any i, in float64.

    Stored per block of `_BLOCK` values and completed from the data on demand, so the
    memory is one byte per value; values are centred on `shift` to keep differences exact.
    """

    def __init__(self, data: np.ndarray) -> None:
        self.data = data
        self.shift = float(data[data.size // 2])
        blocks = -(-data.size // _BLOCK)
        self.sums = np.zeros(blocks + 1)
        self.squares = np.zeros(blocks + 1)
        for start in range(0, data.size, _CHUNK):
            part = data[start:start + _CHUNK].astype(np.float64)
            part -= self.shift
            first = start // _BLOCK + 1
            heads = np.arange(0, part.size, _BLOCK)
            self.sums[first:first + heads.size] = np.add.reduceat(part, heads)
            part *= part
            self.squares[first:first + heads.size] = np.add.reduceat(part, heads)
        np.cumsum(self.sums, out=self.sums)
        np.cumsum(self.squares, out=self.squares)
        self._offsets = np.arange(_BLOCK)

    def at(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        block = positions // _BLOCK
        start = block * _BLOCK
        index = np.minimum(start[:, None] + self._offsets, self.data.size - 1)
        window = self.data[index].astype(np.float64) - self.shift
        window[self._offsets >= (positions - start)[:, None]] = 0.0
        return (self.sums[block] + window.sum(axis=1),
                self.squares[block] + np.einsum("ij,ij->i", window, window))

    def clusters(self, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sizes, centred sums and centred sums of squares of the clusters between `edges`."""
        sums, squares = self.at(edges)
        return np.diff(edges), np.diff(sums), np.diff(squares)

    def sse(self, centroids: np.ndarray, edges: np.ndarray) -> float:
        """Sum of squared errors of the clusters between `edges` against `centroids`."""
        sizes, sums, squares = self.clusters(edges)
        centred = centroids - self.shift
        return float(np.sum(squares - 2.0 * centred * sums + sizes * centred * centred))


def _lloyd(data: np.ndarray, centroids: np.ndarray, iters: int, accelerate: bool) -> tuple[_Fit, _Prefix]:
    """Lloyd iterations until no assignment changes, optionally with Nesterov momentum.

    Plain Lloyd creeps in 1-D (tens of thousands of iterations for k = 256 on a Gaussian).
    With momentum — extrapolate, then one Lloyd step from there; restart whenever the error
    would rise — a few hundred do. Either way it stops only where a Lloyd step changes no
    assignment, so the centroids are the means of their clusters and every value is nearest
    its own centroid.
    """
    prefix = _Prefix(data)
    previous = current = centroids
    momentum_steps = 1
    error = np.inf
    for iteration in range(1, iters + 1):
        beta = (momentum_steps - 1) / (momentum_steps + 2) if accelerate and iteration > _PLAIN_FIRST else 0.0
        point = current + beta * (current - previous) if beta else current
        if beta and np.any(np.diff(point) < 0):
            point, beta, momentum_steps = current, 0.0, 1
        edges = _edges(data, point)
        running, _ = prefix.at(edges)
        sizes = np.diff(edges)
        filled = sizes > 0
        stepped = point.copy()
        stepped[filled] = _means(data, edges, running, filled, prefix.shift)
        if not filled.all():
            stepped = _relocate(data, edges, point, stepped, sizes)
            previous = current = stepped
            momentum_steps, error = 1, np.inf
            continue
        new_edges = _edges(data, stepped)
        if np.array_equal(new_edges, edges):
            return _Fit(stepped, edges, iteration, True), prefix
        if accelerate:
            new_error = prefix.sse(stepped, new_edges)
            if new_error > error and beta:
                momentum_steps = 1  # restart: a plain step from `current` next
                continue
            error = new_error
        previous, current = current, stepped
        momentum_steps += 1
    return _Fit(current, _edges(data, current), iters, False), prefix


def _means(data: np.ndarray, edges: np.ndarray, running: np.ndarray, filled: np.ndarray,
           shift: float) -> np.ndarray:
    """Means of the filled clusters, kept inside each cluster's range: a cluster of equal
    values gets exactly that value, even where the centred sums cannot resolve it.

    A cluster of distinct values whose spread drowns in the rounding of the running sums
    (e.g. 0, 1e-38 and 4e-34 after a -1) is averaged from its values instead: otherwise its
    mean collapses onto an end, the next step empties a neighbour, and Lloyd never settles.
    Such clusters are rare and small, so the direct means cost nothing on ordinary data.
    """
    starts, ends = edges[:-1][filled], edges[1:][filled]
    sizes = ends - starts
    means = shift + np.diff(running)[filled] / sizes
    lows, highs = data[starts], data[ends - 1]
    magnitude = np.maximum(np.abs(running[:-1]), np.abs(running[1:]))[filled]
    rounding = magnitude * 2.0 ** -48 / sizes  # a generous bound on the error of each mean
    span = highs.astype(np.float64) - lows
    for j in np.flatnonzero((span > 0) & (rounding >= span * 2.0 ** -20)):
        means[j] = float(np.mean(data[starts[j]:ends[j]], dtype=np.float64))
    return np.clip(means, lows, highs)


def _relocate(data: np.ndarray, edges: np.ndarray, old: np.ndarray, new: np.ndarray,
              sizes: np.ndarray) -> np.ndarray:
    """Move each empty cluster onto one of the values farthest from the centroid they were
    assigned to (`old`), as scikit-learn does; `new` holds the means of the filled clusters.

    The farthest values of a contiguous cluster sit at its two ends, so a heap over the
    cluster ends yields them in order without looking at the interior; of equally far
    values the lowest goes first. A chosen value takes all its copies along (they would
    follow it at the next assignment anyway) and leaves its old cluster's mean. A cluster
    never gives up its last value: that would only move the hole (scikit-learn does, and
    leaves that centroid at 0). With more distinct values than clusters, which the caller
    ensures, there are always enough values to take. The donor's new mean is taken from its
    remaining values (a contiguous run), which running sums could not resolve for tiny values.
    """
    heap: list[tuple[float, int, int, int]] = []  # (-distance, position, cluster, direction)
    ends: dict[int, list[int]] = {}  # cluster -> [lowest, highest] position not yet taken
    for j in np.flatnonzero(sizes > 0).tolist():
        low, high = int(edges[j]), int(edges[j + 1]) - 1
        ends[j] = [low, high]
        heap.append((-abs(float(data[low]) - old[j]), low, j, 1))
        heap.append((-abs(float(data[high]) - old[j]), high, j, -1))
    heapq.heapify(heap)
    moved = new.copy()
    for target in np.flatnonzero(sizes == 0).tolist():
        while heap:
            _, position, j, direction = heapq.heappop(heap)
            low, high = ends[j]
            if not low <= position <= high:
                continue  # taken from the other end already
            value = data[position]
            first = int(np.searchsorted(data, value, side="left"))
            after = int(np.searchsorted(data, value, side="right"))
            if first > low or after <= high:
                break
            # the cluster's last value: taking it would only move the hole
        else:  # pragma: no cover - impossible with more distinct values than clusters
            break
        moved[target] = float(value)
        if direction == 1:
            ends[j][0] = after
        else:
            ends[j][1] = first - 1
        low, high = ends[j]
        if low <= high:
            moved[j] = float(np.mean(data[low:high + 1], dtype=np.float64))
            nxt = low if direction == 1 else high
            heapq.heappush(heap, (-abs(float(data[nxt]) - old[j]), nxt, j, direction))
    return np.sort(moved)


# ---------------------------------------------------------------- mapping values to centroids

def _order_keys(values: np.ndarray) -> np.ndarray:
    """Unsigned integers that sort like the floats (negative values: all bits flipped)."""
    size = values.dtype.itemsize
    unsigned = np.dtype(f"u{size}")
    negative = (values.view(f"i{size}") >> (8 * size - 1)).view(unsigned)
    return values.view(unsigned) ^ (negative | unsigned.type(1 << (8 * size - 1)))


def _map_to_centroids(flat: np.ndarray, centroids: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """outputs[j] for each value, j its nearest centroid (ties go low), without a search per value.

    Values are bucketed by the leading `_LUT_BITS` bits of their order key: a table answers
    for every bucket that no midpoint splits, a binary search for the few values of the others.
    """
    unsigned = np.dtype(f"u{flat.dtype.itemsize}")
    # cluster of a value = how many boundaries its key reaches
    boundaries = _order_keys(_midpoints(centroids, flat.dtype)) + unsigned.type(1)
    out = np.empty_like(flat)
    if flat.size < (1 << _LUT_BITS):
        out[:] = outputs[np.searchsorted(boundaries, _order_keys(flat), side="right")]
        return out
    shift = unsigned.type(8 * flat.dtype.itemsize - _LUT_BITS)
    bucket_of = (boundaries >> shift).astype(np.intp)
    reached = np.cumsum(np.bincount(bucket_of, minlength=1 << _LUT_BITS))  # by a bucket's end
    at_start = np.bincount(bucket_of[(boundaries & ((unsigned.type(1) << shift) - 1)) == 0],
                           minlength=1 << _LUT_BITS)
    first = np.concatenate(([0], reached[:-1])) + at_start  # by a bucket's start
    table, split_table = outputs[first], first != reached
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        keys = _order_keys(part)
        keys >>= shift
        out[start:start + part.size] = table[keys]
        split = np.flatnonzero(split_table[keys])
        if split.size:
            out[start + split] = outputs[np.searchsorted(boundaries, _order_keys(part[split]),
                                                         side="right")]
    return out
