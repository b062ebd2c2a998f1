"""Plan, fit, stream: the whole run of a pipeline over one checkpoint.

`plan` decides from headers alone what every step does to every tensor (`wtool.steps`
runs them); `run` then fits the steps that need a first pass and streams each output
tensor through its steps into the writer, taking statistics on the way. Peak memory is a
few copies of the largest tensor (or group of tensors for folding transforms), whatever the
checkpoint size. One output tensor is computed in `wtool.materialise`, what travels with the
weights is decided in `wtool.outputs`, and the report is assembled in `wtool.tally`.

>>> import tempfile
>>> pipe = Pipeline.from_specs(["clip:c=0.5", "quantize:bits=4"])
>>> report = run(pipe, "fixtures/tiny-llama.safetensors", tempfile.mkdtemp() + "/out.safetensors")
>>> report.totals["changed"] > 0
True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


from wtool.compressed import QUANTIZATION_CONFIG, DecompressedReader, Scheme, find_layouts, quantization_config
from wtool.dtypes import by_user_name
from wtool.errors import UsageError
from wtool.io import Reader, check_target, create_writer, is_folder_output, open_checkpoint, output_format, \
    protect_readers
from wtool.materialise import materialise_in_order, planned_record
from wtool.outputs import model_files_for, output_metadata
from wtool.recipe import Pipeline, Step
from wtool.report import GroupRecord, Records, Report, SkipRecord
from wtool.selection import no_match_hint
from wtool.steps import Chain, Source, StepPlan, StepRun, fit_step, plan_step
from wtool.tally import assemble
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

    @property
    def companions(self) -> list[Reader]:
        """The checkpoints steps read beside the input (e.g. decay's grads)."""
        return [r for step in self.steps for r in step.run.companion_readers.values()]

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
    with it); from 2 on, the statistics process counts as one when one job keeps it busy. Without `stats` the report lists tensors, steps and whether their bytes changed,
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
            inputs = protect_readers([reader, *the_plan.companions], reads)
            for target in reports:
                inputs.refuse(Path(target), "report")
            qconfig = quantization_config(the_plan.stored)
            extra, copied = ({}, []) if output is None else model_files_for(
                reader, output, pipeline, the_plan.notes, copy=copy_model_files, update_config=update_config,
                qconfig=qconfig)
            if qconfig and not extra and output is not None:
                the_plan.notes.append(f"{QUANTIZATION_CONFIG} stored in the output's metadata "
                                      f"(no config.json travels with this output)")
            if dry_run or output is None:
                if output is not None:
                    inputs.refuse(Path(output), "output")
                    check_target(Path(output), force, "folder" if is_folder_output(output) else "file")
                planned = (planned_record(reader, node) for node in the_plan.chains)
                records = Records(record for record in planned if record is not None)
                return assemble(the_plan, records, output, time.perf_counter() - started, dry_run=True,
                                model_files=copied)
            infos = [node.info for node in the_plan.chains]
            metadata = output_metadata(reader.metadata, pipeline, infos, the_plan.notes, qconfig)
            copies = {node.info.name: stored.offset for node in the_plan.chains
                      if node.untouched and (stored := reader.stored(node.info.name)) is not None}
            writer = create_writer(output, infos, metadata, max_shard_size=max_shard_size, force=force,
                                   extra_files=extra, one_file=reader.format != "sharded", inputs=inputs,
                                   copies=copies)
            records = Records()
            with writer:
                for step in the_plan.steps:
                    fit_step(step, the_plan.chains)
                    step.run.measure = stats
                if progress:
                    progress.start(len(infos), sum(i.nbytes for i in infos))
                for node, array in materialise_in_order(reader, the_plan.chains, jobs, stats, records.append):
                    writer.write(node.info.name, array)
                    del array
                    if progress:
                        progress.advance(node.info)
            return assemble(the_plan, records, output, time.perf_counter() - started, dry_run=False,
                            model_files=copied)
        finally:
            the_plan.close()


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
