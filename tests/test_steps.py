"""Step execution (wtool.steps): evaluations per tensor, long chains, per-step plans."""

from __future__ import annotations

import collections
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from wtool import Pipeline, open_checkpoint, plan, run
from wtool import steps as steps_module
from wtool.errors import UsageError
from wtool.transforms.clip import Clip

GLOBAL = ["clip:percentile=99", "sparsify:fraction=0.5,scope=global"]


def checkpoint(tmp_path: Path, *, nonfinite: bool = False) -> Path:
    rng = np.random.default_rng(3)
    tensors = {f"layer{i}.weight": rng.normal(size=(8, 16)).astype(np.float32) for i in range(3)}
    if nonfinite:
        tensors["layer1.weight"][0, 0] = np.nan
    path = tmp_path / "in.safetensors"
    save_file(tensors, path)
    return path


@pytest.mark.parametrize("policy", ["skip", "zero"])
def test_a_global_fit_runs_earlier_steps_at_most_twice_per_tensor(tmp_path, monkeypatch, policy):
    calls: collections.Counter[str] = collections.Counter()
    original = Clip.apply

    def counting(self, array, ctx):
        calls[ctx.name] += 1
        return original(self, array, ctx)

    monkeypatch.setattr(Clip, "apply", counting)
    run(Pipeline.from_specs(GLOBAL, nonfinite=policy), checkpoint(tmp_path, nonfinite=True),
        tmp_path / "out.safetensors")
    # once for the fit (cached over its three passes), once when the tensor is written
    expected = {"layer0.weight": 2, "layer2.weight": 2}
    if policy == "zero":
        expected["layer1.weight"] = 2
    else:  # clip leaves the NaN tensor alone before calling apply
        assert calls["layer1.weight"] == 0
        del calls["layer1.weight"]
    assert dict(calls) == expected


def test_fit_inputs_spilled_to_disk_give_the_same_bytes(tmp_path, monkeypatch):
    source = checkpoint(tmp_path)
    run(Pipeline.from_specs(GLOBAL), source, tmp_path / "memory.safetensors")
    monkeypatch.setattr(steps_module, "FIT_CACHE_BYTES", 0)
    spilled = []
    original = steps_module._FitCache.get

    def watching(self, key, compute):
        value = original(self, key, compute)
        spilled.append(self.folder is not None)
        return value

    monkeypatch.setattr(steps_module._FitCache, "get", watching)
    run(Pipeline.from_specs(GLOBAL), source, tmp_path / "disk.safetensors")
    assert spilled and all(spilled)
    assert (tmp_path / "memory.safetensors").read_bytes() == (tmp_path / "disk.safetensors").read_bytes()


def test_ten_thousand_steps_plan_without_recursion_in_linear_memory(tmp_path):
    source = checkpoint(tmp_path)

    def planned_bytes(count: int) -> int:
        pipe = Pipeline.from_specs(["clip:c=100"] * count)
        with open_checkpoint(source) as reader:
            tracemalloc.start()
            try:
                the_plan = plan(pipe, reader)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert the_plan.chains[0].ops() == ["clip"] * count
        return peak

    small, large = planned_bytes(2_500), planned_bytes(10_000)
    assert large < 5 * small  # 4x the steps: linear, not quadratic (16x)
    report = run(Pipeline.from_specs(["clip:c=100"] * 10_000), source, None, dry_run=True)
    assert len(report.tensors[0].steps) == 10_000


def test_a_long_chain_of_group_and_tensor_steps_runs_without_recursion(tmp_path):
    rng = np.random.default_rng(5)
    weight = rng.normal(size=(4, 6)).astype(np.float32)
    save_file({"fc.weight": weight}, tmp_path / "in.safetensors")
    round_trip = ["split-weight-norm", "fold-weight-norm", "clip:c=100"] * 400
    report = run(Pipeline.from_specs(round_trip), tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    assert report.tensors[0].steps == ["split-weight-norm", "fold-weight-norm", "clip"] * 400
    np.testing.assert_allclose(load_file(tmp_path / "out.safetensors")["fc.weight"], weight, rtol=1e-4, atol=1e-6)


def test_a_step_that_selects_nothing_quotes_its_own_note_only(tmp_path):
    rng = np.random.default_rng(0)
    bn = {f"bn1.{leaf}": rng.random(4).astype(np.float32) + 0.5
          for leaf in ("weight", "bias", "running_mean", "running_var")}
    lonely = {f"head.{leaf}": rng.random(4).astype(np.float32) + 0.5
              for leaf in ("weight", "bias", "running_mean", "running_var")}
    save_file({"conv1.weight": rng.normal(size=(4, 3, 1, 1)).astype(np.float32), **bn, **lonely},
              tmp_path / "in.safetensors")
    with pytest.raises(UsageError) as caught:
        run(Pipeline.from_specs(["fold-bn", "fold-prune"]), tmp_path / "in.safetensors", None, dry_run=True)
    assert str(caught.value).startswith("step 2 (fold-prune) selects no tensor;")
    assert "fold-bn" not in str(caught.value)
    with pytest.raises(UsageError, match=r"step 2 \(fold-bn\) selects no tensor \(fold-bn: head: left unpaired"):
        run(Pipeline.from_specs(["fold-bn:pairs=conv1:bn1", "fold-bn"]), tmp_path / "in.safetensors", None,
            dry_run=True)


def test_extras_belong_to_one_evaluation(tmp_path):
    source = checkpoint(tmp_path, nonfinite=True)
    report = run(Pipeline.from_specs(["clip:sigma=3", "clip:sigma=2"], nonfinite="zero"), source,
                 tmp_path / "out.safetensors")
    extras = {r.name: r.extras for r in report.tensors}
    assert extras["layer1.weight"] == {"clip.nonfinite": "1 zeroed"}
    assert extras["layer0.weight"] == {}


@pytest.mark.parametrize("values, found", [
    ([3e38, 3e38, -1.0], None),  # finite values whose sum overflows: nothing to report
    ([np.nan, 1.0, 2.0], "1 zeroed"), ([np.inf, -np.inf, 2.0], "2 zeroed"), ([np.inf, 1.0, 1.0], "1 zeroed"),
])
def test_nonfinite_guard_counts_what_is_there(values, found):
    from wtool.recipe import Step

    step_run = steps_module.StepRun(Step.parse("clip:sigma=3"), policy="zero", source="in.safetensors")
    array = np.array(values, np.float32)
    extras: dict = {}
    guarded = step_run._guard("w", array, extras)
    assert extras.get("clip.nonfinite") == found
    assert np.isfinite(guarded).all() and (found is not None or guarded is array)
