"""Data-free warnings through files: they fire where the damage is, stay quiet on healthy
tensors, and their figures match numpy computed here."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from wtool import Pipeline, run
from wtool.cli import app
from wtool.report import apply_markdown


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    outliers = (rng.normal(size=(16, 512)) * 0.04).astype(np.float32)
    outliers[5, 100] = 7.9  # one row's range set by one value, as in MiniLM's FFN outputs
    tensors = {"gauss.weight": rng.normal(size=(16, 512)).astype(np.float32), "outlier.weight": outliers,
               "tiny.weight": (rng.normal(size=(16, 512)) * 3e-3).astype(np.float32)}
    path = tmp_path / "in.safetensors"
    save_file(tensors, path)
    return path, tensors


def _warnings(path, spec, tmp_path):
    report = run(Pipeline.from_specs([spec]), path, tmp_path / "out.safetensors", force=True)
    return report, {(w["tensor"], w["kind"]): w["message"] for w in report.to_json()["warnings"]}


def test_outliers_in_a_4_bit_channel_grid(weights, tmp_path):
    path, tensors = weights
    report, found = _warnings(path, "quantize:bits=4,granularity=channel", tmp_path)
    assert set(found) == {("outlier.weight", "outliers")}
    levels = int(re.search(r"land on (\d+) of 16 levels", found["outlier.weight", "outliers"]).group(1))
    row = load_file(tmp_path / "out.safetensors")["outlier.weight"][5]
    original = tensors["outlier.weight"][5]
    bulk = np.abs(original - np.median(original)) < 3 * 0.04
    assert abs(levels - len(np.unique(row[bulk]))) <= 1  # the estimate against the levels actually used
    assert "outliers" in apply_markdown(report)


@pytest.mark.parametrize("spec", ["quantize:bits=4", "quantize:bits=8,granularity=channel",
                                  "quantize:bits=5,granularity=tensor"])
def test_no_outlier_warning_for_groups_or_more_bits(weights, tmp_path, spec):
    assert _warnings(weights[0], spec, tmp_path)[1] == {}


def test_sparsity_past_the_knee(weights, tmp_path):
    path, tensors = weights
    assert _warnings(path, "sparsify:fraction=0.5", tmp_path)[1] == {}
    _, found = _warnings(path, "sparsify:fraction=0.9,include=gauss.weight", tmp_path)
    w = tensors["gauss.weight"].astype(np.float64)
    knee = np.mean(w ** 2 < np.mean(w ** 2))
    kept = np.sum(load_file(tmp_path / "out.safetensors")["gauss.weight"].astype(np.float64) ** 2) / np.sum(w ** 2)
    assert f"is past {knee:.2f}" in found["gauss.weight", "sparsity"]
    assert f"{1 - kept:.0%} of its energy is gone" in found["gauss.weight", "sparsity"]
    assert 0.6 < knee < 0.75


def test_a_cast_that_flushes_values(weights, tmp_path):
    path, tensors = weights
    _, found = _warnings(path, "cast:dtype=float8_e4m3fn", tmp_path)
    stored = np.abs(tensors["tiny.weight"].astype(ml_dtypes.float8_e4m3fn).astype(np.float64))
    zeros = int(np.sum(stored == 0))
    subnormal = int(np.sum((stored > 0) & (stored < 2.0 ** -6)))  # e4m3's smallest normal is 2^-6
    assert f"zeros ({zeros:,}) or subnormals ({subnormal:,})" in found["tiny.weight", "flush"]
    assert ("gauss.weight", "flush") not in found
    assert _warnings(path, "cast:dtype=bfloat16", tmp_path)[1] == {}


def test_warnings_in_json_and_on_the_terminal(weights, tmp_path):
    result = CliRunner().invoke(app, ["apply", str(weights[0]), str(tmp_path / "o.safetensors"), "-t",
                                      "quantize:bits=3,granularity=channel", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["warnings"] and set(data["warnings"][0]) == {"tensor", "kind", "message"}
    assert "⚠ outlier.weight (outliers)" in result.output
