"""The pipeline end to end through files: selection, planning, streaming, groups, fits, failures."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from corpus import ALL_CODES, sample
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from wtool import InputError, Pipeline, UsageError, open_checkpoint, run
from wtool.dtypes import by_numpy
from wtool.io import create_writer
from wtool.pipeline import Step
from wtool.selection import Selector
from wtool.tensor import TensorInfo
from wtool.transforms import Group, GroupPlan, GroupTransform, Transform


def read_all(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as reader:
        return {t.name: np.array(reader.read(t.name)) for t in reader.tensors}


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    infos = [TensorInfo(k, _code(v.dtype), v.shape) for k, v in tensors.items()]
    with create_writer(path, infos, metadata or {}) as writer:
        for k, v in tensors.items():
            writer.write(k, v)
    return path


def _code(dtype) -> str:
    return by_numpy(np.dtype(dtype)).code


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- faithful copies

@pytest.mark.parametrize("suffix", ["out.safetensors", "out.npz", "sharded"])
def test_no_steps_is_a_bit_exact_copy_of_every_dtype(tmp_path, suffix):
    tensors = {f"t.{code}": sample(code, (3, 5), seed=i, bits=False) for i, code in enumerate(ALL_CODES)}
    tensors["scalar"] = np.array(1.5, np.float32)
    tensors["empty"] = np.zeros((0, 4), np.float16)
    tensors["f32.special"] = np.array([np.nan, -0.0, np.inf, -np.inf], np.float32)
    source = write(tmp_path / "in.safetensors", tensors, {"format": "pt", "note": "keep me"})
    out = tmp_path / suffix
    report = run(Pipeline(), source, out, max_shard_size=200 if suffix == "sharded" else None)
    copied = read_all(out)
    assert list(copied) == list(tensors)  # name order kept
    for name, array in tensors.items():
        assert same_bytes(copied[name], array), name
    assert report.totals["changed"] == 0
    with open_checkpoint(out) as reader:
        assert reader.metadata["note"] == "keep me"
        assert json.loads(reader.metadata["wtool"])["steps"] == []


@pytest.mark.parametrize("suffix", ["out.safetensors", "sharded"])
def test_untouched_tensors_are_copied_page_to_page(tmp_path, monkeypatch, suffix):
    """The output's header is padded so that each tensor copied unchanged sits at its input
    place within a page (the kernel then copies whole pages); changed tensors do not count."""
    import os

    tensors = {"embed": sample("BF16", (64, 64), seed=1, bits=False), "w": sample("F32", (64, 64), seed=2, bits=False),
               "head": sample("F16", (64, 64), seed=3, bits=False)}
    source = write(tmp_path / "in.safetensors", tensors, {"note": "x" * 100})
    places, real = [], os.copy_file_range

    def copy_file_range(source, target, count, offset_src=None, offset_dst=None):
        places.append((offset_src - offset_dst) % 4096)
        return real(source, target, count, offset_src, offset_dst)
    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    run(Pipeline.from_specs(["clip:c=0.5"], selector=Selector(("w",))), source, tmp_path / suffix)
    assert places == [0, 0]
    written = sorted((tmp_path / suffix).glob("*.safetensors")) if suffix == "sharded" else [tmp_path / suffix]
    loaded = {name: array for path in written for name, array in load_file(str(path)).items()}
    assert same_bytes(loaded["embed"], tensors["embed"]) and same_bytes(loaded["head"], tensors["head"])
    assert same_bytes(loaded["w"], np.clip(tensors["w"], -0.5, 0.5))


@pytest.mark.parametrize("suffix", ["out.safetensors", "sharded", "out.npz"])
def test_a_copy_without_statistics_reads_no_tensor_but_bools(tmp_path, monkeypatch, suffix):
    """Without statistics an untouched tensor is copied as stored, never read by the run (but
    a bool tensor, whose bytes are checked as they are read), whatever the output format."""
    from wtool.io.safetensors import SafetensorsReader

    tensors = {f"t.{code}": sample(code, (3, 5), seed=i, bits=False) for i, code in enumerate(ALL_CODES)}
    source = write(tmp_path / "in.safetensors", tensors)
    reads, real = [], SafetensorsReader._read
    monkeypatch.setattr(SafetensorsReader, "_read", lambda self, info: (reads.append(info.name), real(self, info))[1])
    run(Pipeline(), source, tmp_path / suffix, stats=False, max_shard_size=200 if suffix == "sharded" else None)
    assert reads == (["t.BOOL"] if suffix != "out.npz" else list(tensors))  # npz: read to be written
    assert all(same_bytes(read_all(tmp_path / suffix)[name], array) for name, array in tensors.items())


def test_steps_take_their_own_figures_only_when_the_run_reports_statistics(tmp_path):
    source = write(tmp_path / "in.safetensors", {"w": sample("F32", (32, 32), seed=1, bits=False)})
    pipeline = Pipeline.from_specs(["sparsify:threshold=0.5"])
    reports = [run(pipeline, source, tmp_path / f"{stats}.safetensors", stats=stats).to_json()["tensors"][0]
               for stats in (True, False)]
    assert "sparsify.energy_kept" in reports[0]["extras"] and reports[1]["extras"] == {}
    assert same_bytes(read_all(tmp_path / "True.safetensors")["w"], read_all(tmp_path / "False.safetensors")["w"])


def test_metadata_gets_format_pt_for_transformers(tmp_path):
    source = tmp_path / "in.safetensors"
    save_file({"w": np.ones((2, 2), np.float32)}, source)
    run(Pipeline(), source, tmp_path / "out.safetensors")
    with safe_open(tmp_path / "out.safetensors", "numpy") as f:
        assert f.metadata()["format"] == "pt"
        assert json.loads(f.metadata()["wtool"])["version"]


# ---------------------------------------------------------------- transforms through files

def test_bf16_steps_compute_in_float32_and_cast_back_once(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    pipe = Pipeline.from_specs(["clip:c=1.0", "quantize:bits=4,granularity=tensor"])
    report = run(pipe, llama, out)
    original = load_file(llama)
    result = load_file(out)
    w = original["model.layers.0.mlp.up_proj.weight"].astype(np.float32)
    clipped = np.clip(w, -1, 1)
    low, high = clipped.min(), clipped.max()
    levels = 15
    expected = (np.round((clipped - low) / (high - low) * levels) * (high - low) / levels + low)
    np.testing.assert_array_equal(result["model.layers.0.mlp.up_proj.weight"],
                                  expected.astype(ml_dtypes.bfloat16))
    # 1-D tensors and ints are skipped by default and copied bit-exact
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.mlp.up_proj.bias", "model.position_ids"):
        assert same_bytes(result[name], original[name])
    record = {r.name: r for r in report.tensors}
    assert record["model.position_ids"].steps == []
    assert record["model.layers.0.mlp.up_proj.weight"].steps == ["clip", "quantize"]
    assert record["model.layers.0.mlp.up_proj.weight"].error["max_abs"] > 0
    skipped = {(s.name, s.op) for s in report.skipped}
    assert ("model.layers.0.mlp.up_proj.bias", "quantize") in skipped
    assert ("model.position_ids", "clip") in skipped


def test_cast_changes_storage_dtype(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    run(Pipeline.from_specs(["cast:dtype=float16"]), llama, out)
    result = load_file(out)
    assert result["lm_head.weight"].dtype == np.float16
    assert result["model.layers.0.mlp.up_proj.bias"].dtype == np.float16  # cast applies to 1-D floats too
    assert result["model.position_ids"].dtype == np.int64


def test_global_sparsity_through_files(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    pipe = Pipeline.from_specs(["sparsify:fraction=0.6,scope=global"], selector=Selector(("*proj.weight",)))
    run(pipe, llama, out)
    result, original = load_file(out), load_file(llama)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    values = np.concatenate([np.abs(original[n].astype(np.float32)).ravel() for n in names])
    zeros = sum(int((result[n] == 0).sum()) for n in names)
    assert zeros == round(0.6 * values.size)
    threshold = np.sort(values)[zeros - 1]
    for n in names:  # one threshold for both tensors
        kept = np.abs(result[n].astype(np.float32))[result[n] != 0]
        assert kept.min() >= threshold


# ---------------------------------------------------------------- selection

def test_step_include_lifts_the_default_1d_rule(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    run(Pipeline.from_specs(["quantize:bits=2,granularity=tensor,include=*.bias"]), llama, out)
    result, original = load_file(out), load_file(llama)
    assert len(np.unique(result["model.layers.0.mlp.up_proj.bias"])) <= 4
    assert same_bytes(result["lm_head.weight"], original["lm_head.weight"])


def test_global_include_does_not_lift_default_rules(llama, tmp_path):
    report = run(Pipeline.from_specs(["quantize"], selector=Selector(("model.layers.*",))), llama, None, dry_run=True)
    steps = {r.name: r.steps for r in report.tensors}
    assert steps["model.layers.0.mlp.up_proj.bias"] == []
    assert steps["model.layers.0.mlp.up_proj.weight"] == ["quantize"]
    assert steps["lm_head.weight"] == []


def test_regex_is_a_full_match_and_exclude_wins(llama):
    pipe = Pipeline.from_specs(["clip:c=1"], selector=Selector(("re:.*proj\\.weight", "lm_head.*"), ("re:.*q_proj.*",)))
    steps = {r.name: r.steps for r in run(pipe, llama, None, dry_run=True).tensors}
    assert steps["model.layers.0.mlp.up_proj.weight"] == ["clip"]
    assert steps["lm_head.weight"] == ["clip"]
    assert steps["model.layers.0.self_attn.q_proj.weight"] == []
    with pytest.raises(UsageError, match="'re:proj' matches no tensor"):  # not a search
        run(Pipeline.from_specs(["clip:c=1"], selector=Selector(("re:proj",))), llama, None, dry_run=True)


def test_patterns_and_steps_that_select_nothing_are_errors(llama):
    with pytest.raises(UsageError, match="'nothing.\\*' matches no tensor"):
        run(Pipeline.from_specs(["clip:c=1"], selector=Selector(("nothing.*",))), llama, None, dry_run=True)
    with pytest.raises(UsageError, match=r"step 1 \(clip\).*'\*.nothing' matches no tensor"):
        run(Pipeline.from_specs(["clip:c=1,include=*.nothing"]), llama, None, dry_run=True)
    with pytest.raises(UsageError, match=r"step 1 \(quantize\) selects no tensor"):
        run(Pipeline.from_specs(["quantize"], selector=Selector(("*.bias",))), llama, None, dry_run=True)
    report = run(Pipeline.from_specs(["quantize"], selector=Selector(("*.bias", "nothing")), allow_empty=True),
                 llama, None, dry_run=True)
    assert all(not r.steps for r in report.tensors)


def test_bad_regex_is_a_usage_error():
    with pytest.raises(UsageError, match="invalid regex"):
        Selector(("re:[unclosed",))


# ---------------------------------------------------------------- recipes and specs

def test_recipe(llama, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('exclude = ["lm_head.*"]\n\n[[steps]]\nop = "clip"\nsigma = 3\n\n'
                      '[[steps]]\nop = "quantize"\nbits = 4\ninclude = ["*.mlp.*"]\n')
    pipe = Pipeline.from_recipe(recipe)
    assert [s.op for s in pipe.steps] == ["clip", "quantize"]
    steps = {r.name: r.steps for r in run(pipe, llama, None, dry_run=True).tensors}
    assert steps["model.layers.0.mlp.up_proj.weight"] == ["clip", "quantize"]
    assert steps["model.layers.0.mlp.up_proj.bias"] == ["quantize"]  # step include lifts the 1-D rule
    assert steps["model.layers.0.self_attn.q_proj.weight"] == ["clip"]
    assert steps["lm_head.weight"] == []


@pytest.mark.parametrize("text, error, message", [
    ("[[steps]]\nbits = 4\n", UsageError, "needs op"),
    ("[[steps]]\nop = \"quantise\"\n", UsageError, "did you mean 'quantize'"),
    ("[[steps]]\nop = \"quantize\"\nbits = \"four\"\n", UsageError, "step 1: quantize: parameter bits"),
    ("[[steps]]\nop = \"quantize\"\nbits = true\n", UsageError, "expected int"),
    ("steps = 3\n", UsageError, "must be"),
    ("include = 3\n", UsageError, "string or a list"),
    ("[pipeline]\n", UsageError, "unknown top-level key"),
    ("[[steps]\n", InputError, "invalid TOML"),
])
def test_bad_recipes(tmp_path, text, error, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    with pytest.raises(error, match=message):
        Pipeline.from_recipe(recipe)


@pytest.mark.parametrize("spec, message", [
    ("clip:c", "expected key=value"), ("clip:c=1,c=2", "given twice"), ("nope", "unknown transform"),
    ("clip:cc=1", "did you mean 'c'"),
])
def test_bad_specs(spec, message):
    with pytest.raises(UsageError, match=message):
        Step.parse(spec)


# ---------------------------------------------------------------- group transforms

class Merge(GroupTransform):
    """Test-only: replace every `P.a` + `P.b` pair by `P.sum` (and keep `P.a` doubled)."""

    def plan(self, tensors, selected, config=None):
        names = {t.name: t for t in tensors}
        groups = []
        for t in tensors:
            if t.name.endswith(".a") and selected(t.name):
                prefix = t.name[:-2]
                if f"{prefix}.b" in names:
                    groups.append(Group((t.name, f"{prefix}.b"),
                                        (TensorInfo(t.name, t.dtype, t.shape), TensorInfo(f"{prefix}.sum", t.dtype, t.shape)),
                                        note=f"{prefix}.a + {prefix}.b"))
        return GroupPlan(tuple(groups), ("left alone: lonely.a (no lonely.b)",))

    def apply_group(self, group, arrays):
        a, b = (arrays[n] for n in group.inputs)
        return {group.outputs[0].name: 2 * a, group.outputs[1].name: a + b}


def test_group_transform_creates_drops_and_keeps_order(tmp_path):
    tensors = {"x.a": np.ones((2, 2), np.float32), "mid": np.zeros(3, np.int32),
               "x.b": np.full((2, 2), 3, np.float32), "lonely.a": np.ones(2, np.float32), "last": np.ones(1, np.float32)}
    source = write(tmp_path / "in.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    report = run(Pipeline((Step(Merge()),)), source, out)
    result = read_all(out)
    assert list(result) == ["x.a", "x.sum", "mid", "lonely.a", "last"]
    np.testing.assert_array_equal(result["x.a"], 2 * tensors["x.a"])
    np.testing.assert_array_equal(result["x.sum"], tensors["x.a"] + tensors["x.b"])
    assert report.dropped == ["x.b"]
    assert report.groups[0].created == ["x.sum"] and report.groups[0].dropped == ["x.b"]
    assert any("lonely.a" in note for note in report.notes)


# ---------------------------------------------------------------- non-finite values, overflow, failures

def test_library_nonfinite_policies(tmp_path):
    w = np.arange(16, dtype=np.float32).reshape(4, 4)
    w[1, 2] = np.nan
    source = write(tmp_path / "in.safetensors", {"w": w, "ok": np.ones((2, 2), np.float32)})
    out = tmp_path / "out.safetensors"
    with pytest.raises(InputError, match=r"'w': 1 non-finite value.*quantize.*--nonfinite"):
        run(Pipeline.from_specs(["quantize"]), source, out)
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    run(Pipeline.from_specs(["quantize:bits=2,granularity=tensor"], nonfinite="skip"), source, out)
    assert same_bytes(read_all(out)["w"], w)
    run(Pipeline.from_specs(["quantize:bits=8,granularity=tensor"], nonfinite="zero"), source, out, force=True)
    assert np.isfinite(read_all(out)["w"]).all() and read_all(out)["w"][1, 2] == 0
    run(Pipeline.from_specs(["clip:c=3"]), source, out, force=True)  # clip with c does not spread NaN
    assert np.isnan(read_all(out)["w"][1, 2])


class Explode(Transform):
    """Test-only: multiply by 1e6 (overflows float16)."""

    def apply(self, array, ctx):
        return array * 1e6


def test_overflow_when_casting_back_is_refused(tmp_path):
    source = write(tmp_path / "in.safetensors", {"w": np.ones((2, 2), np.float16)})
    with pytest.raises(InputError, match=r"'w': 4 value\(s\) overflow float16"):
        run(Pipeline((Step(Explode()),)), source, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


class FailOnSecond(Transform):
    """Test-only: fails on the tensor named 'b'."""

    def apply(self, array, ctx):
        if ctx.name == "b":
            raise InputError("boom on b")
        return array + 1


@pytest.mark.parametrize("name", ["out.safetensors", "out.npz", "sharded"])
def test_failure_mid_run_leaves_no_output_and_keeps_an_existing_one(tmp_path, name):
    source = write(tmp_path / "in.safetensors", {k: np.ones((2, 2), np.float32) for k in "abc"})
    out = tmp_path / name
    with pytest.raises(InputError, match="boom"):
        run(Pipeline((Step(FailOnSecond()),)), source, out)
    assert not out.exists()
    run(Pipeline(), source, out)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(InputError, match="boom"):
        run(Pipeline((Step(FailOnSecond()),)), source, out, force=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert same_bytes(read_all(out)["a"], np.ones((2, 2), np.float32))


def test_existing_output_needs_force_and_output_may_not_be_input(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    run(Pipeline(), llama, out)
    with pytest.raises(UsageError, match="exists"):
        run(Pipeline(), llama, out)
    run(Pipeline(), llama, out, force=True)
    with pytest.raises(UsageError, match="is the input"):
        run(Pipeline(), llama, llama, force=True)


def test_dry_run_writes_nothing(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    report = run(Pipeline.from_specs(["quantize"]), llama, out, dry_run=True)
    assert not out.exists()
    assert report.dry_run and any(r.steps == ["quantize"] for r in report.tensors)


@dataclass(frozen=True)
class NudgeParams:
    grads: str = ""


class Nudge(Transform):
    """Test-only: subtract the companion 'grads' tensor when present."""

    Params = NudgeParams

    def companion_paths(self):
        return {"grads": self.params.grads}

    def apply(self, array, ctx):
        grad = ctx.companions["grads"]
        return array if grad is None else array - grad


def test_companion_checkpoints_are_streamed_by_name(tmp_path):
    source = write(tmp_path / "in.safetensors", {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)})
    grads = write(tmp_path / "g.npz", {"a": np.full((2, 2), 0.25, np.float32)})
    run(Pipeline((Step(Nudge(NudgeParams(str(grads)))),)), source, tmp_path / "out.safetensors")
    result = read_all(tmp_path / "out.safetensors")
    np.testing.assert_array_equal(result["a"], np.full((2, 2), 0.75, np.float32))
    np.testing.assert_array_equal(result["b"], np.ones((2, 2), np.float32))


def test_config_json_beside_the_checkpoint_reaches_group_transforms(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"model.norm.weight": rng.normal(1, 0.1, 8).astype(np.float32),
               "lm_head.weight": rng.normal(size=(16, 8)).astype(np.float32),
               "model.embed_tokens.weight": rng.normal(size=(16, 8)).astype(np.float32)}
    source = write(tmp_path / "model.safetensors", tensors)
    folded = run(Pipeline.from_specs(["fold-norm"]), source, None, dry_run=True)
    assert len(folded.groups) == 1
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    with pytest.raises(UsageError, match="selects no tensor"):
        run(Pipeline.from_specs(["fold-norm"]), source, None, dry_run=True)
    refused = run(Pipeline.from_specs(["fold-norm"], allow_empty=True), source, None, dry_run=True)
    assert not refused.groups and any("tie_word_embeddings" in n for n in refused.notes)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(InputError, match="config.json"):
        run(Pipeline.from_specs(["fold-norm"]), source, None, dry_run=True)


def test_folder_to_folder_carries_config_and_tokenizer(tmp_path):
    folder = tmp_path / "model"
    write(folder, {"w": np.ones((2, 2), np.float32)}, {"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "notes.txt").write_text("not a model file")
    report = run(Pipeline.from_specs(["cast:dtype=bfloat16"]), folder, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".wtool-files.json", "config.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json",
        "notes.txt", "tokenizer.json"]
    assert report.model_files == ["config.json", "notes.txt", "tokenizer.json"]
    assert any("declares dtype float32" in n for n in report.notes)
    run(Pipeline(), folder, tmp_path / "bare", copy_model_files=False)
    assert not (tmp_path / "bare" / "config.json").exists()
    run(Pipeline(), folder, tmp_path / "single.safetensors")  # a single file carries nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "model", "out", "single.safetensors"]


@pytest.mark.parametrize("jobs", [2, 3])
def test_jobs_give_the_same_bytes_and_order(llama, tmp_path, jobs):
    specs = ["clip:percentile=99", "quantize:bits=3", "sparsify:fraction=0.3,scope=global"]
    one = run(Pipeline.from_specs(specs), llama, tmp_path / "one.safetensors")
    many = run(Pipeline.from_specs(specs), llama, tmp_path / f"many{jobs}.safetensors", jobs=jobs)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / f"many{jobs}.safetensors").read_bytes()
    assert [r.name for r in one.tensors] == [r.name for r in many.tensors]
    source = write(tmp_path / "g.safetensors", {f"{k}.{p}": np.full((2, 2), i + 1.0, np.float32)
                                                 for i, k in enumerate("xyz") for p in "ab"})
    run(Pipeline((Step(Merge()),)), source, tmp_path / "g1.safetensors")
    run(Pipeline((Step(Merge()),)), source, tmp_path / "g2.safetensors", jobs=jobs)
    assert (tmp_path / "g1.safetensors").read_bytes() == (tmp_path / "g2.safetensors").read_bytes()


def test_failure_with_jobs_leaves_no_output(tmp_path):
    source = write(tmp_path / "in.safetensors", {k: np.ones((2, 2), np.float32) for k in "abcdef"})
    with pytest.raises(InputError, match="boom"):
        run(Pipeline((Step(FailOnSecond()),)), source, tmp_path / "out.safetensors", jobs=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize("policy", ["zero", "skip"])
def test_global_fit_sees_what_the_step_will_see(tmp_path, policy):
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(10, 10)).astype(np.float32)
    dirty = rng.normal(size=(10, 10)).astype(np.float32)
    dirty[0, :5] = np.nan
    source = write(tmp_path / "in.safetensors", {"clean": clean, "dirty": dirty})
    run(Pipeline.from_specs(["sparsify:fraction=0.5,scope=global"], nonfinite=policy), source,
        tmp_path / "out.safetensors")
    result = read_all(tmp_path / "out.safetensors")
    if policy == "zero":  # NaNs became zeros before the threshold was chosen: exactly half of 200 are zero
        assert int((result["clean"] == 0).sum() + (result["dirty"] == 0).sum()) == 100
    else:  # the dirty tensor is left alone and the clean one alone decides: half of 100
        assert same_bytes(result["dirty"], dirty)
        assert int((result["clean"] == 0).sum()) == 50
    with pytest.raises(InputError, match=r"in.safetensors: tensor 'dirty': 5 non-finite"):
        run(Pipeline.from_specs(["sparsify:fraction=0.5,scope=global"]), source, tmp_path / "err.safetensors")


def test_without_stats_the_output_and_changed_flags_are_the_same(llama, tmp_path):
    specs = ["clip:c=100", "quantize:bits=3"]  # clip changes nothing: `changed` must come from the bytes
    full = run(Pipeline.from_specs(specs), llama, tmp_path / "full.safetensors")
    bare = run(Pipeline.from_specs(specs), llama, tmp_path / "bare.safetensors", stats=False)
    assert (tmp_path / "full.safetensors").read_bytes() == (tmp_path / "bare.safetensors").read_bytes()
    assert [(r.name, r.changed) for r in bare.tensors] == [(r.name, r.changed) for r in full.tensors]
    assert all(r.before is None and r.after is None and r.error is None for r in bare.tensors)
    clipped_only = run(Pipeline.from_specs(["clip:c=100"]), llama, tmp_path / "c.safetensors", stats=False)
    assert not any(r.changed for r in clipped_only.tensors)
