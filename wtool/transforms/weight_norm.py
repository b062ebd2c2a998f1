"""Weight normalization: rescale slices to a fixed norm, fold torch's (g, v) pairs, or split them.

>>> from wtool.transforms import Context, Transform
>>> w = np.array([[3.0, 4.0], [0.0, 1.0]])
>>> Transform.create("weight-norm", {"norm": "2"}).apply(w, Context.of(w))
array([[1.2, 1.6],
       [0. , 2. ]])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wtool.tensor import TensorInfo
from wtool.transforms._layout import (
    AlongDim,
    Fold,
    FoldIntoOne,
    join,
    normalize_dim,
    slice_norms,
    split_name,
)
from wtool.transforms.base import (
    Context,
    Group,
    GroupPlan,
    GroupTransform,
    NoParams,
    param,
)


def _direction_times(v: np.ndarray, g: np.ndarray | float, dim: int | None) -> np.ndarray:
    """g · v/‖v‖ per slice along `dim` (as torch's `_weight_norm`); all-zero slices stay zero."""
    norms = slice_norms(v, dim)
    scale = np.zeros(np.broadcast_shapes(np.shape(g), norms.shape))
    np.divide(g, norms, out=scale, where=norms > 0)
    return (v * scale).astype(v.dtype, copy=False)


@dataclass(frozen=True)
class WeightNormParams:
    dim: int | None = param(0, "axis with one norm per slice (0: per output row/channel, as torch); "
                               "none: one norm for the whole tensor")
    norm: float = param(1.0, "the L2 norm every slice gets", low=0.0, low_open=True)


class WeightNorm(AlongDim, name="weight-norm"):
    """Rescale every slice along `dim` to the same L2 norm (torch's weight_norm with g = norm)."""

    Params = WeightNormParams
    formula = ("w' = norm · w/‖w‖₂, one norm per slice along dim (the whole tensor for dim=none); "
               "zero slices stay zero")
    applies_to = "float tensors with ndim >= 2 that have axis `dim`"
    example = "weight-norm:dim=0,norm=1.0"
    spreads_nonfinite = True

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        return _direction_times(array, self.params.norm, normalize_dim(self.params.dim, array.ndim))


# ---------------------------------------------------------------- fold / split torch's (g, v)

@dataclass(frozen=True)
class _Pair:
    g: str
    v: str
    weight: str
    dim: int | None


def _param_parts(name: str, leaf: str) -> tuple[str, str] | None:
    """(module prefix P, parameter X) when `name` is `P.parametrizations.X.<leaf>`."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "parametrizations" and parts[-1] == leaf:
        return ".".join(parts[:-3]), parts[-2]
    return None


def _dim_of_g(g: TensorInfo, v: TensorInfo) -> tuple[int | None, str]:
    """The axis along which g varies (None: one norm for the whole tensor), or an error text."""
    if g.numel == 1 and g.ndim in (0, v.ndim):
        return None, ""
    if g.ndim == v.ndim:
        varying = [axis for axis, size in enumerate(g.shape) if size != 1]
        if len(varying) == 1 and g.shape[varying[0]] == v.shape[varying[0]]:
            return varying[0], ""
    return None, f"{g.name} has shape {list(g.shape)}, which fits no axis of {v.name} {list(v.shape)}"


class FoldWeightNorm(FoldIntoOne, name="fold-weight-norm"):
    """Fold torch weight-norm pairs (weight_g/weight_v or parametrizations original0/1) into plain weights."""

    Params = NoParams
    formula = "P.weight = g · v/‖v‖₂, the norm over every axis except the one along which g is not 1"
    applies_to = ("P.X_g + P.X_v (torch.nn.utils.weight_norm) and P.parametrizations.X.original0 + original1; "
                  "formed when v is selected; a X_v with no X_g (spectral norm) is left alone")
    example = "fold-weight-norm"
    spreads_nonfinite = True

    def find(self, info: TensorInfo, by_name: Mapping[str, TensorInfo]) -> Fold | None:
        found = self._companions(info, by_name)
        if found is None:
            return None
        g_name, weight, clash = found
        dim, shape_problem = _dim_of_g(by_name[g_name], info)
        return Fold((g_name,), weight, f"{weight} <- {g_name}, {info.name}", _Pair(g_name, info.name, weight, dim),
                    clash or shape_problem)

    @staticmethod
    def _companions(info: TensorInfo, by_name: Mapping[str, TensorInfo]) -> tuple[str, str, str] | None:
        """(g name, folded weight name, conflict) when `info` is the v of a weight-norm pair."""
        parametrized = _param_parts(info.name, "original1")
        if parametrized:
            prefix, leaf = parametrized
            g_name = join(prefix, "parametrizations", leaf, "original0")
            return (g_name, join(prefix, leaf), "") if g_name in by_name else None
        prefix, leaf = split_name(info.name)
        if not leaf.endswith("_v") or leaf == "_v":
            return None
        base = leaf[:-2]
        g_name = join(prefix, base + "_g")
        if g_name not in by_name:
            return None
        clash = ""
        if join(prefix, base + "_u") in by_name:
            clash = f"both {g_name} (weight norm) and {join(prefix, base + '_u')} (spectral norm) are present"
        return g_name, join(prefix, base), clash

    def apply_group(self, group: Group, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pair: _Pair = group.data
        return {pair.weight: _direction_times(arrays[pair.v], arrays[pair.g], pair.dim)}


@dataclass(frozen=True)
class SplitWeightNormParams:
    layout: str = param("legacy", "tensor names to write: legacy weight_g/weight_v, or "
                                  "parametrizations.weight.original0/original1",
                        choices=("legacy", "parametrizations"))
    dim: int | None = param(0, "axis g varies along (0: per output channel); none: one g for the whole tensor")


class SplitWeightNorm(GroupTransform, name="split-weight-norm"):
    """Split plain weights into torch weight-norm pairs (g = per-slice norm, v = the weight)."""

    Params = SplitWeightNormParams
    formula = "g = ‖w‖₂ per slice along dim (kept dims; 0-D for dim=none), v = w, so that g · v/‖v‖ = w"
    applies_to = "selected float tensors with ndim >= 2 (any name: P.X -> P.X_g, P.X_v)"
    example = "split-weight-norm:layout=parametrizations,dim=0"
    spreads_nonfinite = True

    def plan(self, tensors: Sequence[TensorInfo], selected: Callable[[str], bool],
             config: Mapping[str, Any] | None = None) -> GroupPlan:
        names = {t.name for t in tensors}
        groups: list[Group] = []
        notes: list[str] = []
        small = 0
        for info in tensors:
            if not selected(info.name) or not info.dtype_info.is_float:
                continue
            if info.ndim < 2:
                small += 1
                continue
            try:
                dim = normalize_dim(self.params.dim, info.ndim)
            except ValueError as err:
                notes.append(f"{info.name}: not split: {err}")
                continue
            g_name, v_name = self._targets(info.name)
            taken = [n for n in (g_name, v_name) if n in names]
            if taken:
                notes.append(f"{info.name}: not split: {taken[0]} already exists")
                continue
            g_shape = () if dim is None else tuple(s if a == dim else 1 for a, s in enumerate(info.shape))
            groups.append(Group(inputs=(info.name,),
                                outputs=(TensorInfo(g_name, info.dtype, g_shape),
                                         TensorInfo(v_name, info.dtype, info.shape)),
                                note=f"{info.name} -> {g_name}, {v_name}", data=_Pair(g_name, v_name, info.name, dim)))
        if small:
            notes.append(f"left {small} selected tensor(s) with ndim < 2 alone")
        return GroupPlan(tuple(groups), tuple(notes))

    def _targets(self, name: str) -> tuple[str, str]:
        prefix, leaf = split_name(name)
        if self.params.layout == "legacy":
            return join(prefix, leaf + "_g"), join(prefix, leaf + "_v")
        return (join(prefix, "parametrizations", leaf, "original0"),
                join(prefix, "parametrizations", leaf, "original1"))

    def apply_group(self, group: Group, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        pair: _Pair = group.data
        weight = arrays[pair.weight]
        norms = slice_norms(weight, pair.dim)
        g = norms.reshape(()) if pair.dim is None else norms
        return {pair.g: g.astype(weight.dtype), pair.v: weight.copy()}
