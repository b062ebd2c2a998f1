"""`wtool batch`: outputs as apply writes them, failures isolated, --resume, executors, Ctrl-C."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import wtool
from wtool.batch import Batch, RayExecutor, Task, convert, expand, task_memory
from wtool.cli import app
from wtool.errors import UsageError
from wtool.io import create_writer
from wtool.selection import Selector
from wtool.tensor import TensorInfo

STEPS = ["clip:percentile=99", "quantize:bits=4,granularity=group,group_size=8", "sparsify:fraction=0.25"]
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def write(path: Path, seed: int, *, max_shard_size: int | None = None, shape: tuple[int, int] = (16, 32)) -> Path:
    """A small seeded checkpoint: two float matrices, a bias and an int buffer."""
    rng = np.random.default_rng(seed)
    tensors = {"a.weight": rng.normal(size=shape).astype(np.float32), "a.bias": rng.normal(size=shape[:1]).astype(np.float32),
               "b.weight": rng.normal(size=shape[::-1]).astype(np.float16), "steps": np.arange(4, dtype=np.int64)}
    infos = [TensorInfo(name, {np.float32: "F32", np.float16: "F16", np.int64: "I64"}[a.dtype.type], a.shape)
             for name, a in tensors.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with create_writer(path, infos, {"origin": f"seed {seed}"}, max_shard_size=max_shard_size) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    return path


@pytest.fixture
def zoo(tmp_path: Path) -> Path:
    """Three small checkpoints (a file, an npz, a sharded model folder) and one hostile file."""
    root = tmp_path / "zoo"
    root.mkdir()
    write(root / "one.safetensors", 1)
    write(root / "two.npz", 2)
    model = write(root / "runs" / "three", 3, max_shard_size=2000)
    (model / "config.json").write_text('{"model_type": "tiny"}')
    (root / "hostile.safetensors").write_bytes(b"\xff" * 8 + b"{")  # header length far past the file
    return root


def files(path: Path) -> dict[str, bytes]:
    """Every file of a checkpoint (one file, or a folder's files), by relative name."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def load(report: Path) -> dict:
    return json.loads(report.read_text())


def by_input(data: dict) -> dict[str, dict]:
    return {Path(item["input"]).name: item for item in data["inputs"]}


def test_outputs_equal_apply_byte_for_byte_and_failure_does_not_stop_others(zoo, tmp_path):
    out, report = tmp_path / "out", tmp_path / "batch.json"
    result = invoke("batch", zoo, "--out-dir", out, *[a for s in STEPS for a in ("-t", s)], "--report", report)
    assert result.exit_code == 1, result.output
    items = by_input(load(report))
    assert {name: item["status"] for name, item in items.items()} == \
        {"one.safetensors": "ok", "two.npz": "ok", "three": "ok", "hostile.safetensors": "failed"}
    assert "hostile.safetensors" in items["hostile.safetensors"]["error"]
    assert "hostile.safetensors" in result.output and "failed" in result.output
    assert sorted(p.name for p in out.rglob("*") if p.parent == out) == ["one.safetensors", "runs", "two.npz"]
    pipe = wtool.Pipeline.from_specs(STEPS)
    (tmp_path / "apply").mkdir()
    for source, relative in [(zoo / "one.safetensors", "one.safetensors"), (zoo / "two.npz", "two.npz"),
                             (zoo / "runs" / "three", "runs/three")]:
        applied = wtool.run(pipe, source, tmp_path / "apply" / relative.replace("/", "_"))
        assert files(out / relative) == files(Path(applied.output)), relative
        item = items[Path(relative).name]
        assert item["report"]["totals"]["changed"] == applied.totals["changed"] > 0
        assert item["report"]["tensors"] == applied.to_json()["tensors"]
    assert "config.json" in files(out / "runs" / "three")
    assert not (out / "hostile.safetensors").exists()
    summary = load(report)["summary"]
    assert (summary["inputs"], summary["ok"], summary["failed"], summary["not_run"]) == (4, 3, 1, 0)


def test_folders_made_for_failed_inputs_only_are_removed(zoo, tmp_path):
    out = tmp_path / "out"
    (zoo / "runs" / "bad").mkdir()
    (zoo / "runs" / "bad" / "model.safetensors").write_bytes(b"not a checkpoint")
    result = invoke("batch", zoo / "runs", "--out-dir", out)
    assert result.exit_code == 1
    assert sorted(p.name for p in out.iterdir()) == ["three"]
    assert invoke("batch", zoo / "runs" / "bad", "--out-dir", tmp_path / "none" / "deeper").exit_code == 1
    assert not (tmp_path / "none").exists()


def test_all_ok_exits_0_and_markdown_lists_every_input(zoo, tmp_path):
    (zoo / "hostile.safetensors").unlink()
    result = invoke("batch", zoo / "one.safetensors", zoo / "two.npz", "--out-dir", tmp_path / "out",
                    "-t", "clip:c=1", "--markdown", "-")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("| ok |") == 2 and "### wtool batch" in result.stdout
    again = invoke("batch", zoo / "one.safetensors", "--out-dir", tmp_path / "out", "-t", "clip:c=1", "--resume",
                   "--report", "-", "--jobs", "3", "--executor", "serial")
    assert again.exit_code == 0, again.output
    data = json.loads(again.stdout)
    assert (data["summary"]["skipped"], data["jobs"], data["inputs"][0]["report"]) == (1, 1, None)


def test_resume_skips_exactly_the_finished_outputs_and_redoes_another_pipelines(zoo, tmp_path):
    out = tmp_path / "out"
    one, two, three = zoo / "one.safetensors", zoo / "two.npz", zoo / "runs" / "three"
    assert invoke("batch", one, two, "--out-dir", out, "-t", "clip:c=1").exit_code == 0
    assert invoke("batch", two, "--out-dir", out, "-t", "clip:c=2", "--force").exit_code == 0
    kept = (out / "one.safetensors").stat()
    report = tmp_path / "resume.json"
    result = invoke("batch", one, two, three, zoo / "hostile.safetensors", "--out-dir", out, "-t", "clip:c=1",
                    "--resume", "--report", report)
    assert result.exit_code == 1, result.output
    items = by_input(load(report))
    assert [items[n]["status"] for n in ("one.safetensors", "two.npz", "three", "hostile.safetensors")] == \
        ["skipped", "ok", "ok", "failed"]
    assert "another pipeline" in items["two.npz"]["note"]
    now = (out / "one.safetensors").stat()
    assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    applied = wtool.run(wtool.Pipeline.from_specs(["clip:c=1"]), two, tmp_path / "two.npz")
    assert files(out / "two.npz") == files(Path(applied.output))
    again = invoke("batch", one, two, three, zoo / "hostile.safetensors", "--out-dir", out, "-t", "clip:c=1",
                   "--resume", "--report", report)
    assert again.exit_code == 1
    assert [i["status"] for i in load(report)["inputs"]] == ["skipped", "skipped", "skipped", "failed"]


def test_resume_compares_the_runs_patterns_too(zoo, tmp_path):
    out = tmp_path / "out"
    assert invoke("batch", zoo / "one.safetensors", "--out-dir", out, "-t", "clip:c=1").exit_code == 0
    narrowed = wtool.Pipeline.from_specs(["clip:c=1"], selector=Selector(("a.*",)))
    plan = Batch.plan([str(zoo / "one.safetensors")], out, narrowed, resume=True)
    assert [e.action for e in plan.entries] == ["replace"]
    same = Batch.plan([str(zoo / "one.safetensors")], out, wtool.Pipeline.from_specs(["clip:c=1"]), resume=True)
    assert [e.action for e in same.entries] == ["skip"]


def test_existing_output_is_a_usage_error_before_anything_runs(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "two.npz").write_bytes(b"previous")
    result = invoke("batch", zoo / "one.safetensors", zoo / "two.npz", "--out-dir", out, "-t", "clip:c=1")
    assert result.exit_code == 2
    assert "two.npz exists" in result.output and "--resume" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["two.npz"]


@pytest.mark.parametrize("args, message", [
    (["{zoo}/one.safetensors", "{other}/one.safetensors"], "would both be written to"),
    (["{zoo}", "--out-dir", "{zoo}/out"], "inside the input folder"),
    (["{zoo}/one.safetensors", "--force", "--resume"], "not both"),
    (["{zoo}/nothing-*.safetensors"], "no file or folder matches"),
    (["{zoo}/one.safetensors", "--executor", "cluster"], "expected one of"),
])
def test_usage_errors(zoo, tmp_path, args, message):
    other = tmp_path / "other"
    write(other / "one.safetensors", 5)
    argv = [a.format(zoo=zoo, other=other) for a in args]
    if "--out-dir" not in argv:
        argv += ["--out-dir", str(tmp_path / "out")]
    result = invoke("batch", *argv)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists() and not (zoo / "out").exists()


def test_folder_expansion(tmp_path):
    root = tmp_path / "in"
    write(root / "a.safetensors", 1)
    write(root / "deep" / "b.safetensors", 2)
    write(root / "model", 3)  # a model folder: one input, not walked into
    write(root / ".hidden.safetensors", 4)
    (root / "notes.txt").write_text("not a checkpoint")
    assert [(p.name, str(r)) for p, r in expand([str(root)])] == \
        [("a.safetensors", "a.safetensors"), ("b.safetensors", "deep/b.safetensors"), ("model", "model")]
    assert [str(r) for _, r in expand([str(root / "model" / "model.safetensors.index.json")])] == ["model"]
    assert [str(r) for _, r in expand([str(root / "*.safetensors"), str(root / "model")])] == \
        ["a.safetensors", "model"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no checkpoint"):
        expand([str(tmp_path / "empty")])


def test_task_is_picklable_and_convert_is_pure(zoo, tmp_path):
    pipe = wtool.Pipeline.from_specs(STEPS + ["fold-bn", "sparsify:fraction=0.5,scope=global"], allow_empty=True,
                                     selector=Selector(("*.weight",)))
    task = Task(zoo / "one.safetensors", pipe, tmp_path / "one.safetensors")
    copy = pickle.loads(pickle.dumps(task))
    assert copy.pipeline.provenance() == pipe.provenance()
    first, second = convert(task), convert(Task(task.source, copy.pipeline, tmp_path / "copy.safetensors"))
    assert first.status == second.status == "ok"
    assert task.output.read_bytes() == Path(second.output).read_bytes()


def test_task_memory_follows_the_largest_tensor(tmp_path):
    path = write(tmp_path / "m.safetensors", 0, shape=(256, 64))  # largest: 256 × 64 float32
    assert task_memory(path) == 8 * 256 * 64 * 4 + 100 * 2**20
    assert task_memory(tmp_path / "missing.safetensors") == 100 * 2**20


def run_with(zoo: Path, out: Path, executor: str, jobs: int = 2) -> dict:
    (zoo / "hostile.safetensors").unlink(missing_ok=True)
    job = Batch.plan([str(zoo)], out, wtool.Pipeline.from_specs(STEPS), executor=executor, workers=jobs)
    result = job.run()
    assert [i.status for i in result.inputs] == ["ok"] * 3, [i.error for i in result.inputs]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("executor", ["threads", "processes"])
def test_executors_write_what_serial_writes(zoo, tmp_path, executor):
    assert run_with(zoo, tmp_path / executor, executor) == run_with(zoo, tmp_path / "serial", "serial", 1)


def test_ray_executor_writes_what_serial_writes(zoo, tmp_path):
    pytest.importorskip("ray")
    assert run_with(zoo, tmp_path / "ray", "ray") == run_with(zoo, tmp_path / "serial", "serial", 1)


def test_ray_fails_an_input_bigger_than_any_node_at_once(zoo, tmp_path):
    pytest.importorskip("ray")
    executor = RayExecutor(1)
    try:
        executor.largest_node = 1
        future = executor.submit(Task(zoo / "one.safetensors", wtool.Pipeline(), tmp_path / "one.safetensors"))
        item = future.result(timeout=60)
    finally:
        executor.close()
    assert item.status == "failed" and "the largest Ray node has" in item.error
    assert not (tmp_path / "one.safetensors").exists()


def test_ray_missing_is_a_usage_error(zoo, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = invoke("batch", zoo / "one.safetensors", "--out-dir", tmp_path / "out", "--executor", "ray")
    assert result.exit_code == 2 and "wtool[ray]" in result.output


def layers(path: Path, seed: int, count: int = 8) -> Path:
    """A checkpoint of `count` float32 matrices of 512 KiB: slow enough to interrupt mid-way."""
    rng = np.random.default_rng(seed)
    infos = [TensorInfo(f"layers.{i}.weight", "F32", (256, 512)) for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with create_writer(path, infos, {}) as writer:
        for info in infos:
            writer.write(info.name, rng.normal(size=info.shape).astype(np.float32))
    return path


@pytest.mark.parametrize("executor", ["serial", "threads", "processes", "ray"])
def test_ctrl_c_keeps_finished_outputs_and_leaves_nothing_partial(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    # the signal comes when the last input (started only after another ended, so never in lockstep
    # with one about to finish) has 2 of its 12 tensors written: ~10 to go when the stop reaches it
    inputs = [layers(tmp_path / "in" / f"m{i}.safetensors", i, count=12) for i in range(3)]
    out, report = tmp_path / "out", tmp_path / "batch.json"
    process = subprocess.Popen([sys.executable, "-m", "wtool", "batch", *map(str, inputs), "--out-dir", str(out),
                                "-t", "share:bits=5", "--executor", executor, "--jobs", "2", "--report", str(report)],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = os.listdir(out) if out.is_dir() else []
        if any(n.startswith(".m2.safetensors.wtool-tmp-") and _size(out / n) > 2**20 for n in names):
            break
        time.sleep(0.01)
    else:
        process.kill()
        pytest.fail("the last input never got 2 tensors written")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    left = sorted(os.listdir(out))
    assert left and not [n for n in left if n.startswith(".")], left
    statuses = {Path(i["input"]).name: i["status"] for i in load(report)["inputs"]}
    assert sorted(n for n, s in statuses.items() if s == "ok") == left
    assert "interrupted" in statuses.values() and set(statuses.values()) <= {"ok", "interrupted", "not run"}
    for name in left:
        assert wtool.Pipeline.from_specs(["share:bits=5"]).provenance() == \
            json.loads(wtool.open_checkpoint(out / name).metadata["wtool"])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # committed or removed meanwhile
        return 0
