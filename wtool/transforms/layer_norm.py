"""Fold LayerNorm/RMSNorm gains (and LayerNorm bias) into the linear layers that read their output.

linear(γ ⊙ x̂ + β) = (W·diag(γ)) x̂ + (b + W·β), so the gain moves into every consumer and the
norm keeps only its normalization (gain ones, bias zeros). Every consumer must take the gain,
so a norm is folded into all of its linears or none.

Automatic pairs follow Llama/Mistral/Qwen naming; a layer that also has a
`post_feedforward_layernorm` (Gemma 2/3, OLMo 2) is post-norm and its
`post_attention_layernorm` is refused. Gemma stores RMSNorm gains as 1 + weight: use
`gain_offset=1` there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms._layout import join, parse_pairs, shown, split_name, unselected
from wtool.transforms.base import Group, GroupPlan, GroupTransform, param

#: norm leaf -> alternative consumer sets (relative to the norm's parent module)
_RULES: dict[str, tuple[tuple[str, ...], ...]] = {
    "input_layernorm": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.qkv_proj",)),
    "post_attention_layernorm": (("mlp.gate_proj", "mlp.up_proj"), ("mlp.gate_up_proj",)),
}
_POST_NORM_MARKERS = ("post_feedforward_layernorm", "pre_feedforward_layernorm")
_HEAD = "lm_head"


def _head_of(norm: str) -> str | None:
    """`X.lm_head` for a final norm `X.model.norm` (X usually empty), else None."""
    parent, leaf = split_name(norm)
    grandparent, parent_leaf = split_name(parent)
    return join(grandparent, _HEAD) if (leaf, parent_leaf) == ("norm", "model") else None


@dataclass(frozen=True)
class FoldNormParams:
    pairs: str | None = param(None, "explicit NORM:LINEAR+LINEAR;... module prefixes (replaces automatic pairing)")
    gain_offset: float = param(0.0, "the gain is gain_offset + weight (Gemma's RMSNorm: 1)")


@dataclass(frozen=True)
class _Linear:
    weight: str
    bias_in: str | None
    bias_out: str | None


@dataclass(frozen=True)
class _NormFold:
    gain: str
    shift: str | None
    linears: tuple[_Linear, ...]


def _tied(config: Mapping[str, Any] | None) -> bool:
    value = (config or {}).get("tie_word_embeddings", False)
    return value is True or str(value).lower() == "true"


class FoldNorm(GroupTransform, name="fold-norm"):
    """Fold LayerNorm/RMSNorm gain (and LN bias) into the linears consuming the norm's output."""

    Params = FoldNormParams
    formula = "W' = W·diag(γ);  b' = b + W·β (bias created if β exists);  then γ = 1, β = 0"
    applies_to = ("input_layernorm -> self_attn.{q,k,v}_proj, post_attention_layernorm -> mlp.{gate,up}_proj, "
                  "model.norm -> lm_head unless tied, or pairs=; formed when the norm and all its linears are selected")
    example = "fold-norm"
    spreads_nonfinite = True

    def plan(self, tensors: Sequence[TensorInfo], selected: Callable[[str], bool],
             config: Mapping[str, Any] | None = None) -> GroupPlan:
        """Find the folds. `config` is the model's config.json when known: `tie_word_embeddings`
        refuses the lm_head fold, a Gemma `model_type` needs gain_offset=1."""
        by_name = {t.name: t for t in tensors}
        order = {t.name: i for i, t in enumerate(tensors)}
        model_type = str((config or {}).get("model_type", ""))
        if model_type.startswith("gemma") and self.params.gain_offset == 0.0:
            return GroupPlan((), (f"nothing folded: {model_type} stores RMSNorm gains as 1 + weight; "
                                  "pass gain_offset=1",))
        notes: list[str] = []
        if self.params.pairs is not None:
            candidates = self._explicit(by_name)
        else:
            candidates = self._automatic(tensors, by_name, selected, notes)
        groups: list[Group] = []
        used: dict[str, str] = {}
        for norm, linears in candidates:
            keys = [join(norm, "weight"), *(join(linear, "weight") for linear in linears)]
            if not any(selected(k) for k in keys):
                continue
            problem = self._problem(norm, linears, by_name)
            if not problem and _tied(config) and any(split_name(linear)[1] == _HEAD for linear in linears):
                problem = "the config sets tie_word_embeddings: folding into lm_head would change the embeddings too"
            taken = [linear for linear in linears if linear in used]
            if not problem and taken:
                problem = f"{taken[0]} already takes the gain of {shown(used[taken[0]])}"
            left_out = unselected(keys, selected)
            if not problem and left_out:
                problem = (f"{', '.join(left_out)} excluded by selection "
                           "(a gain must fold into all of its consumers)")
            if problem:
                notes.append(f"{shown(norm)}: not folded: {problem}")
                continue
            used.update((linear, norm) for linear in linears)
            groups.append(self._group(norm, linears, by_name, order))
        groups.sort(key=lambda g: order[g.inputs[0]])
        return GroupPlan(tuple(groups), tuple(notes))

    @staticmethod
    def _automatic(tensors: Sequence[TensorInfo], by_name: Mapping[str, TensorInfo],
                   selected: Callable[[str], bool], notes: list[str]) -> list[tuple[str, tuple[str, ...]]]:
        found = []
        for info in tensors:
            norm, leaf = split_name(info.name)
            if leaf != "weight":
                continue
            say = selected(info.name)
            parent, kind = split_name(norm)
            head = _head_of(norm)
            if head is not None:
                if join(head, "weight") in by_name:
                    found.append((norm, (head,)))
                elif say:
                    notes.append(f"{norm}: not folded: {head} is tied to the embeddings (no {head}.weight): "
                                 "folding would change the embeddings too")
                continue
            if kind not in _RULES:
                continue
            markers = [join(parent, m, "weight") for m in _POST_NORM_MARKERS if join(parent, m, "weight") in by_name]
            if kind == "post_attention_layernorm" and markers:
                if say:
                    notes.append(f"{norm}: not folded: post-norm layout ({markers[0]} exists): it normalizes "
                                 "the attention output, not the MLP input")
                continue
            options = [tuple(join(parent, c) for c in option) for option in _RULES[kind]]
            complete = [o for o in options if all(join(c, "weight") in by_name for c in o)]
            if complete:
                found.append((norm, complete[0]))
            elif say:
                missing = [join(c, "weight") for c in options[0] if join(c, "weight") not in by_name]
                notes.append(f"{norm}: not folded: no {', '.join(missing)}")
        return found

    def _explicit(self, by_name: Mapping[str, TensorInfo]) -> list[tuple[str, tuple[str, ...]]]:
        found = []
        for norm, linears in parse_pairs(self.name, "pairs", self.params.pairs or ""):
            for name in (join(norm, "weight"), *(join(linear, "weight") for linear in linears)):
                if name not in by_name:
                    tied = " (a tied lm_head has no tensor of its own)" if name.endswith(_HEAD + ".weight") else ""
                    raise UsageError(f"fold-norm: pairs: no tensor {name!r}{tied}")
            found.append((norm, linears))
        return found

    @staticmethod
    def _problem(norm: str, linears: tuple[str, ...], by_name: Mapping[str, TensorInfo]) -> str:
        gain = by_name[join(norm, "weight")]
        if gain.ndim != 1 or not gain.dtype_info.is_float:
            return f"{gain.name} is not a float vector ({gain.dtype}, {list(gain.shape)})"
        shift = by_name.get(join(norm, "bias"))
        if shift is not None and shift.shape != gain.shape:
            return f"{shift.name} has shape {list(shift.shape)}, {gain.name} {list(gain.shape)}"
        for linear in linears:
            weight = by_name[join(linear, "weight")]
            if weight.ndim != 2 or weight.shape[1] != gain.shape[0] or not weight.dtype_info.is_float:
                return f"{weight.name} {list(weight.shape)} does not read {gain.shape[0]} features"
            bias = by_name.get(join(linear, "bias"))
            if bias is not None and bias.shape != (weight.shape[0],):
                return f"{bias.name} has shape {list(bias.shape)}, expected [{weight.shape[0]}]"
        return ""

    @staticmethod
    def _group(norm: str, linears: tuple[str, ...], by_name: Mapping[str, TensorInfo],
               order: Mapping[str, int]) -> Group:
        gain = by_name[join(norm, "weight")]
        shift = by_name.get(join(norm, "bias"))
        inputs = [gain.name] + ([shift.name] if shift else [])
        outputs = []
        plans = []
        for linear in linears:
            weight = by_name[join(linear, "weight")]
            bias = by_name.get(join(linear, "bias"))
            inputs += [weight.name] + ([bias.name] if bias else [])
            outputs.append(weight)
            bias_out = None
            if bias is not None or shift is not None:
                bias_out = bias.name if bias else join(linear, "bias")
                outputs.append(bias or TensorInfo(bias_out, weight.dtype, (weight.shape[0],)))
            plans.append(_Linear(weight.name, bias.name if bias else None, bias_out))
        outputs += [gain] + ([shift] if shift else [])
        return Group(inputs=tuple(sorted(inputs, key=order.__getitem__)), outputs=tuple(outputs),
                     note=f"{shown(norm)} -> {', '.join(linears)}",
                     data=_NormFold(gain.name, shift.name if shift else None, tuple(plans)))

    def apply_group(self, group: Group, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        fold: _NormFold = group.data
        gain_stored = arrays[fold.gain]
        gain = gain_stored.astype(np.float64) + self.params.gain_offset
        shift = arrays[fold.shift].astype(np.float64) if fold.shift else None
        out: dict[str, np.ndarray] = {}
        for linear in fold.linears:
            weight = arrays[linear.weight]
            out[linear.weight] = weight * gain.astype(weight.dtype)
            if linear.bias_out is not None:
                bias = arrays[linear.bias_in].astype(np.float64) if linear.bias_in else np.zeros(weight.shape[0])
                if shift is not None:
                    bias = bias + weight.astype(np.float64) @ shift
                out[linear.bias_out] = bias.astype(arrays[linear.bias_in].dtype if linear.bias_in else weight.dtype)
        out[fold.gain] = np.full(gain_stored.shape, 1.0 - self.params.gain_offset, dtype=gain_stored.dtype)
        if fold.shift:
            out[fold.shift] = np.zeros_like(arrays[fold.shift])
        return out
