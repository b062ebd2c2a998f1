"""Fold torch pruning (torch.nn.utils.prune) masks into plain weights.

A pruned parameter X is stored as X_orig and X_mask; torch's `prune.remove` writes
X = X_orig · X_mask. Legacy spectral norm also stores X_orig, so the pair is told apart by
its siblings: X_mask means pruning, X_u means spectral norm.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from wtool.tensor import TensorInfo
from wtool.transforms._layout import Fold, FoldIntoOne, join, split_name
from wtool.transforms.base import Group, NoParams


class FoldPrune(FoldIntoOne, name="fold-prune"):
    """Fold torch pruning pairs (weight_orig + weight_mask) into the pruned weight."""

    Params = NoParams
    formula = "P.X = P.X_orig · P.X_mask (X is usually weight or bias); both inputs dropped"
    applies_to = "P.X_orig + P.X_mask pairs, formed when X_orig is selected; X_orig with X_u is spectral norm"
    example = "fold-prune"

    def find(self, info: TensorInfo, by_name: Mapping[str, TensorInfo]) -> Fold | None:
        prefix, leaf = split_name(info.name)
        if not leaf.endswith("_orig") or leaf == "_orig":
            return None
        base = leaf[:-5]
        mask, target = join(prefix, base + "_mask"), join(prefix, base)
        if mask not in by_name:
            return None
        problem = ""
        if join(prefix, base + "_u") in by_name:
            problem = f"both {mask} (pruning) and {join(prefix, base + '_u')} (spectral norm) are present"
        elif by_name[mask].shape != info.shape:
            problem = f"{mask} has shape {list(by_name[mask].shape)}, {info.name} {list(info.shape)}"
        return Fold((mask,), target, f"{target} <- {info.name} · {mask}", (info.name, mask, target), problem)

    def apply_group(self, group: Group, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        orig_name, mask_name, target = group.data
        orig = arrays[orig_name]
        return {target: orig * arrays[mask_name].astype(orig.dtype, copy=False)}
