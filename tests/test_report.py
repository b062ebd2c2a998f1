"""Report rendering: Markdown, the self-contained HTML page (rendered in headless Chromium when present)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from safetensors.numpy import save_file

from wtool import Pipeline, run
from wtool.report import apply_html, apply_markdown, hist_lines, sparkline


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
    assert "**2 changed**" in text or "**3 changed**" in text


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
