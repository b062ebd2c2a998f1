"""wtool: stream neural-network checkpoints through weight transforms and report what changed.

The library is the tool; the CLI is a thin layer over these names.

>>> import wtool
>>> pipe = wtool.Pipeline.from_specs(["clip:percentile=99.9", "quantize:bits=4"])
>>> report = wtool.run(pipe, "fixtures/tiny-llama.safetensors", "out.safetensors", force=True)
>>> report.to_json()["totals"]["changed"]
"""

__version__ = "0.1.0"

from wtool.analyze import diff, inspect  # noqa: E402
from wtool.evaluate import evaluate_models  # noqa: E402  (imports torch only when called)
from wtool.errors import GateFailed, InputError, OutputError, UsageError, WtoolError  # noqa: E402
from wtool.io import create_writer, open_checkpoint  # noqa: E402
from wtool.new import new_checkpoint  # noqa: E402
from wtool.pipeline import Pipeline, Step, plan, run  # noqa: E402
from wtool.report import DiffReport, EvalReport, InspectReport, Report  # noqa: E402
from wtool.transforms import REGISTRY as TRANSFORMS  # noqa: E402
from wtool.transforms import Transform  # noqa: E402

__all__ = [
    "__version__", "diff", "inspect", "evaluate_models", "open_checkpoint", "create_writer", "new_checkpoint", "Pipeline", "Step", "plan", "run",
    "Report", "InspectReport", "DiffReport", "EvalReport", "Transform", "TRANSFORMS",
    "WtoolError", "UsageError", "InputError", "OutputError", "GateFailed",
]
