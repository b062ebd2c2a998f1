"""Helpers shared by the normalization transforms: module prefixes, dims, pair specs, selection.

A tensor name is a module prefix plus a leaf; the prefix may be empty (a bare module's
`weight_orig`, a bare Sequential's `0.weight`).

>>> split_name("layer1.0.conv1.weight"), split_name("weight_orig")
(('layer1.0.conv1', 'weight'), ('', 'weight_orig'))
>>> join("", "weight"), join("encoder", "weight")
('weight', 'encoder.weight')
>>> parse_pairs("fold-bn", "pairs", "conv1:bn1; 0:1")
[('conv1', ('bn1',)), ('0', ('1',))]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms.base import Group, GroupPlan, GroupTransform, Skip, Transform


def split_name(name: str) -> tuple[str, str]:
    """(module prefix, leaf) of a tensor name; the prefix is '' for top-level tensors."""
    prefix, _, leaf = name.rpartition(".")
    return prefix, leaf


def join(prefix: str, *parts: str) -> str:
    """The name of `parts` inside module `prefix` (which may be empty)."""
    return ".".join(p for p in (prefix, *parts) if p)


def shown(prefix: str) -> str:
    """A module prefix as printed in notes: the root module has no name of its own."""
    return prefix or "<root>"


def normalize_dim(dim: int | None, ndim: int) -> int | None:
    """`dim` as a non-negative axis of an `ndim`-D tensor (None stays None); ValueError if out of range."""
    if dim is None:
        return None
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim={dim} is out of range for a {ndim}-D tensor")
    return dim % ndim


def other_axes(ndim: int, dim: int | None) -> tuple[int, ...]:
    """Every axis except `dim` (all axes when dim is None)."""
    return tuple(a for a in range(ndim) if a != dim)


def slice_norms(array: np.ndarray, dim: int | None) -> np.ndarray:
    """L2 norm of every slice along `dim` (of the whole tensor when None), in float64, with kept dims."""
    wide = array.astype(np.float64, copy=False)
    return np.sqrt(np.sum(np.square(wide), axis=other_axes(array.ndim, dim), keepdims=True))


def matrix_around(array: np.ndarray, dim: int) -> np.ndarray:
    """`array` with axis `dim` moved to the front and the rest flattened: shape (shape[dim], -1).

    This is how torch's spectral norm sees a weight (`_reshape_weight_to_matrix`).
    """
    return np.moveaxis(array, dim, 0).reshape(array.shape[dim], -1)


def parse_pairs(op: str, key: str, text: str) -> list[tuple[str, tuple[str, ...]]]:
    """Parse `A:B;C:D+E` into [(A, (B,)), (C, (D, E))]; module prefixes may be empty."""
    pairs = []
    for item in text.split(";"):
        if not item.strip():
            continue
        left, sep, right = item.partition(":")
        if not sep or ":" in right:
            raise UsageError(f"{op}: {key}={text!r}: {item.strip()!r} must look like A:B")
        targets = tuple(part.strip() for part in right.split("+"))
        pairs.append((left.strip(), targets))
    if not pairs:
        raise UsageError(f"{op}: {key}={text!r} names no pair")
    return pairs


def unselected(names: Iterable[str], selected: Callable[[str], bool]) -> list[str]:
    """The names that the user's include/exclude patterns leave out."""
    return [n for n in names if not selected(n)]


class AlongDim(Transform):
    """Base of the transforms that work slice by slice along `params.dim` (weight-norm,
    spectral-norm, standardize): a tensor without that axis is skipped, and no include lifts it."""

    def skip(self, info: TensorInfo) -> Skip | None:
        reason = super().skip(info)
        if reason is not None and reason.hard:
            return reason
        try:
            normalize_dim(self.params.dim, info.ndim)
        except ValueError as err:
            return Skip(str(err), hard=True)
        return reason


@dataclass(frozen=True)
class Fold:
    """One fold found from an anchor tensor: its companions, the weight it writes, and why it
    cannot happen (`problem`, reported in the plan's notes)."""

    companions: tuple[str, ...]
    target: str
    note: str = ""
    data: Any = None
    problem: str = ""


class FoldIntoOne(GroupTransform):
    """Base of the folds that turn an anchor tensor and its companions into one weight of the
    anchor's shape and dtype (fold-weight-norm, fold-spectral-norm, fold-prune).

    Subclasses implement `find`; a fold forms when its anchor is selected and the weight it
    would write does not exist yet.
    """

    def find(self, info: TensorInfo, by_name: Mapping[str, TensorInfo]) -> Fold | None:
        """The fold anchored at `info`, or None when `info` anchors none."""
        raise NotImplementedError

    def plan(self, tensors: Sequence[TensorInfo], selected: Callable[[str], bool],
             config: Mapping[str, Any] | None = None) -> GroupPlan:
        by_name = {t.name: t for t in tensors}
        order = {t.name: i for i, t in enumerate(tensors)}
        groups: list[Group] = []
        notes: list[str] = []
        for info in tensors:
            fold = self.find(info, by_name) if selected(info.name) else None
            if fold is None:
                continue
            problem = fold.problem or (f"{fold.target} already exists" if fold.target in by_name else "")
            if problem:
                notes.append(f"{fold.target}: not folded: {problem}")
                continue
            inputs = tuple(sorted((info.name, *fold.companions), key=order.__getitem__))
            groups.append(Group(inputs, (TensorInfo(fold.target, info.dtype, info.shape),), fold.note, fold.data))
        return GroupPlan(tuple(groups), tuple(notes))
