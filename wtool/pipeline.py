"""Parse steps and recipes, select tensors, plan, and stream every tensor through the steps.

Data flows one way: a reader yields tensors lazily, each output tensor is a chain of
nodes (source -> step -> step ...) evaluated once when the writer reaches it, statistics
are taken on the way, and the writer streams it out. Peak memory is a few copies of the
largest tensor (or group of tensors for folding transforms), whatever the checkpoint size.

>>> pipe = Pipeline.from_specs(["clip:c=0.5", "quantize:bits=4"])
>>> report = run(pipe, "fixtures/tiny-llama.safetensors", "/tmp/out.safetensors", force=True)
>>> report.totals["changed"] > 0
True
"""

from __future__ import annotations

import json
import math
import threading
import time
import tomllib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wtool import __version__
from wtool.advice import data_free_warnings
from wtool.dtypes import by_code, convert, to_storage
from wtool.errors import InputError, UsageError
from wtool.io import (
    Inputs,
    Reader,
    check_target,
    create_writer,
    is_folder_output,
    model_files,
    open_checkpoint,
)
from wtool.io.base import MAX_HEADER_BYTES
from wtool.io.safetensors import encode_header
from wtool.report import GroupRecord, Report, SkipRecord, TensorRecord
from wtool.selection import Selector, no_match_hint
from wtool.stats import compare, histogram, same_bytes, tensor_stats, weighted_error
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Group, GroupTransform, Transform

NONFINITE_POLICIES = ("error", "skip", "zero")
RESERVED_KEYS = ("include", "exclude")


# ------------------------------------------------------------------ steps and recipes

@dataclass(frozen=True)
class Step:
    """One transform with its own include/exclude patterns, as written by the user."""

    transform: Transform
    selector: Selector = field(default_factory=Selector)
    spec: str = ""

    @property
    def op(self) -> str:
        return self.transform.name

    @classmethod
    def parse(cls, spec: str) -> Step:
        """Parse `NAME` or `NAME:key=value,key=value`; `include=`/`exclude=` may repeat.

        >>> Step.parse("quantize:bits=4,include=*.weight").selector.include
        ('*.weight',)
        """
        name, _, rest = spec.strip().partition(":")
        options: dict[str, str] = {}
        patterns: dict[str, list[str]] = {"include": [], "exclude": []}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                hint = ("; a comma ends a -t parameter, so a regex with a comma (such as {1,3}) belongs in "
                        "--include/--exclude or a recipe") if "re:" in spec else ""
                raise UsageError(f"step {spec!r}: expected key=value, got {item!r}{hint}")
            if key in RESERVED_KEYS:
                patterns[key].append(value.strip())
            elif key in options:
                raise UsageError(f"step {spec!r}: parameter {key!r} given twice")
            else:
                options[key] = value
        return cls(Transform.create(name.strip(), options),
                   Selector(tuple(patterns["include"]), tuple(patterns["exclude"])), spec.strip())

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str) -> Step:
        """Build a step from a recipe's `[[steps]]` table: `op`, parameters, include/exclude."""
        if not isinstance(table.get("op"), str):
            raise UsageError(f"{where}: every [[steps]] table needs op = \"NAME\"")
        options = {k: v for k, v in table.items() if k != "op" and k not in RESERVED_KEYS}
        selector = Selector(_pattern_list(table.get("include"), where), _pattern_list(table.get("exclude"), where))
        try:
            transform = Transform.create(table["op"], options)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
        return cls(transform, selector, table["op"])


def _pattern_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{where}: include/exclude must be a string or a list of strings")


@dataclass(frozen=True)
class Pipeline:
    """Steps in order plus the options that apply to all of them.

    `nonfinite` decides what happens when a step that would spread NaN/Inf meets them:
    `error` (default) fails naming the tensor, `skip` leaves that tensor out of the step,
    `zero` replaces them with 0 first.
    """

    steps: tuple[Step, ...] = ()
    selector: Selector = field(default_factory=Selector)
    allow_empty: bool = False
    nonfinite: str = "error"

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE_POLICIES:
            raise UsageError(f"--nonfinite={self.nonfinite!r}: expected one of {', '.join(NONFINITE_POLICIES)}")

    @classmethod
    def from_specs(cls, specs: Sequence[str], **options: Any) -> Pipeline:
        return cls(tuple(Step.parse(s) for s in specs), **options)

    @classmethod
    def from_recipe(cls, path: str | Path, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                    **options: Any) -> Pipeline:
        """Read a TOML recipe; command-line include/exclude patterns are added to the recipe's."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: cannot read recipe: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise InputError(f"{path}: invalid TOML: {err}") from None
        unknown = set(data) - {"include", "exclude", "steps"}
        if unknown:
            raise UsageError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                             "expected include, exclude, [[steps]]")
        tables = data.get("steps", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UsageError(f"{path}: steps must be [[steps]] tables")
        steps = tuple(Step.from_table(t, f"{path} step {i + 1}") for i, t in enumerate(tables))
        selector = Selector(_pattern_list(data.get("include"), str(path)) + tuple(include),
                            _pattern_list(data.get("exclude"), str(path)) + tuple(exclude))
        return cls(steps, selector, **options)

    def describe(self) -> list[dict[str, Any]]:
        """`[{"op", "params"}]` as recorded in the report and the output's metadata."""
        rows = []
        for step in self.steps:
            row: dict[str, Any] = {"op": step.op, "params": step.transform.options()}
            if step.selector.include or step.selector.exclude:
                row["include"], row["exclude"] = list(step.selector.include), list(step.selector.exclude)
            rows.append(row)
        return rows

    def provenance(self) -> dict[str, Any]:
        """What the output's `wtool` metadata records: version, steps, and the run-wide
        patterns and NaN policy when they are not the defaults (`batch --resume` compares it)."""
        recorded: dict[str, Any] = {"version": __version__, "steps": self.describe()}
        if self.selector.include or self.selector.exclude:
            recorded["include"], recorded["exclude"] = list(self.selector.include), list(self.selector.exclude)
        if self.nonfinite != "error":
            recorded["nonfinite"] = self.nonfinite
        return recorded


# ------------------------------------------------------------------ the node graph

class Node:
    """One tensor as it stands after some steps; `compute()` evaluates it (once per call)."""

    info: TensorInfo
    steps: tuple[str, ...] = ()
    extras: dict[str, Any]

    def compute(self) -> np.ndarray:
        raise NotImplementedError

    def load(self) -> np.ndarray:
        """The value in compute dtype (float32, or float64 for F64 tensors)."""
        return convert(self.compute(), self.info.dtype_info.compute)


class SourceNode(Node):
    def __init__(self, reader: Reader, info: TensorInfo) -> None:
        self.reader, self.info, self.extras = reader, info, {}

    def compute(self) -> np.ndarray:
        return self.reader.read(self.info.name)


class StepNode(Node):
    """`prev` with one transform applied; `run` carries the step's fitted state and companions."""

    def __init__(self, prev: Node, run: StepRun) -> None:
        self.prev, self.run = prev, run
        self.info = TensorInfo(prev.info.name, run.step.transform.output_dtype(prev.info.dtype), prev.info.shape)
        self.steps = (*prev.steps, run.step.op)
        self.extras = prev.extras

    def compute(self) -> np.ndarray:
        loaded = array = self.prev.load()
        transform = self.run.step.transform
        try:
            if transform.spreads_nonfinite:
                array = self.run.guard(self.info.name, loaded, self.extras)
                if array is None:  # --nonfinite=skip: this step leaves the tensor as it came
                    return loaded
            ctx = Context(self.prev.info, self.run.state, self.run.companions(self.info.name, array.dtype), {})
            result = transform.apply(array, ctx)
        except InputError as exc:  # a value the step refuses: name the input file too
            raise self.run.refused(exc) from None
        self.extras.update({f"{transform.name}.{k}": v for k, v in ctx.extras.items()})
        if result.shape != array.shape:
            raise RuntimeError(f"{transform.name} changed the shape of {self.info.name!r}")  # transform bug
        return result


class GroupNode(Node):
    """One output of a group transform; the group is evaluated once for all its outputs."""

    def __init__(self, evaluation: GroupEvaluation, info: TensorInfo, steps: tuple[str, ...]) -> None:
        self.evaluation, self.info, self.steps, self.extras = evaluation, info, steps, {}

    def compute(self) -> np.ndarray:
        return self.evaluation.output(self.info.name)


class GroupEvaluation:
    """Reads a group's inputs, runs the transform, and hands each output out once.

    Outputs wait in memory only until the writer reaches them; a later pass (a global fit
    over a following step) simply evaluates the group again.
    """

    def __init__(self, run: StepRun, group: Group, inputs: Mapping[str, Node]) -> None:
        self.run, self.group, self.inputs = run, group, inputs
        self._waiting: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # outputs of one group may be materialised by two threads

    def output(self, name: str) -> np.ndarray:
        with self._lock:
            if name not in self._waiting:
                self._waiting = self._evaluate()
            return self._waiting.pop(name)

    def _evaluate(self) -> dict[str, np.ndarray]:
        transform = self.run.step.transform
        assert isinstance(transform, GroupTransform)
        arrays = {key: node.load() if node.info.dtype_info.is_float else node.compute()
                  for key, node in self.inputs.items()}
        try:
            for key, node in self.inputs.items():
                if transform.spreads_nonfinite and node.info.dtype_info.is_float:
                    guarded = self.run.guard(key, arrays[key], {})
                    if guarded is None:
                        raise InputError(f"tensor {key!r}: non-finite values; {transform.name} cannot skip one "
                                         f"member of the group {self.group.note or key}; use --nonfinite=zero")
                    arrays[key] = guarded
            outputs = transform.apply_group(self.group, arrays)
        except InputError as exc:
            raise self.run.refused(exc) from None
        missing = {o.name for o in self.group.outputs} - set(outputs)
        if missing:
            raise RuntimeError(f"{transform.name} did not produce {sorted(missing)}")  # transform bug
        return outputs


@dataclass
class StepRun:
    """A step during one run: its fitted state and its open companion checkpoints."""

    step: Step
    policy: str
    source: str
    companion_readers: dict[str, Reader] = field(default_factory=dict)
    state: Any = None

    def companions(self, name: str, dtype: np.dtype) -> dict[str, np.ndarray | None]:
        """The tensor of the same name in each companion checkpoint (None where it has none)."""
        return {role: np.asarray(reader.read(name), dtype=dtype) if name in reader else None
                for role, reader in self.companion_readers.items()}

    def refused(self, exc: InputError) -> InputError:
        """A value error from this step ("tensor 'w': ..."), prefixed with the input's path."""
        return InputError(f"{self.source}: {exc}")

    def guarded_load(self, node: Node) -> np.ndarray:
        """`node`'s value as this step will see it, for a fit pass (`skip` members are left out before)."""
        array = node.load()
        if not self.step.transform.spreads_nonfinite:
            return array
        try:
            guarded = self.guard(node.info.name, array, {})
        except InputError as exc:
            raise self.refused(exc) from None
        return array if guarded is None else guarded

    def guard(self, name: str, array: np.ndarray, extras: dict[str, Any]) -> np.ndarray | None:
        """Apply the non-finite policy: the array to transform, or None to skip this tensor."""
        bad = ~np.isfinite(array)
        count = int(np.count_nonzero(bad))
        if not count:
            return array
        if self.policy == "error":
            raise InputError(f"tensor {name!r}: {count} non-finite value(s) (NaN/Inf) would spread through "
                             f"{self.step.op}; pass --nonfinite=skip or --nonfinite=zero")
        extras[f"{self.step.op}.nonfinite"] = f"{count} {'left alone' if self.policy == 'skip' else 'zeroed'}"
        return None if self.policy == "skip" else np.where(bad, np.zeros((), array.dtype), array)


# ------------------------------------------------------------------ planning

@dataclass
class Plan:
    """What a run will do: the output tensors (as nodes), what was skipped, grouped, dropped."""

    reader: Reader
    pipeline: Pipeline
    nodes: list[Node]
    runs: list[StepRun]
    skipped: list[SkipRecord]
    groups: list[GroupRecord]
    notes: list[str]

    def close(self) -> None:
        for run in self.runs:
            for reader in run.companion_readers.values():
                reader.close()


def plan(pipeline: Pipeline, reader: Reader) -> Plan:
    """Decide, for every tensor, which steps it gets — before any tensor is read."""
    names = [t.name for t in reader.tensors]
    if not pipeline.allow_empty:
        for pattern in pipeline.selector.unmatched(names):
            raise UsageError(f"pattern {pattern!r} matches no tensor in {reader.path}{no_match_hint(pattern, names)} "
                             "(use --allow-empty to allow)")
    nodes: list[Node] = [SourceNode(reader, info) for info in reader.tensors]
    grouped = any(isinstance(step.transform, GroupTransform) for step in pipeline.steps)
    config = reader.config() if grouped else None
    runs: list[StepRun] = []
    skipped: list[SkipRecord] = []
    groups: list[GroupRecord] = []
    notes: list[str] = []
    try:
        for index, step in enumerate(pipeline.steps, start=1):
            label = f"step {index} ({step.op})"
            current = [n.info.name for n in nodes]
            if not pipeline.allow_empty:
                for pattern in step.selector.unmatched(current):
                    raise UsageError(f"{label}: pattern {pattern!r} matches no tensor"
                                     f"{no_match_hint(pattern, current)}")
            run = StepRun(step, pipeline.nonfinite, str(reader.path))
            runs.append(run)
            for role, path in step.transform.companion_paths().items():
                run.companion_readers[role] = open_checkpoint(path)

            def selected(name: str, step: Step = step) -> bool:
                return pipeline.selector.admits(name) and step.selector.admits(name)

            if isinstance(step.transform, GroupTransform):
                nodes, touched = _plan_group(step, run, nodes, selected, config, groups, notes)
            else:
                nodes, touched = _plan_each(step, run, nodes, selected, skipped)
            if touched == 0 and not pipeline.allow_empty:
                why = notes[-1] if notes and isinstance(step.transform, GroupTransform) else \
                    _default_rule_hint(step, [n.info for n in nodes if selected(n.info.name)])
                raise UsageError(f"{label} selects no tensor{' (' + why + ')' if why else ''}"
                                 "; check include/exclude or use --allow-empty")
    except BaseException:
        for run in runs:
            for companion in run.companion_readers.values():
                companion.close()
        raise
    return Plan(reader, pipeline, nodes, runs, skipped, groups, notes)


def _default_rule_hint(step: Step, candidates: Sequence[TensorInfo]) -> str:
    """When a step's default rule left out every tensor it could have taken: say so, and show
    the step-level include that lifts it."""
    reasons = [(info, step.transform.skip(info)) for info in candidates]
    soft = [(info, reason) for info, reason in reasons if reason is not None and not reason.hard]
    if not soft:
        return ""
    leaves = {info.name.rpartition(".")[2] for info, _ in soft}
    example = f"*.{leaves.pop()}" if len(leaves) == 1 and "." in soft[0][0].name else soft[0][0].name
    return (f"its default rule left out {len(soft)} tensor(s): {soft[0][1].reason}; a step-level include "
            f"lifts it, e.g. -t {step.op}:include={example}")


def _plan_each(step: Step, run: StepRun, nodes: list[Node], selected: Callable[[str], bool],
               skipped: list[SkipRecord]) -> tuple[list[Node], int]:
    out: list[Node] = []
    touched = 0
    for node in nodes:
        name = node.info.name
        if not selected(name):
            out.append(node)
            continue
        reason = step.transform.skip(node.info)
        if reason is not None and (reason.hard or not step.selector.included_explicitly(name)):
            skipped.append(SkipRecord(name, step.op, reason.reason))
            out.append(node)
            continue
        problem = step.transform.problem(node.info)
        if problem:
            raise UsageError(f"{step.op}: tensor {name!r}: {problem}")
        out.append(StepNode(node, run))
        touched += 1
    return out, touched


def _plan_group(step: Step, run: StepRun, nodes: list[Node], selected: Callable[[str], bool],
                config: Mapping[str, Any] | None, records: list[GroupRecord],
                notes: list[str]) -> tuple[list[Node], int]:
    transform = step.transform
    assert isinstance(transform, GroupTransform)
    by_name = {n.info.name: n for n in nodes}
    found = transform.plan([n.info for n in nodes], selected, config)
    notes.extend(f"{step.op}: {note}" for note in found.notes)
    owner: dict[str, Group] = {}
    for group in found.groups:
        for name in group.inputs:
            if name in owner:
                raise UsageError(f"{step.op}: tensor {name!r} belongs to two groups "
                                 f"({owner[name].note} and {group.note}); give explicit pairs")
            if name not in by_name:
                raise RuntimeError(f"{step.op} planned a group over unknown tensor {name!r}")  # transform bug
            owner[name] = group
    placed: dict[str, list[Node]] = {}
    for group in found.groups:
        evaluation = GroupEvaluation(run, group, {n: by_name[n] for n in group.inputs})
        first = group.inputs[0]
        for info in group.outputs:
            base = by_name.get(info.name)
            steps = (*(base.steps if base else by_name[first].steps), step.op)
            anchor = info.name if info.name in group.inputs else first
            placed.setdefault(anchor, []).append(GroupNode(evaluation, info, steps))
        records.append(GroupRecord(step.op, group.note, list(group.inputs), [o.name for o in group.outputs],
                                   list(group.created), list(group.dropped)))
    out: list[Node] = []
    for node in nodes:
        name = node.info.name
        if name in owner:
            out.extend(placed.pop(name, []))
        else:
            out.append(node)
    names = [n.info.name for n in out]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"{step.op}: would create tensor {duplicate!r}, which already exists")
    return out, len(found.groups)


# ------------------------------------------------------------------ running

class Progress(Protocol):
    """What the CLI's progress bar needs to know; the library never draws anything."""

    def start(self, tensors: int, nbytes: int) -> None: ...

    def advance(self, info: TensorInfo) -> None: ...


def run(pipeline: Pipeline, source: str | Path, output: str | Path | None, *, force: bool = False,
        max_shard_size: int | None = None, dry_run: bool = False, copy_model_files: bool = True,
        update_config: bool = False, jobs: int = 1, stats: bool = True, progress: Progress | None = None,
        reports: Sequence[str | Path] = (), reads: Sequence[str | Path] = ()) -> Report:
    """Stream `source` through the pipeline into `output` and report what changed.

    With `dry_run` (or no output) nothing is read beyond headers and nothing is written; the
    report then holds the plan (tensors and their steps) without statistics, and every
    problem the headers reveal (an existing output without `force` included) is raised. When
    both input and output are model folders, every non-weight file travels along
    (`copy_model_files`: config, tokenizer, sentence-transformers modules, custom code), so the
    output loads as the input did; `update_config` records a cast's dtype in the copied
    config.json. A single-file input gives a folder with one `model.safetensors` unless
    `max_shard_size` asks for shards. `jobs` tensors are computed at once (peak memory grows
    with it). Without `stats` the report lists tensors, steps and whether their bytes changed,
    without statistics, error metrics or histograms.

    Everything the run reads (the input, companions such as `decay`'s `grads=`, model files
    and the files in `reads`, e.g. the recipe) is protected: the output and the files in
    `reports` (which the caller writes afterwards) may not be, contain or sit on any of them
    (UsageError before any tensor is read), and a change to any of them before the output is
    committed is an InputError with nothing written.
    """
    if jobs < 1:
        raise UsageError(f"jobs={jobs}: must be at least 1")
    started = time.perf_counter()
    with open_checkpoint(source) as reader:
        the_plan = plan(pipeline, reader)
        try:
            inputs = _protect(the_plan, reads)
            for target in reports:
                inputs.refuse(Path(target), "report")
            extra, copied = ({}, []) if output is None else _model_files(
                reader, output, pipeline, the_plan.notes, copy=copy_model_files, update_config=update_config)
            sources = {t.name: t for t in reader.tensors}
            if dry_run or output is None:
                if output is not None:
                    inputs.refuse(Path(output), "output")
                    check_target(Path(output), force, "folder" if is_folder_output(output) else "file")
                records = [_planned_record(node, sources.get(node.info.name)) for node in the_plan.nodes]
                return _report(the_plan, records, output, time.perf_counter() - started, dry_run=True,
                               model_files=copied)
            infos = [node.info for node in the_plan.nodes]
            metadata = _output_metadata(reader.metadata, pipeline, infos, the_plan.notes)
            writer = create_writer(output, infos, metadata, max_shard_size=max_shard_size, force=force,
                                   extra_files=extra, one_file=reader.format != "sharded", inputs=inputs)
            records = []
            with writer:
                _fit(the_plan)
                if progress:
                    progress.start(len(infos), sum(i.nbytes for i in infos))
                for node, (array, record) in _evaluate_in_order(reader, sources, the_plan.nodes, jobs, stats):
                    writer.write(node.info.name, array)
                    records.append(record)
                    del array
                    if progress:
                        progress.advance(node.info)
            return _report(the_plan, records, output, time.perf_counter() - started, dry_run=False,
                           model_files=copied)
        finally:
            the_plan.close()


def _protect(the_plan: Plan, reads: Sequence[str | Path]) -> Inputs:
    """Every file the run reads: the checkpoint, companions, model files beside it, `reads`."""
    inputs = Inputs()
    for reader in [the_plan.reader, *(r for run in the_plan.runs for r in run.companion_readers.values())]:
        _protect_reader(inputs, reader)
    for path in reads:
        inputs.add(Path(path))
    return inputs


def _protect_reader(inputs: Inputs, reader: Reader) -> None:
    inputs.add_stamps(reader.stamps)
    source = Path(reader.path)
    folder = source if source.is_dir() else source.parent
    beside = [folder / name for name in model_files(folder).copied] \
        if source.is_dir() or source.name.endswith(".index.json") else []
    for path in [*beside, folder / "config.json"]:
        if path.is_file():
            inputs.add(path)


def protect(sources: Sequence[str | Path]) -> Inputs:
    """The protected set of a command that only reads `sources` (inspect, diff): what its
    reports may not touch. Only headers are read."""
    inputs = Inputs()
    for source in sources:
        with open_checkpoint(source) as reader:
            _protect_reader(inputs, reader)
    return inputs


def _evaluate_in_order(reader: Reader, sources: Mapping[str, TensorInfo], nodes: Sequence[Node],
                       jobs: int, stats: bool) -> Iterator[tuple[Node, tuple[np.ndarray, TensorRecord]]]:
    """Materialise the output tensors in order, up to `jobs` of them at once in threads
    (numpy releases the GIL in its kernels); memory grows with `jobs`. The next tensor is
    computed while the caller writes the previous one, so even one job overlaps the
    statistics with the writing.

    The threads are daemons and nothing waits for them when the run stops early: Ctrl-C or
    SIGTERM takes effect at once, not after every tensor in flight.
    """
    work = partial(_materialise, reader, stats=stats)
    pending: deque[tuple[Node, Future]] = deque()
    upcoming = iter(nodes)
    for node in upcoming:
        pending.append((node, _in_thread(work, sources.get(node.info.name), node)))
        if len(pending) >= jobs:
            break
    while pending:
        node, future = pending.popleft()
        following = next(upcoming, None)
        if following is not None:
            pending.append((following, _in_thread(work, sources.get(following.info.name), following)))
        yield node, future.result()


def _in_thread(function: Callable[..., Any], *args: Any) -> Future:
    """Run `function(*args)` in a new daemon thread; its result or exception arrives in the future."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            future.set_exception(exc)

    threading.Thread(target=work, name="wtool-job", daemon=True).start()
    return future


def _model_files(reader: Reader, output: str | Path, pipeline: Pipeline, notes: list[str], *,
                 copy: bool, update_config: bool) -> tuple[dict[str, Path | bytes], list[str]]:
    """The files of a folder input that travel to a folder output (relative name -> source, or
    the rewritten config.json with `update_config`), the names copied, and a note for each fact."""
    source = Path(reader.path)
    folder = source if source.is_dir() else source.parent if source.name.endswith(".index.json") else None
    casts = [s.transform.params.dtype for s in pipeline.steps if s.op == "cast"]
    if casts and casts[-1].startswith("float8"):
        notes.append(f"transformers' from_pretrained with its default dtype fails on {casts[-1]} weights; "
                     f"load with an explicit torch_dtype (--update-config records {casts[-1]} in config.json)")
    travels = copy and folder is not None and is_folder_output(output)
    if update_config and not (travels and casts and (folder / "config.json").is_file()):
        raise UsageError("--update-config needs a cast step, a model folder with config.json as input and a "
                         "folder output (without --no-model-files)")
    if not travels:
        return {}, []
    found = model_files(folder, skip=[*reader.files, Path(output)])
    extra: dict[str, Path | bytes] = {name: folder / name for name in found.copied}
    if found.copied:
        notes.append(f"copied {len(found.copied)} model file(s) beside the weights: {', '.join(found.copied)}")
    if found.left:
        notes.append(f"left behind (weights in another format, or not a regular file): {', '.join(found.left)}")
    config = reader.config() or {}
    declared = config.get("torch_dtype") or config.get("dtype")
    if update_config:
        for key in ("torch_dtype", "dtype"):
            if key in config or key == "torch_dtype":
                config[key] = casts[-1]
        extra["config.json"] = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        notes.append(f"config.json: torch_dtype set to {casts[-1]} (--update-config)")
    elif casts and declared and declared != casts[-1]:
        notes.append(f"config.json declares dtype {declared} but tensors were cast to {casts[-1]}; "
                     "pass --update-config to record the new dtype")
    return extra, found.copied


def _fit(the_plan: Plan) -> None:
    """First passes for steps that need one (e.g. a global sparsity threshold), in step order."""
    for run in the_plan.runs:
        if not run.step.transform.needs_fit():
            continue
        members = [n for n in _all_nodes(the_plan.nodes) if isinstance(n, StepNode) and n.run is run]
        if run.policy == "skip" and run.step.transform.spreads_nonfinite:  # they will be left alone
            members = [m for m in members if np.isfinite(m.prev.load()).all()]
        run.state = run.step.transform.fit([(m.prev.info, partial(run.guarded_load, m.prev)) for m in members])


def _all_nodes(nodes: Sequence[Node]) -> Iterator[Node]:
    seen: set[int] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if isinstance(node, StepNode):
            stack.append(node.prev)
        elif isinstance(node, GroupNode):
            stack.extend(node.evaluation.inputs.values())


def _materialise(reader: Reader, source: TensorInfo | None, node: Node, *,
                 stats: bool = True) -> tuple[np.ndarray, TensorRecord]:
    """Evaluate one output tensor in its storage dtype, with its before/after statistics.

    `source` is the input tensor of the same name, if any: the "before" of the report. A
    tensor of the same shape is compared in one pass over the pair (`stats.compare`).
    """
    info = node.info
    before = reader.read(info.name) if source is not None else None
    if isinstance(node, SourceNode):
        stored = before
        after_stats = before_stats = tensor_stats(before) if stats else None
        return stored, TensorRecord(info.name, info.dtype, list(info.shape), [], False,
                                    before_stats, after_stats, None, {})
    value = node.compute()
    try:
        stored = _to_storage(value, info)
    except InputError as exc:
        raise InputError(f"{reader.path}: {exc}") from None
    del value
    comparable = source is not None and source.shape == info.shape
    if not stats:
        changed = not comparable or source.dtype != info.dtype or not same_bytes(before, stored)
        return stored, TensorRecord(info.name, info.dtype, list(info.shape), list(node.steps), changed,
                                    None, None, None, dict(node.extras),
                                    dtype_before=source.dtype if source else None)
    if comparable:
        pair = compare(before, stored)
        changed = source.dtype != info.dtype or not pair.same_bytes
        before_stats, after_stats, error = pair.before, pair.after, pair.error
        histograms = pair.histogram if changed else None
    else:
        before_stats = tensor_stats(before) if before is not None else None
        after_stats, error, changed = tensor_stats(stored), None, True
        histograms = _histograms(before, before_stats, stored, after_stats)
    return stored, TensorRecord(info.name, info.dtype, list(info.shape), list(node.steps), changed,
                                before_stats, after_stats, error, dict(node.extras),
                                dtype_before=source.dtype if source else None, histogram=histograms)


def _histograms(before: np.ndarray | None, before_stats: dict[str, Any] | None,
                after: np.ndarray, after_stats: dict[str, Any]) -> dict[str, Any] | None:
    """Before/after value histograms on one shared range, for tensors `compare` cannot pair
    (created, or reshaped by a group transform)."""
    ends = [v for s in (before_stats, after_stats) if s for v in (s["min"], s["max"]) if v is not None]
    if not ends:
        return None
    low, high = min(ends), max(ends)
    return {"low": low, "high": high,
            "before": histogram(before, low, high) if before is not None else None,
            "after": histogram(after, low, high)}


def _to_storage(value: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Cast a computed tensor back to its storage dtype, refusing values that overflow it."""
    dtype = by_code(info.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        stored = to_storage(value, dtype)
    value = np.asarray(value)
    if dtype.is_float and dtype.itemsize < value.dtype.itemsize and _may_overflow(value, dtype.numpy):
        overflow = int(np.count_nonzero(~np.isfinite(stored))) - int(np.count_nonzero(~np.isfinite(value)))
        if overflow > 0:
            raise InputError(f"tensor {info.name!r}: {overflow} value(s) overflow {dtype.user_name} after the "
                             f"pipeline; add a cast step with saturate=true or clip first")
    return stored


def _may_overflow(value: np.ndarray, dtype: np.dtype) -> bool:
    """Whether casting `value` to `dtype` may create NaN/Inf: rounding is monotonic, so only
    the extremes can overflow (two fast reductions instead of counting every element)."""
    if not value.size:
        return False
    extremes = np.array([value.min(), value.max()])
    with np.errstate(over="ignore", invalid="ignore"):
        return not (np.isfinite(extremes).all() and np.isfinite(extremes.astype(dtype)).all())


def _planned_record(node: Node, source: TensorInfo | None) -> TensorRecord:
    info = node.info
    return TensorRecord(info.name, info.dtype, list(info.shape), list(node.steps), bool(node.steps),
                        None, None, None, {}, dtype_before=source.dtype if source else None)


def _output_metadata(metadata: Mapping[str, str], pipeline: Pipeline, infos: Sequence[TensorInfo],
                     notes: list[str]) -> dict[str, str]:
    """The input's metadata plus one `wtool` entry (`Pipeline.provenance`).

    transformers refuses safetensors metadata without `format`, so `format: pt` is added
    when the input had none. What wtool adds is left out again (with a note) when it would
    push a header that the input kept under the size limit over it.
    """
    out = dict(metadata)
    out.setdefault("format", "pt")
    out["wtool"] = json.dumps(pipeline.provenance(), sort_keys=True)
    for added in ("wtool", "format"):
        if len(encode_header(infos, out)) - 8 <= MAX_HEADER_BYTES or added in metadata:
            break
        del out[added]
        notes.append(f"metadata entry {added!r} left out: with it the safetensors header would pass the "
                     f"{MAX_HEADER_BYTES:,} byte limit that readers accept")
    return out


def _quality_totals(records: list[TensorRecord], reader: Reader, totals: Mapping[str, Any]) -> dict[str, Any]:
    """Parameter-weighted error and the worst tensors (see `weighted_error`), stored bits per
    weight before and after, and the grid bits of quantized tensors, scales and offsets counted."""
    changed = [{"name": r.name, "numel": math.prod(r.shape), "rel_l2": r.error["rel_l2"],
                "sqnr_db": r.error["sqnr_db"]} for r in records if r.changed and r.error is not None]
    measured = any(r.after is not None for r in records) or not records  # stats=False measures no error
    params_in = sum(t.numel for t in reader.tensors)
    quantized = [(math.prod(r.shape), r.extras["quantize.bits_per_weight"]) for r in records
                 if "quantize.bits_per_weight" in r.extras]
    grid = math.fsum(n * b for n, b in quantized) / sum(n for n, _ in quantized) if quantized else None
    return (weighted_error(changed) if measured else {}) | {
        "bits_per_weight": {"before": 8 * totals["bytes_in"] / params_in if params_in else None,
                            "after": 8 * totals["bytes_out"] / totals["params"] if totals["params"] else None},
        "quantized_bits_per_weight": grid,
    }


def _report(the_plan: Plan, records: list[TensorRecord], output: str | Path | None, seconds: float,
            *, dry_run: bool, model_files: list[str]) -> Report:
    reader = the_plan.reader
    output_names = {r.name for r in records}
    dropped = [t.name for t in reader.tensors if t.name not in output_names]
    bytes_out = sum(TensorInfo(r.name, r.dtype, tuple(r.shape)).nbytes for r in records)
    totals = {
        "tensors": len(records),
        "changed": sum(r.changed for r in records),
        "params": sum(int(np.prod(r.shape, dtype=np.int64)) for r in records),
        "bytes_in": sum(t.nbytes for t in reader.tensors),
        "bytes_out": bytes_out,
        "seconds": round(seconds, 3),
    }
    if not dry_run:
        totals |= _quality_totals(records, reader, totals)
    return Report(
        wtool_version=__version__, input=str(reader.path), output=None if output is None else str(output),
        steps=the_plan.pipeline.describe(), tensors=records, totals=totals, dropped=dropped,
        skipped=the_plan.skipped, groups=the_plan.groups, notes=the_plan.notes, dry_run=dry_run,
        nonfinite_policy=the_plan.pipeline.nonfinite, model_files=model_files,
        warnings=data_free_warnings(records),
    )

