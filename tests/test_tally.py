"""The totals of a run, taken in one pass over its spilled records, agree with the records."""

from __future__ import annotations

import math

import pytest

from wtool import Pipeline, run
from wtool.stats import weighted_error

SPECS = [["clip:percentile=99", "sparsify:fraction=0.5,scope=global"],
         ["quantize:bits=4,granularity=group,group_size=32", "cast:dtype=bfloat16"],
         ["quantize:bits=4,group_size=32,storage=packed"]]


@pytest.mark.parametrize("specs", SPECS, ids=lambda specs: "+".join(s.split(":")[0] for s in specs))
def test_totals_match_the_records(specs, tmp_path):
    report = run(Pipeline.from_specs(specs), "fixtures/tiny-llama.safetensors", tmp_path / "out")
    records = list(report.tensors)
    totals = report.totals
    assert totals["tensors"] == len(records) and totals["changed"] == sum(r.changed for r in records)
    assert totals["params"] == sum(math.prod(r.shape) for r in records)
    assert totals["bytes_out"] == sum(r.bytes_after for r in records)
    rows = [{"name": r.name, "numel": math.prod(r.shape), "rel_l2": r.error["rel_l2"], "sqnr_db": r.error["sqnr_db"]}
            for r in records if r.changed and r.error is not None]
    assert {k: totals[k] for k in ("weighted_rel_l2", "weighted_sqnr_db", "worst")} == weighted_error(rows)
    quantized = [(math.prod(r.shape), r.extras["quantize.bits_per_weight"]) for r in records
                 if "quantize.bits_per_weight" in r.extras]
    expected = math.fsum(n * b for n, b in quantized) / sum(n for n, _ in quantized) if quantized else None
    assert totals["quantized_bits_per_weight"] == expected
    assert totals["bits_per_weight"]["after"] == 8 * totals["bytes_out"] / totals["params"]


def test_a_dry_run_lists_dropped_tensors_and_no_quality_totals(tmp_path):
    report = run(Pipeline.from_specs(["fold-bn", "quantize:bits=4"]), "fixtures/reference/batch_norm_resnet_block.safetensors",
                 tmp_path / "out", dry_run=True)
    names = {r.name for r in report.tensors}
    assert report.dropped and not names & set(report.dropped)
    assert "bits_per_weight" not in report.totals and report.totals["tensors"] == len(names)
