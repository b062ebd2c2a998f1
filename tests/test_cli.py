"""The CLI through Typer's test runner: exit codes, messages, streams, --dry-run, --force."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from wtool import __version__
from wtool.cli import app
from wtool.transforms import REGISTRY

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["apply", "batch", "inspect", "diff", "transforms", "new", "eval", "decompress"])
def test_every_command_has_help_with_an_example(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_eval_without_torch_says_in_one_line_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    result = invoke("eval", tmp_path, tmp_path)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "pip install 'wtool[eval]'" in result.stderr


def test_only_eval_imports_torch(llama, tmp_path):
    """The rest of wtool never imports torch or transformers, even where they are installed."""
    code = ("import sys; from wtool.cli import main; sys.argv = ['wtool', 'apply', sys.argv[1], sys.argv[2], "
            "'-t', 'quantize:bits=4', '-q']\ntry: main()\nexcept SystemExit: pass\n"
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, str(llama), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]" and (tmp_path / "o.safetensors").exists()


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_apply_writes_output_report_and_markdown(llama, tmp_path):
    out, report, md = tmp_path / "out.safetensors", tmp_path / "r.json", tmp_path / "r.md"
    result = invoke("apply", llama, out, "-t", "clip:percentile=99", "-t", "quantize:bits=4",
                    "--report", report, "--markdown", md)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert set(data) >= {"wtool_version", "input", "output", "steps", "tensors", "totals"}
    assert set(data["totals"]) >= {"tensors", "changed", "params", "bytes_in", "bytes_out", "seconds"}
    assert [s["op"] for s in data["steps"]] == ["clip", "quantize"]
    row = next(t for t in data["tensors"] if t["name"] == "lm_head.weight")
    assert set(row) >= {"name", "dtype", "shape", "steps", "changed", "before", "after", "error"}
    assert set(row["before"]) == {"numel", "min", "max", "mean", "std", "absmax", "l2", "sparsity", "nan", "inf"}
    assert set(row["error"]) == {"mse", "max_abs", "rel_l2", "sqnr_db"}
    assert "| tensor |" in md.read_text()
    assert "lm_head.weight" in result.output
    assert load_file(out)["lm_head.weight"].shape == (32, 16)


def test_json_report_on_stdout_is_pure_json(llama, tmp_path):
    result = runner.invoke(app, ["apply", str(llama), str(tmp_path / "o.safetensors"), "-t", "clip:c=1",
                                 "--report", "-"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["totals"]["changed"] > 0


def test_nonfinite_stats_are_null_in_json(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file({"w": np.array([[np.nan, np.inf], [1.0, 2.0]], np.float32)}, path)
    result = runner.invoke(app, ["inspect", str(path), "--json", "-", "-q"])
    assert result.exit_code == 0
    assert "NaN" not in result.stdout and "Infinity" not in result.stdout
    row = json.loads(result.stdout)["tensors"][0]
    assert row["nan"] == 1 and row["inf"] == 1 and row["max"] == 2.0


@pytest.mark.parametrize("args, code, message", [
    (["-t", "quantise"], 2, "did you mean 'quantize'"),
    (["-t", "quantize:bits=12"], 2, "bits='12': must be <= 8"),
    (["-t", "quantize:bitz=4"], 2, "did you mean 'bits'"),
    (["-t", "clip"], 2, "exactly one of"),
    (["-i", "nothing*"], 2, "matches no tensor"),
    (["--nonfinite", "maybe"], 2, "--nonfinite"),
    (["--max-shard-size", "lots"], 2, "lots"),
])
def test_usage_errors_exit_2_before_writing(llama, tmp_path, args, code, message):
    out = tmp_path / "out.safetensors"
    result = invoke("apply", llama, out, *args)
    assert result.exit_code == code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_invalid_input_exits_3_with_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    result = invoke("apply", bad, tmp_path / "out.safetensors")
    assert result.exit_code == 3
    assert "bad.safetensors" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_recipe_and_steps_together_are_refused(llama, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nop = "clip"\nc = 1\n')
    result = invoke("apply", llama, tmp_path / "o.safetensors", "--recipe", recipe, "-t", "quantize")
    assert result.exit_code == 2 and "not both" in result.output
    assert invoke("apply", llama, tmp_path / "o.safetensors", "--recipe", recipe).exit_code == 0


def test_dry_run_prints_the_plan_and_writes_nothing(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    result = invoke("apply", llama, out, "-t", "quantize", "--dry-run")
    assert result.exit_code == 0
    assert "dry run" in result.output and "quantize" in result.output and "ndim >= 2" in result.output
    assert not out.exists()


def test_existing_output_refused_without_force(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    result = invoke("apply", llama, out, "-t", "clip:c=1")
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_bytes() == b"precious"
    result = invoke("apply", llama, out, "-t", "clip:c=1", "--force")  # not a checkpoint: never replaced
    assert result.exit_code == 2 and "is not a checkpoint" in result.output and out.read_bytes() == b"precious"
    assert invoke("apply", llama, tmp_path / "ok.safetensors").exit_code == 0
    assert invoke("apply", llama, tmp_path / "ok.safetensors", "-t", "clip:c=1", "--force").exit_code == 0


def test_diff_gates(llama, tmp_path):
    out = tmp_path / "q.safetensors"
    assert invoke("apply", llama, out, "-t", "quantize:bits=2", "-q").exit_code == 0
    assert invoke("diff", llama, llama, "--fail-above", "rel_l2=0").exit_code == 0
    failed = invoke("diff", llama, out, "--fail-above", "rel_l2=0.01")
    assert failed.exit_code == 1 and "rel_l2" in failed.output
    assert invoke("diff", llama, out, "--fail-above", "rel_l2=10").exit_code == 0
    assert invoke("diff", llama, out, "--fail-below", "cosine=0.999999").exit_code == 1
    assert invoke("diff", llama, out, "--fail-above", "cosine=1").exit_code == 2
    result = runner.invoke(app, ["diff", str(llama), str(out), "--json", "-", "-q"])
    data = json.loads(result.stdout)
    assert data["passed"] is True
    row = next(t for t in data["tensors"] if t["name"] == "lm_head.weight")
    assert set(row) >= {"max_abs", "mse", "rel_l2", "cosine", "sqnr_db"}


def test_diff_missing_tensors_fail_unless_allowed(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"x": np.ones((2, 2), np.float32), "y": np.ones(2, np.float32)}, a)
    save_file({"x": np.ones((2, 2), np.float32), "z": np.ones((3,), np.float16)}, b)
    result = runner.invoke(app, ["diff", str(a), str(b), "--json", "-", "-q"])
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["only_in_a"] == ["y"] and data["only_in_b"] == ["z"]
    assert invoke("diff", a, b, "--allow-missing").exit_code == 0


def test_inspect_json(llama):
    result = runner.invoke(app, ["inspect", str(llama), "--json", "-", "-q"])
    data = json.loads(result.stdout)
    assert data["format"] == "safetensors" and data["metadata"]["origin"] == "test"
    assert data["totals"]["by_dtype"]["BF16"]["tensors"] == 5
    ids = next(t for t in data["tensors"] if t["name"] == "model.position_ids")
    assert ids["min"] == 0 and ids["max"] == 7 and ids["nan"] == 0


def test_transforms_lists_every_registered_transform():
    result = invoke("transforms")
    assert result.exit_code == 0
    for name in REGISTRY:
        assert name in result.output
    detail = invoke("transforms", "quantize")
    assert "group_size" in detail.output and "round" in detail.output
    assert invoke("transforms", "quantise").exit_code == 2


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_transforms_detail_shows_each_transforms_own_selection_rule(name):
    shown = " ".join(invoke("transforms", name).output.split())
    assert f"applies to: {' '.join(REGISTRY[name].applies_to.split())}" in shown


def test_tensor_names_with_markup_are_printed_literally(tmp_path):
    path = tmp_path / "odd.safetensors"
    save_file({"[bold]w[/bold]": np.ones((2, 2), np.float32)}, path)
    result = invoke("inspect", path)
    assert "[bold]w[/bold]" in result.output


def test_missing_input_is_exit_3_with_one_line(tmp_path):
    for args in (["inspect", tmp_path / "nope.safetensors"], ["apply", tmp_path / "nope.npz", tmp_path / "o.safetensors"],
                 ["diff", tmp_path / "a", tmp_path / "b"]):
        result = invoke(*args)
        assert result.exit_code == 3 and len(result.output.strip().splitlines()) == 1, result.output


def test_report_into_a_missing_folder_fails_before_writing_the_checkpoint(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    result = invoke("apply", llama, out, "-t", "clip:c=1", "--report", tmp_path / "nowhere" / "r.json")
    assert result.exit_code == 2 and "does not exist" in result.output
    assert not out.exists()


def test_value_errors_name_the_file_and_the_tensor(tmp_path):
    path = tmp_path / "nan.safetensors"
    save_file({"w": np.array([[np.nan, 1.0], [2.0, 3.0]], np.float32)}, path)
    result = invoke("apply", path, tmp_path / "o.safetensors", "-t", "quantize")
    assert result.exit_code == 3
    assert "nan.safetensors: tensor 'w': 1 non-finite" in result.output


def test_new_creates_a_checkpoint_from_a_spec(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[[tensors]]\nname = "layers.{i}.weight"\ncount = 3\nshape = [8, 4]\ndtype = "bfloat16"\n'
                    '[[tensors]]\nname = "bias"\nshape = [8]\n')
    out = tmp_path / "new.safetensors"
    result = invoke("new", spec, out)
    assert result.exit_code == 0, result.output
    tensors = load_file(out)
    assert set(tensors) == {"bias", "layers.0.weight", "layers.1.weight", "layers.2.weight"}
    assert str(tensors["layers.0.weight"].dtype) == "bfloat16" and not tensors["bias"].any()
    assert invoke("new", spec, out).exit_code == 2  # exists
    bad = tmp_path / "bad.toml"
    bad.write_text('[[tensors]]\nname = "w"\nshape = [-1]\n')
    failed = invoke("new", bad, tmp_path / "bad.safetensors")
    assert failed.exit_code == 3 and "bad.toml" in failed.output and not (tmp_path / "bad.safetensors").exists()


def test_a_closed_stdout_ends_quietly(tmp_path):
    import os
    import subprocess
    import sys

    path = tmp_path / "m.safetensors"
    save_file({f"t{i}": np.ones((2, 2), np.float32) for i in range(50)}, path)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", "wtool", "inspect", str(path), "--json", "-", "-q"],
                              stdout=write_end, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert done.returncode == 141 and done.stderr == b""


@pytest.mark.parametrize("name", ["out.gguf", "out.bin", "out.pt", "out.safetensor", "out.v2"])
def test_an_output_suffix_wtool_cannot_write_is_refused_with_a_hint(llama, tmp_path, name):
    for args in (["apply", llama, tmp_path / name], ["apply", llama, tmp_path / name, "--dry-run"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "or a folder (no suffix, or end the path with /)" in " ".join(result.output.split())
    assert list(tmp_path.iterdir()) == [llama]
    if name == "out.safetensor":
        assert "did you mean .safetensors?" in result.output


@pytest.mark.parametrize("name", ["out.bin/", "Qwen2.5-0.5B-q4", "plain"])
def test_folder_outputs_need_no_suffix_or_a_trailing_slash(llama, tmp_path, name):
    result = invoke("apply", llama, f"{tmp_path}/{name}", "-t", "clip:c=1", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    folder = tmp_path / name.rstrip("/")
    assert (folder / "model.safetensors").is_file()  # a single-file input stays one file in the folder
    assert json.loads((tmp_path / "r.json").read_text())["output"] == f"{tmp_path}/{name}"
