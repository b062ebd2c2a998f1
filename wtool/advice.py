"""Data-free warnings: what a report's figures say about damage its medians would hide.

Each rule reads one tensor's record (statistics and the figures its steps put in `extras`)
and needs no data and no model run:

- `outliers`: a tensor or channel grid of 4 bits or fewer whose range a few outliers set, so
  that most of a row lands on a quarter of the levels or fewer (`quantize.bulk_levels`);
- `sparsity`: zeros past the tensor's own knee, where its energy starts to drop faster than
  its weights (`sparsify.knee`, `sparsify.energy_kept`);
- `flush`: a cast that turns more than 5 % of the values into zeros or subnormals.

>>> data_free_warnings(report.tensors)  # doctest: +SKIP
[{'tensor': 'encoder.layer.2.output.dense.weight', 'kind': 'outliers', 'message': '...'}]
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from wtool.report import TensorRecord

FLUSH_SHARE = 0.05  # a cast that flushes more than this share of the values is worth a warning


def data_free_warnings(records: Iterable[TensorRecord]) -> list[dict[str, Any]]:
    """{"tensor", "kind", "message"} for each rule a tensor breaks, by kind, the worst first."""
    found = [(kind, -severity, index, {"tensor": record.name, "kind": kind, "message": message})
             for index, record in enumerate(records) for kind, severity, message in _rules(record)]
    return [warning for *_, warning in sorted(found, key=lambda item: item[:3])]


def _rules(record: TensorRecord) -> list[tuple[str, float, str]]:
    """(kind, severity, message) of each rule `record` breaks; severity orders one kind's warnings."""
    extras, out = record.extras, []
    levels = extras.get("quantize.bulk_levels")
    if levels is not None:
        grid = extras["quantize.grid"]
        count = 2 ** int(grid.split("-")[0])
        if levels <= count // 4:
            out.append(("outliers", -levels,
                        f"absmax/σ = {extras['quantize.outlier_ratio']:.0f}: a {grid} grid spends its range on "
                        f"outliers, and most values of its worst row land on {levels} of {count} levels; use "
                        "granularity=group (the default at <= 4 bits), more bits or bits=auto"))
    knee, sparsity = extras.get("sparsify.knee"), (record.after or {}).get("sparsity")
    if knee is not None and sparsity is not None and sparsity > knee:
        gone = 1 - extras["sparsify.energy_kept"]
        out.append(("sparsity", gone,
                    f"sparsity {sparsity:.2f} is past {knee:.2f}, where this tensor's energy drops sharply "
                    f"(each further zero removes more than the mean w²): {gone:.0%} of its energy is gone"))
    lost = extras.get("cast.flushed_to_zero", 0) + extras.get("cast.subnormal", 0)
    numel = math.prod(record.shape)
    if numel and lost > FLUSH_SHARE * numel:
        out.append(("flush", lost / numel,
                    f"cast to {record.dtype} turns {lost / numel:.1%} of the values into zeros "
                    f"({extras['cast.flushed_to_zero']:,}) or subnormals ({extras['cast.subnormal']:,}); "
                    "scale the tensor first or keep a wider dtype"))
    return out
