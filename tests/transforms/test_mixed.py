"""quantize:bits=auto: the budget holds, the choice beats uniform grids, each tensor is what a
plain quantize step with its chosen grid gives, and the allocator is near a brute-force optimum
of the damage estimate."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import scipy.stats
from safetensors.numpy import load_file, save_file

from wtool import Pipeline, UsageError, run
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform
from wtool.transforms._mixed import allocate


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    """A big Gaussian tensor, small ones, and one whose rows carry strong outliers."""
    rng = np.random.default_rng(seed)
    outliers = rng.normal(size=(32, 256)).astype(np.float32)
    outliers[np.arange(32), rng.integers(0, 256, 32)] = 60.0
    return {"embed.weight": rng.normal(size=(512, 128)).astype(np.float32),
            "layer.0.weight": rng.normal(size=(64, 128)).astype(np.float32),
            "layer.1.weight": rng.laplace(size=(64, 128)).astype(np.float32),
            "layer.2.weight": outliers, "layer.2.bias": np.zeros(32, np.float32)}


def _grid_bits(label: str, shape: tuple[int, ...]) -> float:
    """Bits per weight of a grid label such as '4-bit asym group 128', from its definition."""
    bits, scheme, size = re.fullmatch(r"(\d)-bit (asym|sym) group (\d+)", label).groups()
    groups = shape[0] * -(-shape[1] // int(size))
    return int(bits) + groups * (32 if scheme == "asym" else 16) / (shape[0] * shape[1])


def _rel2(a: np.ndarray, b: np.ndarray) -> float:
    a64 = a.astype(np.float64)
    return float(np.sum((b.astype(np.float64) - a64) ** 2) / np.sum(a64 ** 2))


def _bulk_damage(w: np.ndarray, q: np.ndarray) -> float:
    """Noise power over n·σ², σ² estimated robustly from the median of the non-zero w² (the
    estimate of the module's docstring)."""
    w64 = w.astype(np.float64)
    sigma2 = np.median(w64[w64 != 0] ** 2) / scipy.stats.chi2.ppf(0.5, df=1)
    return float(np.sum((q - w64) ** 2) / (w.size * sigma2))


@pytest.mark.parametrize("avg_bits", [3.0, 4.3, 5.0, 7.0])
def test_auto_meets_the_budget_and_each_tensor_is_its_chosen_grid(tmp_path, avg_bits):
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    weights = _weights()
    save_file(weights, source)
    report = run(Pipeline.from_specs([f"quantize:bits=auto,avg_bits={avg_bits}"]), source, out)
    result = load_file(out)
    sizes, spent = 0, 0.0
    for record in report.tensors:
        if record.name.endswith("bias"):
            assert not record.extras and np.array_equal(result[record.name], weights[record.name])
            continue
        label = record.extras["quantize.grid"]
        bits, scheme, size = re.fullmatch(r"(\d)-bit (asym|sym) group (\d+)", label).groups()
        plain = Transform.create("quantize", {"bits": bits, "scheme": scheme, "granularity": "group",
                                              "group_size": size, "remainder": "ok"})
        np.testing.assert_array_equal(result[record.name], plain.apply(weights[record.name], Context.of(weights[record.name], record.name)))
        shape = weights[record.name].shape
        assert record.extras["quantize.bits_per_weight"] == pytest.approx(_grid_bits(label, shape))
        sizes += weights[record.name].size
        spent += weights[record.name].size * _grid_bits(label, shape)
    assert spent / sizes <= avg_bits + 1e-9
    assert report.totals["quantized_bits_per_weight"] == pytest.approx(spent / sizes)
    assert spent / sizes >= avg_bits - 0.6  # the budget is used, not wasted


def test_auto_beats_a_uniform_grid_of_the_same_cost(tmp_path):
    source = tmp_path / "in.safetensors"
    weights = {k: v for k, v in _weights(1).items() if v.ndim == 2}
    save_file(weights, source)
    uniform = run(Pipeline.from_specs(["quantize:bits=4,group_size=64"]), source, tmp_path / "u.safetensors")
    auto = run(Pipeline.from_specs([f"quantize:bits=auto,avg_bits={uniform.totals['quantized_bits_per_weight']}"]),
               source, tmp_path / "a.safetensors")

    def damage(path):
        result = load_file(path)
        return sum(_rel2(weights[n], result[n]) for n in weights)

    assert damage(tmp_path / "a.safetensors") < 0.7 * damage(tmp_path / "u.safetensors")
    grids = {r.name: r.extras["quantize.grid"] for r in auto.tensors}
    assert int(grids["layer.2.weight"][0]) > int(grids["embed.weight"][0])  # bits go where outliers are


def test_allocation_is_near_the_brute_force_optimum():
    weights = {k: v for k, v in _weights(2).items() if v.ndim == 2}
    candidates = [Transform.create("quantize", {"bits": b, "scheme": s, "granularity": "group", "group_size": g,
                                                "remainder": "ok"})
                  for b, s, g in [(2, "asym", 128), (3, "sym", 64), (4, "asym", 128), (4, "asym", 32), (6, "sym", 128)]]
    infos = [(TensorInfo(n, "F32", w.shape), (lambda w=w: w)) for n, w in weights.items()]
    size = sum(w.size for w in weights.values())
    table = {(n, i): (_bulk_damage(w, c.apply(w, Context.of(w))), c.bits_per_weight(w.shape)) for n, w in weights.items()
             for i, c in enumerate(candidates)}
    for budget in (3.0, 3.6, 4.4, 5.2):
        best = min(sum(table[n, i][0] for n, i in zip(weights, combo))
                   for combo in itertools.product(range(len(candidates)), repeat=len(weights))
                   if sum(weights[n].size * table[n, i][1] for n, i in zip(weights, combo)) <= budget * size)
        chosen = allocate(infos, candidates, budget)
        picks = {n: candidates.index(chosen[n]) for n in weights}
        assert sum(weights[n].size * table[n, i][1] for n, i in picks.items()) <= budget * size
        assert sum(table[n, i][0] for n, i in picks.items()) <= 1.1 * best


@pytest.mark.parametrize("spec, message", [
    ("quantize:bits=auto", "go together"),
    ("quantize:bits=4,avg_bits=4", "go together"),
    ("quantize:bits=auto,avg_bits=4,granularity=channel", "leave them out"),
    ("quantize:bits=auto,avg_bits=4,scheme=sym", "leave them out"),
    ("quantize:bits=auto,avg_bits=4,group_size=32", "leave them out"),
    ("quantize:bits=many", r"parameter bits=.many.: expected an int in \[2, 8\] or auto"),
])
def test_bad_auto_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        Pipeline.from_specs([spec])


def test_a_budget_below_every_choice_writes_nothing(tmp_path):
    source, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({"w": np.ones((4, 64), np.float32)}, source)
    with pytest.raises(UsageError, match=r"avg_bits=2.1 is below .*cheapest choice.*2\.25"):
        run(Pipeline.from_specs(["quantize:bits=auto,avg_bits=2.1"]), source, out)
    assert not out.exists()
