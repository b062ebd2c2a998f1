"""Report rendering: Markdown, the self-contained HTML page (rendered in headless Chromium when present)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from wtool import Pipeline, diff, run
from wtool.report import (
    Records,
    TensorRecord,
    apply_html,
    apply_markdown,
    diff_markdown,
    dumps,
    hist_lines,
    html_chunks,
    json_chunks,
    sparkline,
)


@pytest.fixture
def report(tmp_path):
    rng = np.random.default_rng(0)
    source = tmp_path / "in.safetensors"
    save_file({"a.weight": rng.normal(size=(16, 16)).astype(np.float32), "a.bias": np.ones(16, np.float32),
               "<script>alert(1)</script>": rng.normal(size=(4, 4)).astype(np.float32)}, source)
    return run(Pipeline.from_specs(["quantize:bits=2"]), source, tmp_path / "out.safetensors")


def test_sparkline():
    assert sparkline([0, 1, 2, 4], width=4) == " ▂▄█"
    assert sparkline([1] * 32, width=8) == "████████"
    assert sparkline(None) == ""


def test_hist_lines_cover_the_range():
    lines = hist_lines("w", [1, 0, 3], -1.0, 2.0, width=3)
    assert lines[0].startswith("w: 4 finite values")
    assert lines[3].endswith("███ 3") and len(lines) == 4


def test_markdown_has_a_row_per_tensor(report):
    text = apply_markdown(report)
    assert text.count("\n| `") == 3
    # quantize changes both matrices and skips the 1-D bias (ndim >= 2 by default)
    assert "**2 changed**" in text
    assert [r.name for r in report.tensors if not r.changed] == ["a.bias"]


def test_html_is_self_contained_and_escapes_names(report, tmp_path):
    page = apply_html(report)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert page.count("<tr class=") == 3
    assert page.count("<svg") == sum(r.changed for r in report.tensors)


def test_html_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    page = tmp_path / "report.html"
    page.write_text(apply_html(report), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert dom.stdout.count("<tr class=") == 3 and "<svg" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1200,600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000


def test_json_chunks_are_the_same_document(report):
    from wtool.report import dumps, json_chunks

    assert json.loads("".join(json_chunks(report))) == json.loads(dumps(report.to_json()))
    assert "".join(json_chunks(report)).count("\n") > len(report.tensors)  # one tensor per line, not one blob


def test_writing_a_long_report_holds_one_tensor_at_a_time(report, tmp_path):
    import dataclasses
    import tracemalloc

    from wtool.io.atomic import write_text
    from wtool.report import json_chunks

    long = dataclasses.replace(report, tensors=[dataclasses.replace(report.tensors[i % 3], name=f"t{i}")
                                                for i in range(3000)])
    tracemalloc.start()
    try:
        write_text(tmp_path / "r.json", json_chunks(long))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = (tmp_path / "r.json").stat().st_size
    assert len(json.loads((tmp_path / "r.json").read_text())["tensors"]) == 3000
    assert peak < size / 4, (peak, size)  # not the document, nor its dict, at once


def _rel(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(b - a) / np.linalg.norm(a))


@pytest.fixture
def mixed(tmp_path):
    """Tensors of very different sizes: the small one quantized coarsely, the big one finely."""
    rng = np.random.default_rng(1)
    source = tmp_path / "mixed.safetensors"
    save_file({f"t{i}.weight": rng.normal(size=(rows, 64)).astype(np.float32)
               for i, rows in enumerate((4, 256, 32, 8, 16, 64))} | {"bias": np.ones(8, np.float32)}, source)
    return source


def test_totals_weigh_tensors_by_their_size(mixed, tmp_path):
    out = tmp_path / "out.safetensors"
    report = run(Pipeline.from_specs(["quantize:bits=2,include=t0.weight", "quantize:bits=8,include=t1.weight",
                                      "quantize:bits=4,include=t[2-5].weight"]), mixed, out)
    a, b = load_file(mixed), load_file(out)
    changed = [n for n in a if not np.array_equal(a[n], b[n])]
    rel = {n: _rel(a[n], b[n]) for n in changed}
    power = sum(a[n].size * rel[n] ** 2 for n in changed) / sum(a[n].size for n in changed)
    totals = report.to_json()["totals"]
    assert totals["weighted_rel_l2"] == pytest.approx(np.sqrt(power), rel=1e-9)
    assert totals["weighted_sqnr_db"] == pytest.approx(-10 * np.log10(power), rel=1e-9)
    assert [w["name"] for w in totals["worst"]] == sorted(changed, key=lambda n: -rel[n])[:5]
    assert totals["bits_per_weight"] == {"before": 32.0, "after": 32.0}
    sizes = {n: a[n].size for n in changed}
    grid = (sizes["t0.weight"] * (2 + 32 / 64) + sizes["t1.weight"] * (8 + 32 / 64)
            + sum(sizes[f"t{i}.weight"] * (4 + 32 / 64) for i in range(2, 6))) / sum(sizes.values())
    assert totals["quantized_bits_per_weight"] == pytest.approx(grid)
    median = float(np.median(list(rel.values())))
    assert totals["weighted_rel_l2"] < median  # the big 8-bit tensor dominates the weighted figure


def test_totals_and_warnings_appear_in_every_format(mixed, tmp_path):
    report = run(Pipeline.from_specs(["cast:dtype=bfloat16"]), mixed, tmp_path / "out.safetensors")
    assert report.to_json()["totals"]["bits_per_weight"] == {"before": 32.0, "after": 16.0}
    text = apply_markdown(report)
    assert "parameter-weighted over changed tensors" in text and "stored bits per weight: 32 → 16" in text


def test_diff_totals_match_apply_and_gate(mixed, tmp_path):
    out = tmp_path / "out.safetensors"
    report = run(Pipeline.from_specs(["quantize:bits=3"]), mixed, out)
    result = diff(mixed, out, fail_above={"weighted_rel_l2": 0.01}, fail_below={"weighted_sqnr_db": 10})
    assert result.totals["weighted_rel_l2"] == pytest.approx(report.totals["weighted_rel_l2"], rel=1e-12)
    assert result.totals["worst"] == report.totals["worst"]
    assert result.failures == [{"tensor": "totals", "metric": "weighted_rel_l2",
                                "value": report.totals["weighted_rel_l2"], "limit": 0.01}]
    assert diff(mixed, mixed, fail_above={"weighted_rel_l2": 0}).passed
    assert "parameter-weighted" in diff_markdown(result)


def test_without_statistics_the_totals_claim_no_error(mixed, tmp_path):
    report = run(Pipeline.from_specs(["quantize:bits=4"]), mixed, tmp_path / "out.safetensors", stats=False)
    assert "weighted_rel_l2" not in report.totals and "worst" not in report.totals
    assert report.totals["quantized_bits_per_weight"] == pytest.approx(4.5)
    assert "stored bits per weight: 32 → 32" in apply_markdown(report)


# ------------------------------------------------------------------ records spilled, not kept

def _record(index: int, changed: bool = True, rel_l2: float | None = 0.1) -> TensorRecord:
    stats = {"min": -1.0, "max": 1.0, "mean": 0.0, "std": 0.5, "absmax": 1.0, "sparsity": 0.0, "nan": 0, "inf": 0}
    return TensorRecord(f"layers.{index}.weight", "F32", [2, 4], ["clip"] if changed else [], changed,
                        dict(stats), dict(stats), None if rel_l2 is None else {"rel_l2": rel_l2, "sqnr_db": 20.0},
                        {}, histogram={"low": -1.0, "high": 1.0, "before": [index] * 32, "after": [index] * 32})


def test_records_are_spilled_not_kept_in_memory():
    """10,000 records of ~2 KB each: memory grows by the store's index (17 bytes a record), not by them."""
    import tracemalloc

    tracemalloc.start()
    try:
        records = Records()
        before = tracemalloc.get_traced_memory()[0]
        for index in range(10_000):
            records.append(_record(index))
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(records) == 10_000 and records[-1].name == "layers.9999.weight"
    assert grown < 10_000 * 64, f"{grown / 10_000:.0f} bytes per record"


def test_a_report_on_a_run_holds_records_not_a_list(tmp_path):
    source = tmp_path / "in.safetensors"
    save_file({f"w{i}": np.full((2, 2), i, np.float32) for i in range(5)}, source)
    result = run(Pipeline.from_specs(["clip:c=1"]), source, tmp_path / "out.safetensors")
    assert isinstance(result.tensors, Records)
    assert [r.name for r in result.tensors] == [f"w{i}" for i in range(5)]


def test_records_rank_worst_first_and_keep_order_among_equals():
    rows = [_record(0, rel_l2=0.1), _record(1, changed=False, rel_l2=None), _record(2, rel_l2=0.5),
            _record(3, rel_l2=0.1), _record(4, rel_l2=None)]
    records = Records(rows)
    expected = sorted(rows, key=lambda r: (not r.changed, -(r.error["rel_l2"] if r.error else
                                                             (-1.0 if not r.changed else math.inf))))
    assert [r.name for r in records.ranked()] == [r.name for r in expected]
    assert [r.name for r in records.ranked()] == [f"layers.{i}.weight" for i in (4, 2, 0, 3, 1)]
    shown, hidden = records.worst(2)
    assert [r.name for r in shown] == ["layers.4.weight", "layers.2.weight"] and hidden == 3
    assert list(records) == rows and records == rows


def test_records_survive_pickling_and_a_report_built_from_a_list_gives_the_same_json(report):
    copy = pickle.loads(pickle.dumps(report))
    assert copy.tensors == report.tensors and copy.to_json() == report.to_json()
    from_list = dataclasses.replace(report, tensors=list(report.tensors))
    assert "".join(json_chunks(from_list)) == "".join(json_chunks(report))
    assert json.loads("".join(json_chunks(report))) == json.loads(dumps(report.to_json()))
    assert json.loads(dumps(report.to_json()))["tensors"] == [dataclasses.asdict(r) for r in report.tensors]


def test_html_is_written_in_pieces_one_row_each(report):
    pieces = list(html_chunks(report))
    assert len(pieces) == len(report.tensors) + 2 and "".join(pieces) == apply_html(report)


def test_small_reports_hold_no_open_file_and_large_ones_read_back_the_same():
    """A batch keeps one report per input: those under Records.KEEP tensors must not each hold a descriptor."""
    import os

    open_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    small = [Records(_record(i) for i in range(Records.KEEP)) for _ in range(50)]
    if open_before is not None:
        assert len(os.listdir("/proc/self/fd")) == open_before
    rows = [_record(i, rel_l2=(i * 37 % 101) / 100) for i in range(Records.KEEP + 5)]
    large = Records(rows)
    assert list(large) == rows and large[Records.KEEP - 1] == rows[Records.KEEP - 1] and len(small[0]) == Records.KEEP
    assert [r.name for r in large.ranked()] == [r.name for r in sorted(rows, key=lambda r: -r.error["rel_l2"])]
