"""What travels with the weights: the model files of a folder, config.json, the header's metadata.

`model_files_for` picks the files of a folder input that go into a folder output (config,
tokenizer, sentence-transformers modules, custom code), rewriting config.json where the
run changed what it declares; `output_metadata` is the input's safetensors metadata plus
wtool's provenance. Both add a note for each fact the user should know.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wtool.compressed import QUANTIZATION_CONFIG, DecompressedReader, config_json, without_quantization_config
from wtool.config_dtype import cast_notes, declared_dtype, with_dtype
from wtool.errors import UsageError
from wtool.io import Reader, is_folder_output, model_files, model_folder
from wtool.io.base import MAX_HEADER_BYTES
from wtool.io.safetensors import encode_header
from wtool.recipe import Pipeline
from wtool.tensor import TensorInfo


def model_files_for(reader: Reader, output: str | Path, pipeline: Pipeline, notes: list[str], *,
                    copy: bool, update_config: bool,
                    qconfig: Mapping[str, Any] | None = None) -> tuple[dict[str, Path | bytes], list[str]]:
    """The files of a folder input that travel to a folder output (relative name -> source, or
    the rewritten config.json), the names copied, and a note for each fact. config.json gets
    `qconfig` as its `quantization_config` (a reader that decompresses, `DecompressedReader`,
    has it removed) and, with `update_config`, the dtype of the last cast."""
    folder = model_folder(Path(reader.path))
    casts = [s.transform.params.dtype for s in pipeline.steps if s.op == "cast"]
    travels = copy and folder is not None and is_folder_output(output)
    if update_config and not (travels and casts and folder is not None and (folder / "config.json").is_file()):
        raise UsageError("--update-config needs a cast step, a model folder with config.json as input and a "
                         "folder output (without --no-model-files)")
    if not travels or folder is None:
        notes.extend(cast_notes(casts[-1], None, update_config=False) if casts else [])
        return {}, []
    found = model_files(folder, skip=[*reader.files, Path(output)])
    extra: dict[str, Path | bytes] = {name: folder / name for name in found.copied}
    if found.copied:
        notes.append(f"copied {len(found.copied)} model file(s) beside the weights: {', '.join(found.copied)}")
    if found.left:
        notes.append(f"left behind (weights in another format, or not a regular file): {', '.join(found.left)}")
    config = reader.config() or {}
    declared = declared_dtype(config)
    rewritten = False
    if "config.json" in extra and (qconfig is not None or isinstance(reader, DecompressedReader)):
        config = without_quantization_config(config)
        if qconfig is not None:
            config[QUANTIZATION_CONFIG] = dict(qconfig)
        notes.append(f"config.json: {QUANTIZATION_CONFIG} {'written' if qconfig is not None else 'removed'}")
        rewritten = True
    if update_config:
        config = with_dtype(config, casts[-1])
        rewritten = True
    if casts:
        notes.extend(cast_notes(casts[-1], declared, update_config=update_config))
    if rewritten:
        extra["config.json"] = config_json(config)
    return extra, found.copied


def output_metadata(metadata: Mapping[str, str], pipeline: Pipeline, infos: Sequence[TensorInfo],
                    notes: list[str], qconfig: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The input's metadata plus one `wtool` entry (`Pipeline.provenance`), and the
    compressed-tensors `quantization_config` (JSON) when weights were packed.

    transformers refuses safetensors metadata without `format`, so `format: pt` is added
    when the input had none. What wtool adds is left out again (with a note) when it would
    push a header that the input kept under the size limit over it.
    """
    out = dict(metadata)
    out.setdefault("format", "pt")
    out["wtool"] = json.dumps(pipeline.provenance(), sort_keys=True)
    if qconfig is not None:
        out[QUANTIZATION_CONFIG] = json.dumps(qconfig, sort_keys=True)
    for added in ("wtool", "format"):
        if len(encode_header(infos, out)) - 8 <= MAX_HEADER_BYTES or added in metadata:
            break
        del out[added]
        notes.append(f"metadata entry {added!r} left out: with it the safetensors header would pass the "
                     f"{MAX_HEADER_BYTES:,} byte limit that readers accept")
    return out
