"""Reports: plain data objects, rendered as a rich table, JSON or Markdown.

The JSON keys are a public contract (scripts and CI jobs parse them); non-finite numbers
are written as null, never as NaN tokens.

>>> import json, wtool
>>> report = wtool.run(wtool.Pipeline.from_specs(["clip:c=0.1"]), "fixtures/tiny-llama.safetensors", None)
>>> json.loads(dumps(report.to_json()))["dry_run"]     # dumps: the --report FILE.json contents
True
>>> apply_markdown(report).startswith("### wtool apply")  # the --markdown summary
True
"""

from __future__ import annotations

import html
import json
import math
import pickle
import tempfile
from array import array
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from itertools import islice
from typing import IO, Any

import numpy as np

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from wtool.tensor import TensorInfo

SHOW_ROWS = 30


@dataclass(slots=True)
class TensorRecord:
    """One output tensor: what happened to it and its statistics before and after."""

    name: str
    dtype: str
    shape: list[int]
    steps: list[str]
    changed: bool
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    error: dict[str, Any] | None
    extras: dict[str, Any]
    dtype_before: str | None = None
    histogram: dict[str, Any] | None = None
    #: Bytes of the input tensor of the same name (None when new) and of this output tensor.
    bytes_before: int | None = None
    bytes_after: int | None = None


_RECORD_FIELDS = tuple(f.name for f in fields(TensorRecord))  # a record is spilled as a tuple: smaller, faster


class Records:
    """The per-tensor records of a run, in the order they were added. Past `KEEP` of them they
    are spilled to an anonymous temporary file (gone when closed, or when the process ends
    however it ends), and so is every one after.

    Memory then holds 17 bytes per record (where it is in the file, and the rank `worst` sorts
    by), so a report on 100,000 tensors costs about as much as their header, not their
    statistics; a small report (a batch holds one per input) keeps no file open. Iterating
    reads the records back; `worst` reads only the rows it returns.

    >>> records = Records([TensorRecord("a", "F32", [2], [], False, None, None, None, {}),
    ...                    TensorRecord("b", "F32", [2], ["clip"], True, None, None, {"rel_l2": 0.5}, {})])
    >>> len(records), [r.name for r in records], [r.name for r in records.worst(1)[0]], records.worst(1)[1]
    (2, ['a', 'b'], ['b'], 1)
    """

    #: Records kept in memory before the first spill.
    KEEP = 1000

    def __init__(self, records: Iterable[TensorRecord] = ()) -> None:
        self._fill(records)

    def _fill(self, records: Iterable[TensorRecord]) -> None:
        self._kept: list[TensorRecord] = []
        self._file: IO[bytes] | None = None
        self._offsets = array("q")
        self._unchanged = array("b")
        self._rank = array("d")  # minus the relative error (`_rel`): the worst sorts first
        for record in records:
            self.append(record)

    def append(self, record: TensorRecord) -> None:
        self._unchanged.append(not record.changed)
        self._rank.append(-_rel(record))
        if self._file is None and len(self._kept) < self.KEEP:
            self._kept.append(record)
            return
        if self._file is None:
            self._file = tempfile.TemporaryFile(prefix="wtool-records-")
            for kept in self._kept:
                self._spill(kept)
            self._kept = []
        self._spill(record)

    def _spill(self, record: TensorRecord) -> None:
        assert self._file is not None
        self._file.seek(0, 2)
        self._offsets.append(self._file.tell())
        pickle.dump(tuple([getattr(record, name) for name in _RECORD_FIELDS]), self._file,
                    protocol=pickle.HIGHEST_PROTOCOL)

    def __len__(self) -> int:
        return len(self._rank)

    def _read(self, index: int) -> TensorRecord:
        if self._file is None:
            return self._kept[index]
        self._file.seek(self._offsets[index])
        return TensorRecord(*pickle.load(self._file))

    def __iter__(self) -> Iterator[TensorRecord]:
        for index in range(len(self)):
            yield self._read(index)

    def __getitem__(self, index: int) -> TensorRecord:
        return self._read(range(len(self))[index])

    def ranked(self) -> Iterator[TensorRecord]:
        """Every record, worst first: changed ones by decreasing relative error (in the order
        they were added among equals), unchanged ones last."""
        rank = np.array(self._rank, dtype=np.float64)
        unchanged = np.array(self._unchanged, dtype=np.int8)
        for index in np.lexsort((rank, unchanged)):  # stable: ties keep their order
            yield self._read(int(index))

    def worst(self, limit: int = SHOW_ROWS) -> tuple[list[TensorRecord], int]:
        """The first `limit` records of `ranked`, and how many did not fit."""
        shown = list(islice(self.ranked(), limit))
        return shown, len(self) - len(shown)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Records, list)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"<Records: {len(self)} tensors>"

    def __getstate__(self) -> list[TensorRecord]:  # pickled (batch workers) as the records themselves
        return list(self)

    def __setstate__(self, records: list[TensorRecord]) -> None:
        self._fill(records)


@dataclass
class SkipRecord:
    """A tensor a step left alone by its default rule, and why."""

    name: str
    op: str
    reason: str


@dataclass
class GroupRecord:
    """Tensors a group transform merged: what it read, wrote, created and dropped."""

    op: str
    note: str
    inputs: list[str]
    outputs: list[str]
    created: list[str]
    dropped: list[str]
    #: Bytes of the group's inputs and of its outputs (for a compressed layout: dense → stored).
    bytes_before: int | None = None
    bytes_after: int | None = None
    #: For one weight stored in a compressed layout: its scheme, e.g. "int4 sym group 128".
    layout: str | None = None


@dataclass
class Report:
    """The result of `wtool apply` (or its plan, when `dry_run`)."""

    wtool_version: str
    input: str
    output: str | None
    steps: list[dict[str, Any]]
    #: Spilled to a temporary file as they come (`Records`); a list given here is spilled too.
    tensors: Records
    totals: dict[str, Any]
    dropped: list[str] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False
    nonfinite_policy: str = "error"
    model_files: list[str] = field(default_factory=list)
    #: Data-free warnings ({"tensor", "kind", "message"}), see `wtool.advice`.
    warnings: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, Records):
            self.tensors = Records(self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {f.name: [_clean(asdict(r)) for r in self.tensors] if f.name == "tensors"
                else _clean(_plain(getattr(self, f.name))) for f in fields(self)}

    def worst(self, limit: int = SHOW_ROWS) -> tuple[list[TensorRecord], int]:
        """The rows worth showing, worst first: changed tensors by decreasing relative error
        (checkpoint order among equals), unchanged ones last; and how many did not fit."""
        return self.tensors.worst(limit)

    def pipeline_label(self) -> str:
        """Every step with its full parameters, e.g. `clip(percentile=99.9) → quantize(bits=4, ...)`."""
        return " → ".join(step_label(step) for step in self.steps) or "copy (no steps)"


def step_label(step: dict[str, Any]) -> str:
    """`op(key=value, ...)` with the step's own include/exclude patterns (unset parameters left out)."""
    params = {**{k: v for k, v in step.get("params", {}).items() if v is not None},
              **{k: step[k] for k in ("include", "exclude") if step.get(k)}}
    return f"{step['op']}({', '.join(f'{k}={v}' for k, v in params.items())})"


@dataclass
class InspectReport:
    """The result of `wtool inspect`: per-tensor statistics, totals by dtype, metadata."""

    path: str
    format: str
    metadata: dict[str, str]
    tensors: list[dict[str, Any]]
    totals: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return _clean(asdict(self))


@dataclass
class DiffReport:
    """The result of `wtool diff A B`: per common tensor error metrics, and what differs."""

    a: str
    b: str
    tensors: list[dict[str, Any]]
    only_in_a: list[str]
    only_in_b: list[str]
    mismatched: list[dict[str, Any]]
    gates: dict[str, float]
    failures: list[dict[str, Any]]
    #: weighted_rel_l2, weighted_sqnr_db, worst (over tensors whose values differ), bits_per_weight
    totals: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self, worst: int = 3) -> list[str]:
        """One line per failing metric (with the worst offenders), per passing gate, and one per
        dtype change (a cast shows as one line, not one per tensor)."""
        lines = []
        changes: dict[tuple[str, str], int] = {}
        for m in self.mismatched:
            if m["a"].split(" ", 1)[1] == m["b"].split(" ", 1)[1]:
                key = (m["a"].split(" ", 1)[0], m["b"].split(" ", 1)[0])
                changes[key] = changes.get(key, 0) + 1
        lines += [f"dtype {a} → {b}: {count} tensor(s)" for (a, b), count in changes.items()]
        failing: dict[str, list[dict[str, Any]]] = {}
        for f in self.failures:
            failing.setdefault(f["metric"], []).append(f)
        for metric, items in failing.items():
            gate = next((g for g in self.gates if g[:-1] == metric), None)
            if gate is None:  # shapes, missing tensors
                shown = ", ".join(f"{f['tensor']} ({f['value']})" for f in items[:worst])
                lines.append(f"FAILED {metric}: {len(items)} tensor(s): {shown}{' …' if len(items) > worst else ''}")
                continue
            above = gate.endswith(">")
            items = sorted(items, key=lambda f: _severity(f["value"], above))
            shown = ", ".join(f"{f['tensor']} ({fmt(f['value'])})" for f in items[:worst])
            lines.append(f"FAILED {metric} {gate[-1]} {fmt(self.gates[gate])}: {len(items)} tensor(s); worst: {shown}")
        for gate, limit in self.gates.items():
            metric, above = gate[:-1], gate.endswith(">")
            if metric in failing:
                continue
            if metric in self.totals:  # a gate on the weighted totals
                lines.append(f"passed {metric} {gate[-1]} {fmt(limit)}: {fmt(self.totals[metric])} over the changed "
                             "tensors")
                continue
            values = [(r[metric], r["name"]) for r in self.tensors if r.get(metric) is not None]
            worst_row = min(values, key=lambda v: _severity(v[0], above)) if values else None
            where = f" (worst {fmt(worst_row[0])} on {worst_row[1]})" if worst_row else ""
            lines.append(f"passed {metric} {gate[-1]} {fmt(limit)}: all {len(self.tensors)} tensor(s){where}")
        return lines

    def to_json(self) -> dict[str, Any]:
        data = _clean(asdict(self))
        data["passed"] = self.passed
        return data


# ------------------------------------------------------------------ JSON

def _clean(value: Any) -> Any:
    """Replace NaN/Inf anywhere in the structure by None so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, Records):  # inside a dataclass `asdict` copied (a batch item's report)
        return [_clean(asdict(r)) for r in value]
    return value


def dumps(data: dict[str, Any]) -> str:
    """Standard JSON (allow_nan=False: a NaN token would break strict parsers like jq's)."""
    return json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False)


def _plain(value: Any) -> Any:
    """Dataclasses (and lists of them) as plain dicts, as `asdict` would make them."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def json_chunks(report: Report | InspectReport | DiffReport) -> Iterator[str]:
    """The report's JSON (the same document as `dumps(report.to_json())`) in pieces, one tensor
    per line, so that a report on 100,000 tensors is never one string or one dict in memory."""
    head = {f.name: _clean(_plain(getattr(report, f.name))) for f in fields(report) if f.name != "tensors"}
    head = {f.name: head.get(f.name) for f in fields(report)}  # keep the fields' order
    if isinstance(report, DiffReport):
        head["passed"] = report.passed
    yield "{\n"
    for position, key in enumerate(head):
        yield f"  {json.dumps(key)}: "
        if key == "tensors":
            opened = False
            for row in report.tensors:
                yield (",\n    " if opened else "[\n    ") + json.dumps(_clean(_plain(row)), allow_nan=False,
                                                                   ensure_ascii=False)
                opened = True
            yield "\n  ]" if opened else "[]"
        else:
            yield dumps(head[key]).replace("\n", "\n  ")
        yield ",\n" if position + 1 < len(head) else "\n"
    yield "}\n"


# ------------------------------------------------------------------ formatting helpers

def _severity(value: float | None, above: bool) -> float:
    """Sort key putting the worst value first: largest for an upper gate, smallest for a lower one
    (None is an infinite error, or an undefined cosine)."""
    if value is None:
        return -math.inf
    return -value if above else value


def _rel(record: TensorRecord) -> float:
    """Rank for `worst`: the relative error; a changed tensor without one ranks first, unless it is
    new (a created tensor, a piece of a compressed layout), which ranks after every error."""
    value = (record.error or {}).get("rel_l2")
    if value is not None:
        return value
    if not record.changed:
        return -1.0
    return math.inf if record.before is not None else 0.0


def fmt(value: Any, digits: int = 4) -> str:
    """Numbers for people: 4 significant digits, '-' for missing, 'inf' for None errors."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.{digits}g}"
    return str(value)


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1000
    return f"{size:.2f} TB"


SPARKS = " ▁▂▃▄▅▆▇█"


def sparkline(counts: list[int] | None, width: int = 8) -> str:
    """Counts as a row of block characters, `width` wide (bins summed to fit); blank = empty bin."""
    if not counts:
        return ""
    step = max(1, len(counts) // width)
    merged = [sum(counts[i:i + step]) for i in range(0, len(counts), step)]
    top = max(merged) or 1
    return "".join(SPARKS[0] if c == 0 else SPARKS[max(1, round(c / top * (len(SPARKS) - 1)))] for c in merged)


def _hist_pair(record: TensorRecord) -> str:
    h = record.histogram
    if not h:
        return "-"
    before = sparkline(h["before"]) if h.get("before") else ""
    return f"{before} → {sparkline(h['after'])}" if before else sparkline(h["after"])


def arrow(before: str | None, after: str) -> str:
    """`before → after`, or just `after` when nothing changes (or nothing came before)."""
    return after if not before or before == after else f"{before} → {after}"
def _bytes_pair(record: TensorRecord | GroupRecord) -> str:
    """`before → after` in bytes, `→ after` for a new tensor, one figure when unchanged."""
    if record.bytes_after is None:
        return "-"
    after = human_bytes(record.bytes_after)
    if record.bytes_before is None:
        return f"→ {after}"
    return after if record.bytes_before == record.bytes_after else f"{human_bytes(record.bytes_before)} → {after}"


def _shape(shape: list[int]) -> str:
    return "×".join(map(str, shape)) if shape else "scalar"


def _pair(before: dict[str, Any] | None, after: dict[str, Any] | None, key: str) -> str:
    a = fmt(before.get(key)) if before else "-"
    b = fmt(after.get(key)) if after else "-"
    return a if a == b else f"{a} → {b}"


def totals_lines(totals: dict[str, Any]) -> list[str]:
    """The honest totals in words: parameter-weighted error, worst tensors, bits per weight."""
    if "bits_per_weight" not in totals:
        return []
    lines = []
    if totals.get("worst"):
        sqnr = totals["weighted_sqnr_db"]
        lines.append(f"parameter-weighted over changed tensors: rel_l2 {fmt(totals['weighted_rel_l2'])}, "
                     f"SQNR {fmt(sqnr, 3) + ' dB' if sqnr is not None else 'inf'}; worst: "
                     + ", ".join(f"{w['name']} ({fmt(w['rel_l2'])})" for w in totals["worst"]))
    stored = totals["bits_per_weight"]
    line = f"stored bits per weight: {fmt(stored['before'], 3)} → {fmt(stored['after'], 3)}"
    if totals.get("quantized_bits_per_weight") is not None:
        line += (f"; quantized tensors' grid: {fmt(totals['quantized_bits_per_weight'], 3)} bits per weight "
                 "(scales and offsets counted)")
    return [*lines, line]


# ------------------------------------------------------------------ rich tables

def apply_table(report: Report, limit: int = SHOW_ROWS, sparklines: bool = True) -> Table:
    """The terminal table after `apply`: one row per tensor, totals underneath; the value
    histograms as sparklines when the terminal is wide enough for them."""
    rows, hidden = report.worst(limit)
    title = "wtool plan (dry run)" if report.dry_run else f"wtool apply: {escape(report.input)} → {escape(str(report.output))}"
    table = Table(title=title, title_justify="left", show_footer=False)
    longest = max((len(r.name) for r in rows), default=10)
    step_lists = {tuple(r.steps) for r in rows if r.steps}
    uniform = len(step_lists) <= 1  # then rows just say yes/no
    if report.steps:
        table.title += escape(f"\n{report.pipeline_label()}")
    for column, justify in (("tensor", "left"), ("shape", "right"), ("dtype", "left"),
                            ("steps", "left"), ("absmax", "right"), ("std", "right"), ("sparsity", "right"),
                            ("rel_l2", "right"), ("sqnr dB", "right"), ("bytes", "right"),
                            ("values before → after", "left"))[:None if sparklines else -1]:
        table.add_column(column, justify=justify, overflow="fold",
                         min_width=min(longest, 32) if column == "tensor" and sparklines else None)
    for r in rows:
        dtype = arrow(r.dtype_before, r.dtype)
        error = r.error or {}
        style = None if r.changed else "dim"
        steps = ("all" if r.steps else "-") if uniform else escape(" → ".join(r.steps)) or "-"
        table.add_row(escape(r.name), _shape(r.shape), dtype, steps,
                      _pair(r.before, r.after, "absmax"), _pair(r.before, r.after, "std"),
                      _pair(r.before, r.after, "sparsity"), fmt(error.get("rel_l2")),
                      fmt(error.get("sqnr_db"), 3) if error.get("mse") else "-", _bytes_pair(r),
                      *([_hist_pair(r)] if sparklines else []), style=style)
    t = report.totals
    caption = [f"{t['tensors']} tensors, {t['changed']} changed, {fmt(t['params'])} params, "
               f"{human_bytes(t['bytes_in'])} → {human_bytes(t['bytes_out'])}"
               + (f", {t['seconds']:.2f} s" if not report.dry_run else ""), *totals_lines(t)]
    if hidden:
        caption.append(f"{hidden} more tensors hidden (the {limit} with the largest error are shown; "
                       "--report FILE.json has all)")
    if report.dropped:
        caption.append(f"dropped: {len(report.dropped)} tensors")
    table.caption = escape("\n".join(caption))
    table.caption_justify = "left"
    return table


def plan_table(report: Report, limit: int = SHOW_ROWS) -> Table:
    """A dry run's plan: dtype and bytes before → after and the steps of the first `limit` tensors,
    those that would change first (checkpoint order), then how many more; `--report` lists all."""
    table = Table(title=f"plan for {escape(report.input)}", title_justify="left")
    table.add_column("tensor", overflow="fold")
    table.add_column("shape", justify="right")
    table.add_column("dtype")
    table.add_column("bytes", justify="right")
    table.add_column("steps", overflow="fold")
    shown, hidden = report.worst(limit)
    for r in shown:
        before = r.bytes_before if r.bytes_before is not None else \
            TensorInfo(r.name, r.dtype_before, tuple(r.shape)).nbytes if r.dtype_before else None
        after = r.bytes_after if r.bytes_after is not None else TensorInfo(r.name, r.dtype, tuple(r.shape)).nbytes
        table.add_row(escape(r.name), _shape(r.shape), arrow(r.dtype_before, r.dtype),
                      arrow(before and human_bytes(before), human_bytes(after)),
                      escape(" → ".join(r.steps)) or "[dim]unchanged[/]")
    if hidden:
        table.caption = f"… and {hidden} more tensors (--rows N shows more; --report FILE lists every one)"
    return table


def plan_details(report: Report) -> list[Text]:
    """Lines under the table: groups merged, tensors skipped and why, notes."""
    lines = []
    stored: dict[tuple[str, str], list[GroupRecord]] = {}
    for g in report.groups:
        if g.layout:
            stored.setdefault((g.op, g.layout), []).append(g)
            continue
        parts = [f"{g.op}: {g.note}"]
        if g.created:
            parts.append(f"created {', '.join(g.created)}")
        if g.dropped:
            parts.append(f"dropped {', '.join(g.dropped)}")
        if g.bytes_before != g.bytes_after:
            parts.append(_bytes_pair(g))
        lines.append(Text("  • " + "; ".join(parts)))
    for (op, layout), records in stored.items():
        total = GroupRecord(op, "", [], [], [], [], sum(g.bytes_before or 0 for g in records),
                            sum(g.bytes_after or 0 for g in records))
        lines.append(Text(f"  • {op}: {len(records)} weight(s) stored as {layout}: {_bytes_pair(total)}"))
    lines.extend(_skip_lines(report, shown=3))
    lines.extend(Text(f"  • {note}", style="yellow") for note in report.notes)
    lines.extend(Text(f"  ⚠ {line}", style="bold yellow") for line in warning_lines(report.warnings))
    return lines


def _skip_lines(report: Report, shown: int | None = None) -> list[Text]:
    """One line per (reason, steps): the tensors a step's default rule left alone; `shown` caps the names."""
    by_reason: dict[str, dict[str, list[str]]] = {}
    for s in report.skipped:
        by_reason.setdefault(s.reason, {}).setdefault(s.name, []).append(s.op)
    lines = []
    for reason, tensors in by_reason.items():
        by_ops: dict[tuple[str, ...], list[str]] = {}
        for name, ops in tensors.items():
            by_ops.setdefault(tuple(ops), []).append(name)
        for ops, names in by_ops.items():
            listed = names if shown is None else names[:shown]
            more = len(names) - len(listed)
            text = ", ".join(listed) + (f" and {more} more" if more else "")
            lines.append(Text(f"  • skipped by {', '.join(ops)} ({reason}): {len(names)} tensor(s): {text}",
                              style="dim"))
    return lines


def warning_lines(warnings: list[dict[str, Any]], per_kind: int = 5) -> list[str]:
    """'tensor (kind): message', at most `per_kind` of each kind, then how many more there are."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for w in warnings:
        by_kind.setdefault(w["kind"], []).append(w)
    lines = []
    for kind, found in by_kind.items():
        lines.extend(f"{w['tensor']} ({kind}): {w['message']}" for w in found[:per_kind])
        if len(found) > per_kind:
            lines.append(f"… and {len(found) - per_kind} more {kind} warnings (the JSON report lists all)")
    return lines


def inspect_table(report: InspectReport, limit: int = 200) -> Table:
    """One row per tensor; a compressed weight is one row with its scheme, bits/weight and ratio."""
    table = Table(title=f"{escape(report.path)} ({report.format})", title_justify="left")
    compressed = any("layout" in row for row in report.tensors)
    columns = ("tensor", "shape", "dtype", "min", "max", "mean", "std", "sparsity", "nan/inf")
    for column in columns + (("stored as", "bits/w", "ratio") if compressed else ()):
        table.add_column(column, justify="left" if column in ("tensor", "dtype", "stored as") else "right",
                         overflow="fold")
    for row in report.tensors[:limit]:
        layout = row.get("layout")
        extra = (layout["scheme"], f"{layout['bits_per_weight']:.3g}", f"{layout['ratio']:.2f}×") if layout else \
            ("-", "-", "-")
        table.add_row(escape(row["name"]), _shape(row["shape"]), row["dtype"], fmt(row["min"]), fmt(row["max"]),
                      fmt(row["mean"]), fmt(row["std"]), fmt(row["sparsity"]),
                      f"{row['nan']}/{row['inf']}" if row["nan"] or row["inf"] else "-",
                      *(extra if compressed else ()))
    t = report.totals
    by_dtype = ", ".join(f"{d}: {v['tensors']} ({human_bytes(v['bytes'])})" for d, v in t["by_dtype"].items())
    size = human_bytes(t["bytes"])
    if t.get("dense_bytes", t["bytes"]) != t["bytes"]:
        size = f"{human_bytes(t['dense_bytes'])} dense → {size} stored"
    caption = f"{t['tensors']} tensors, {fmt(t['params'])} params, {size}; {by_dtype}"
    if len(report.tensors) > limit:
        caption += f"\n{len(report.tensors) - limit} more tensors hidden (--json has all)"
    table.caption, table.caption_justify = escape(caption), "left"
    return table


def diff_table(report: DiffReport, limit: int = SHOW_ROWS) -> Table:
    table = Table(title=f"diff {escape(report.a)} ↔ {escape(report.b)}", title_justify="left")
    for column in ("tensor", "max_abs", "mse", "rel_l2", "cosine", "sqnr dB"):
        table.add_column(column, justify="left" if column == "tensor" else "right", overflow="fold")
    rows = sorted(report.tensors, key=lambda r: -(r["rel_l2"] if r["rel_l2"] is not None else math.inf))
    for row in rows[:limit]:
        table.add_row(escape(row["name"]), fmt(row["max_abs"]), fmt(row["mse"]), fmt(row["rel_l2"]),
                      fmt(row["cosine"], 6), fmt(row["sqnr_db"], 3))
    caption = [f"{len(report.tensors)} common tensors"
               + (f" ({len(rows) - limit} with the smallest error hidden)" if len(rows) > limit else ""),
               *totals_lines(report.totals)]
    if report.only_in_a:
        caption.append(f"only in A: {', '.join(report.only_in_a[:5])}{' …' if len(report.only_in_a) > 5 else ''}")
    if report.only_in_b:
        caption.append(f"only in B: {', '.join(report.only_in_b[:5])}{' …' if len(report.only_in_b) > 5 else ''}")
    caption.extend(report.summary())
    table.caption, table.caption_justify = escape("\n".join(caption)), "left"
    return table


def print_apply(report: Report, console: Console, limit: int = SHOW_ROWS) -> None:
    console.print(apply_table(report, limit, sparklines=console.width >= 150))
    for line in plan_details(report):
        console.print(line)


# ------------------------------------------------------------------ Markdown

def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def apply_markdown(report: Report, limit: int = SHOW_ROWS) -> str:
    """A summary fit for `$GITHUB_STEP_SUMMARY`: pipeline, totals, the worst tensors."""
    t = report.totals
    steps = " → ".join(f"`{_md(step_label(s))}`" for s in report.steps) or "copy (no steps)"
    out = [f"### wtool apply: `{_md(report.input)}` → `{_md(str(report.output))}`", "",
           f"Pipeline: {steps}  ", f"{t['tensors']} tensors, **{t['changed']} changed**, {fmt(t['params'])} params, "
           f"{human_bytes(t['bytes_in'])} → {human_bytes(t['bytes_out'])} in {t['seconds']:.2f} s  ",
           *(f"{_md(line)}  " for line in totals_lines(t)), ""]
    rows, hidden = report.worst(limit)
    out += ["| tensor | shape | dtype | steps | absmax | sparsity | rel_l2 | sqnr dB | bytes |",
            "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        error = r.error or {}
        out.append(f"| `{_md(r.name)}` | {_shape(r.shape)} | {r.dtype} | {_md(' → '.join(r.steps)) or '-'} | "
                   f"{_md(_pair(r.before, r.after, 'absmax'))} | {_md(_pair(r.before, r.after, 'sparsity'))} | "
                   f"{fmt(error.get('rel_l2'))} | {fmt(error.get('sqnr_db'), 3) if error.get('mse') else '-'} | "
                   f"{_bytes_pair(r)} |")
    if hidden:
        out += ["", f"_{hidden} more tensors hidden; the JSON report has all._"]
    if report.groups or report.dropped:
        out += ["", f"Merged groups: {len(report.groups)}; dropped tensors: {len(report.dropped)}"]
    if report.notes:
        out += [""] + [f"- {_md(note)}" for note in report.notes]
    if report.warnings:
        out += ["", f"**Warnings** ({len(report.warnings)}):", ""]
        out += [f"- {_md(line)}" for line in warning_lines(report.warnings)]
    return "\n".join(out) + "\n"


def diff_markdown(report: DiffReport, limit: int = SHOW_ROWS) -> str:
    status = "passed" if report.passed else "**FAILED**"
    out = [f"### wtool diff: `{_md(report.a)}` ↔ `{_md(report.b)}` — {status}", "",
           *(f"{_md(line)}  " for line in totals_lines(report.totals)), "",
           "| tensor | max_abs | mse | rel_l2 | cosine | sqnr dB |", "|---|---:|---:|---:|---:|---:|"]
    rows = sorted(report.tensors, key=lambda r: -(r["rel_l2"] if r["rel_l2"] is not None else math.inf))
    for row in rows[:limit]:
        out.append(f"| `{_md(row['name'])}` | {fmt(row['max_abs'])} | {fmt(row['mse'])} | {fmt(row['rel_l2'])} | "
                   f"{fmt(row['cosine'], 6)} | {fmt(row['sqnr_db'], 3)} |")
    out += [""] + [f"- {_md(line)}" for line in report.summary()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ terminal histogram

def hist_lines(name: str, counts: list[int], low: float, high: float, width: int = 50) -> list[str]:
    """A vertical list of bars, one per bin, for `wtool inspect --hist NAME`."""
    top = max(counts) or 1
    step = (high - low) / len(counts)
    lines = [f"{name}: {sum(counts):,} finite values in [{fmt(low)}, {fmt(high)}]"]
    for i, count in enumerate(counts):
        bar = "█" * round(count / top * width)
        lines.append(f"{low + i * step:>11.4g} … {low + (i + 1) * step:<11.4g} │{bar} {count:,}")
    return lines


# ------------------------------------------------------------------ HTML

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:20px;margin:0 0 4px} .sub{color:#5b6475;margin-bottom:16px}
table{border-collapse:collapse;width:100%} th,td{padding:4px 8px;border-bottom:1px solid #e3e6ec;text-align:right}
th{position:sticky;top:0;background:#f4f6f9;cursor:pointer;user-select:none;white-space:nowrap}
th.sorted-asc::after{content:" ▲"} th.sorted-desc::after{content:" ▼"}
td.name,th.name,td.steps{text-align:left} td.name{font-family:ui-monospace,monospace;word-break:break-all}
tr.same td{color:#8a92a3} svg{display:block} .legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
ul{color:#5b6475}
"""

_JS = """
document.querySelectorAll('th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = !th.classList.contains('sorted-asc');
  th.parentNode.querySelectorAll('th').forEach(h => h.classList.remove('sorted-asc', 'sorted-desc'));
  th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
  const key = r => { const v = r.cells[col].dataset.v ?? r.cells[col].textContent;
                     const n = parseFloat(v); return isNaN(n) ? v : n; };
  const same = r => r.classList.contains('same');
  [...body.rows].sort((a, b) => { if (same(a) !== same(b)) return same(a) ? 1 : -1;
    const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
"""


def _svg(h: dict[str, Any] | None, width: int = 220, height: int = 48) -> str:
    """Before (grey) and after (blue) histograms overlaid, on their shared value range."""
    if not h:
        return ""
    series = [(h.get("before"), "#b8bfcc"), (h["after"], "#2f6fde")]
    top = max(max(c) for c, _ in series if c) or 1
    parts = []
    for counts, colour in series:
        if not counts:
            continue
        bar = width / len(counts)
        for i, c in enumerate(counts):
            if c:
                tall = max(1.0, c / top * (height - 2))
                parts.append(f'<rect x="{i * bar:.1f}" y="{height - tall:.1f}" width="{bar * 0.9:.1f}" '
                             f'height="{tall:.1f}" fill="{colour}" fill-opacity="0.75"/>')
    label = f"{fmt(h['low'])} … {fmt(h['high'])}"
    return (f'<svg width="{width}" height="{height + 12}" role="img" aria-label="histogram {html.escape(label)}">'
            + "".join(parts) + f'<text x="0" y="{height + 11}" font-size="9" fill="#5b6475">{html.escape(label)}'
            "</text></svg>")


def apply_html(report: Report) -> str:
    """One self-contained page (no network, no external assets): sortable table, histograms."""
    return "".join(html_chunks(report))


def html_chunks(report: Report) -> Iterator[str]:
    """`apply_html` in pieces, one table row each, worst first (`Records.ranked`)."""
    esc = html.escape
    t = report.totals
    head = ["tensor", "shape", "dtype", "steps", "absmax before", "absmax after", "std after", "sparsity after",
            "rel_l2", "sqnr dB", "values (grey before, blue after)"]

    def cell(value: Any, digits: int = 4) -> str:
        raw = "" if value is None else str(value)
        return f'<td data-v="{esc(raw)}">{esc(fmt(value, digits))}</td>'

    steps = report.pipeline_label()
    extra = [f"<li>{esc(g.op)}: {esc(g.note)}</li>" for g in report.groups]
    extra += [f"<li>{esc(line.plain.removeprefix('  • '))}</li>" for line in _skip_lines(report)]
    extra += [f"<li>{esc(n)}</li>" for n in report.notes]
    extra += [f"<li>dropped {esc(n)}</li>" for n in report.dropped]
    extra += [f"<li>{esc(line)}</li>" for line in totals_lines(t)]
    extra += [f"<li><b>warning</b> {esc(w['tensor'])}: {esc(w['message'])}</li>" for w in report.warnings]
    yield (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>wtool report</title>"
           f"<style>{_CSS}</style></head><body><h1>wtool apply: {esc(report.input)} → {esc(str(report.output))}</h1>"
           f'<div class="sub">pipeline: {esc(steps)} · {t["tensors"]} tensors, {t["changed"]} changed · '
           f'{fmt(t["params"])} params · {human_bytes(t["bytes_in"])} → {human_bytes(t["bytes_out"])} · '
           f'{t["seconds"]:.2f} s · wtool {esc(report.wtool_version)}</div>'
           + (f"<ul>{''.join(extra)}</ul>" if extra else "")
           + "<table><thead><tr>" + "".join(f'<th class="{"name" if h in ("tensor", "dtype", "steps") else ""}">{esc(h)}</th>'
                                            for h in head)
           + "</tr></thead><tbody>")
    for r in report.tensors.ranked():
        e = r.error or {}
        after = r.after or {}
        before = r.before or {}
        yield (f'<tr class="{"changed" if r.changed else "same"}"><td class="name">{esc(r.name)}</td>'
               f'<td data-v="{math.prod(r.shape) if r.shape else 1}">{esc(_shape(r.shape))}</td>'
               f'<td class="steps">{esc(r.dtype)}</td><td class="steps">{esc(" → ".join(r.steps)) or "-"}</td>'
               + cell(before.get("absmax")) + cell(after.get("absmax")) + cell(after.get("std"))
               + cell(after.get("sparsity")) + cell(e.get("rel_l2")) + cell(e.get("sqnr_db") if e.get("mse") else None, 3)
               + f"<td>{_svg(r.histogram)}</td></tr>")
    yield f"</tbody></table><script>{_JS}</script></body></html>\n"


# ------------------------------------------------------------------ the transforms table

def transforms_markdown(registry: Mapping[str, Any]) -> str:
    """Every transform as one Markdown table row, from its own declarations (the README's table).

    >>> from wtool.transforms import REGISTRY
    >>> transforms_markdown(REGISTRY).splitlines()[0]
    '| transform | what it does | applies to | formula | parameters | example |'
    """
    rows = ["| transform | what it does | applies to | formula | parameters | example |",
            "| --- | --- | --- | --- | --- | --- |"]
    for name in sorted(registry):
        cls = registry[name]
        params = ", ".join(f"`{p['name']}`" + (f" ({' / '.join(p['choices'])})" if p["choices"] else "")
                           for p in cls.describe_params())
        cells = [f"`{name}`", cls.summary(), cls.applies_to, cls.formula, params or "-", f"`-t {cls.example}`"]
        rows.append("| " + " | ".join(_md(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


# ------------------------------------------------------------------ eval

@dataclass
class EvalReport:
    """The result of `wtool eval BASE CANDIDATE`: what the two models do on the same inputs."""

    base: str
    candidate: str
    task: str
    inputs: int
    tokens: int
    metrics: dict[str, float]
    gates: dict[str, float]
    failures: list[dict[str, Any]]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_json(self) -> dict[str, Any]:
        data = _clean(asdict(self))
        data["passed"] = self.passed
        return data

    def gate_status(self, metric: str) -> tuple[str, str]:
        """(the gates on `metric`, e.g. '≥ 0.99', and 'ok' / 'FAILED' / '')."""
        limits = [f"{'≤' if key.endswith('>') else '≥'} {limit:g}" for key, limit in self.gates.items()
                  if key[:-1] == metric]
        failed = any(f["metric"] == metric for f in self.failures)
        return ", ".join(limits), ("FAILED" if failed else "ok") if limits else ""


def eval_table(report: EvalReport) -> Table:
    table = Table(title=f"eval ({report.task}, {report.inputs} inputs, {report.tokens} tokens): "
                        f"{escape(report.base)} ↔ {escape(report.candidate)}", title_justify="left")
    for column in ("metric", "value", "gate", ""):
        table.add_column(column, justify="right" if column in ("value", "gate") else "left")
    for metric, value in report.metrics.items():
        limits, status = report.gate_status(metric)
        table.add_row(metric, fmt(value, 6), limits, f"[bold red]{status}[/]" if status == "FAILED" else status)
    table.caption = "passed" if report.passed else f"FAILED: {len(report.failures)} gate(s)"
    table.caption_justify = "left"
    return table


def eval_markdown(report: EvalReport) -> str:
    status = "passed" if report.passed else "**FAILED**"
    out = [f"### wtool eval: `{_md(report.base)}` ↔ `{_md(report.candidate)}` — {status}", "",
           f"Task: {report.task}; {report.inputs} inputs, {report.tokens} tokens", "",
           "| metric | value | gate | |", "|---|---:|---:|---|"]
    for metric, value in report.metrics.items():
        limits, status = report.gate_status(metric)
        out.append(f"| {metric} | {fmt(value, 6)} | {limits} | {'**FAILED**' if status == 'FAILED' else status} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ batch

BATCH_STATUSES = ("ok", "failed", "skipped", "interrupted", "not run")


@dataclass
class BatchItem:
    """One input of `wtool batch`: its status (one of BATCH_STATUSES), the error line of a
    failure, and its full apply report when it ran."""

    input: str
    output: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    note: str | None = None
    report: Report | None = None


@dataclass
class BatchReport:
    """The result of `wtool batch`: every input in order, and a summary."""

    wtool_version: str
    steps: list[dict[str, Any]]
    out_dir: str
    executor: str
    jobs: int
    inputs: list[BatchItem]
    seconds: float

    @property
    def summary(self) -> dict[str, Any]:
        """Counts per status (`not run` as `not_run`), changed tensors, bytes and seconds."""
        ran = [item.report.totals for item in self.inputs if item.report]
        counts = {_key(status): sum(item.status == status for item in self.inputs) for status in BATCH_STATUSES}
        return {"inputs": len(self.inputs), **counts, "changed": sum(t["changed"] for t in ran),
                "bytes_in": sum(t["bytes_in"] for t in ran), "bytes_out": sum(t["bytes_out"] for t in ran),
                "seconds": self.seconds}

    def to_json(self) -> dict[str, Any]:
        data = _clean(asdict(self))
        data["summary"] = self.summary
        return data


def _key(status: str) -> str:
    return status.replace(" ", "_")


def batch_summary(report: BatchReport) -> str:
    """`5 inputs: 3 ok, 1 failed, 1 skipped; 1.2 MB → 1.2 MB in 3.4 s (processes, 2 at once)`."""
    s = report.summary
    counts = ", ".join(f"{s[_key(status)]} {status}" for status in BATCH_STATUSES if s[_key(status)])
    return (f"{s['inputs']} inputs: {counts}; {human_bytes(s['bytes_in'])} → {human_bytes(s['bytes_out'])} "
            f"in {s['seconds']:.2f} s ({report.executor}, {report.jobs} at once)")


def _batch_cells(item: BatchItem) -> tuple[str, str, str]:
    """changed tensors, bytes in → out, and the error (or note) of one input."""
    if item.report is None:
        return "-", "-", item.error or item.note or ""
    t = item.report.totals
    return f"{t['changed']}/{t['tensors']}", f"{human_bytes(t['bytes_in'])} → {human_bytes(t['bytes_out'])}", \
        item.note or ""


def _seconds(item: BatchItem) -> str:
    return f"{item.seconds:.2f}" if item.status in ("ok", "failed") else "-"


_STATUS_STYLE = {"ok": "green", "failed": "bold red", "skipped": "dim", "interrupted": "yellow", "not run": "dim"}


def batch_table(report: BatchReport) -> Table:
    """One row per input: status, tensors changed, bytes in → out, seconds, the error line."""
    table = Table(title=f"wtool batch → {escape(report.out_dir)}", title_justify="left")
    for column, justify in (("input", "left"), ("status", "left"), ("changed", "right"),
                            ("bytes in → out", "right"), ("seconds", "right"), ("error", "left")):
        table.add_column(column, justify=justify, overflow="fold")
    for item in report.inputs:
        changed, sizes, message = _batch_cells(item)
        table.add_row(escape(item.input), f"[{_STATUS_STYLE[item.status]}]{item.status}[/]", changed, sizes,
                      _seconds(item), escape(message))
    table.caption = escape(batch_summary(report))
    table.caption_justify = "left"
    return table


def batch_markdown(report: BatchReport) -> str:
    """The batch summary for `$GITHUB_STEP_SUMMARY`: one row per input."""
    steps = " → ".join(f"`{s['op']}`" for s in report.steps) or "copy (no steps)"
    out = [f"### wtool batch → `{_md(report.out_dir)}`", "", f"Pipeline: {steps}  ", _md(batch_summary(report)), "",
           "| input | status | changed | bytes in → out | seconds | error |", "|---|---|---:|---:|---:|---|"]
    for item in report.inputs:
        changed, sizes, message = _batch_cells(item)
        status = f"**{item.status}**" if item.status == "failed" else item.status
        out.append(f"| `{_md(item.input)}` | {status} | {changed} | {sizes} | "
                   f"{_seconds(item)} | {_md(message)} |")
    return "\n".join(out) + "\n"
