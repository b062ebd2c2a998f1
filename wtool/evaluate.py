"""`wtool eval`: compare what two models *do* on a few inputs, not only their weights.

Weight-space error alone is no go/no-go signal: a 4-bit per-channel MiniLM keeps a median
rel_l2 of 0.12 and its sentence embeddings are destroyed (cosine 0.13). This module runs the
base and the candidate with transformers on the same token ids and compares their outputs:

- encoders (`task="encoder"`): cosine of the mean-pooled final hidden states, per input;
- causal LMs (`task="causal-lm"`): KL(base ‖ candidate) of the next-token distributions,
  top-1 agreement and both perplexities;
- every task: `hidden_rel_l2` = ‖H_c − H_b‖/‖H_b‖ over all real tokens' final hidden states.

torch and transformers are an optional extra (`pip install 'wtool[eval]'`); they are imported
only when an evaluation runs, never by the rest of wtool.

>>> report = evaluate_models("model/", "quantized/", fail_below={"cosine_min": 0.99})  # doctest: +SKIP
>>> report.metrics["cosine_min"], report.passed  # doctest: +SKIP
(0.9987, True)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wtool.errors import InputError, UsageError
from wtool.report import EvalReport

TASKS = ("encoder", "causal-lm", "hidden")
METRICS = {
    "encoder": ("cosine_min", "cosine_mean", "hidden_rel_l2"),
    "causal-lm": ("kl_mean", "top1", "ppl_base", "ppl_candidate", "ppl_ratio", "hidden_rel_l2"),
    "hidden": ("hidden_rel_l2",),
}
ALL_METRICS = tuple(dict.fromkeys(m for names in METRICS.values() for m in names))
#: model_type values of encoder-only models (mean-pooled sentence embeddings make sense).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert",
                           "camembert", "deberta", "deberta-v2", "modernbert", "nomic_bert", "xlm"})
INSTALL_HINT = "pip install 'wtool[eval]' (torch and transformers)"

#: The built-in sample: short, varied sentences (prose, code, numbers, dialogue, lists, other
#: languages), so that an evaluation exercises more than one corner of the vocabulary.
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "A neural network checkpoint is a set of named tensors and some metadata.",
    "She opened the window, and the smell of rain filled the small kitchen.",
    "def add(a, b):\n    return a + b",
    "The meeting was moved from Tuesday at 3 pm to Thursday at 10 am.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Can you recommend a good book about the history of mathematics?",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong stepped onto its surface.",
    "The stock market fell 2.3 percent on Monday after weaker than expected earnings.",
    "Mix the flour, sugar and butter, then bake for twenty minutes at 180 degrees.",
    "He said he would call back, but the phone never rang again.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "The committee approved the budget with seven votes in favour and two against.",
    "Le chat dort sur le canapé depuis ce matin.",
    "Der Zug nach Berlin hat heute zwanzig Minuten Verspätung.",
    "El museo abre a las nueve y cierra a las seis de la tarde.",
    "SELECT name, price FROM products WHERE price > 100 ORDER BY price DESC;",
    "Error: file not found. Please check the path and try again.",
    "The patient reported mild headaches and was advised to drink more water.",
    "Our team won the final match 3-1 after a tense second half.",
    "To reset your password, click the link in the email we just sent you.",
    "The river flooded the lower town twice in the last ten years.",
    "Prime numbers such as 2, 3, 5, 7 and 11 have exactly two divisors.",
    "I'm not sure this is the right approach, but let's try it and see.",
    "The new library has a reading room, a café and a rooftop garden.",
    "Large language models predict the next token given the previous ones.",
    "Remember to water the tomatoes every evening during the heat wave.",
    "The contract ends on 31 December unless either party renews it.",
    "Birds migrate south in autumn to find food and warmer weather.",
    "for i in range(10):\n    print(i * i)",
    "Why is the sky blue? Because air scatters short wavelengths more strongly.",
    "The orchestra played Beethoven's ninth symphony to a full house.",
    "Shipping is free for orders over 50 dollars within the country.",
    "A gentle breeze moved the curtains while the children slept.",
    "The algorithm sorts n numbers in O(n log n) time on average.",
    "Volcanic eruptions can cool the planet by releasing ash into the stratosphere.",
    "Please submit the report by Friday and copy the project manager.",
    "Mountains, lakes and forests: the national park has them all.",
    "The detective noticed that the clock had stopped at a quarter past nine.",
    "Water boils at 100 degrees Celsius at sea level.",
)


def detect_task(config: Mapping[str, Any]) -> str:
    """`causal-lm` for *ForCausalLM / *LMHeadModel architectures, `encoder` for encoder-only
    model types (BERT, RoBERTa, MPNet...), else `hidden` (final hidden states only).

    >>> detect_task({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    'causal-lm'
    """
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if config.get("model_type") in ENCODER_TYPES:
        return "encoder"
    return "hidden"


def read_texts(path: str | Path) -> list[str]:
    """One input per non-empty line of a UTF-8 file."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the text file: {exc}") from None
    texts = [line for line in lines if line.strip()]
    if not texts:
        raise InputError(f"{path}: no text (one input per line)")
    return texts


def evaluate_models(base: str | Path, candidate: str | Path, *, task: str | None = None,
                    texts: Sequence[str] | None = None, max_tokens: int = 128, batch_size: int = 8,
                    device: str = "cpu", seed: int = 0, fail_above: Mapping[str, float] | None = None,
                    fail_below: Mapping[str, float] | None = None) -> EvalReport:
    """Run BASE (a model folder: config.json, tokenizer, weights) and CANDIDATE on the same
    token ids and compare their outputs.

    CANDIDATE is a model folder too, or a single checkpoint file (any format wtool reads)
    holding weights for BASE's architecture. Models run in float32 in eval mode; `seed`
    fixes torch's random state so that nothing depends on the run.
    """
    torch, transformers = _backend()
    base, candidate = Path(base), Path(candidate)
    config = _config(base)
    task = task or detect_task(config)
    if task not in TASKS:
        raise UsageError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    fail_above, fail_below = dict(fail_above or {}), dict(fail_below or {})
    for metric in [*fail_above, *fail_below]:
        if metric not in METRICS[task]:
            raise UsageError(f"gate {metric!r} does not exist for task {task}; its metrics: {', '.join(METRICS[task])}")
    if max_tokens < 2 or batch_size < 1:
        raise UsageError("--max-tokens must be at least 2 and --batch-size at least 1")
    texts = list(texts) if texts is not None else list(SAMPLE_TEXT)
    if not texts:
        raise UsageError("no inputs to evaluate on")
    torch.manual_seed(seed)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base}: cannot load a tokenizer from it: {_first_line(exc)}") from None
    encoded = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    batches = [_pad(torch, encoded[i:i + batch_size]) for i in range(0, len(encoded), batch_size)]
    comparison = _Comparison(task)
    with torch.inference_mode():
        models = [_load(base, base, task, device), _load(candidate, base, task, device)]
        for ids, mask in batches:
            comparison.add(*(_forward(m, task, ids, mask, device) for m in models), ids, mask)
    metrics = comparison.metrics()
    failures = _gate_failures(metrics, fail_above, fail_below)
    gates = {f"{k}>": v for k, v in fail_above.items()} | {f"{k}<": v for k, v in fail_below.items()}
    return EvalReport(str(base), str(candidate), task, len(texts), sum(map(len, encoded)), metrics, gates, failures)


def _backend() -> tuple[Any, Any]:
    """torch and transformers, or a usage error saying what to install."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise UsageError(f"wtool eval needs {exc.name or 'torch'}: {INSTALL_HINT}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return torch, transformers


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise InputError(f"{folder}: not a model folder (no config.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None


def _pad(torch: Any, rows: list[list[int]]) -> tuple[Any, Any]:
    """Right-padded token ids (pad id 0, never attended to) and their attention mask."""
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def _load(path: Path, base: Path, task: str, device: str) -> Any:
    """A model folder through `from_pretrained`; a checkpoint file as weights for BASE's model."""
    import torch
    import transformers

    auto = transformers.AutoModelForCausalLM if task == "causal-lm" else transformers.AutoModel
    try:
        if path.is_dir():
            model = auto.from_pretrained(path, dtype=torch.float32)
        else:
            model = auto.from_config(transformers.AutoConfig.from_pretrained(base), dtype=torch.float32)
            _load_weights(model, path)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise InputError(f"{path}: cannot load the model: {_first_line(exc)}") from None
    return model.to(device).eval()


def _load_weights(model: Any, path: Path) -> None:
    """Every parameter and buffer from the checkpoint, except those tied to one it has (an LM
    head tied to the embeddings is saved once); anything else missing or left over is an error."""
    loaded = model.load_state_dict(_state_dict(path, model), strict=False)
    model.tie_weights()
    params = dict(model.named_parameters(remove_duplicate=False))
    given = {p.data_ptr() for k, p in params.items() if k not in loaded.missing_keys}
    untied = [k for k in loaded.missing_keys if k not in params or params[k].data_ptr() not in given]
    if untied or loaded.unexpected_keys:
        problem = f"no tensor for {untied[0]!r}" if untied else f"unexpected tensor {loaded.unexpected_keys[0]!r}"
        raise InputError(f"{path}: does not fit {type(model).__name__}: {problem}")


def _state_dict(path: Path, model: Any) -> dict[str, Any]:
    """The checkpoint's tensors as float32 torch tensors, named as `model` expects them
    (a `base_model_prefix.` prefix is added or removed when only that differs)."""
    import numpy as np
    import torch

    from wtool.io import open_checkpoint

    expected = set(model.state_dict())
    prefix = f"{model.base_model_prefix}."
    out = {}
    with open_checkpoint(path) as reader:
        for info in reader.tensors:
            name = info.name
            if name not in expected:
                name = name.removeprefix(prefix) if name.removeprefix(prefix) in expected else prefix + name
            array = reader.read(info.name)
            if info.dtype_info.is_float:
                array = np.asarray(array, dtype=np.float32)
            out[name] = torch.from_numpy(np.array(array))
    return out


def _forward(model: Any, task: str, ids: Any, mask: Any, device: str) -> tuple[Any, Any]:
    """The final hidden states and (causal LMs) the logits of one batch, float64 on the CPU."""
    if task == "causal-lm":
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        return out.hidden_states[-1].double().cpu(), out.logits.double().cpu()
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return out.last_hidden_state.double().cpu(), None


class _Comparison:
    """Accumulates the task's metrics batch by batch, in float64 (see the module docstring)."""

    def __init__(self, task: str) -> None:
        self.task = task
        self.cosines: list[float] = []
        self.kl = self.nll_base = self.nll_candidate = self.diff_sq = self.ref_sq = 0.0
        self.agree = self.positions = 0

    def add(self, base: tuple[Any, Any], candidate: tuple[Any, Any], ids: Any, mask: Any) -> None:
        import torch

        (hb, lb), (hc, lc) = base, candidate
        keep = mask.bool()
        self.diff_sq += float(((hc - hb)[keep] ** 2).sum())
        self.ref_sq += float((hb[keep] ** 2).sum())
        if self.task == "encoder":
            weights = mask.unsqueeze(-1).double()
            eb, ec = (hb * weights).sum(1) / weights.sum(1), (hc * weights).sum(1) / weights.sum(1)
            rows = zip((eb * ec).sum(-1).tolist(), (eb * eb).sum(-1).tolist(), (ec * ec).sum(-1).tolist())
            # d/sqrt(x·y), not d/(sqrt(x)·sqrt(y)): exactly 1.0 for identical vectors
            self.cosines.extend(min(max(d / math.sqrt(x * y), -1.0), 1.0) if x * y > 0 else 0.0 for d, x, y in rows)
        if self.task == "causal-lm":
            valid = keep[:, 1:]  # position t predicts token t+1; both must be real tokens
            logp_b = torch.log_softmax(lb[:, :-1], dim=-1)[valid]
            logp_c = torch.log_softmax(lc[:, :-1], dim=-1)[valid]
            target = ids[:, 1:][valid][:, None]
            self.kl += float((logp_b.exp() * (logp_b - logp_c)).sum())
            self.agree += int((logp_b.argmax(-1) == logp_c.argmax(-1)).sum())
            self.nll_base -= float(logp_b.gather(-1, target).sum())
            self.nll_candidate -= float(logp_c.gather(-1, target).sum())
            self.positions += int(valid.sum())

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.task == "encoder":
            out |= {"cosine_min": min(self.cosines), "cosine_mean": math.fsum(self.cosines) / len(self.cosines)}
        if self.task == "causal-lm":
            if not self.positions:
                raise UsageError("every input is a single token: no next-token prediction to compare")
            ppl_base = math.exp(self.nll_base / self.positions)
            ppl_candidate = math.exp(self.nll_candidate / self.positions)
            out |= {"kl_mean": self.kl / self.positions, "top1": self.agree / self.positions, "ppl_base": ppl_base,
                    "ppl_candidate": ppl_candidate, "ppl_ratio": ppl_candidate / ppl_base}
        diff, ref = self.diff_sq, self.ref_sq
        out["hidden_rel_l2"] = math.sqrt(diff / ref) if ref > 0 else (0.0 if diff == 0 else math.inf)
        return out


def _gate_failures(metrics: Mapping[str, float], above: Mapping[str, float],
                   below: Mapping[str, float]) -> list[dict[str, Any]]:
    """Failed gates as {"metric", "value", "limit"}; a NaN value fails every gate."""
    failures = []
    for metric, limit in above.items():
        value = metrics[metric]
        if not value <= limit:
            failures.append({"metric": metric, "value": value, "limit": limit})
    for metric, limit in below.items():
        value = metrics[metric]
        if not value >= limit:
            failures.append({"metric": metric, "value": value, "limit": limit})
    return failures
