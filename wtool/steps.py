"""Running steps: the one place a transform meets a tensor.

Planning turns every output tensor into a `Chain`: where its value starts (a tensor of the
input, or one output of a group step) and the per-tensor steps after that, in order.
`Chain.evaluate()` walks that list in a loop, so a recipe of 10,000 steps needs no
recursion and memory linear in its length. `StepRun.apply` and `StepRun.apply_group` run
one step on one tensor or one group: the `--nonfinite` policy, companions, the figures a
step reports (`extras`, a fresh dict per evaluation) and the input path in error messages
are all handled there. `plan_step` plans one step and returns what it decided (`StepPlan`);
`fit_step` runs a step's first pass over values cached once, so a global fit evaluates the
steps before it once per tensor, whatever its number of passes.

>>> from wtool.recipe import Step
>>> from wtool.tensor import TensorInfo
>>> run = StepRun(Step.parse("clip:c=1"), policy="error", source="in.safetensors")
>>> run.apply(TensorInfo("w", "F32", (3,)), np.array([-2.0, 0.5, 3.0], np.float32))
(array([-1. ,  0.5,  1. ], dtype=float32), {})
"""

from __future__ import annotations

import math
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from wtool.compressed import Layout, Scheme, dequantize
from wtool.dtypes import convert, to_storage
from wtool.errors import InputError, UsageError
from wtool.io import Reader, open_checkpoint
from wtool.recipe import Step
from wtool.report import GroupRecord, SkipRecord
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Group, GroupTransform, Transform

#: Fit inputs up to this many bytes stay in memory; larger ones go to a temporary folder.
FIT_CACHE_BYTES = 256 << 20


def _complete(transform: Transform, group: Group, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`outputs`, once every output the group declared is in it (a missing one is a transform bug)."""
    missing = {o.name for o in group.outputs} - set(outputs)
    if missing:
        raise RuntimeError(f"{transform.name} did not produce {sorted(missing)}")
    return outputs


@dataclass
class StepRun:
    """A step during one run: the `--nonfinite` policy, open companion checkpoints, fitted state."""

    step: Step
    policy: str
    source: str
    companion_readers: dict[str, Reader] = field(default_factory=dict)
    state: Any = None
    #: Whether the run takes statistics (apply --no-stats does not), e.g. a layout's decoding error.
    measure: bool = True

    def open(self) -> StepRun:
        """Open the companion checkpoints the transform declares (e.g. decay's grads)."""
        for role, path in self.step.transform.companion_paths().items():
            self.companion_readers[role] = open_checkpoint(path)
        return self

    def close(self) -> None:
        for reader in self.companion_readers.values():
            reader.close()

    def output_info(self, info: TensorInfo) -> TensorInfo:
        """`info` after this step (only the dtype may change; the same object when it does not)."""
        dtype = self.step.transform.output_dtype(info.dtype)
        return info if dtype == info.dtype else TensorInfo(info.name, dtype, info.shape)

    def apply(self, info: TensorInfo, array: np.ndarray, owned: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
        """Run this per-tensor step on `array`, the value of `info` in compute dtype; `owned`
        when it is a copy made for this step alone, which the step may overwrite (`Context.owned`).

        Returns the result and the figures the step reported, keyed `op.name`; a tensor the
        `skip` policy leaves alone comes back as it came.
        """
        transform = self.step.transform
        extras: dict[str, Any] = {}
        try:
            guarded = self._guard(info.name, array, extras) if transform.needs_finite else array
            if guarded is None:
                return array, extras
            ctx = Context(info, self.state, self._companions(info.name, guarded.dtype),
                          owned=owned or guarded is not array, measure=self.measure)
            result = transform.apply(guarded, ctx)
        except InputError as exc:
            raise self._refused(exc) from None
        extras.update({f"{transform.name}.{k}": v for k, v in ctx.extras.items()})
        if result.shape != array.shape:
            raise RuntimeError(f"{transform.name} changed the shape of {info.name!r}")  # transform bug
        return result, extras

    def apply_group(self, group: Group, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run this group step; float inputs arrive in compute dtype, others as stored."""
        transform = self.step.transform
        assert isinstance(transform, GroupTransform)
        try:
            for key, array in arrays.items():
                if transform.needs_finite and array.dtype.kind == "f":
                    guarded = self._guard(key, array, {})
                    if guarded is None:
                        raise InputError(f"tensor {key!r}: non-finite values; {transform.name} cannot skip one "
                                         f"member of the group {group.note or key}; use --nonfinite=zero")
                    arrays[key] = guarded
            outputs = transform.apply_group(group, arrays)
        except InputError as exc:
            raise self._refused(exc) from None
        return _complete(transform, group, outputs)

    def apply_split(self, group: Group, info: TensorInfo, array: np.ndarray,
                    decoded: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Run a per-tensor step that stores `info` as several tensors (`Transform.split`); with
        `decoded`, also the dense weight they decode to, when the transform has it at hand."""
        transform = self.step.transform
        try:
            guarded = self._guard(info.name, array, {}) if transform.needs_finite else array
            if guarded is None:
                raise InputError(f"tensor {info.name!r}: non-finite values; {transform.name} cannot leave a "
                                 f"tensor it stores as {group.note or 'several'} alone; use --nonfinite=zero")
            ctx = Context(info, self.state, {})
            outputs, dense = transform.apply_split_decoded(guarded, ctx) if decoded else \
                (transform.apply_split(guarded, ctx), None)
        except InputError as exc:
            raise self._refused(exc) from None
        return _complete(transform, group, outputs), dense

    def fit_input(self, info: TensorInfo, array: np.ndarray) -> np.ndarray:
        """`array` as this step's fit sees it: after the `--nonfinite` policy (`skip` members
        are left out by the caller)."""
        if not self.step.transform.needs_finite:
            return array
        try:
            guarded = self._guard(info.name, array, {})
        except InputError as exc:
            raise self._refused(exc) from None
        return array if guarded is None else guarded

    def _companions(self, name: str, dtype: np.dtype) -> dict[str, np.ndarray | None]:
        """The tensor of the same name in each companion checkpoint (None where it has none)."""
        return {role: np.asarray(reader.read(name), dtype=dtype) if name in reader else None
                for role, reader in self.companion_readers.items()}

    def _refused(self, exc: InputError) -> InputError:
        """A value error from this step ("tensor 'w': ..."), prefixed with the input's path."""
        return InputError(f"{self.source}: {exc}")

    def _guard(self, name: str, array: np.ndarray, extras: dict[str, Any]) -> np.ndarray | None:
        """Apply the non-finite policy: the array to transform, or None to skip this tensor.

        One sum answers for most tensors: NaN and Inf make it non-finite, so a finite sum
        means none is there (half the time of isfinite and a count); only a non-finite sum
        (NaN/Inf, or finite values that overflow it) pays for the count."""
        if array.dtype.kind != "f":
            return array
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.add.reduce(array, axis=None))):
                return array
        bad = ~np.isfinite(array)
        count = int(np.count_nonzero(bad))
        if not count:
            return array
        if self.policy == "error":
            raise InputError(f"tensor {name!r}: {count} non-finite value(s) (NaN/Inf) would spread through "
                             f"{self.step.op}; pass --nonfinite=skip or --nonfinite=zero")
        extras[f"{self.step.op}.nonfinite"] = f"{count} {'left alone' if self.policy == 'skip' else 'zeroed'}"
        return None if self.policy == "skip" else np.where(bad, np.zeros((), array.dtype), array)


# ------------------------------------------------------------------ chains

@dataclass(frozen=True, eq=False, slots=True)
class Source:
    """A chain that starts at a tensor of the input checkpoint."""

    reader: Reader
    info: TensorInfo

    def take(self) -> np.ndarray:
        return self.reader.read(self.info.name)


@dataclass(frozen=True, eq=False, slots=True)
class GroupOutput:
    """A chain that starts at one output of a group step; `history` is the chain whose steps
    the report lists before the group's (the input of the same name, else the first input)."""

    evaluation: GroupEvaluation
    info: TensorInfo
    history: Chain

    def take(self) -> np.ndarray:
        return self.evaluation.take(self.info.name)

    def ready(self) -> bool:
        return self.evaluation.ready(self.info.name)


class Chain:
    """One tensor as it stands after some steps: an origin and the per-tensor steps after it.

    Planning appends steps in place (`extend`); a chain a group reads is never extended
    again, so a prefix (`evaluate(upto)`) stays what it was when planned.
    """

    __slots__ = ("origin", "runs", "info")

    def __init__(self, origin: Source | GroupOutput) -> None:
        self.origin = origin
        self.runs: list[StepRun] = []
        self.info = origin.info

    def extend(self, run: StepRun) -> None:
        self.runs.append(run)
        self.info = run.output_info(self.info)

    @property
    def compressed_piece(self) -> GroupOutput | None:
        """The origin, when this chain is one piece of a compressed layout and no step follows."""
        origin = self.origin
        if isinstance(origin, GroupOutput) and not self.runs and \
                not isinstance(origin.evaluation.run.step.transform, GroupTransform):
            return origin
        return None

    @property
    def untouched(self) -> bool:
        """True for an input tensor that no step changes."""
        return isinstance(self.origin, Source) and not self.runs

    def ops(self) -> list[str]:
        """The names of every step this tensor went through, in order (groups included)."""
        parts: list[list[str]] = []
        chain: Chain | None = self
        while chain is not None:
            parts.append([run.step.op for run in reversed(chain.runs)])
            if isinstance(chain.origin, GroupOutput):
                parts.append([chain.origin.evaluation.run.step.op])
                chain = chain.origin.history
            else:
                chain = None
        return [op for part in reversed(parts) for op in reversed(part)]

    def evaluate(self, upto: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """The value after the first `upto` steps (all by default), as the last step returned
        it, with the figures the steps reported."""
        _prepare(self.origin)
        info = self.origin.info
        value = self.origin.take()
        extras: dict[str, Any] = {}
        for run in islice(self.runs, upto):
            converted = convert(value, info.dtype_info.compute)
            value, reported = run.apply(info, converted, owned=converted is not value)
            del converted
            extras.update(reported)
            info = run.output_info(info)
        return value, extras

    def info_at(self, upto: int) -> TensorInfo:
        """The tensor after the first `upto` steps."""
        info = self.origin.info
        for run in islice(self.runs, upto):
            info = run.output_info(info)
        return info

    def load(self, upto: int) -> np.ndarray:
        """The value after the first `upto` steps in compute dtype (float32, or float64 for F64)."""
        return convert(self.evaluate(upto)[0], self.info_at(upto).dtype_info.compute)


def _prepare(origin: Source | GroupOutput) -> None:
    """Evaluate the groups `origin` waits on, deepest first, in a loop: values then flow up
    without recursion however many group steps are stacked."""
    stack: list[Source | GroupOutput] = [origin]
    while stack:
        top = stack[-1]
        if not isinstance(top, GroupOutput) or top.ready():
            stack.pop()
            continue
        deeper = [c.origin for c in top.evaluation.inputs.values()
                  if isinstance(c.origin, GroupOutput) and not c.origin.ready()]
        if deeper:
            stack.extend(deeper)
            continue
        top.evaluation.fill(top.info.name)
        stack.pop()


class GroupEvaluation:
    """Reads a group's inputs, runs the step, and hands each output out once.

    Outputs wait in memory only until their chain takes them; a later pass (a global fit
    over a following step) simply evaluates the group again.
    """

    def __init__(self, run: StepRun, group: Group, inputs: Mapping[str, Chain]) -> None:
        self.run, self.group, self.inputs = run, group, inputs
        #: For one tensor stored in a compressed layout, when the run measures: the input tensor
        #: as read when no step came before (the report's "before", so it is not read twice; else
        #: None), and what the layout decodes to, in the tensor's dtype, until the report takes
        #: them (`take_measured`).
        self.measured: tuple[np.ndarray | None, np.ndarray] | None = None
        self._waiting: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # outputs of one group may be taken by two threads

    def ready(self, name: str) -> bool:
        return name in self._waiting

    def fill(self, name: str) -> None:
        with self._lock:
            if name not in self._waiting:
                self._waiting = self._evaluate()

    def take(self, name: str) -> np.ndarray:
        with self._lock:
            if name not in self._waiting:
                self._waiting = self._evaluate()
            return self._waiting.pop(name)

    def _evaluate(self) -> dict[str, np.ndarray]:
        measure = isinstance(self.group.data, Scheme) and self.run.measure
        arrays, stored = {}, None
        for key, chain in self.inputs.items():
            value = chain.evaluate()[0]
            arrays[key] = convert(value, chain.info.dtype_info.compute) if chain.info.dtype_info.is_float else value
            stored = value if measure and chain.untouched else None  # else not kept while the step runs
            del value
        if isinstance(self.run.step.transform, GroupTransform):
            return self.run.apply_group(self.group, arrays)
        (name,) = self.group.inputs
        info = self.inputs[name].info
        outputs, decoded = self.run.apply_split(self.group, info, arrays[name], decoded=measure)
        if measure:
            self.measured = stored, decoded if decoded is not None else _decode(self.group, info, outputs)
        return outputs

    def take_measured(self) -> tuple[np.ndarray | None, np.ndarray] | None:
        """The input weight (None when steps came before) and what its layout decodes to (see
        `measured`), handed out once."""
        with self._lock:
            measured, self.measured = self.measured, None
            return measured


def _decode(group: Group, info: TensorInfo, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Decode a layout as a reader will (pieces in their storage dtypes), in the tensor's dtype."""
    stored = {o.name: to_storage(outputs[o.name], o.dtype_info) for o in group.outputs}
    layout = Layout(info.name, group.data, info.shape, info.dtype, group.outputs)
    return to_storage(dequantize(layout, stored.__getitem__), info.dtype_info)


# ------------------------------------------------------------------ planning one step

@dataclass
class StepPlan:
    """What one step will do: the tensors it transforms (each as `(chain, position)`, its
    value before this step), and what it skipped, grouped and noted."""

    run: StepRun
    members: list[tuple[Chain, int]] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    groups: list[GroupRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Tensors this step stores in a compressed layout (groups of one input, `data` a Scheme).
    layouts: list[Group] = field(default_factory=list)

    @property
    def touched(self) -> int:
        """How many tensors (or groups) the step selects."""
        return len(self.members) + len(self.groups)


def plan_step(run: StepRun, chains: list[Chain], selected: Callable[[str], bool],
              config: Mapping[str, Any] | None) -> tuple[list[Chain], StepPlan]:
    """The chains after `run`'s step, and what the step will do."""
    if isinstance(run.step.transform, GroupTransform):
        return _plan_group(run, chains, selected, config)
    return _plan_each(run, chains, selected)


def _plan_each(run: StepRun, chains: list[Chain], selected: Callable[[str], bool]) -> tuple[list[Chain], StepPlan]:
    step = run.step
    result = StepPlan(run)
    out: list[Chain] = []
    for chain in chains:
        out.append(chain)
        name = chain.info.name
        if not selected(name):
            continue
        piece = chain.compressed_piece
        if piece is not None:
            result.skipped.append(SkipRecord(name, step.op, f"part of a compressed layout ({piece.evaluation.group.note})"))
            continue
        reason = step.transform.skip(chain.info)
        if reason is not None and (reason.hard or not step.selector.included_explicitly(name)):
            result.skipped.append(SkipRecord(name, step.op, reason.reason))
            continue
        problem = step.transform.problem(chain.info)
        if problem:
            raise UsageError(f"{step.op}: tensor {name!r}: {problem}")
        group = step.transform.split(chain.info)
        if group is None:
            result.members.append((chain, len(chain.runs)))
            chain.extend(run)
            continue
        out.pop()
        evaluation = GroupEvaluation(run, group, {name: chain})
        out.extend(Chain(GroupOutput(evaluation, info, chain)) for info in group.outputs)
        result.groups.append(_group_record(step.op, group, [chain.info]))
        if isinstance(group.data, Scheme):
            result.layouts.append(group)
    return out, result


def _group_record(op: str, group: Group, inputs: Sequence[TensorInfo]) -> GroupRecord:
    return GroupRecord(op, group.note, list(group.inputs), [o.name for o in group.outputs], list(group.created),
                       list(group.dropped), bytes_before=sum(i.nbytes for i in inputs),
                       bytes_after=sum(o.nbytes for o in group.outputs),
                       layout=group.data.label() if isinstance(group.data, Scheme) else None)


def _plan_group(run: StepRun, chains: list[Chain], selected: Callable[[str], bool],
                config: Mapping[str, Any] | None) -> tuple[list[Chain], StepPlan]:
    step = run.step
    transform = step.transform
    assert isinstance(transform, GroupTransform)
    by_name = {c.info.name: c for c in chains}
    found = transform.plan([c.info for c in chains], selected, config)
    result = StepPlan(run, notes=[f"{step.op}: {note}" for note in found.notes])
    owner: dict[str, Group] = {}
    for group in found.groups:
        for name in group.inputs:
            if name in owner:
                raise UsageError(f"{step.op}: tensor {name!r} belongs to two groups "
                                 f"({owner[name].note} and {group.note}); give explicit pairs")
            if name not in by_name:
                raise RuntimeError(f"{step.op} planned a group over unknown tensor {name!r}")  # transform bug
            owner[name] = group
    placed: dict[str, list[Chain]] = {}
    for group in found.groups:
        evaluation = GroupEvaluation(run, group, {n: by_name[n] for n in group.inputs})
        first = group.inputs[0]
        for info in group.outputs:
            history = by_name.get(info.name) or by_name[first]
            anchor = info.name if info.name in group.inputs else first
            placed.setdefault(anchor, []).append(Chain(GroupOutput(evaluation, info, history)))
        result.groups.append(_group_record(step.op, group, [by_name[n].info for n in group.inputs]))
    out: list[Chain] = []
    for chain in chains:
        name = chain.info.name
        if name in owner:
            out.extend(placed.pop(name, []))
        else:
            out.append(chain)
    names = [c.info.name for c in out]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"{step.op}: would create tensor {duplicate!r}, which already exists")
    return out, result


# ------------------------------------------------------------------ fitting one step

def fit_step(plan: StepPlan, outputs: Sequence[Chain]) -> None:
    """Run the step's first pass (e.g. a global sparsity threshold) and keep its state.

    Each member's input is computed once and cached for all the fit's passes; under
    `--nonfinite=skip` members with NaN/Inf are left out of the fit, as they are of the step.
    Members come in the order `_depth_first(outputs)` visits them (the last output first),
    which decides how a global sparsify breaks ties.
    """
    run = plan.run
    transform = run.step.transform
    if not transform.needs_fit:
        return
    position = {id(chain): at for chain, at in plan.members}
    members = [(chain, position[id(chain)]) for chain in _depth_first(outputs) if id(chain) in position]
    with _FitCache(FIT_CACHE_BYTES) as cache:
        loads = []
        for chain, at in members:
            info = chain.info_at(at)
            load = partial(cache.get, id(chain), partial(_fit_value, run, chain, at, info))
            if run.policy == "skip" and transform.needs_finite and not np.isfinite(load()).all():
                continue
            loads.append((info, load))
        run.state = transform.fit(loads)


def _fit_value(run: StepRun, chain: Chain, upto: int, info: TensorInfo) -> np.ndarray:
    return run.fit_input(info, chain.load(upto))


class _FitCache:
    """Values kept for the passes of one fit, read-only: in memory up to `budget` bytes, then
    as .npy files in a temporary folder (memory-mapped back), removed when the fit ends."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.values: dict[Any, np.ndarray | Path] = {}
        self.folder: tempfile.TemporaryDirectory[str] | None = None

    def get(self, key: Any, compute: Callable[[], np.ndarray]) -> np.ndarray:
        kept = self.values.get(key)
        if isinstance(kept, Path):
            return np.load(kept, mmap_mode="r")
        if kept is not None:
            return kept
        value = compute()
        value.setflags(write=False)  # every pass must see the same values
        if value.nbytes <= self.budget:
            self.budget -= value.nbytes
            self.values[key] = value
        else:
            if self.folder is None:
                self.folder = tempfile.TemporaryDirectory(prefix="wtool-fit-")
            path = Path(self.folder.name) / f"{len(self.values)}.npy"
            np.save(path, value)
            self.values[key] = path
        return value

    def __enter__(self) -> _FitCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.values.clear()
        if self.folder is not None:
            self.folder.cleanup()


def _depth_first(chains: Sequence[Chain]) -> Iterator[Chain]:
    """Every chain the outputs depend on (group inputs included), each once."""
    seen: set[int] = set()
    stack = list(chains)
    while stack:
        chain = stack.pop()
        if id(chain) in seen:
            continue
        seen.add(id(chain))
        yield chain
        if isinstance(chain.origin, GroupOutput):
            stack.extend(chain.origin.evaluation.inputs.values())
