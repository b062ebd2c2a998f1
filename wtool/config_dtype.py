"""What a `cast` means for a model folder's config.json, as transformers reads it.

Checked against transformers 5.24 with torch 2.13 (tests/test_model_folders.py loads the real
all-MiniLM-L6-v2 folder): `from_pretrained`'s default dtype is "auto", which takes config.json's
`dtype`, else its `torch_dtype`, else the dtype of the first float tensor in the weights. So:

- after a cast to bfloat16 or float16, the default load gives that dtype whatever config.json
  says when it declares nothing; a declared dtype wins, so a stale one is worth fixing;
- after a cast to float8, the default load fails (`couldn't find storage object
  Float8_e4m3fnStorage`): torch cannot build float8 parameters. Recording float8 in
  config.json would fail the same way, so `--update-config` records bfloat16 instead, which
  holds every float8_e4m3fn and float8_e5m2 value exactly: the default load then upcasts the
  float8 weights without error and without changing a value.

transformers 5 writes `dtype`, 4.x wrote `torch_dtype`, and 5 reads `dtype` first: wtool writes
`torch_dtype`, and `dtype` too when the config has it, so both readers see the new value.

>>> recorded_dtype("float8_e5m2"), recorded_dtype("float16")
('bfloat16', 'float16')
>>> with_dtype({"dtype": "float32", "model_type": "bert"}, "float8_e4m3fn")
{'dtype': 'bfloat16', 'model_type': 'bert', 'torch_dtype': 'bfloat16'}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LOADABLE = "bfloat16"
"""The dtype recorded for float8 weights: the narrowest one torch computes in that holds them exactly."""

DTYPE_KEYS = ("torch_dtype", "dtype")


def recorded_dtype(cast: str) -> str:
    """The dtype `--update-config` writes for weights cast to `cast`."""
    return LOADABLE if cast.startswith("float8") else cast


def declared_dtype(config: Mapping[str, Any]) -> str | None:
    """The dtype config.json declares, as transformers 5 reads it (`dtype` before `torch_dtype`)."""
    return config.get("dtype") or config.get("torch_dtype")


def with_dtype(config: Mapping[str, Any], cast: str) -> dict[str, Any]:
    """A copy of `config` declaring the dtype to load weights cast to `cast` in."""
    updated = dict(config)
    for key in DTYPE_KEYS:
        if key in updated or key == "torch_dtype":
            updated[key] = recorded_dtype(cast)
    return updated


def cast_notes(cast: str, declared: str | None, *, update_config: bool) -> list[str]:
    """What a cast to `cast` means for loading, given the dtype config.json declares (None: none,
    or no config.json travels with the weights).

    >>> cast_notes("bfloat16", "float32", update_config=False)
    ['config.json declares dtype float32 but tensors were cast to bfloat16 (from_pretrained upcasts them to float32); pass --update-config to record bfloat16']
    >>> cast_notes("bfloat16", None, update_config=False)
    []
    """
    recorded = recorded_dtype(cast)
    if update_config:
        exact = f" (float8 loads upcast to {LOADABLE}, exactly)" if recorded != cast else ""
        return [f"config.json: torch_dtype set to {recorded}{exact} (--update-config)"]
    if cast.startswith("float8") and (declared is None or declared.startswith("float8")):
        return [f"transformers' from_pretrained with its default dtype (\"auto\" in transformers 5) fails on {cast} "
                f"weights when config.json declares no other dtype; load with dtype=torch.{LOADABLE} (exact), or pass "
                f"--update-config to record {LOADABLE} in config.json"]
    if declared and declared != recorded:
        return [f"config.json declares dtype {declared} but tensors were cast to {cast} (from_pretrained upcasts "
                f"them to {declared}); pass --update-config to record {recorded}"]
    return []
