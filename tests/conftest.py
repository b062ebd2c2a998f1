"""Shared fixtures: small seeded checkpoints written by the safetensors library itself."""

from __future__ import annotations

from pathlib import Path

import os

import ml_dtypes
import numpy as np
import pytest
from hypothesis import settings
from safetensors.numpy import save_file

# `make test` (and so CI) draws the same hypothesis examples every run, so a gate never
# flakes; HYPOTHESIS_PROFILE=explore draws new ones each run to hunt for bugs.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A tiny Llama-shaped bf16 checkpoint with a 1-D norm, an I64 buffer and metadata."""
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.normal(size=(32, 16)).astype(ml_dtypes.bfloat16),
        "model.layers.0.input_layernorm.weight": np.ones(16, ml_dtypes.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": rng.normal(size=(16, 16)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.up_proj.weight": rng.normal(size=(32, 16)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.up_proj.bias": rng.normal(size=(32,)).astype(ml_dtypes.bfloat16),
        "model.position_ids": np.arange(8, dtype=np.int64).reshape(1, 8),
        "lm_head.weight": rng.normal(size=(32, 16)).astype(np.float32),
    }
    path = tmp_path / "llama.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "origin": "test"})
    return path
