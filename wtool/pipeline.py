"""Plan, fit, stream: the whole run of a pipeline over one checkpoint.

`plan` decides from headers alone what every step does to every tensor (`wtool.steps`
runs them); `run` then fits the steps that need a first pass and streams each output
tensor through its steps into the writer, taking statistics on the way. Peak memory is a
few copies of the largest tensor (or group of tensors for folding transforms), whatever the
checkpoint size.

>>> import tempfile
>>> pipe = Pipeline.from_specs(["clip:c=0.5", "quantize:bits=4"])
>>> report = run(pipe, "fixtures/tiny-llama.safetensors", tempfile.mkdtemp() + "/out.safetensors")
>>> report.totals["changed"] > 0
True
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wtool import __version__
from wtool.advice import data_free_warnings
from wtool.compressed import (
    QUANTIZATION_CONFIG,
    DecompressedReader,
    Scheme,
    config_json,
    find_layouts,
    quantization_config,
    without_quantization_config,
)
from wtool.config_dtype import cast_notes, declared_dtype, with_dtype
from wtool.dtypes import by_code, by_user_name, to_storage
from wtool.errors import InputError, UsageError
from wtool.io import (
    Inputs,
    Reader,
    check_target,
    create_writer,
    is_folder_output,
    model_files,
    model_folder,
    open_checkpoint,
    output_format,
)
from wtool.io.base import MAX_HEADER_BYTES
from wtool.io.safetensors import encode_header
from wtool.recipe import Pipeline, Step
from wtool.selection import no_match_hint
from wtool.report import GroupRecord, Report, SkipRecord, TensorRecord
from wtool.stats import compare, histogram, same_bytes, tensor_stats, weighted_error
from wtool.steps import Chain, GroupOutput, Source, StepPlan, StepRun, fit_step, plan_step
from wtool.tensor import TensorInfo
from wtool.transforms import GroupTransform

__all__ = ["Pipeline", "Plan", "Progress", "Step", "plan", "run"]


# ------------------------------------------------------------------ planning

@dataclass
class Plan:
    """What a run will do: the output tensors (as chains), and per step what it decided."""

    reader: Reader
    pipeline: Pipeline
    chains: list[Chain]
    steps: list[StepPlan]
    notes: list[str]

    @property
    def stored(self) -> dict[str, Scheme]:
        """Weights written in a compressed layout, by their name before compression."""
        return {g.inputs[0]: g.data for step in self.steps for g in step.layouts}

    @property
    def skipped(self) -> list[SkipRecord]:
        return [record for step in self.steps for record in step.skipped]

    @property
    def groups(self) -> list[GroupRecord]:
        return [record for step in self.steps for record in step.groups]

    def close(self) -> None:
        for step in self.steps:
            step.run.close()


def plan(pipeline: Pipeline, reader: Reader) -> Plan:
    """Decide, for every tensor, which steps it gets — before any tensor is read."""
    names = [t.name for t in reader.tensors]
    if not pipeline.allow_empty:
        for pattern in pipeline.selector.unmatched(names):
            raise UsageError(f"pattern {pattern!r} matches no tensor in {reader.path}{no_match_hint(pattern, names)} "
                             "(use --allow-empty to allow)")
    chains = [Chain(Source(reader, info)) for info in reader.tensors]
    grouped = any(isinstance(step.transform, GroupTransform) for step in pipeline.steps)
    config = reader.config() if grouped else None
    runs: list[StepRun] = []
    planned: list[StepPlan] = []
    try:
        for index, step in enumerate(pipeline.steps, start=1):
            label = f"step {index} ({step.op})"
            current = [c.info.name for c in chains]
            if not pipeline.allow_empty:
                for pattern in step.selector.unmatched(current):
                    raise UsageError(f"{label}: pattern {pattern!r} matches no tensor{no_match_hint(pattern, current)}")
            runs.append(StepRun(step, pipeline.nonfinite, str(reader.path)).open())

            def selected(name: str, step: Step = step) -> bool:
                return pipeline.selector.admits(name) and step.selector.admits(name)

            chains, decided = plan_step(runs[-1], chains, selected, config)
            planned.append(decided)
            if decided.touched == 0 and not pipeline.allow_empty:
                hint = decided.notes[-1] if decided.notes else \
                    _default_rule_hint(step, [c.info for c in chains if selected(c.info.name)])
                why = f" ({hint})" if hint else ""
                raise UsageError(f"{label} selects no tensor{why}; check include/exclude or use --allow-empty")
    except BaseException:
        for run in runs:
            run.close()
        raise
    return Plan(reader, pipeline, chains, planned, [note for step in planned for note in step.notes])


def _default_rule_hint(step: Step, candidates: Sequence[TensorInfo]) -> str:
    """When a step's default rule left out every tensor it could have taken: say so, and show
    the step-level include that lifts it."""
    if isinstance(step.transform, GroupTransform):
        return ""
    reasons = [(info, step.transform.skip(info)) for info in candidates]
    soft = [(info, reason) for info, reason in reasons if reason is not None and not reason.hard]
    if not soft:
        return ""
    leaves = {info.name.rpartition(".")[2] for info, _ in soft}
    example = f"*.{leaves.pop()}" if len(leaves) == 1 and "." in soft[0][0].name else soft[0][0].name
    return (f"its default rule left out {len(soft)} tensor(s): {soft[0][1].reason}; a step-level include "
            f"lifts it, e.g. -t {step.op}:include={example}")


# ------------------------------------------------------------------ running

class Progress(Protocol):
    """What the CLI's progress bar needs to know; the library never draws anything."""

    def start(self, tensors: int, nbytes: int) -> None: ...

    def advance(self, info: TensorInfo) -> None: ...


def decompress(source: str | Path, output: str | Path | None, dtype: str | None = None, **options: Any) -> Report:
    """Write `source` with every compressed weight (pack-quantized, float-quantized, nvfp4,
    codebook) turned back into a dense tensor of `dtype` (default: its scale's dtype); config.json
    loses its `quantization_config`. `options` as for `run`."""
    code = by_user_name(dtype).code if dtype else None
    return run(Pipeline(), source, output, decompress_to=code or "", **options)


def run(pipeline: Pipeline, source: str | Path, output: str | Path | None, *, force: bool = False,
        max_shard_size: int | None = None, dry_run: bool = False, copy_model_files: bool = True,
        update_config: bool = False, jobs: int = 1, stats: bool = True, progress: Progress | None = None,
        reports: Sequence[str | Path] = (), reads: Sequence[str | Path] = (),
        decompress_to: str | None = None) -> Report:
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
    if output is not None:
        output_format(output)  # an output suffix wtool cannot write is refused before any work
    started = time.perf_counter()
    with open_checkpoint(source) as reader:
        if decompress_to is not None or pipeline.allow_requantize:
            reader = DecompressedReader(reader, decompress_to or None, as_float=_named_integers(pipeline, reader))
        elif pipeline.steps:
            _refuse_requantizing(pipeline, reader)
        the_plan = plan(pipeline, reader)
        try:
            inputs = _protect(the_plan, reads)
            for target in reports:
                inputs.refuse(Path(target), "report")
            qconfig = quantization_config(the_plan.stored)
            extra, copied = ({}, []) if output is None else _model_files(
                reader, output, pipeline, the_plan.notes, copy=copy_model_files, update_config=update_config,
                qconfig=qconfig)
            if qconfig and not extra and output is not None:
                the_plan.notes.append(f"{QUANTIZATION_CONFIG} stored in the output's metadata "
                                      f"(no config.json travels with this output)")
            sources = {t.name: t for t in reader.tensors}
            if dry_run or output is None:
                if output is not None:
                    inputs.refuse(Path(output), "output")
                    check_target(Path(output), force, "folder" if is_folder_output(output) else "file")
                planned = (_planned_record(reader, node, sources.get(node.info.name)) for node in the_plan.chains)
                records = [record for record in planned if record is not None]
                return _report(the_plan, records, output, time.perf_counter() - started, dry_run=True,
                               model_files=copied)
            infos = [node.info for node in the_plan.chains]
            metadata = _output_metadata(reader.metadata, pipeline, infos, the_plan.notes, qconfig)
            writer = create_writer(output, infos, metadata, max_shard_size=max_shard_size, force=force,
                                   extra_files=extra, one_file=reader.format != "sharded", inputs=inputs)
            records = []
            with writer:
                for step in the_plan.steps:
                    fit_step(step, the_plan.chains)
                    step.run.measure = stats
                if progress:
                    progress.start(len(infos), sum(i.nbytes for i in infos))
                for node, (array, record) in _evaluate_in_order(reader, sources, the_plan.chains, jobs, stats):
                    writer.write(node.info.name, array)
                    if record is not None:  # a compressed weight's other pieces: its row is the first's
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
    for reader in [the_plan.reader, *(r for step in the_plan.steps for r in step.run.companion_readers.values())]:
        _protect_reader(inputs, reader)
    for path in reads:
        inputs.add(Path(path))
    return inputs


def _protect_reader(inputs: Inputs, reader: Reader) -> None:
    inputs.add_stamps(reader.stamps)
    source = Path(reader.path)
    folder = model_folder(source)
    beside = [folder / name for name in model_files(folder).copied] if folder is not None else []
    for path in [*beside, (folder or source.parent) / "config.json"]:
        if path.is_file():
            inputs.add(path)


def protect(sources: Sequence[str | Path]) -> Inputs:
    """The protected set of a command that only reads `sources` (inspect, diff, eval): what its
    reports may not touch, and what must not change before they are written. Only headers are read."""
    inputs = Inputs()
    for source in sources:
        with open_checkpoint(source) as reader:
            _protect_reader(inputs, reader)
    return inputs


def _evaluate_in_order(reader: Reader, sources: Mapping[str, TensorInfo], nodes: Sequence[Chain],
                       jobs: int, stats: bool) -> Iterator[tuple[Chain, tuple[np.ndarray, TensorRecord | None]]]:
    """Materialise the output tensors in order, up to `jobs` of them at once in threads
    (numpy releases the GIL in its kernels); memory grows with `jobs`. One job computes in
    the calling thread: overlapping the next tensor with the writing would double its memory.

    The threads are daemons and nothing waits for them when the run stops early: Ctrl-C or
    SIGTERM takes effect at once, not after every tensor in flight.
    """
    if jobs <= 1:
        behind = _Behind()  # a compressed weight's statistics overlap the next tensor's work
        work = partial(_materialise, reader, stats=stats, behind=behind)
        for node in nodes:
            yield node, work(sources.get(node.info.name), node)
        behind.wait()
        return
    work = partial(_materialise, reader, stats=stats)
    pending: deque[tuple[Chain, Future]] = deque()
    upcoming = iter(nodes)
    for node in upcoming:
        pending.append((node, _in_thread(work, sources.get(node.info.name), node)))
        if len(pending) >= jobs:
            break
    while pending:
        node, future = pending.popleft()
        yield node, future.result()
        del future  # the written tensor is freed before the next one starts: `jobs` tensors at most
        following = next(upcoming, None)
        if following is not None:
            pending.append((following, _in_thread(work, sources.get(following.info.name), following)))


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


def _refuse_requantizing(pipeline: Pipeline, reader: Reader) -> None:
    """Quantizing what is already quantized is refused, unless --allow-requantize has it read
    as dense float values first: a step that selects a compressed weight (packed, fp8, an
    integer weight with a scale) or would change one of its pieces (a scale), and a quantize
    step that names an integer tensor exactly. Integer tensors a default rule or a glob
    selects (position_ids) are skipped as before, and listed."""
    for layout in find_layouts(reader):
        dense = TensorInfo(layout.name, layout.dtype, layout.shape)
        for step in pipeline.steps:
            for info in (dense, *layout.pieces):
                if pipeline.selector.admits(info.name) and step.selector.admits(info.name) \
                        and step.transform.skip(info) is None:
                    part = "" if info is dense else f" ({info.name!r} is part of it)"
                    raise UsageError(f"{reader.path}: {step.op} would change {layout.name!r}, stored as "
                                     f"{layout.scheme.label()}{part}; pass --allow-requantize to decompress it "
                                     f"and {step.op} the dense weight")
    for name in _named_integers(pipeline, reader):
        raise UsageError(f"{reader.path}: quantize names {name!r}, a {reader.info(name).dtype} tensor: its values "
                         "are integers already (quantized?); pass --allow-requantize to quantize them again "
                         "as float32")


def _named_integers(pipeline: Pipeline, reader: Reader) -> list[str]:
    """Integer tensors outside any compressed layout that a quantize step names exactly (its
    include, or the run's, spells the whole name), in checkpoint order."""
    pieces = {p.name for layout in find_layouts(reader) for p in layout.pieces}
    named = []
    for info in reader.tensors:
        if info.dtype_info.numpy.kind not in "iu" or info.name in pieces or not pipeline.selector.admits(info.name):
            continue
        if any(step.op == "quantize" and step.selector.admits(info.name)
               and info.name in (*step.selector.include, *pipeline.selector.include) for step in pipeline.steps):
            named.append(info.name)
    return named


def _model_files(reader: Reader, output: str | Path, pipeline: Pipeline, notes: list[str], *,
                 copy: bool, update_config: bool,
                 qconfig: Mapping[str, Any] | None = None) -> tuple[dict[str, Path | bytes], list[str]]:
    """The files of a folder input that travel to a folder output (relative name -> source, or
    the rewritten config.json), the names copied, and a note for each fact. config.json gets
    `qconfig` as its `quantization_config` (a reader that decompresses, `DecompressedReader`,
    has it removed) and, with `update_config`, the dtype of the last cast."""
    folder = model_folder(Path(reader.path))
    casts = [s.transform.params.dtype for s in pipeline.steps if s.op == "cast"]
    travels = copy and folder is not None and is_folder_output(output)
    if update_config and not (travels and casts and (folder / "config.json").is_file()):
        raise UsageError("--update-config needs a cast step, a model folder with config.json as input and a "
                         "folder output (without --no-model-files)")
    if not travels:
        notes.extend(cast_notes(casts[-1], None, update_config=False) if casts else [])
        return {}, []
    found = model_files(folder, skip=[*reader.files, Path(output)])
    extra: dict[str, Path | bytes] = {name: folder / name for name in found.copied}
    if found.copied:
        notes.append(f"copied {len(found.copied)} model file(s) beside the weights: {', '.join(found.copied)}")
    if found.left:
        notes.append(f"left behind (weights in another format, or not a regular file): {', '.join(found.left)}")
    config = reader.config() or {}
    declared = declared_dtype(config)
    rewritten = False
    if "config.json" in extra and (qconfig is not None or isinstance(reader, DecompressedReader)):
        config = without_quantization_config(config)
        if qconfig is not None:
            config[QUANTIZATION_CONFIG] = dict(qconfig)
        notes.append(f"config.json: {QUANTIZATION_CONFIG} {'written' if qconfig is not None else 'removed'}")
        rewritten = True
    if update_config:
        config = with_dtype(config, casts[-1])
        rewritten = True
    if casts:
        notes.extend(cast_notes(casts[-1], declared, update_config=update_config))
    if rewritten:
        extra["config.json"] = config_json(config)
    return extra, found.copied


class _Behind:
    """One background thread's worth of work that trails the run (a compressed weight's
    statistics, while the next tensor is computed): at most one task in flight, so memory
    grows by one tensor's decoded values at most."""

    def __init__(self) -> None:
        self.pending: Future | None = None

    def run(self, task: Callable[[], None]) -> None:
        self.wait()
        self.pending = _in_thread(task)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


def _materialise(reader: Reader, source: TensorInfo | None, node: Chain, *, stats: bool = True,
                 behind: _Behind | None = None) -> tuple[np.ndarray, TensorRecord | None]:
    """Evaluate one output tensor in its storage dtype, with its before/after statistics (None
    for a piece of a compressed layout other than the first, which speaks for the weight).

    `source` is the input tensor of the same name, if any: the "before" of the report. A
    tensor of the same shape is compared in one pass over the pair (`stats.compare`).
    """
    info = node.info
    before = reader.read(info.name) if source is not None else None
    if node.untouched:
        stored = before
        after_stats = before_stats = tensor_stats(before) if stats else None
        return stored, TensorRecord(info.name, info.dtype, list(info.shape), [], False,
                                    before_stats, after_stats, None, {},
                                    bytes_before=info.nbytes, bytes_after=info.nbytes)
    value, extras = node.evaluate()
    try:
        stored = _to_storage(value, info)
    except InputError as exc:
        raise InputError(f"{reader.path}: {exc}") from None
    del value
    piece = node.compressed_piece
    if piece is not None and isinstance(piece.evaluation.group.data, Scheme):
        return stored, _layout_record(reader, piece, node.ops(), stats, behind)
    comparable = source is not None and source.shape == info.shape
    sizes = {"bytes_before": source.nbytes if source else None, "bytes_after": info.nbytes}
    if not stats:
        changed = not comparable or source.dtype != info.dtype or not same_bytes(before, stored)
        return stored, TensorRecord(info.name, info.dtype, list(info.shape), node.ops(), changed,
                                    None, None, None, extras,
                                    dtype_before=source.dtype if source else None, **sizes)
    if comparable:
        pair = compare(before, stored)
        changed = source.dtype != info.dtype or not pair.same_bytes
        before_stats, after_stats, error = pair.before, pair.after, pair.error
        histograms = pair.histogram if changed else None
    else:
        before_stats = tensor_stats(before) if before is not None else None
        after_stats, error, changed = tensor_stats(stored), None, True
        histograms = _histograms(before, before_stats, stored, after_stats)
    return stored, TensorRecord(info.name, info.dtype, list(info.shape), node.ops(), changed,
                                before_stats, after_stats, error, extras,
                                dtype_before=source.dtype if source else None, histogram=histograms, **sizes)


def _layout_record(reader: Reader, piece: GroupOutput, steps: list[str], stats: bool,
                   behind: _Behind | None = None) -> TensorRecord | None:
    """The report's one row for a weight stored in a compressed layout, made with its first piece
    (None for the others): the dense weight before, what the layout decodes to after, bytes
    before → the sum of the pieces. Its statistics are taken `behind` the run when given (the
    record is complete once `behind.wait()` returns)."""
    group = piece.evaluation.group
    if piece.info.name != group.outputs[0].name:
        return None
    name = group.inputs[0]
    dense = piece.history.info
    source = reader.info(name) if name in reader else None
    after = piece.evaluation.take_decoded() if stats else None
    op = piece.evaluation.run.step.op
    stored_bytes = sum(o.nbytes for o in group.outputs)
    extras = {f"{op}.layout": group.data.label(), f"{op}.bits_per_weight": 8 * stored_bytes / max(dense.numel, 1)}
    record = TensorRecord(name, dense.dtype, list(dense.shape), steps, True, None, None, None, extras,
                          dtype_before=source.dtype if source else None,
                          bytes_before=source.nbytes if source else None, bytes_after=stored_bytes)
    if after is not None:
        measure = partial(_measure_layout, record, reader if source is not None else None, after)
        if behind is None:
            measure()
        else:
            behind.run(measure)
    return record


def _measure_layout(record: TensorRecord, reader: Reader | None, after: np.ndarray) -> None:
    """Fill `record` with the statistics of the dense weight (read from `reader`, when it has
    one) and of `after`, what its layout decodes to, and the error between them."""
    before = reader.read(record.name) if reader is not None else None
    if before is not None and before.shape == after.shape:
        pair = compare(before, after)
        record.before, record.after, record.error, record.histogram = pair.before, pair.after, pair.error, pair.histogram
    else:
        record.after = tensor_stats(after)
        record.histogram = _histograms(None, None, after, record.after)


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


def _planned_record(reader: Reader, node: Chain, source: TensorInfo | None) -> TensorRecord | None:
    info = node.info
    steps = node.ops()
    piece = node.compressed_piece
    if piece is not None and isinstance(piece.evaluation.group.data, Scheme):
        return _layout_record(reader, piece, steps, stats=False)
    return TensorRecord(info.name, info.dtype, list(info.shape), steps, bool(steps),
                        None, None, None, {}, dtype_before=source.dtype if source else None)


def _output_metadata(metadata: Mapping[str, str], pipeline: Pipeline, infos: Sequence[TensorInfo],
                     notes: list[str], qconfig: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The input's metadata plus one `wtool` entry (`Pipeline.provenance`), and the
    compressed-tensors `quantization_config` (JSON) when weights were packed.

    transformers refuses safetensors metadata without `format`, so `format: pt` is added
    when the input had none. What wtool adds is left out again (with a note) when it would
    push a header that the input kept under the size limit over it.
    """
    out = dict(metadata)
    out.setdefault("format", "pt")
    out["wtool"] = json.dumps(pipeline.provenance(), sort_keys=True)
    if qconfig is not None:
        out[QUANTIZATION_CONFIG] = json.dumps(qconfig, sort_keys=True)
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
    bytes_out = sum(r.bytes_after if r.bytes_after is not None else TensorInfo(r.name, r.dtype, tuple(r.shape)).nbytes
                    for r in records)
    totals = {
        "tensors": len(records),
        "changed": sum(r.changed for r in records),
        "params": sum(int(np.prod(r.shape, dtype=np.int64)) for r in records),
        "bytes_in": sum(t.nbytes for t in (reader.inner if isinstance(reader, DecompressedReader) else reader).tensors),
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

