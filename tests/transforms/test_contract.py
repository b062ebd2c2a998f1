"""One contract over every registered transform: adding a transform file gets it checked here."""

from __future__ import annotations

import dataclasses

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
            formula = "w' = w"  # everything a transform declares but its docstring


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


def _declared(cls: type[Transform], key: str) -> list[str]:
    return [f.name for f in dataclasses.fields(cls.Params) if f.metadata.get(key)]


@pytest.mark.parametrize("name", NAMES)
def test_a_first_pass_is_declared_exactly_when_fit_is_implemented(name):
    cls = REGISTRY[name]
    assert bool(_declared(cls, "fit_when")) == (cls.fit is not Transform.fit)


@pytest.mark.parametrize("name", NAMES)
def test_companions_are_declared_not_listed_by_hand(name):
    assert REGISTRY[name].companion_paths is Transform.companion_paths, "use param(kind='checkpoint')"


@pytest.mark.parametrize("spec, finite, fit", [
    ("clip:c=1", False, False), ("clip:percentile=99", True, False), ("clip:sigma=3", True, False),
    ("sparsify:threshold=0.1", False, False), ("sparsify:fraction=0.5", True, False),
    ("sparsify:fraction=0.5,scope=global", True, True), ("sparsify:nm=2:4", True, False),
    ("quantize", True, False), ("cast:dtype=float16", False, False), ("fold-bn", True, False),
])
def test_what_is_derived_from_the_declarations(spec, finite, fit):
    transform = Step.parse(spec).transform
    assert (transform.needs_finite, transform.needs_fit) == (finite, fit)


def test_decay_companions_follow_its_declared_parameters():
    transform = Step.parse("decay:lr=0.1,wd=0.1,anchor=a.safetensors,grads=g.safetensors").transform
    assert transform.companion_paths() == {"grads": "g.safetensors", "anchor": "a.safetensors"}


@pytest.mark.parametrize("name", SINGLE)
def test_min_ndim_is_the_default_skip_rule(name):
    transform = Step.parse(REGISTRY[name].example).transform
    below = TensorInfo("v", "F32", (4,) * (transform.min_ndim - 1)) if transform.min_ndim else None
    if below is not None:
        assert transform.skip(below) is not None
    assert transform.skip(TensorInfo("ids", "I64", (4, 4))).hard


OWNED_SPECS = sorted({REGISTRY[n].example for n in SINGLE} | {
    "quantize:bits=4,scheme=asym,granularity=group,group_size=8",
    "quantize:bits=3,scheme=sym,granularity=group,group_size=8", "clip:c=0.3", "clip:percentile=90"})


@pytest.mark.parametrize("spec", OWNED_SPECS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_step_that_owns_its_input_gives_the_bytes_of_one_that_does_not(spec, dtype):
    """`Context.owned`: a transform may write its result over an input made for it alone (a
    bfloat16 weight's float32 copy); the bytes are those it makes from a read-only input.
    Rows of one repeated value (-0.0 among them) are the ones a quantizer keeps as they are."""
    transform = Step.parse(spec).transform
    if transform.companion_paths():
        pytest.skip(f"{spec} streams a companion checkpoint")
    array = np.random.default_rng(1).normal(size=(16, 128)).astype(dtype)
    array[0], array[1], array[2, :8], array[3, 8:16] = -0.0, 0.5, -0.0, 0.0
    info = TensorInfo("layer.weight", "F64" if dtype == np.float64 else "F32", array.shape)
    kept = array.copy()
    kept.setflags(write=False)
    reference = transform.apply(kept, Context(info))
    owned = array.copy()
    result = transform.apply(owned, Context(info, owned=True))
    assert result.dtype == reference.dtype and result.shape == reference.shape
    assert result.tobytes() == reference.tobytes()
