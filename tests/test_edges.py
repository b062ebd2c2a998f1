"""Sharp edges of the command line: rendered help, one-line usage errors, odd environments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from wtool.cli import app

runner = CliRunner()
COMMANDS = ["apply", "inspect", "diff", "transforms", "new"]


def invoke(*args: object, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def shell(command: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run `wtool` (this interpreter's) under a POSIX shell, for redirections such as `>&-`."""
    wtool = f"'{sys.executable}' -m wtool"
    return subprocess.run(["sh", "-c", command.replace("wtool", wtool, 1)], cwd=cwd, capture_output=True,
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
