"""wtool: stream neural-network checkpoints through weight transforms and report what changed.

The library is the tool; the CLI is a thin layer over these names.

>>> import tempfile, wtool
>>> pipe = wtool.Pipeline.from_specs(["clip:percentile=99.9", "quantize:bits=4"])
>>> out = tempfile.mkdtemp() + "/out.safetensors"
>>> report = wtool.run(pipe, "fixtures/tiny-llama.safetensors", out)
>>> report.to_json()["totals"]["changed"]
16
"""

__version__ = "0.1.0"

from importlib import import_module
from typing import TYPE_CHECKING, Any

#: Each public name and the module it lives in, imported on first use (PEP 562): a process
#: that needs one module (the statistics process imports wtool.stats) skips the others.
_WHERE = {
    "diff": "analyze", "inspect": "analyze", "evaluate_models": "evaluate", "open_checkpoint": "io",
    "create_writer": "io", "new_checkpoint": "new", "Pipeline": "pipeline", "Step": "pipeline", "plan": "pipeline",
    "run": "pipeline", "decompress": "pipeline", "Report": "report", "InspectReport": "report",
    "DiffReport": "report", "EvalReport": "report", "Transform": "transforms", "WtoolError": "errors",
    "UsageError": "errors", "InputError": "errors", "OutputError": "errors",
}

__all__ = [
    "__version__", "diff", "inspect", "evaluate_models", "open_checkpoint", "create_writer", "new_checkpoint",
    "Pipeline", "Step", "plan", "run", "decompress", "Report", "InspectReport", "DiffReport", "EvalReport", "Transform",
    "TRANSFORMS", "WtoolError", "UsageError", "InputError", "OutputError",
]


def __getattr__(name: str) -> Any:
    if name == "TRANSFORMS":
        return import_module("wtool.transforms").REGISTRY
    if name in _WHERE:
        return getattr(import_module(f"wtool.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'wtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # what type checkers and editors see
    from wtool.analyze import diff, inspect
    from wtool.errors import InputError, OutputError, UsageError, WtoolError
    from wtool.evaluate import evaluate_models
    from wtool.io import create_writer, open_checkpoint
    from wtool.new import new_checkpoint
    from wtool.pipeline import Pipeline, Step, decompress, plan, run
    from wtool.report import DiffReport, EvalReport, InspectReport, Report
    from wtool.transforms import REGISTRY as TRANSFORMS
    from wtool.transforms import Transform
