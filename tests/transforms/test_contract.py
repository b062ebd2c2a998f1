"""One contract over every registered transform: adding a transform file gets it checked here."""

from __future__ import annotations

import numpy as np
import pytest

from wtool.pipeline import Step
from wtool.tensor import TensorInfo
from wtool.transforms import REGISTRY, Context, GroupPlan, GroupTransform, Transform

NAMES = sorted(REGISTRY)
SINGLE = [n for n in NAMES if not issubclass(REGISTRY[n], GroupTransform)]


def test_the_classic_methods_are_all_registered():
    expected = {"clip", "sparsify", "quantize", "cast", "weight-norm", "spectral-norm", "standardize",
                "fold-weight-norm", "split-weight-norm", "fold-spectral-norm", "fold-prune", "fold-bn", "fold-norm"}
    assert expected <= set(REGISTRY)


@pytest.mark.parametrize("name", NAMES)
def test_self_description(name):
    cls = REGISTRY[name]
    assert cls.name == name
    assert cls.summary() and cls.summary()[0].isupper() and len(cls.summary()) < 120
    assert cls.formula, f"{name} has no formula"
    assert cls.applies_to
    assert cls.example.split(":")[0] == name, "example must be a -t spec of this transform"
    for row in cls.describe_params():
        assert row["help"], f"{name}.{row['name']} has no help text"
    step = Step.parse(cls.example)  # the documented example parses and validates
    assert step.op == name


def test_duplicate_names_are_refused():
    with pytest.raises(TypeError, match="registered twice"):
        class Again(Transform, name="clip"):
            """Duplicate."""


def test_a_transform_needs_a_docstring():
    with pytest.raises(TypeError, match="docstring"):
        class Silent(Transform, name="silent-test-transform"):
            pass


@pytest.mark.parametrize("name", SINGLE)
@pytest.mark.parametrize("shape", [(16, 128), (4, 3, 2, 128)])  # examples use group_size=128
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_apply_keeps_shape_and_dtype_never_mutates_and_is_deterministic(name, shape, dtype):
    transform = Step.parse(REGISTRY[name].example).transform
    if transform.companion_paths():
        pytest.skip(f"{name}'s example streams a companion checkpoint (tested in its own module)")
    array = np.random.default_rng(0).normal(size=shape).astype(dtype)
    original = array.copy()
    array.setflags(write=False)  # inputs may be read-only memory maps
    info = TensorInfo("layer.weight", "F64" if dtype == np.float64 else "F32", shape)
    first = transform.apply(array, Context(info))
    second = transform.apply(array, Context(info))
    np.testing.assert_array_equal(array, original)
    assert first.shape == shape and first.dtype == dtype
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", [n for n in NAMES if issubclass(REGISTRY[n], GroupTransform)])
def test_group_transforms_plan_nothing_on_an_empty_checkpoint(name):
    transform = Step.parse(REGISTRY[name].example).transform
    plan = transform.plan([], lambda _: True)
    assert isinstance(plan, GroupPlan) and plan.groups == ()
