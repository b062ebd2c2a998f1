"""Read-only analyses: `inspect` one checkpoint, `diff` two of them (with CI gates).

Both stream tensor by tensor, like `apply`.

>>> report = diff("fixtures/tiny-llama.safetensors", "fixtures/tiny-llama.safetensors", fail_above={"rel_l2": 0.05})
>>> report.passed
True
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wtool.compressed import DecompressedReader
from wtool.errors import UsageError
from wtool.io import Reader, open_checkpoint
from wtool.measure import Behind, Measurer
from wtool.pipeline import Progress
from wtool.report import DiffReport, InspectReport
from wtool.selection import Selector, no_match_hint
from wtool.stats import cosine, error_metrics, histogram, tensor_stats, weighted_error
from wtool.tensor import values

ABOVE_METRICS = ("max_abs", "mse", "rel_l2", "weighted_rel_l2")
BELOW_METRICS = ("cosine", "sqnr_db", "weighted_sqnr_db")
#: Gates on the totals (over every changed tensor) rather than on each tensor.
TOTAL_METRICS = ("weighted_rel_l2", "weighted_sqnr_db")


def inspect(path: str | Path, selector: Selector | None = None, *, allow_empty: bool = False,
            progress: Progress | None = None) -> InspectReport:
    """Statistics of every (selected) tensor, totals by dtype, metadata and format.

    A weight stored in a compressed layout (packed int, fp8 + scale, codebook) is one row with
    the statistics of its dense values and a `layout`: scheme, bytes stored, bits per weight
    (scales and zero points included) and compression ratio against its dense dtype. Totals:
    `bytes` as stored, `dense_bytes` as they would be decompressed; `by_dtype` counts what is stored.
    """
    selector = selector or Selector()
    with open_checkpoint(path) as stored, DecompressedReader(stored) as reader, \
            Measurer(advice="run again") as measurer:  # inspect has no --no-stats
        names = [t.name for t in reader.tensors]
        _check_patterns(selector, names, allow_empty, str(reader.path))
        chosen = [t for t in reader.tensors if selector.admits(t.name)]
        if progress:
            progress.start(len(chosen), sum(t.nbytes for t in chosen))
        if any(Measurer.worth(t.nbytes) for t in chosen):
            measurer.start()
            if any(Measurer.worth(t.nbytes) and reader.stored(t.name) is None for t in chosen):
                measurer.share("read")  # what the process cannot read from the input is read into memory it maps
        behind = Behind(measurer)  # a tensor's statistics there when it has room, here otherwise
        parts, by_dtype = [], {}
        dense_bytes = 0
        for info in chosen:
            head = {"name": info.name, "dtype": info.dtype, "shape": list(info.shape)}
            figures: dict[str, Any] = {}
            tensor = reader.stored(info.name) or reader.read(info.name)  # stored: the process reads it itself
            if not behind.one(figures, figures.update, tensor):
                figures.update(tensor_stats(values(tensor)))
            del tensor
            layout = reader.layouts.get(info.name)
            pieces = layout.pieces if layout else (info,)
            tail = {}
            if layout:
                tail["layout"] = {"format": layout.scheme.format, "scheme": layout.scheme.label(),
                                  "stored_bytes": layout.stored_bytes,
                                  "bits_per_weight": round(layout.bits_per_weight, 4),
                                  "ratio": round(info.nbytes / layout.stored_bytes, 4),
                                  "tensors": [p.name for p in layout.pieces]}
            parts.append((head, figures, tail))
            dense_bytes += info.nbytes
            for piece in pieces:
                bucket = by_dtype.setdefault(piece.dtype, {"tensors": 0, "params": 0, "bytes": 0})
                bucket["tensors"] += 1
                bucket["params"] += piece.numel
                bucket["bytes"] += piece.nbytes
            if progress:
                progress.advance(info)
        behind.wait()
        rows = [{**head, **figures, **tail} for head, figures, tail in parts]
        totals = {"tensors": len(rows), "params": sum(int(np.prod(r["shape"], dtype=np.int64)) for r in rows),
                  "bytes": sum(b["bytes"] for b in by_dtype.values()), "dense_bytes": dense_bytes,
                  "by_dtype": by_dtype}
        return InspectReport(str(reader.path), reader.format, dict(stored.metadata), rows, totals)


def value_histogram(path: str | Path, name: str, bins: int = 24) -> tuple[list[int], float, float]:
    """Counts of one tensor's finite values in `bins` equal bins between its min and max."""
    with open_checkpoint(path) as reader:
        if name not in reader:
            close = [t.name for t in reader.tensors if name in t.name][:3]
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(f"{reader.path}: no tensor named {name!r}{hint}")
        array = reader.read(name)
        found = tensor_stats(array)
        if found["min"] is None:
            return [0] * bins, 0.0, 0.0
        return histogram(array, found["min"], found["max"], bins), found["min"], found["max"]


def parse_gates(items: list[str], allowed: tuple[str, ...], option: str) -> dict[str, float]:
    """Parse `METRIC=VALUE` gate options.

    >>> parse_gates(["rel_l2=0.05"], ABOVE_METRICS, "--fail-above")
    {'rel_l2': 0.05}
    """
    gates = {}
    for item in items:
        metric, sep, value = item.partition("=")
        metric = metric.strip()
        if not sep or metric not in allowed:
            raise UsageError(f"{option} {item!r}: expected METRIC=VALUE with METRIC one of {', '.join(allowed)}")
        try:
            gates[metric] = float(value)
        except ValueError:
            raise UsageError(f"{option} {item!r}: {value!r} is not a number") from None
    return gates


def diff(a: str | Path, b: str | Path, selector: Selector | None = None, *,
         fail_above: Mapping[str, float] | None = None, fail_below: Mapping[str, float] | None = None,
         allow_missing: bool = False, allow_empty: bool = False,
         progress: Progress | None = None) -> DiffReport:
    """Compare tensors of the same name in A (reference) and B.

    Failures (which make the CLI exit 1): a gate exceeded by any tensor; tensors only in one
    side (unless `allow_missing`); shapes that differ. A dtype difference is reported, and
    the values are still compared.
    """
    selector = selector or Selector()
    fail_above, fail_below = dict(fail_above or {}), dict(fail_below or {})
    with open_checkpoint(a) as left, open_checkpoint(b) as right:
        names_a = [t.name for t in left.tensors if selector.admits(t.name)]
        names_b = [t.name for t in right.tensors if selector.admits(t.name)]
        _check_patterns(selector, [t.name for t in left.tensors] + [t.name for t in right.tensors],
                        allow_empty, f"{left.path} or {right.path}")
        in_b = set(names_b)
        only_a = [n for n in names_a if n not in in_b]
        only_b = [n for n in names_b if n not in set(names_a)]
        rows, mismatched, failures, changed = [], [], [], []
        if progress:
            common = [left.info(n) for n in names_a if n in in_b]
            progress.start(len(common), sum(t.nbytes for t in common))
        for name in names_a:
            if name not in in_b:
                continue
            info_a, info_b = left.info(name), right.info(name)
            if info_a.shape != info_b.shape or info_a.dtype != info_b.dtype:
                mismatched.append({"name": name, "a": f"{info_a.dtype} {list(info_a.shape)}",
                                   "b": f"{info_b.dtype} {list(info_b.shape)}"})
            if info_a.shape != info_b.shape:
                failures.append(_failure(name, "shape", f"{list(info_a.shape)} in A, {list(info_b.shape)} in B"))
                continue
            x, y = left.read(name), right.read(name)
            metrics = error_metrics(x, y)
            row = {"name": name, "dtype": info_a.dtype, "shape": list(info_a.shape),
                   "max_abs": metrics["max_abs"], "mse": metrics["mse"], "rel_l2": metrics["rel_l2"],
                   "cosine": cosine(x, y), "sqnr_db": metrics["sqnr_db"]}
            rows.append(row)
            if metrics["max_abs"] != 0:
                changed.append({"name": name, "numel": info_a.numel, "rel_l2": row["rel_l2"], "sqnr_db": row["sqnr_db"]})
            failures.extend(_gate_failures(row, _per_tensor(fail_above), _per_tensor(fail_below)))
            if progress:
                progress.advance(info_a)
        if not allow_missing:
            failures.extend(_failure(n, "missing", "only in A") for n in only_a)
            failures.extend(_failure(n, "missing", "only in B") for n in only_b)
        totals = {"changed": len(changed), **weighted_error(changed),
                  "bits_per_weight": {"before": _stored_bits(left, names_a), "after": _stored_bits(right, names_b)}}
        failures.extend(_total_failures(totals, fail_above, fail_below))
        gates = {f"{k}>": v for k, v in fail_above.items()} | {f"{k}<": v for k, v in fail_below.items()}
        return DiffReport(str(left.path), str(right.path), rows, only_a, only_b, mismatched, gates, failures, totals)


def _per_tensor(gates: Mapping[str, float]) -> dict[str, float]:
    return {k: v for k, v in gates.items() if k not in TOTAL_METRICS}


def _stored_bits(reader: Reader, names: list[str]) -> float | None:
    """Stored bits per weight of the named tensors."""
    infos = [reader.info(n) for n in names]
    count = sum(i.numel for i in infos)
    return 8 * sum(i.nbytes for i in infos) / count if count else None


def _total_failures(totals: Mapping[str, Any], above: Mapping[str, float], below: Mapping[str, float]) -> list[dict]:
    """Gates on the weighted totals (tensor "totals"); None is an infinite error (above) or no
    error at all (below)."""
    failures = []
    for metric in TOTAL_METRICS:
        value = totals[metric]
        if metric in above and (value is None or value > above[metric]):
            failures.append(_failure("totals", metric, value, above[metric]))
        if metric in below and value is not None and value < below[metric]:
            failures.append(_failure("totals", metric, value, below[metric]))
    return failures


def _failure(tensor: str, metric: str, value: float | str | None, limit: float | None = None) -> dict:
    """One failure as the JSON report carries it: `{"tensor", "metric", "value", "limit"}`."""
    return {"tensor": tensor, "metric": metric, "value": value, "limit": limit}


def _gate_failures(row: dict, above: Mapping[str, float], below: Mapping[str, float]) -> list[dict]:
    """None means infinite error (above) or a perfect match (sqnr_db) / undefined cosine."""
    failures = []
    for metric, limit in above.items():
        value = row[metric]
        if value is None or value > limit:
            failures.append(_failure(row["name"], metric, value, limit))
    for metric, limit in below.items():
        value = row[metric]
        if value is None and row["max_abs"] == 0:  # identical tensors: nothing to gate
            continue
        if value is None or value < limit:
            failures.append(_failure(row["name"], metric, value, limit))
    return failures


def _check_patterns(selector: Selector, names: list[str], allow_empty: bool, where: str) -> None:
    if allow_empty:
        return
    for pattern in selector.unmatched(names):
        raise UsageError(f"pattern {pattern!r} matches no tensor in {where}{no_match_hint(pattern, names)} "
                         "(use --allow-empty to allow)")
    if names and not any(selector.admits(n) for n in names):
        raise UsageError(f"include/exclude select no tensor in {where} (use --allow-empty to allow)")
