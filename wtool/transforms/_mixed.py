"""Mixed precision under a bit budget: which grid each tensor gets for `quantize:bits=auto`.

Data-free. Each tensor (up to `SAMPLE` weights of it, in whole rows) is quantized once with
every candidate grid, and the damage of a choice is its noise power relative to the power of
the tensor's bulk, ‖w_q − w‖²/(n·σ²) with σ² from the median of w² (see `_damages`): a linear layer's output
error relative to its output grows with it whatever the layer's size, and the errors of the
layers add up along the network. So a tensor's damage is *not* weighted by its size, while
its cost is: n·bits_per_weight. Minimising Σ damage subject to Σ n·bits ≤ avg_bits·Σ n is a
multiple-choice knapsack, solved by dynamic programming over the budget in `STEPS` units.

On all-MiniLM-L6-v2 this sends the word embeddings (half the weights, looked up rather than
multiplied) to 3 bits and the FFN output projections, which carry outliers, to 5-6 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms.base import Context

STEPS = 20_000  # the budget's resolution in the knapsack: rounding costs up loses at most tensors/STEPS of it
SAMPLE = 1 << 18  # weights per tensor on which each candidate's damage is measured
CHI2_MEDIAN = 0.454936423119572  # median of w²/σ² for Gaussian w: the chi-squared(1) median


class Grid(Protocol):
    """A candidate: a transform that can say what it costs."""

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray: ...

    def bits_per_weight(self, shape: tuple[int, ...]) -> float: ...


def allocate(tensors: Sequence[tuple[TensorInfo, Callable[[], np.ndarray]]], candidates: Sequence[Grid],
             avg_bits: float) -> dict[str, Grid]:
    """The candidate for each tensor, minimising Σ rel_l2² with Σ n·bits_per_weight ≤ avg_bits·Σ n."""
    sizes = np.array([info.numel for info, _ in tensors], dtype=np.float64)
    costs = np.array([[c.bits_per_weight(info.shape) for c in candidates] for info, _ in tensors]).reshape(
        len(tensors), len(candidates))
    samples = (_sample(load()) for _, load in tensors)
    damage = np.array([_damages(sample, candidates) for sample in samples]).reshape(costs.shape)
    budget = avg_bits * sizes.sum()
    pick = _knapsack(damage, costs * sizes[:, None], budget)
    if pick is None:
        cheapest = float(sizes @ costs.min(axis=1)) / sizes.sum()
        raise UsageError(f"quantize: avg_bits={avg_bits:g} is below (or within rounding of) the cheapest choice "
                         f"for these tensors ({cheapest:.4g} bits per weight)")
    return {info.name: candidates[j] for (info, _), j in zip(tensors, pick)}


def _sample(array: np.ndarray) -> np.ndarray:
    """Whole rows (last axis), evenly spaced, about `SAMPLE` weights: every candidate grid runs
    along rows, so a row quantizes as it would in the whole tensor."""
    rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
    if rows.size <= SAMPLE:
        return rows
    keep = max(1, SAMPLE // rows.shape[1])
    return rows[np.unique(np.linspace(0, rows.shape[0] - 1, keep).round().astype(np.intp))]


def _damages(sample: np.ndarray, candidates: Sequence[Grid]) -> list[float]:
    """Each candidate's noise power relative to the power of the tensor's *bulk*: n·median(w² ≠ 0)/0.4549,
    the variance for Gaussian weights. Against the plain ‖w‖², a few outliers that hold most of
    the energy would hide that a coarse grid flattens every other value (numpy's pairwise sums:
    no BLAS threads to wait for)."""
    squares = np.square(sample, dtype=np.float64)
    squares = squares[squares > 0]  # a sparse tensor's bulk is its non-zero values
    power = float(np.median(squares)) / CHI2_MEDIAN * sample.size if squares.size else 0.0
    out = []
    for candidate in candidates:
        noise = float(np.square(candidate.apply(sample, Context.of(sample)) - sample, dtype=np.float64).sum())
        out.append(noise / power if power > 0 else (0.0 if noise == 0 else float("inf")))
    return out


def _knapsack(damage: np.ndarray, spend: np.ndarray, budget: float) -> np.ndarray | None:
    """Multiple-choice knapsack by dynamic programming over the budget in `STEPS` units, each
    tensor's cost rounded up (so the result always fits): exact up to that rounding. None
    when even the cheapest choices do not fit."""
    unit = budget / STEPS
    weights = np.ceil(spend / unit - 1e-9).astype(np.int64)
    if weights.min(axis=1).sum() > STEPS:
        return None
    best = np.zeros(STEPS + 1)  # least damage of the tensors so far within b units
    choices = np.zeros((len(damage), STEPS + 1), dtype=np.int16)
    for i in range(len(damage)):
        options = np.full((damage.shape[1], STEPS + 1), np.inf)
        for j, cost in enumerate(weights[i]):
            if cost <= STEPS:
                options[j, cost:] = best[:STEPS + 1 - cost] + damage[i, j]
        choices[i] = options.argmin(axis=0)
        best = options[choices[i], np.arange(STEPS + 1)]
    pick = np.zeros(len(damage), dtype=np.intp)
    left = STEPS
    for i in reversed(range(len(damage))):
        pick[i] = choices[i, left]
        left -= weights[i, pick[i]]
    return pick
