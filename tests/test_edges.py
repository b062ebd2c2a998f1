"""Sharp edges of the command line: rendered help, one-line usage errors, odd environments."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from wtool.cli import app

runner = CliRunner()
COMMANDS = ["apply", "batch", "inspect", "diff", "eval", "transforms", "new"]


def invoke(*args: object, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run `wtool` (this interpreter's) under a POSIX shell, for redirections such as `>&-`."""
    command = re.sub(r"(^|&& )wtool ", lambda m: f"{m.group(1)}'{sys.executable}' -m wtool ", command)
    return subprocess.run(["sh", "-c", command], cwd=cwd, capture_output=True,
                          env={**os.environ, "WTOOL_DEBUG": "", **env}, timeout=120)


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "in.safetensors"
    rng = np.random.default_rng(0)
    save_file({f"layer{i}.weight": rng.normal(size=(8, 8)).astype(np.float32) for i in range(40)}, path)
    return path


# -- help --------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_brackets_and_no_bool_metavar(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.output


def test_help_keeps_toml_brackets_and_colons():
    assert "[[steps]]" in invoke("apply", "--help").output
    assert "[defaults], [metadata], [[tensors]]" in " ".join(invoke("new", "--help").output.split())
    shown = invoke("transforms", "sparsify").output
    assert "nm=N:M:" in shown and "Ⓜ" not in shown


# -- usage errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["-j", "0"], "--jobs"),
    (["--recipe", "missing.toml"], "missing.toml"),
    (["--max-shard-size", "5"], "needs a unit"),
    (["--rows"], "--rows"),
])
def test_usage_errors_are_one_line(small, tmp_path, args, message):
    result = invoke("apply", small, tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "╭" not in result.output


# -- odd environments --------------------------------------------------------------------------

def test_closed_stdout_still_writes_the_checkpoint(small, tmp_path):
    done = shell("wtool apply in.safetensors out.safetensors -t clip:c=1 >&-", tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.safetensors").exists()
    refused = shell("wtool apply in.safetensors out2.safetensors --report - >&-", tmp_path)
    assert refused.returncode == 2 and b"stdout is closed" in refused.stderr
    assert not (tmp_path / "out2.safetensors").exists()


def test_closed_stderr_still_works_and_fails_with_the_code(small, tmp_path):
    assert shell("wtool apply in.safetensors out.safetensors -t clip:c=1 2>&-", tmp_path).returncode == 0
    assert (tmp_path / "out.safetensors").exists()
    assert shell("wtool apply missing.safetensors o.safetensors 2>&-", tmp_path).returncode == 3


@pytest.mark.parametrize("command", [["inspect", "in.safetensors"],
                                     ["apply", "in.safetensors", "o.safetensors", "-t", "clip:c=1"]])
def test_reader_gone_is_141(small, tmp_path, command):
    read_end, write_end = os.pipe()
    os.close(read_end)  # no reader at all: every write fails, as after `| head` or `| true`
    try:
        done = subprocess.run([sys.executable, "-m", "wtool", *command], cwd=tmp_path, stdout=write_end,
                              stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert done.stderr == b""


def test_ascii_stdout_and_non_utf8_file_names(small, tmp_path):
    done = shell("wtool inspect in.safetensors", tmp_path, PYTHONIOENCODING="ascii")
    assert done.returncode == 0, done.stderr
    odd = os.fsencode(tmp_path) + b"/in\xff.safetensors"
    os.link(small, odd)
    done = subprocess.run([sys.executable, "-m", "wtool", "apply", odd, b"out.safetensors", b"--report",
                           b"r.json"], cwd=tmp_path, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["input"].endswith(".safetensors")


@pytest.mark.parametrize("columns", ["0", "3", "abc"])
def test_unusable_columns_still_prints(small, tmp_path, columns):
    done = shell("wtool inspect in.safetensors", tmp_path, COLUMNS=columns)
    assert done.returncode == 0 and b"layer0.weight" in done.stdout


# -- dry run -----------------------------------------------------------------------------------

def test_dry_run_finds_group_size_problems_as_usage_errors(small, tmp_path):
    for spec in ("quantize:granularity=group,group_size=3", "sparsify:nm=2:3"):
        result = invoke("apply", small, "--dry-run", "-t", spec)
        assert result.exit_code == 2, result.output
        assert "not divisible" in result.output and "layer0.weight" in result.output


def test_dry_run_finds_an_existing_output_before_any_pass(small, tmp_path, monkeypatch):
    from wtool.transforms.sparsify import Sparsify

    def no_pass(*args, **kwargs):
        raise AssertionError("a global fit pass ran")

    monkeypatch.setattr(Sparsify, "fit", no_pass)
    (tmp_path / "out.safetensors").write_bytes(b"keep")
    for extra in (["--dry-run"], []):
        result = invoke("apply", small, tmp_path / "out.safetensors", "-t", "sparsify:fraction=0.5,scope=global", *extra)
        assert result.exit_code == 2 and "--force" in result.output, result.output
    assert (tmp_path / "out.safetensors").read_bytes() == b"keep"


def test_dry_run_shows_dtype_and_bytes_before_and_after(small):
    result = invoke("apply", small, "--dry-run", "-t", "cast:dtype=bfloat16", "-i", "layer0.weight")
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if "layer0.weight" in line)
    assert "F32 → BF16" in row and "256 B → 128 B" in row
    assert "10.24 KB → 10.11 KB in total" in " ".join(result.output.split())


def test_dry_run_shows_changing_tensors_first_up_to_rows(tmp_path):
    names = [f"t{i:03d}" for i in range(200)]
    path = tmp_path / "many.safetensors"
    save_file({n: np.ones(4, np.float32) for n in names}, str(path))
    result = invoke("apply", path, "--dry-run", "--rows", "5", "-t", "clip:c=1,include=t19*")
    assert result.exit_code == 0, result.output
    listed = [n for n in names if re.search(rf"\b{n}\b", result.output)]
    assert listed == ["t190", "t191", "t192", "t193", "t194"]
    text = " ".join(result.output.split())
    assert "… and 195 more tensors" in text and "(10 of 200 tensors would change" in text


@pytest.mark.parametrize("command", ["apply", "inspect", "diff"])
def test_json_option_on_every_command_that_writes_json(small, tmp_path, command):
    args = {"apply": [small, tmp_path / "o.safetensors"], "inspect": [small], "diff": [small, small]}[command]
    result = invoke(command, *args, "--json", "-", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)
    assert "--json" in invoke(command, "--help").output



# -- selection ---------------------------------------------------------------------------------

def test_unmatched_pattern_shows_closest_names_and_whole_name_rule(small):
    result = invoke("apply", small, "--dry-run", "-i", "layer1.weigth")
    assert result.exit_code == 2 and "closest: 'layer1.weight'" in result.output
    result = invoke("apply", small, "--dry-run", "-i", "layer1")
    assert "match the whole name: '*layer1*' matches" in " ".join(result.output.split())
    result = invoke("inspect", small, "-i", "re:layer1")
    assert "'re:.*layer1.*' matches" in " ".join(result.output.split())


def test_default_rule_skip_shows_the_include_that_lifts_it(tmp_path):
    path = tmp_path / "b.safetensors"
    save_file({"a.bias": np.ones(4, np.float32), "b.bias": np.ones(4, np.float32)}, path)
    result = invoke("apply", path, "--dry-run", "-t", "quantize")
    assert result.exit_code == 2
    assert "-t quantize:include=*.bias" in " ".join(result.output.split())
    assert invoke("apply", path, "--dry-run", "-t", "quantize:include=*.bias").exit_code == 0


def test_regex_with_a_comma_in_a_step_gets_a_hint(small):
    result = invoke("apply", small, "--dry-run", "-t", r"clip:c=1,include=re:layer\d{1,2}.weight")
    assert result.exit_code == 2 and "a comma ends a -t parameter" in " ".join(result.output.split())


# -- reports -----------------------------------------------------------------------------------

def test_reports_carry_full_parameters_and_skips_and_sort_worst_first(tmp_path):
    path = tmp_path / "in.safetensors"
    rng = np.random.default_rng(1)
    save_file({"a.weight": rng.normal(size=(8, 8)).astype(np.float32),
               "b.weight": (rng.normal(size=(8, 8)) * 100).astype(np.float32),
               "c.bias": np.ones(8, np.float32)}, path)
    html, md = tmp_path / "r.html", tmp_path / "r.md"
    result = invoke("apply", path, tmp_path / "o.safetensors", "-t", "clip:c=1", "-t", "quantize:bits=3",
                    "--html", html, "--markdown", md)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "clip(c=1.0" in flat and "quantize(bits=3, scheme=asym" in flat
    assert "clip(c=1.0" in md.read_text() and "quantize(bits=3, scheme=asym" in html.read_text()
    page = html.read_text()
    assert "skipped by clip, quantize" in page and "c.bias" in page
    assert "same(a) ? 1 : -1" in page  # unchanged rows stay last whichever way a column sorts
    rows = [line.split("│")[1].strip() for line in result.output.splitlines() if line.startswith("│")]
    assert rows == ["b.weight", "a.weight", "c.bias"]  # worst first, unchanged last


# -- diff --------------------------------------------------------------------------------------

def test_diff_summarises_casts_and_groups_gates(small, tmp_path):
    out = tmp_path / "bf16.safetensors"
    assert invoke("apply", small, out, "-t", "cast:dtype=bfloat16", "-q").exit_code == 0
    result = invoke("diff", small, out, "--fail-above", "rel_l2=1e-9", "--fail-below", "cosine=0.9")
    assert result.exit_code == 1
    flat = " ".join(result.output.split())
    assert "dtype F32 → BF16: 40 tensor(s)" in flat and "mismatch" not in flat
    assert "FAILED rel_l2 > 1e-09: 40 tensor(s); worst: layer" in flat
    assert "passed cosine < 0.9: all 40 tensor(s)" in flat
    data = json.loads(invoke("diff", small, out, "--fail-above", "rel_l2=1e-9", "--json", "-", "-q").stdout)
    assert set(data["failures"][0]) == {"tensor", "metric", "value", "limit"}
    assert data["failures"][0]["metric"] == "rel_l2" and data["failures"][0]["limit"] == 1e-9


# -- limits ------------------------------------------------------------------------------------

def test_out_of_memory_is_one_line_exit_6_and_leaves_nothing(small, tmp_path, monkeypatch):
    from wtool.transforms.clip import Clip

    def exhausted(self, array, ctx):
        raise MemoryError

    monkeypatch.setattr(Clip, "apply", exhausted)
    result = invoke("apply", small, tmp_path / "out", "-t", "clip:c=1")
    assert result.exit_code == 6
    assert result.output.strip().splitlines() == [result.output.strip()] and "out of memory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.safetensors"]


@pytest.mark.parametrize("command", [
    "inspect snan.safetensors -q --hist a",
    "apply snan.safetensors o.safetensors -q -t clip:c=1 --nonfinite=skip",
    "apply snan.safetensors o.safetensors -q -t cast:dtype=bfloat16",
    "apply snan.safetensors o.safetensors -q -t quantize --nonfinite=zero",
])
def test_signalling_nans_print_no_warnings(tmp_path, command):
    signalling_f32 = np.array([0x7F800001, 0x3F800000, 0xFF800005, 0x40000000], np.uint32).view(np.float32)
    signalling_f16 = np.array([0x7C01, 0x3C00, 0x7D00, 0x4000], np.uint16).view(np.float16)
    save_file({"a": signalling_f32.reshape(2, 2), "b": signalling_f16.reshape(2, 2)}, tmp_path / "snan.safetensors")
    done = shell(f"wtool {command}", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    if command.startswith("apply"):
        assert shell("wtool diff snan.safetensors o.safetensors -q", tmp_path).stderr == b""


def test_many_shards_under_a_small_open_file_limit(tmp_path):
    from wtool.io import create_writer
    from wtool.tensor import TensorInfo

    infos = [TensorInfo(f"t{i}", "F32", (4,)) for i in range(300)]
    with create_writer(tmp_path / "hf", infos, {}, max_shard_size=16) as writer:
        for info in infos:
            writer.write(info.name, np.full(4, float(info.name[1:]), np.float32))
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) == 300
    done = shell("ulimit -n 256 && wtool apply hf out.safetensors -t clip:c=100,include=* -q "
                 "&& wtool apply hf out2 --max-shard-size 16B -q", tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out2").glob("*.safetensors"))) == 300


def test_validating_the_output_does_not_map_it(small, tmp_path, monkeypatch):
    import safetensors

    opened_sizes = []
    real_open = safetensors.safe_open

    def recording(path, *args, **kwargs):
        opened_sizes.append(os.path.getsize(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safetensors, "safe_open", recording)
    big = tmp_path / "big.safetensors"
    save_file({f"w{i}": np.ones((256, 1024), np.float32) for i in range(8)}, big)  # 8 MiB
    for out in ("o.safetensors", "folder"):
        assert invoke("apply", big, tmp_path / out, "-q").exit_code == 0
    assert opened_sizes and max(opened_sizes) < 4096  # header-only probes, never the 8 MiB file


def test_a_faithful_copy_of_a_header_at_the_limit_still_works(tmp_path, monkeypatch):
    import wtool.io.safetensors
    import wtool.outputs

    limit = 100_000  # the real 100 MB limit, scaled down so the test runs in a blink
    for module in (wtool.io.safetensors, wtool.outputs):
        monkeypatch.setattr(module, "MAX_HEADER_BYTES", limit)
    data = np.arange(4, dtype=np.float32)
    bare = {"__metadata__": {"format": "pt", "pad": ""}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    size = len(json.dumps(bare, separators=(",", ":")).encode())
    bare["__metadata__"]["pad"] = "x" * (limit - 40 - size)  # 40 bytes below the limit
    header = json.dumps(bare, separators=(",", ":")).encode()
    path = tmp_path / "edge.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data.tobytes())
    result = invoke("apply", path, tmp_path / "copy.safetensors", "-q", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    assert any("'wtool' left out" in note for note in notes)
    assert invoke("inspect", tmp_path / "copy.safetensors", "-q").exit_code == 0
