"""The report of a run, assembled from its records in one pass over them.

Records arrive one per output tensor and are spilled as they come (`report.Records`);
`assemble` reads them back once for the totals (count, parameters, bytes, the
parameter-weighted error, bits per weight) and once for the data-free warnings, keeping
nothing per tensor but what `Records` keeps.

>>> from wtool.report import TensorRecord
>>> totals = Totals()
>>> for row in totals.scan([TensorRecord("w", "F32", [2, 3], ["clip"], True, None, {}, {"rel_l2": 0.1,
...                                       "sqnr_db": 20.0}, {})]):
...     pass
>>> totals.tensors, totals.changed, totals.params, totals.bytes_out
(1, 1, 6, 24)
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wtool import __version__
from wtool.advice import data_free_warnings
from wtool.compressed import DecompressedReader
from wtool.report import Records, Report, TensorRecord
from wtool.stats import weighted_error
from wtool.tensor import TensorInfo

if TYPE_CHECKING:
    from wtool.pipeline import Plan


class Totals:
    """Running totals over records; `scan` adds each record it passes on."""

    def __init__(self) -> None:
        self.tensors = self.changed = self.params = self.bytes_out = 0
        self.measured = False
        self.quantized_numel = 0
        self.quantized_bits = array("d")  # numel × bits per weight of each quantized tensor, for one fsum

    def scan(self, records: Iterable[TensorRecord]) -> Iterator[dict[str, Any]]:
        """Add every record; yield the error row (`stats.weighted_error`) of each changed one."""
        for r in records:
            numel = math.prod(r.shape)
            self.tensors += 1
            self.changed += r.changed
            self.params += numel
            self.bytes_out += r.bytes_after if r.bytes_after is not None else \
                TensorInfo(r.name, r.dtype, tuple(r.shape)).nbytes
            self.measured = self.measured or r.after is not None
            if "quantize.bits_per_weight" in r.extras:
                self.quantized_numel += numel
                self.quantized_bits.append(numel * r.extras["quantize.bits_per_weight"])
            if r.changed and r.error is not None:
                yield {"name": r.name, "numel": numel, "rel_l2": r.error["rel_l2"], "sqnr_db": r.error["sqnr_db"]}


def assemble(the_plan: Plan, records: Records, output: str | Path | None, seconds: float,
             *, dry_run: bool, model_files: list[str]) -> Report:
    """The run's Report: its records, totals, what was dropped, skipped, grouped and noted."""
    reader = the_plan.reader
    totals = Totals()
    error = weighted_error(totals.scan(records))
    output_names = {chain.info.name for chain in the_plan.chains} | set(the_plan.stored)  # a packed weight is kept
    summary: dict[str, Any] = {
        "tensors": totals.tensors,
        "changed": totals.changed,
        "params": totals.params,
        "bytes_in": sum(t.nbytes for t in (reader.inner if isinstance(reader, DecompressedReader) else reader).tensors),
        "bytes_out": totals.bytes_out,
        "seconds": round(seconds, 3),
    }
    if not dry_run:
        params_in = sum(t.numel for t in reader.tensors)
        measured = totals.measured or not totals.tensors  # stats=False measures no error
        summary |= (error if measured else {}) | {
            "bits_per_weight": {"before": 8 * summary["bytes_in"] / params_in if params_in else None,
                                "after": 8 * totals.bytes_out / totals.params if totals.params else None},
            "quantized_bits_per_weight": math.fsum(totals.quantized_bits) / totals.quantized_numel
            if totals.quantized_numel else None,
        }
    return Report(
        wtool_version=__version__, input=str(reader.path), output=None if output is None else str(output),
        steps=the_plan.pipeline.describe(), tensors=records, totals=summary,
        dropped=[t.name for t in reader.tensors if t.name not in output_names],
        skipped=the_plan.skipped, groups=the_plan.groups, notes=the_plan.notes, dry_run=dry_run,
        nonfinite_policy=the_plan.pipeline.nonfinite, model_files=model_files,
        warnings=data_free_warnings(records),
    )
