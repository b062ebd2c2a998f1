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

from wtool.analyze import diff, inspect
from wtool.errors import InputError, OutputError, UsageError, WtoolError
from wtool.evaluate import evaluate_models  # imports torch only when called
from wtool.io import create_writer, open_checkpoint
from wtool.new import new_checkpoint
from wtool.pipeline import Pipeline, Step, decompress, plan, run
from wtool.report import DiffReport, EvalReport, InspectReport, Report
from wtool.transforms import REGISTRY as TRANSFORMS
from wtool.transforms import Transform

__all__ = [
    "__version__", "diff", "inspect", "evaluate_models", "open_checkpoint", "create_writer", "new_checkpoint",
    "Pipeline", "Step", "plan", "run", "decompress", "Report", "InspectReport", "DiffReport", "EvalReport", "Transform",
    "TRANSFORMS", "WtoolError", "UsageError", "InputError", "OutputError",
]
