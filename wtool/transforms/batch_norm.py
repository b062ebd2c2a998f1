"""Fold eval-mode BatchNorm into the conv/linear layer before it.

Pairs are found by name: `convN` <- `bnN` and `conv` <- `bn` among siblings, and `X.N-1`
<- `X.N` in a Sequential (X may be empty; this covers `downsample.0` <- `downsample.1`).
The conv's output channels must be its weight's axis 0, so ConvTranspose (axis 1) is not
supported. Naming cannot tell a BN after a conv from one before it (pre-activation nets):
give `pairs=` there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms._layout import join, parse_pairs, shown, split_name, unselected
from wtool.transforms.base import Group, GroupPlan, GroupTransform, param

_BN_LEAF = re.compile(r"bn(\d*)")


@dataclass(frozen=True)
class FoldBatchNormParams:
    pairs: str | None = param(None, "explicit CONV:BN;CONV:BN module prefixes (replaces automatic pairing)")
    eps: float = param(1e-5, "BatchNorm epsilon (not stored in checkpoints; torch's default is 1e-5)", low=0.0)


@dataclass(frozen=True)
class _Fold:
    conv: str
    bn: str
    names: Mapping[str, str | None]  # role -> tensor name (None when absent)


class FoldBatchNorm(GroupTransform, name="fold-bn"):
    """Fold eval-mode BatchNorm (running stats, affine) into the preceding conv/linear weight and bias."""

    Params = FoldBatchNormParams
    formula = "s = γ/√(σ²+ε);  W' = W·s per output channel (axis 0);  b' = (b − μ)·s + β (b = 0 if absent)"
    applies_to = ("BN modules (running_mean + running_var) paired with the conv/linear before them by name "
                  "(convN/bnN, conv/bn, X.N-1/X.N) or by pairs=; formed when both weights are selected")
    example = "fold-bn:eps=1e-5"
    spreads_nonfinite = True

    def plan(self, tensors: Sequence[TensorInfo], selected: Callable[[str], bool],
             config: Mapping[str, Any] | None = None) -> GroupPlan:
        by_name = {t.name: t for t in tensors}
        order = {t.name: i for i, t in enumerate(tensors)}
        norms = [split_name(t.name)[0] for t in tensors
                 if split_name(t.name)[1] == "running_mean" and join(split_name(t.name)[0], "running_var") in by_name]
        if self.params.pairs is not None:
            candidates = self._explicit(by_name, set(norms))
        else:
            candidates = [(bn, *self._partner(bn)) for bn in norms]
        groups: list[Group] = []
        notes: list[str] = []
        used: dict[str, str] = {}
        for bn, conv, reason in candidates:
            bn_key = join(bn, "weight") if join(bn, "weight") in by_name else join(bn, "running_mean")
            if conv is None:
                if selected(bn_key):
                    notes.append(f"{shown(bn)}: left unpaired: {reason}")
                continue
            names = self._names(conv, bn, by_name)
            keys = [join(conv, "weight"), bn_key]
            if not any(selected(k) for k in keys):
                continue
            problem = self._problem(conv, bn, names, by_name)
            if not problem and conv in used:
                problem = f"{shown(conv)} already folds {shown(used[conv])}"
            left_out = unselected(keys, selected)
            if not problem and left_out:
                problem = f"{', '.join(left_out)} excluded by selection"
            if problem:
                notes.append(f"{shown(bn)}: left unpaired: {problem}")
                continue
            used[conv] = bn
            weight = by_name[names["weight"]]
            bias = names["bias"] or join(conv, "bias")
            bias_dtype = by_name[bias].dtype if bias in by_name else weight.dtype
            inputs = tuple(sorted((n for n in names.values() if n is not None), key=order.__getitem__))
            groups.append(Group(inputs=inputs,
                                outputs=(weight, TensorInfo(bias, bias_dtype, (weight.shape[0],))),
                                note=f"{shown(conv)} <- {shown(bn)}", data=_Fold(conv, bn, names)))
        groups.sort(key=lambda g: order[g.inputs[0]])
        return GroupPlan(tuple(groups), tuple(notes))

    def _explicit(self, by_name: Mapping[str, TensorInfo], norms: set[str]) -> list[tuple[str, str | None, str]]:
        found = []
        seen: set[str] = set()
        for conv, (bn, *extra) in parse_pairs(self.name, "pairs", self.params.pairs or ""):
            if extra:
                raise UsageError(f"fold-bn: pairs: {conv}:{'+'.join((bn, *extra))} names more than one BN")
            if bn not in norms:
                raise UsageError(f"fold-bn: pairs: no BatchNorm {shown(bn)!r} "
                                 f"({join(bn, 'running_mean')} and {join(bn, 'running_var')} are needed)")
            if join(conv, "weight") not in by_name:
                raise UsageError(f"fold-bn: pairs: no tensor {join(conv, 'weight')!r}")
            if bn in seen:
                raise UsageError(f"fold-bn: pairs: BatchNorm {shown(bn)!r} is named twice")
            seen.add(bn)
            found.append((bn, conv, ""))
        return found

    @staticmethod
    def _partner(bn: str) -> tuple[str | None, str]:
        """The conv prefix `bn` follows by naming convention, or (None, why not)."""
        parent, leaf = split_name(bn)
        match = _BN_LEAF.fullmatch(leaf)
        if match:
            return join(parent, "conv" + match.group(1)), ""
        if leaf.isdigit():
            if int(leaf) == 0:
                return None, "first module of its Sequential: nothing before it"
            return join(parent, str(int(leaf) - 1)), ""
        return None, "no naming rule applies (convN/bnN, conv/bn, X.N-1/X.N): give pairs="

    @staticmethod
    def _names(conv: str, bn: str, by_name: Mapping[str, TensorInfo]) -> dict[str, str | None]:
        def present(name: str) -> str | None:
            return name if name in by_name else None
        return {"weight": join(conv, "weight"), "bias": present(join(conv, "bias")),
                "gamma": present(join(bn, "weight")), "beta": present(join(bn, "bias")),
                "mean": join(bn, "running_mean"), "var": join(bn, "running_var"),
                "count": present(join(bn, "num_batches_tracked"))}

    @staticmethod
    def _problem(conv: str, bn: str, names: Mapping[str, str | None], by_name: Mapping[str, TensorInfo]) -> str:
        """Why `bn` cannot fold into `conv`, or ''."""
        weight = by_name.get(join(conv, "weight"))
        if weight is None:
            wrapped = [n for n in (join(conv, "weight_orig"), join(conv, "weight_v"),
                                   join(conv, "parametrizations", "weight", "original"),
                                   join(conv, "parametrizations", "weight", "original1")) if n in by_name]
            hint = f" ({wrapped[0]} is there: fold its weight norm, spectral norm or pruning first)" if wrapped else ""
            return f"no {names['weight']}{hint}"
        channels = by_name[names["mean"] or ""].shape
        if len(channels) != 1:
            return f"{names['mean']} is not a vector"
        if weight.ndim < 2 or not weight.dtype_info.is_float:
            return f"{weight.name} is not a float conv/linear weight ({weight.dtype}, {list(weight.shape)})"
        if weight.shape[0] != channels[0]:
            hint = " (ConvTranspose keeps them on axis 1: not supported)" if weight.shape[1] == channels[0] else ""
            return (f"{weight.name} has {weight.shape[0]} output channels on axis 0, "
                    f"{shown(bn)} has {channels[0]}{hint}")
        for role in ("bias", "gamma", "beta", "var"):
            name = names[role]
            if name is not None and by_name[name].shape != channels:
                return f"{name} has shape {list(by_name[name].shape)}, expected {list(channels)}"
        return ""

    def apply_group(self, group: Group, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        fold: _Fold = group.data
        names = fold.names
        weight = arrays[names["weight"]]
        channels = weight.shape[0]

        def vector(role: str, default: float) -> np.ndarray:
            name = names[role]
            return np.full(channels, default) if name is None else arrays[name].astype(np.float64)

        scale = vector("gamma", 1.0) / np.sqrt(vector("var", 0.0) + self.params.eps)
        bias = (vector("bias", 0.0) - vector("mean", 0.0)) * scale + vector("beta", 0.0)
        bias_out = group.outputs[1]
        folded = weight * scale.reshape((channels,) + (1,) * (weight.ndim - 1))
        bias_dtype = arrays[names["bias"]].dtype if names["bias"] is not None else weight.dtype
        return {names["weight"]: folded.astype(weight.dtype, copy=False), bias_out.name: bias.astype(bias_dtype)}
