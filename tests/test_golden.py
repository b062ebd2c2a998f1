"""Output bytes pinned: a set of pipelines over the committed fixtures, hashed.

A refactor of the step machinery must not change a single output byte nor what the report
says happened to each tensor (its steps, whether it changed, what the steps reported). When a change is *meant* to alter outputs, regenerate the
hashes and say so in the commit:

    .venv/bin/python tests/test_golden.py --update
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from wtool import Pipeline, run

FIXTURES = Path(__file__).parent.parent / "fixtures"
GOLDEN = Path(__file__).parent / "golden.json"
LLAMA = "tiny-llama.safetensors"

#: name -> (input under fixtures/ or the generated "nonfinite", output name, steps, options)
CASES: dict[str, tuple[str, str, list[str], dict]] = {
    "copy": (LLAMA, "out.safetensors", [], {}),
    "copy-npz": (LLAMA, "out.npz", [], {}),
    "copy-sharded": (LLAMA, "out", [], {"max_shard_size": 20_000}),
    "clip-quantize-sparsify": (LLAMA, "out.safetensors",
                               ["clip:percentile=99.9", "quantize:bits=4,granularity=group,group_size=32",
                                "sparsify:fraction=0.25"], {}),
    "clip-then-global": (LLAMA, "out.safetensors", ["clip:percentile=99", "sparsify:fraction=0.5,scope=global"], {}),
    "two-global": (LLAMA, "out.safetensors", ["sparsify:fraction=0.3,scope=global",
                                               "sparsify:fraction=0.5,scope=global"], {}),
    "cast-bf16-f8": (LLAMA, "out.safetensors", ["cast:dtype=float32", "clip:sigma=3",
                                                 "cast:dtype=float8_e4m3fn,saturate=true"], {}),
    "nm-sym": (LLAMA, "out.safetensors", ["sparsify:nm=2:4", "quantize:bits=3,scheme=sym"], {}),
    "norms": (LLAMA, "out.safetensors", ["weight-norm:dim=0,norm=1.0", "standardize",
                                         "spectral-norm:target=1.0,method=power"], {}),
    "share-init": (LLAMA, "out.safetensors", ["share:bits=3,init=density",
                                              "init:scheme=he,seed=3,include=lm_head.weight"], {}),
    "decay": (LLAMA, "out.safetensors", ["decay:lr=0.1,wd=0.01,grads=grads.safetensors"], {}),
    "fold-bn-global": ("reference/batch_norm_resnet_block.safetensors", "out.safetensors",
                       ["fold-bn", "sparsify:fraction=0.5,scope=global"], {}),
    "fold-norm": ("reference/llama_block.safetensors", "out.safetensors", ["fold-norm", "quantize:bits=8"], {}),
    "split-fold-weight-norm": ("reference/weight_norm_legacy_conv.safetensors", "out.safetensors",
                               ["fold-weight-norm", "split-weight-norm:layout=parametrizations",
                                "fold-weight-norm"], {}),
    "fold-spectral": ("reference/spectral_norm_legacy_conv.safetensors", "out.npz", ["fold-spectral-norm"], {}),
    "fold-prune": ("reference/prune_linear.safetensors", "out.safetensors", ["fold-prune", "clip:c=0.1"], {}),
    "nonfinite-skip": ("nonfinite", "out.safetensors", ["clip:percentile=99", "sparsify:fraction=0.5,scope=global"],
                       {"nonfinite": "skip"}),
    "nonfinite-zero": ("nonfinite", "out.safetensors", ["clip:percentile=99", "sparsify:fraction=0.5,scope=global",
                                                        "quantize:bits=4"], {"nonfinite": "zero"}),
}

RUN_OPTIONS = ("max_shard_size",)


def nonfinite_checkpoint(folder: Path) -> Path:
    """Three float32 tensors, one with NaN and Inf, one int buffer."""
    rng = np.random.default_rng(7)
    bad = rng.normal(size=(8, 16)).astype(np.float32)
    bad[0, 0], bad[3, 5] = np.nan, np.inf
    tensors = {"a.weight": rng.normal(size=(16, 16)).astype(np.float32), "b.weight": bad,
               "c.weight": rng.normal(size=(4, 32)).astype(np.float32), "ids": np.arange(6, dtype=np.int64)}
    path = folder / "nonfinite.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def digest(case: str, folder: Path) -> str:
    """sha256 over the output's files and what the report says per tensor."""
    source, out_name, steps, options = CASES[case]
    folder.mkdir(parents=True, exist_ok=True)
    path = nonfinite_checkpoint(folder) if source == "nonfinite" else FIXTURES / source
    pipe_options = {k: v for k, v in options.items() if k not in RUN_OPTIONS}
    run_options = {k: v for k, v in options.items() if k in RUN_OPTIONS}
    output = folder / out_name
    shutil.copyfile(FIXTURES / LLAMA, folder / "grads.safetensors")
    with contextlib.chdir(folder):  # companion paths are relative: the output metadata records them
        report = run(Pipeline.from_specs(steps, **pipe_options), path, output, force=True, **run_options)
    sha = hashlib.sha256()
    files = sorted(output.iterdir()) if output.is_dir() else [output]
    for file in files:
        sha.update(file.name.encode() + b"\0" + file.read_bytes())
    # statistics and error metrics are left out: a faster formula may move their last digits
    summary = {"tensors": [[r.name, r.dtype, r.shape, r.steps, r.changed, r.extras] for r in report.tensors],
               "skipped": [[s.name, s.op, s.reason] for s in report.skipped],
               "groups": [[g.op, g.note, g.inputs, g.outputs] for g in report.groups],
               "notes": report.notes, "dropped": report.dropped}
    sha.update(json.dumps(summary, sort_keys=True, default=str).encode())
    return sha.hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_bytes_are_pinned(case: str, tmp_path: Path) -> None:
    expected = json.loads(GOLDEN.read_text())
    assert digest(case, tmp_path) == expected[case], \
        f"{case}: output changed; if intended, run `python tests/test_golden.py --update`"


def test_every_case_is_pinned() -> None:
    assert sorted(json.loads(GOLDEN.read_text())) == sorted(CASES)


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        hashes = {case: digest(case, Path(scratch) / case) for case in sorted(CASES)}
    GOLDEN.write_text(json.dumps(hashes, indent=1) + "\n")
    print(f"wrote {len(hashes)} hashes to {GOLDEN}")
