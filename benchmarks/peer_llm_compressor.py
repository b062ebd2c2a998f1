"""The peer for `make bench`: llm-compressor's model-free PTQ, W4A16 (packed int4), on the CPU.

    python peer_llm_compressor.py INPUT_FOLDER OUTPUT_FOLDER TIMES.json

Writes {"seconds": ...} timed around the call alone (the wall time of the whole process,
which the suite measures, includes importing torch and llmcompressor).
"""

import json
import sys
import time

from llmcompressor import model_free_ptq

source, target, times = sys.argv[1:4]
start = time.perf_counter()
model_free_ptq(source, target, scheme="W4A16", max_workers=1, device="cpu")
with open(times, "w") as handle:
    json.dump({"seconds": time.perf_counter() - start}, handle)
