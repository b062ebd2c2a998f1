"""The normalization family against torch's own results, and the naming logic of the fold-* plans.

References come from fixtures/make_reference.py (committed under fixtures/reference/), so
these tests need no torch; when torch is importable one test regenerates them and compares.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.numpy import load_file

from wtool.dtypes import by_code, by_numpy
from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms import REGISTRY, GroupPlan, GroupTransform, Transform

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
REFERENCE = FIXTURES / "reference"
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())
FAMILY = ("weight-norm", "fold-weight-norm", "split-weight-norm", "spectral-norm", "fold-spectral-norm",
          "fold-prune", "standardize", "fold-bn", "fold-norm")


# ---------------------------------------------------------------- helpers

def load_case(name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    return (load_file(str(REFERENCE / f"{name}.safetensors")),
            load_file(str(REFERENCE / f"{name}.expected.safetensors")), MANIFEST["cases"][name])


def infos(state: Mapping[str, np.ndarray], code: str | None = None) -> list[TensorInfo]:
    return [TensorInfo(n, code or by_numpy(a.dtype).code, a.shape) for n, a in state.items()]


def everything(name: str) -> bool:
    return True


def run_group(transform: GroupTransform, state: Mapping[str, np.ndarray],
              selected: Callable[[str], bool] = everything, **plan_options) -> tuple[dict[str, np.ndarray], GroupPlan]:
    """What the pipeline does with a group transform: plan, apply each group, drop and add tensors."""
    plan = transform.plan(infos(state), selected, **plan_options)
    result = dict(state)
    for group in plan.groups:
        arrays = {n: state[n].astype(by_numpy(state[n].dtype).compute) if by_numpy(state[n].dtype).is_float
                  else state[n] for n in group.inputs}
        before = {n: a.copy() for n, a in arrays.items()}
        produced = transform.apply_group(group, arrays)
        for n, a in arrays.items():
            np.testing.assert_array_equal(a, before[n], err_msg=f"{transform.name} mutated {n}")
        assert set(produced) == {o.name for o in group.outputs}
        for name in group.dropped:
            del result[name]
        for out in group.outputs:
            assert produced[out.name].shape == out.shape, out.name
            result[out.name] = produced[out.name].astype(by_code(out.dtype).numpy)
    return result, plan


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: int = 1, padding: int = 0,
           groups: int = 1) -> np.ndarray:
    """torch.nn.functional.conv2d in float64 by im2col."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    out_channels, per_group, kh, kw = weight.shape
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]
    n, channels, height, width = windows.shape[:4]
    windows = windows.reshape(n, groups, channels // groups, height, width, kh, kw)
    kernels = weight.astype(np.float64).reshape(groups, out_channels // groups, per_group, kh, kw)
    out = np.einsum("ngchwij,gocij->ngohw", windows, kernels).reshape(n, out_channels, height, width)
    return out if bias is None else out + bias.astype(np.float64)[None, :, None, None]


def rms_norm(x: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + eps)


def layer_norm(x: np.ndarray, eps: float) -> np.ndarray:
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered / np.sqrt(np.mean(np.square(centered), axis=-1, keepdims=True) + eps)


def linear(x: np.ndarray, state: Mapping[str, np.ndarray], prefix: str) -> np.ndarray:
    out = x.astype(np.float64) @ state[join(prefix, "weight")].astype(np.float64).T
    bias = state.get(join(prefix, "bias"))
    return out if bias is None else out + bias


def join(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def close(actual: np.ndarray, expected: np.ndarray, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- registration

@pytest.mark.parametrize("name", FAMILY)
def test_registered_with_summary_formula_and_working_example(name: str) -> None:
    cls = REGISTRY[name]
    assert cls.summary() and cls.formula and cls.applies_to
    spec_name, _, options = cls.example.partition(":")
    assert spec_name == name
    pairs = dict(item.split("=", 1) for item in options.split(",") if item)
    assert isinstance(Transform.create(name, pairs), cls)


@pytest.mark.parametrize(("name", "options", "match"), [
    ("weight-norm", {"norm": "0"}, "must be > 0"),
    ("weight-norm", {"dim": "x"}, "expected int"),
    ("spectral-norm", {"method": "lanczos"}, "expected one of power, svd"),
    ("spectral-norm", {"tol": "0"}, "must be > 0"),
    ("split-weight-norm", {"layout": "new"}, "expected one of legacy, parametrizations"),
    ("standardize", {"eps": "-1"}, "must be >= 0"),
])
def test_bad_options_are_usage_errors(name: str, options: dict, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        Transform.create(name, options)


def test_dim_none_parses_for_whole_tensor_modes() -> None:
    assert Transform.create("weight-norm", {"dim": "none"}).params.dim is None
    assert Transform.create("standardize", {"dim": "None"}).params.dim is None
    assert Transform.create("fold-spectral-norm", {"dim": "1"}).params.dim == 1


# ---------------------------------------------------------------- torch references

def test_reference_fixtures_are_small() -> None:
    assert sum(p.stat().st_size for p in REFERENCE.iterdir()) < 1_000_000


@pytest.mark.parametrize("case", ["weight_norm_legacy_conv", "weight_norm_parametrized_linear",
                                  "weight_norm_parametrized_conv1d_dim2", "weight_norm_legacy_linear_whole"])
def test_fold_weight_norm_matches_torch(case: str) -> None:
    state, expected, settings_ = load_case(case)
    result, plan = run_group(Transform.create("fold-weight-norm"), state)
    assert len(plan.groups) == 1 and not plan.notes
    assert set(result) == {"weight"} | ({"bias"} & set(state))
    close(result["weight"], expected["folded.weight"], rtol=2e-6, atol=1e-7)
    if "output.conv" in expected:
        close(conv2d(expected["input"], result["weight"], result["bias"], **settings_["conv"]), expected["output.conv"])
    if "output.linear" in expected:
        close(linear(expected["input"], result, "").astype(np.float32), expected["output.linear"])


def test_fold_weight_norm_infers_dim_from_g() -> None:
    state, _, _ = load_case("weight_norm_parametrized_conv1d_dim2")
    plan = Transform.create("fold-weight-norm").plan(infos(state), everything)
    assert plan.groups[0].data.dim == 2
    state, _, _ = load_case("weight_norm_legacy_linear_whole")
    assert Transform.create("fold-weight-norm").plan(infos(state), everything).groups[0].data.dim is None


@pytest.mark.parametrize("layout", ["legacy", "parametrizations"])
@pytest.mark.parametrize("dim", ["0", "2", "none"])
def test_split_then_fold_weight_norm_round_trips(layout: str, dim: str) -> None:
    state, expected, _ = load_case("weight_norm_legacy_conv")
    plain = {"conv.weight": expected["folded.weight"], "conv.bias": state["bias"]}
    split, plan = run_group(Transform.create("split-weight-norm", {"layout": layout, "dim": dim}), plain)
    assert plan.notes == ("left 1 selected tensor(s) with ndim < 2 alone",)
    g_name = "conv.weight_g" if layout == "legacy" else "conv.parametrizations.weight.original0"
    g_shape = {"0": (4, 1, 1, 1), "2": (1, 1, 3, 1), "none": ()}[dim]
    assert split[g_name].shape == g_shape
    folded, _ = run_group(Transform.create("fold-weight-norm"), split)
    assert sorted(folded) == ["conv.bias", "conv.weight"]
    close(folded["conv.weight"], plain["conv.weight"], rtol=1e-6, atol=1e-7)


def test_split_weight_norm_matches_torch_layout() -> None:
    state, expected, _ = load_case("weight_norm_legacy_conv")
    split, _ = run_group(Transform.create("split-weight-norm"), {"weight": expected["folded.weight"]})
    assert split["weight_g"].shape == state["weight_g"].shape
    close(split["weight_g"], state["weight_g"], rtol=1e-6)
    # v is only defined up to a positive factor per slice; torch keeps the original v
    unit = split["weight_v"] / np.linalg.norm(split["weight_v"].reshape(4, -1), axis=1)[:, None, None, None]
    torch_unit = state["weight_v"] / np.linalg.norm(state["weight_v"].reshape(4, -1), axis=1)[:, None, None, None]
    close(unit, torch_unit, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("case", "dim"), [
    ("spectral_norm_legacy_conv", 0), ("spectral_norm_parametrized_linear", 0),
    ("spectral_norm_legacy_conv_transpose", 1), ("spectral_norm_bare_module", 0)])
def test_fold_spectral_norm_matches_torch_eval_weight(case: str, dim: int) -> None:
    state, expected, settings_ = load_case(case)
    result, plan = run_group(Transform.create("fold-spectral-norm"), state)
    assert len(plan.groups) == 1 and plan.groups[0].data.dim == dim
    assert sorted(result) == ["bias", "weight"]
    close(result["weight"], expected["folded.weight"], rtol=2e-6, atol=1e-7)
    if "output.conv" in expected:
        close(conv2d(expected["input"], result["weight"], result["bias"], **settings_["conv"]), expected["output.conv"])
    if "output.linear" in expected:
        close(linear(expected["input"], result, "").astype(np.float32), expected["output.linear"])


def test_fold_spectral_norm_uses_stored_u_v_not_a_fresh_svd() -> None:
    state, expected, _ = load_case("spectral_norm_legacy_conv")
    fresh = state["weight_orig"] / np.linalg.svd(state["weight_orig"].reshape(4, -1), compute_uv=False)[0]
    assert not np.allclose(fresh, expected["folded.weight"], rtol=1e-6)


def test_fold_prune_matches_prune_remove() -> None:
    state, expected, _ = load_case("prune_linear")
    result, plan = run_group(Transform.create("fold-prune"), state)
    assert sorted(result) == ["bias", "weight"]
    assert [g.note for g in plan.groups] == ["bias <- bias_orig · bias_mask", "weight <- weight_orig · weight_mask"]
    np.testing.assert_array_equal(result["weight"], expected["folded.weight"])
    np.testing.assert_array_equal(result["bias"], expected["folded.bias"])


def test_fold_bn_bare_sequential_matches_torch() -> None:
    state, expected, settings_ = load_case("batch_norm_sequential")
    result, plan = run_group(Transform.create("fold-bn"), state)
    assert [g.note for g in plan.groups] == ["0 <- 1", "3 <- 4"]
    assert not plan.notes
    assert sorted(result) == ["0.bias", "0.weight", "3.bias", "3.weight"]
    assert result["3.bias"].dtype == np.float32
    hidden = np.maximum(conv2d(expected["input"], result["0.weight"], result["0.bias"], **settings_["conv"]), 0)
    close(conv2d(hidden, result["3.weight"], result["3.bias"], **settings_["conv"]), expected["output.model"],
          rtol=1e-5, atol=2e-5)


def test_fold_bn_resnet_block_matches_torch() -> None:
    state, expected, s = load_case("batch_norm_resnet_block")
    result, plan = run_group(Transform.create("fold-bn"), state)
    assert [g.note for g in plan.groups] == ["layer1.0.conv1 <- layer1.0.bn1", "layer1.0.conv2 <- layer1.0.bn2",
                                            "layer1.0.downsample.0 <- layer1.0.downsample.1"]
    assert not any(".bn" in n or "downsample.1" in n for n in result)
    p = "layer1.0."
    x = expected["input"]
    out = np.maximum(conv2d(x, result[p + "conv1.weight"], result[p + "conv1.bias"], **s["conv1"]), 0)
    out = conv2d(out, result[p + "conv2.weight"], result[p + "conv2.bias"], **s["conv2"])
    out = out + conv2d(x, result[p + "downsample.0.weight"], result[p + "downsample.0.bias"], **s["downsample"])
    close(np.maximum(out, 0), expected["output.model"], rtol=1e-5, atol=2e-5)


def test_fold_norm_llama_block_matches_torch() -> None:
    state, expected, s = load_case("llama_block")
    result, plan = run_group(Transform.create("fold-norm"), state)
    assert sorted(g.note for g in plan.groups) == [
        "model.layers.0.input_layernorm -> model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, "
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.post_attention_layernorm -> model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj",
        "model.norm -> lm_head"]
    assert sorted(result) == sorted(state)
    x = rms_norm(expected["input"].astype(np.float64), s["eps"])
    for name in ("q_proj", "k_proj", "v_proj"):
        close(linear(x, result, f"model.layers.0.self_attn.{name}"), expected[f"output.{name}"])
    for name in ("gate_proj", "up_proj"):
        close(linear(x, result, f"model.layers.0.mlp.{name}"), expected[f"output.{name}"])
    close(linear(x, result, "lm_head"), expected["output.lm_head"])
    for norm in ("model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"):
        np.testing.assert_array_equal(result[f"{norm}.weight"], np.ones(8, np.float32))
    down = "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(result[down], state[down])


def test_fold_norm_layer_norm_bias_creates_linear_bias() -> None:
    state, expected, s = load_case("layer_norm_two_linears")
    result, plan = run_group(Transform.create("fold-norm", {"pairs": s["pairs"]}), state)
    assert [g.note for g in plan.groups] == ["norm -> fc1, fc2"]
    assert "fc2.bias" in result and result["fc2.bias"].dtype == np.float32
    np.testing.assert_array_equal(result["norm.bias"], np.zeros(8, np.float32))
    x = layer_norm(expected["input"].astype(np.float64), s["eps"])
    close(linear(x, result, "fc1"), expected["output.fc1"])
    close(linear(x, result, "fc2"), expected["output.fc2"])


def test_regenerated_references_match_committed(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    subprocess.run([sys.executable, str(FIXTURES / "make_reference.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for committed in sorted(REFERENCE.glob("*.safetensors")):
        fresh = load_file(str(tmp_path / committed.name))
        old = load_file(str(committed))
        assert sorted(fresh) == sorted(old), committed.name
        for name in old:
            np.testing.assert_allclose(fresh[name], old[name], rtol=1e-6, atol=1e-7, err_msg=f"{committed.name}:{name}")
    fresh_manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert fresh_manifest["cases"] == MANIFEST["cases"]


# ---------------------------------------------------------------- plan(): naming logic

def names_plan(transform: str, names: Mapping[str, tuple[int, ...]], options: dict | None = None,
               selected: Callable[[str], bool] = everything, **plan_options) -> GroupPlan:
    tensors = [TensorInfo(n, "I64" if n.endswith("num_batches_tracked") else "F32", shape)
               for n, shape in names.items()]
    return Transform.create(transform, options or {}).plan(tensors, selected, **plan_options)


MIXED = {
    "wn.weight_g": (4, 1), "wn.weight_v": (4, 3),
    "sn.weight_orig": (4, 3), "sn.weight_u": (4,), "sn.weight_v": (3,),
    "pr.weight_orig": (4, 3), "pr.weight_mask": (4, 3),
    "weight_orig": (5, 2), "weight_u": (5,), "weight_v": (2,),
    "parametrizations.weight.original0": (2, 1), "parametrizations.weight.original1": (2, 6),
}


def test_siblings_decide_which_fold_claims_weight_orig_and_weight_v() -> None:
    outputs = {t: [o.name for g in names_plan(t, MIXED).groups for o in g.outputs]
               for t in ("fold-weight-norm", "fold-spectral-norm", "fold-prune")}
    assert outputs == {"fold-weight-norm": ["wn.weight", "weight"],
                       "fold-spectral-norm": ["sn.weight", "weight"],
                       "fold-prune": ["pr.weight"]}
    spectral = names_plan("fold-spectral-norm", MIXED)
    assert spectral.groups[1].inputs == ("weight_orig", "weight_u", "weight_v")
    assert spectral.groups[1].dropped == ("weight_orig", "weight_u", "weight_v")


def test_conflicting_siblings_are_refused_with_notes() -> None:
    both = {"m.weight_orig": (4, 3), "m.weight_mask": (4, 3), "m.weight_u": (4,), "m.weight_v": (3,),
            "k.weight_g": (4, 1), "k.weight_v": (4, 3), "k.weight_u": (4,)}
    prune = names_plan("fold-prune", both)
    assert not prune.groups and prune.notes == (
        "m.weight: not folded: both m.weight_mask (pruning) and m.weight_u (spectral norm) are present",)
    spectral = names_plan("fold-spectral-norm", both)
    assert not spectral.groups and "m.weight_mask (pruning)" in spectral.notes[0]
    weight_norm = names_plan("fold-weight-norm", both)
    assert not weight_norm.groups and "k.weight_u (spectral norm)" in weight_norm.notes[0]


def test_fold_refuses_when_target_exists_or_shapes_do_not_fit() -> None:
    plan = names_plan("fold-weight-norm", {"a.weight_g": (4, 1), "a.weight_v": (4, 3), "a.weight": (4, 3),
                                           "b.weight_g": (2, 3), "b.weight_v": (2, 3)})
    assert plan.notes == ("a.weight: not folded: a.weight already exists",
                          "b.weight: not folded: b.weight_g has shape [2, 3], which fits no axis of b.weight_v [2, 3]")
    plan = names_plan("fold-spectral-norm", {"c.weight_orig": (4, 3), "c.weight_u": (5,), "c.weight_v": (3,)})
    assert plan.notes == ("c.weight: not folded: len(u)=5, len(v)=3 fit no axis of [4, 3]",)


def test_fold_spectral_dim_ambiguity_defaults_to_zero_and_param_overrides() -> None:
    square = {"t.weight_orig": (4, 4, 3, 3), "t.weight_u": (4,), "t.weight_v": (36,)}
    auto = names_plan("fold-spectral-norm", square).groups[0]
    assert auto.data.dim == 0 and "ambiguous among [0, 1]" in auto.note
    assert names_plan("fold-spectral-norm", square, {"dim": "1"}).groups[0].data.dim == 1
    bad = names_plan("fold-spectral-norm", square, {"dim": "2"})
    assert not bad.groups and "do not fit dim=2" in bad.notes[0]


def test_stacked_parametrizations_and_old_spectral_checkpoints_are_refused() -> None:
    stacked = {"m.parametrizations.weight.original": (4, 3), "m.parametrizations.weight.0._u": (4,),
               "m.parametrizations.weight.0._v": (3,), "m.parametrizations.weight.1.scale": (1,)}
    assert "stacked" in names_plan("fold-spectral-norm", stacked).notes[0]
    old = {"m.weight_orig": (4, 3), "m.weight_u": (4,)}
    assert "torch < 1.1" in names_plan("fold-spectral-norm", old).notes[0]


def test_empty_prefix_parametrizations_and_bare_sequential() -> None:
    plan = names_plan("fold-weight-norm", {"parametrizations.weight.original0": (3, 1),
                                           "parametrizations.weight.original1": (3, 2), "bias": (3,)})
    assert [g.note for g in plan.groups] == [
        "weight <- parametrizations.weight.original0, parametrizations.weight.original1"]
    plan = names_plan("fold-bn", {"0.weight": (4, 3), "1.weight": (4,), "1.bias": (4,), "1.running_mean": (4,),
                                  "1.running_var": (4,), "1.num_batches_tracked": ()})
    assert [g.note for g in plan.groups] == ["0 <- 1"]
    assert plan.groups[0].created == ("0.bias",)
    assert plan.groups[0].dropped == ("1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")


def bn(prefix: str, channels: int = 4, affine: bool = True) -> dict[str, tuple[int, ...]]:
    names = {f"{prefix}.running_mean": (channels,), f"{prefix}.running_var": (channels,),
             f"{prefix}.num_batches_tracked": ()}
    if affine:
        names |= {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,)}
    return names


def test_fold_bn_notes_every_unpaired_batch_norm_and_why() -> None:
    names = {"conv1.weight": (4, 3, 3, 3), **bn("bn1"),
             **bn("bn2"),                                     # no conv2
             **bn("head.0"),                                  # first in its Sequential
             "feat.0.weight": (4, 3, 3, 3), **bn("feat.2"),   # feat.1 is a ReLU: no weight
             "up.weight": (3, 4, 2, 2), **bn("up_bn"),        # no rule
             "t.0.weight": (3, 4, 2, 2), **bn("t.1"),         # ConvTranspose: channels on axis 1
             "w.0.weight_v": (4, 3), "w.0.weight_g": (4, 1), **bn("w.1"),
             "c.conv.weight": (4, 2), **bn("c.bn", affine=False)}
    plan = names_plan("fold-bn", names)
    assert [g.note for g in plan.groups] == ["conv1 <- bn1", "c.conv <- c.bn"]
    assert plan.notes == (
        "bn2: left unpaired: no conv2.weight",
        "head.0: left unpaired: first module of its Sequential: nothing before it",
        "feat.2: left unpaired: no feat.1.weight",
        "up_bn: left unpaired: no naming rule applies (convN/bnN, conv/bn, X.N-1/X.N): give pairs=",
        "t.1: left unpaired: t.0.weight has 3 output channels on axis 0, t.1 has 4 "
        "(ConvTranspose keeps them on axis 1: not supported)",
        "w.1: left unpaired: no w.0.weight (w.0.weight_v is there: fold its weight norm, spectral norm or "
        "pruning first)",
    )
    assert plan.groups[1].inputs == ("c.conv.weight", "c.bn.running_mean", "c.bn.running_var",
                                     "c.bn.num_batches_tracked")


def test_fold_bn_explicit_pairs_override_naming() -> None:
    names = {"features.conv_a.weight": (4, 3, 3, 3), **bn("features.norm_a"), "conv1.weight": (4, 3), **bn("bn1")}
    plan = names_plan("fold-bn", names, {"pairs": "features.conv_a:features.norm_a"})
    assert [g.note for g in plan.groups] == ["features.conv_a <- features.norm_a"]
    with pytest.raises(UsageError, match="no BatchNorm 'features.conv_a'"):
        names_plan("fold-bn", names, {"pairs": "features.norm_a:features.conv_a"})
    with pytest.raises(UsageError, match="no tensor 'nothing.weight'"):
        names_plan("fold-bn", names, {"pairs": "nothing:bn1"})
    with pytest.raises(UsageError, match="must look like A:B"):
        names_plan("fold-bn", names, {"pairs": "conv1-bn1"})
    shared = names_plan("fold-bn", {**names, **bn("bn1b")}, {"pairs": "conv1:bn1;conv1:bn1b"})
    assert shared.notes == ("bn1b: left unpaired: conv1 already folds bn1",)
    with pytest.raises(UsageError, match="named twice"):
        names_plan("fold-bn", names, {"pairs": "conv1:bn1;features.conv_a:bn1"})


def test_fold_bn_selection_needs_both_weights() -> None:
    names = {"conv1.weight": (4, 3, 3, 3), **bn("bn1"), "conv2.weight": (4, 4, 3, 3), **bn("bn2")}
    plan = names_plan("fold-bn", names, selected=lambda n: n.startswith("conv1") or n.startswith("bn1")
                      or n == "conv2.weight")
    assert [g.note for g in plan.groups] == ["conv1 <- bn1"]
    assert plan.notes == ("bn2: left unpaired: bn2.weight excluded by selection",)
    assert not names_plan("fold-bn", names, selected=lambda n: False).notes


def llama_names(tied: bool = False, post_norm: bool = False) -> dict[str, tuple[int, ...]]:
    layer = "model.layers.0."
    names = {"model.embed_tokens.weight": (10, 8), layer + "input_layernorm.weight": (8,),
             **{f"{layer}self_attn.{p}_proj.weight": (8, 8) for p in "qkvo"},
             layer + "post_attention_layernorm.weight": (8,),
             **{f"{layer}mlp.{p}_proj.weight": (12, 8) for p in ("gate", "up")},
             layer + "mlp.down_proj.weight": (8, 12),
             "model.norm.weight": (8,)}
    if post_norm:
        names[layer + "post_feedforward_layernorm.weight"] = (8,)
    if not tied:
        names["lm_head.weight"] = (10, 8)
    return names


def test_fold_norm_refuses_tied_lm_head() -> None:
    plan = names_plan("fold-norm", llama_names(tied=True))
    assert len(plan.groups) == 2
    assert plan.notes == ("model.norm: not folded: lm_head is tied to the embeddings (no lm_head.weight): "
                          "folding would change the embeddings too",)
    plan = names_plan("fold-norm", llama_names(), config={"tie_word_embeddings": True})
    assert len(plan.groups) == 2 and "tie_word_embeddings" in plan.notes[0]
    with pytest.raises(UsageError, match="no tensor 'lm_head.weight' \\(a tied lm_head"):
        names_plan("fold-norm", llama_names(tied=True), {"pairs": "model.norm:lm_head"})


def test_fold_norm_final_norm_under_a_wrapper_prefix() -> None:
    names = {"language_model.model.norm.weight": (8,), "language_model.lm_head.weight": (10, 8)}
    assert [g.note for g in names_plan("fold-norm", names).groups] == [
        "language_model.model.norm -> language_model.lm_head"]
    tied = names_plan("fold-norm", {"language_model.model.norm.weight": (8,)})
    assert tied.notes[0].startswith("language_model.model.norm: not folded: language_model.lm_head is tied")


def test_fold_norm_refuses_post_norm_layers_and_unoffset_gemma() -> None:
    plan = names_plan("fold-norm", llama_names(post_norm=True))
    assert [g.note.split(" ->")[0] for g in plan.groups] == ["model.layers.0.input_layernorm", "model.norm"]
    assert "post-norm layout" in plan.notes[0]
    gemma = names_plan("fold-norm", llama_names(), config={"model_type": "gemma"})
    assert not gemma.groups and "gain_offset=1" in gemma.notes[0]
    assert len(names_plan("fold-norm", llama_names(), {"gain_offset": "1"}, config={"model_type": "gemma"}).groups) == 3


def test_fold_norm_needs_every_consumer_selected() -> None:
    plan = names_plan("fold-norm", llama_names(), selected=lambda n: "k_proj" not in n)
    assert [g.note.split(" ->")[0] for g in plan.groups] == ["model.layers.0.post_attention_layernorm", "model.norm"]
    assert plan.notes == ("model.layers.0.input_layernorm: not folded: model.layers.0.self_attn.k_proj.weight "
                          "excluded by selection (a gain must fold into all of its consumers)",)


def test_fold_norm_explicit_pairs_and_fused_projections() -> None:
    names = {"blk.ln.weight": (8,), "blk.ln.bias": (8,), "blk.fc.weight": (6, 8), "blk.out.weight": (6, 8)}
    plan = names_plan("fold-norm", names, {"pairs": "blk.ln:blk.fc+blk.out"})
    assert plan.groups[0].created == ("blk.fc.bias", "blk.out.bias")
    wrong = names_plan("fold-norm", {"n.weight": (8,), "f.weight": (8, 6)}, {"pairs": "n:f"})
    assert not wrong.groups and "does not read 8 features" in wrong.notes[0]
    twice = names_plan("fold-norm", {**names, "other.weight": (8,)}, {"pairs": "blk.ln:blk.fc;other:blk.fc"})
    assert twice.notes == ("other: not folded: blk.fc already takes the gain of blk.ln",)
    fused = {"m.input_layernorm.weight": (8,), "m.self_attn.qkv_proj.weight": (24, 8)}
    assert names_plan("fold-norm", fused).groups[0].note == "m.input_layernorm -> m.self_attn.qkv_proj"
    missing = names_plan("fold-norm", {"m.input_layernorm.weight": (8,), "m.self_attn.q_proj.weight": (8, 8)})
    assert missing.notes == ("m.input_layernorm: not folded: no m.self_attn.k_proj.weight, m.self_attn.v_proj.weight",)


@pytest.mark.parametrize("transform", ["fold-bn", "fold-norm", "fold-weight-norm"])
def test_outputs_keep_storage_dtype_and_created_bias_takes_weight_dtype(transform: str) -> None:
    names = {"fold-bn": {"conv1.weight": (4, 3), **bn("bn1")},
             "fold-norm": {"norm.weight": (3,), "norm.bias": (3,), "fc.weight": (4, 3)},
             "fold-weight-norm": {"weight_g": (4, 1), "weight_v": (4, 3)}}[transform]
    options = {"pairs": "norm:fc"} if transform == "fold-norm" else {}
    tensors = [TensorInfo(n, "I64" if "num_batches" in n else "BF16", s) for n, s in names.items()]
    plan = Transform.create(transform, options).plan(tensors, everything)
    assert {o.dtype for g in plan.groups for o in g.outputs} == {"BF16"}


# ---------------------------------------------------------------- fold-bn / fold-norm keep the function

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), groups=st.sampled_from([1, 2]), kernel=st.sampled_from([1, 3]),
       bias=st.booleans(), affine=st.booleans())
def test_fold_bn_equals_conv_then_batch_norm(seed: int, groups: int, kernel: int, bias: bool, affine: bool) -> None:
    rng = np.random.default_rng(seed)
    channels, inputs, eps = 4, 2 * groups, 1e-5
    state = {"conv.weight": rng.standard_normal((channels, inputs // groups, kernel, kernel)),
             "bn.running_mean": rng.standard_normal(channels), "bn.running_var": rng.uniform(0.1, 3.0, channels),
             "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    if bias:
        state["conv.bias"] = rng.standard_normal(channels)
    if affine:
        state |= {"bn.weight": rng.uniform(-2, 2, channels), "bn.bias": rng.standard_normal(channels)}
    x = rng.standard_normal((2, inputs, 5, 5))
    out = conv2d(x, state["conv.weight"], state.get("conv.bias"), padding=1, groups=groups)
    shape = (1, channels, 1, 1)
    expected = (out - state["bn.running_mean"].reshape(shape)) / np.sqrt(state["bn.running_var"].reshape(shape) + eps)
    if affine:
        expected = expected * state["bn.weight"].reshape(shape) + state["bn.bias"].reshape(shape)
    result, plan = run_group(Transform.create("fold-bn"), state)
    assert sorted(result) == ["conv.bias", "conv.weight"] and len(plan.groups) == 1
    close(conv2d(x, result["conv.weight"], result["conv.bias"], padding=1, groups=groups), expected,
          rtol=1e-10, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), layer=st.booleans(), shift=st.booleans(), bias=st.booleans(),
       offset=st.sampled_from([0.0, 1.0]))
def test_fold_norm_keeps_the_block_output(seed: int, layer: bool, shift: bool, bias: bool, offset: float) -> None:
    rng = np.random.default_rng(seed)
    width, eps = 6, 1e-5
    state = {"n.weight": rng.uniform(-2, 2, width), "a.weight": rng.standard_normal((5, width)),
             "b.weight": rng.standard_normal((3, width))}
    if shift:
        state["n.bias"] = rng.standard_normal(width)
    if bias:
        state["a.bias"] = rng.standard_normal(5)
    x = rng.standard_normal((4, width))
    normed = layer_norm(x, eps) if layer else rms_norm(x, eps)
    affine = normed * (state["n.weight"] + offset) + state.get("n.bias", 0.0)
    expected = {p: linear(affine, state, p) for p in ("a", "b")}
    result, _ = run_group(Transform.create("fold-norm", {"pairs": "n:a+b", "gain_offset": offset}), state)
    np.testing.assert_allclose(result["n.weight"] + offset, 1.0)
    after = normed * (result["n.weight"] + offset) + result.get("n.bias", 0.0)
    for p in ("a", "b"):
        close(linear(after, result, p), expected[p], rtol=1e-10, atol=1e-10)
    assert ("b.bias" in result) == shift
