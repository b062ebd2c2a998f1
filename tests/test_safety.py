"""Data safety (issue 8): wtool never loses, corrupts or misreports a user's file.

Every run protects what it reads (by identity and by resolved path); `--force` replaces only
what wtool would have written; creating is exclusive at the moment of commit; reports are
outputs too; inputs that change under the run are detected; signals abort cleanly and say
truthfully what was committed. Each test was first run against the code before the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from corpus import load, save, skip_fsync, stop_midway  # noqa: F401 (skip_fsync is an autouse fixture)
from typer.testing import CliRunner

import wtool.io.atomic
from wtool.cli import app
from wtool.errors import InputError, UsageError
from wtool.io import INDEX_NAME, open_checkpoint
from wtool.pipeline import Pipeline, run

runner = CliRunner()
ARRAYS = {"a.weight": np.linspace(-1, 1, 4096, dtype=np.float32).reshape(64, 64),
          "b.weight": np.linspace(-2, 2, 2048, dtype=np.float32).reshape(32, 64),
          "c.bias": np.arange(32, dtype=np.float32)}
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGALRM]


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"NO_COLOR": "1"})


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones included) with the sha256 of its bytes (links not followed)."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "-> " + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            found[key] = "folder" if path.is_dir() else "special"
    return found


def leftovers(root: Path) -> list[str]:
    """Hidden temporaries or old copies wtool left anywhere under `root`."""
    return [str(path) for path in root.rglob("*") if ".wtool-" in path.name and path.name != ".wtool-files.json"]


def error_line(result) -> str:
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def model_folder(folder: Path, shards: int = 2) -> Path:
    """A Hugging Face model folder: shards, index, config, README, tokenizer."""
    save(folder, ARRAYS, max_shard_size=None if shards == 1 else 9000)
    (folder / "config.json").write_text('{"model_type": "test"}')
    (folder / "README.md").write_text("# my model card\n")
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def small(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return save(tmp_path / "src" / "model.safetensors", ARRAYS)


class Hook:
    """A progress receiver that does something to the world after the `after`-th tensor is written."""

    def __init__(self, action, after: int = 1):
        self.action, self.after, self.count = action, after, 0

    def start(self, tensors: int, nbytes: int) -> None:
        pass

    def advance(self, info) -> None:
        self.count += 1
        if self.count == self.after:
            self.action()


# -- 1. identity, not names: no output may be, contain or sit on an input -------------------------------

def test_force_folder_output_holding_the_input_file_is_refused(tmp_path):
    """`wtool apply proj/model.safetensors proj --force` deleted the input, notes.txt and data/."""
    proj = tmp_path / "proj"
    proj.mkdir()
    save(proj / "model.safetensors", ARRAYS)
    (proj / "notes.txt").write_text("notes")
    (proj / "data").mkdir()
    (proj / "data" / "x.csv").write_text("1,2")
    before = tree(tmp_path)
    result = invoke("apply", proj / "model.safetensors", proj, "--force")
    assert result.exit_code == 2, result.output
    assert re.fullmatch(r"error: output \S+ contains the input \S+model\.safetensors; write to a new path",
                        error_line(result))
    assert tree(tmp_path) == before


def test_force_output_ancestor_of_the_input_is_refused(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    deep = save(tmp_path / "a" / "b" / "c" / "model.safetensors", ARRAYS)
    before = tree(tmp_path)
    result = invoke("apply", deep, tmp_path / "a", "--force")
    assert result.exit_code == 2 and "contains the input" in error_line(result)
    assert tree(tmp_path) == before


def test_force_index_output_is_its_own_folder_is_refused(tmp_path):
    """`wtool apply sharded/model.safetensors.index.json sharded --force` replaced the input shards."""
    folder = model_folder(tmp_path / "sharded")
    before = tree(tmp_path)
    result = invoke("apply", folder / INDEX_NAME, folder, "--force")
    assert result.exit_code == 2, result.output
    assert "contains the input" in error_line(result)
    assert tree(tmp_path) == before


def test_dot_output_holding_the_input_is_refused(tmp_path, monkeypatch):
    """`cd proj && wtool apply model.safetensors . --force`; and `..` from a sub-folder."""
    proj = tmp_path / "proj"
    (proj / "sub").mkdir(parents=True)
    save(proj / "sub" / "model.safetensors", ARRAYS)
    before = tree(tmp_path)
    monkeypatch.chdir(proj / "sub")
    for target in (".", ".."):
        result = invoke("apply", "model.safetensors", target, "--force")
        assert result.exit_code == 2, result.output
        assert "contains the input" in error_line(result)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["symlink", "hardlink"])
def test_output_that_is_the_input_under_another_name_is_refused(small, tmp_path, kind):
    other = tmp_path / "other.safetensors"
    if kind == "symlink":
        other.symlink_to(small)
    else:
        os.link(small, other)
    before = tree(tmp_path)
    result = invoke("apply", small, other, "--force", "-t", "clip:c=0.1")
    assert result.exit_code == 2, result.output
    assert re.fullmatch(r"error: output \S+ is the input \S+; write to a new path", error_line(result))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("role", ["grads", "anchor"])
def test_output_onto_a_companion_checkpoint_is_refused(small, tmp_path, role):
    companion = save(tmp_path / f"{role}.safetensors", ARRAYS)
    before = tree(tmp_path)
    result = invoke("apply", small, companion, "--force", "-t", f"decay:lr=0.1,wd=0.1,{role}={companion}")
    assert result.exit_code == 2, result.output
    assert "is the input" in error_line(result) and f"{role}.safetensors" in error_line(result)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("option", ["--report", "--markdown", "--html"])
@pytest.mark.parametrize("victim", ["config.json", "README.md", "sub/model-00001-of-00002.safetensors",
                                    INDEX_NAME])
def test_a_report_never_overwrites_an_input_file(tmp_path, option, victim):
    """Reports overwrote a shard the index keeps in a sub-folder, and the input's config.json and README.md."""
    folder = tmp_path / "hf"
    model_folder(folder)
    if victim.startswith("sub/"):  # an index that keeps its first shard in a sub-folder
        (folder / "sub").mkdir()
        os.rename(folder / "model-00001-of-00002.safetensors", folder / victim)
        index = json.loads((folder / INDEX_NAME).read_text())
        index["weight_map"] = {k: victim if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
        (folder / INDEX_NAME).write_text(json.dumps(index))
    before = tree(tmp_path)
    result = invoke("apply", folder, tmp_path / "out", option, folder / victim)
    assert result.exit_code == 2 and "exists; pass --force" in error_line(result)
    result = invoke("apply", folder, tmp_path / "out", option, folder / victim, "--force")
    assert result.exit_code == 2, result.output
    assert re.fullmatch(r"error: report \S+ is the input \S+; write to a new path", error_line(result))
    assert tree(tmp_path) == before


def test_a_report_never_overwrites_the_recipe(small, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[steps]]\nop = "clip"\nc = 0.5\n')
    before = tree(tmp_path)
    result = invoke("apply", small, tmp_path / "out.safetensors", "--recipe", recipe, "--markdown", recipe, "--force")
    assert result.exit_code == 2 and "is the input" in error_line(result)
    assert tree(tmp_path) == before


def test_inspect_and_diff_reports_never_overwrite_their_inputs(tmp_path):
    folder = model_folder(tmp_path / "hf")
    other = save(tmp_path / "other.safetensors", ARRAYS)
    before = tree(tmp_path)
    for args in (["inspect", folder, "--json", folder / "model-00002-of-00002.safetensors", "--force"],
                 ["inspect", folder / INDEX_NAME, "--json", folder / INDEX_NAME, "--force"],
                 ["diff", folder, other, "--json", other, "--force"],
                 ["diff", folder, other, "--markdown", folder / "model-00001-of-00002.safetensors", "--force"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "is the input" in error_line(result)
    assert tree(tmp_path) == before


# -- 2. --force replaces only what wtool would have written -------------------------------------------

def test_force_refuses_a_folder_with_an_unrelated_file(small, tmp_path, monkeypatch):
    """`wtool apply ../minilm/model.safetensors "$PWD" --force` in a folder holding keep.txt."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "keep.txt").write_text("keep me")
    before = tree(tmp_path)
    monkeypatch.chdir(here)
    for target in (here, "."):
        result = invoke("apply", small, target, "--force")
        assert result.exit_code == 2, result.output
        assert re.fullmatch(r"error: \S+ holds keep\.txt, which wtool did not write; --force replaces only a "
                            r"checkpoint wtool wrote \(see the README\)", error_line(result))
    assert tree(tmp_path) == before


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_force_refuses_a_file_that_is_not_a_checkpoint(small, tmp_path, target):
    (tmp_path / target).write_text("precious text")
    before = tree(tmp_path)
    result = invoke("apply", small, tmp_path / target, "--force")
    assert result.exit_code == 2, result.output
    assert "--force replaces only" in error_line(result)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "symlink-to-device", "dangling-symlink"])
def test_force_refuses_special_files(small, tmp_path, kind):
    target = tmp_path / "out.safetensors"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink-to-device":
        target.symlink_to("/dev/null")
    else:
        target.symlink_to(tmp_path / "nowhere")
    result = invoke("apply", small, target, "--force")
    assert result.exit_code == 2, result.output
    assert "--force replaces only" in error_line(result)
    assert os.path.lexists(target) and (kind != "fifo" or stat.S_ISFIFO(os.lstat(target).st_mode))
    assert leftovers(tmp_path) == []


def test_force_refuses_a_checkpoint_folder_with_a_foreign_subfolder(small, tmp_path):
    out = tmp_path / "out"
    assert invoke("apply", small, out).exit_code == 0
    (out / "data").mkdir()
    (out / "data" / "x.bin").write_bytes(b"mine")
    before = tree(tmp_path)
    result = invoke("apply", small, out, "--force")
    assert result.exit_code == 2 and "holds data/x.bin" in error_line(result)
    assert tree(tmp_path) == before


def test_force_replaces_what_wtool_wrote(tmp_path):
    """A previous output of wtool (shards, index, copied model files) is replaced whole."""
    source = model_folder(tmp_path / "hf")
    out = tmp_path / "out"
    assert invoke("apply", source, out, "--max-shard-size", "9000B").exit_code == 0
    assert {"config.json", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    result = invoke("apply", source, out, "--force", "-t", "clip:c=0.5")
    assert result.exit_code == 0, result.output
    assert load(out)[0]["a.weight"].max() == np.float32(0.5)
    assert leftovers(tmp_path) == []


def test_force_replaces_a_plain_sharded_checkpoint_and_an_empty_folder(small, tmp_path):
    plain = save(tmp_path / "plain", ARRAYS, max_shard_size=9000)  # shards and index, nothing else
    (tmp_path / "empty").mkdir()
    file = save(tmp_path / "file.safetensors", ARRAYS)
    for target in (plain, tmp_path / "empty", file):
        result = invoke("apply", small, target, "--force", "-t", "clip:c=0.5")
        assert result.exit_code == 0, result.output
        assert load(target)[0]["a.weight"].max() == np.float32(0.5)
    assert leftovers(tmp_path) == []


def test_force_replaces_listed_files_in_subfolders(small, tmp_path):
    """Files wtool records as written (e.g. a sentence-transformers 1_Pooling/config.json) may be replaced."""
    out = tmp_path / "out"
    assert invoke("apply", small, out).exit_code == 0
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text("{}")
    manifest = json.loads((out / ".wtool-files.json").read_text())
    manifest["files"].append("1_Pooling/config.json")
    (out / ".wtool-files.json").write_text(json.dumps(manifest))
    assert invoke("apply", small, out, "--force").exit_code == 0
    assert not (out / "1_Pooling").exists()


# -- 3. creating is exclusive at the moment of commit ---------------------------------------------------

@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_an_output_created_during_the_run_is_never_replaced(small, tmp_path, target):
    """Two runs on the same new output both exited 0 and the second silently replaced the first."""
    out = tmp_path / target

    def intruder() -> None:
        if target == "out":
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
        else:
            out.write_text("theirs")

    with pytest.raises(UsageError, match=r"was created by another process during the run; pass --force"):
        run(Pipeline(), small, out, progress=Hook(intruder))
    assert (out / "theirs.txt" if target == "out" else out).read_text() == "theirs"
    assert leftovers(tmp_path) == []


def test_force_never_replaces_what_appears_during_the_run(small, tmp_path):
    out = tmp_path / "out"
    save(out, ARRAYS)
    with pytest.raises(UsageError, match=r"holds notes\.txt, which wtool did not write"):
        run(Pipeline(), small, out, force=True, progress=Hook(lambda: (out / "notes.txt").write_text("mine")))
    assert (out / "notes.txt").read_text() == "mine" and load(out)[0].keys() == ARRAYS.keys()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("target", ["out.safetensors", "out"])
def test_concurrent_force_writers_leave_one_output_and_no_hidden_copy(small, tmp_path, target):
    """Concurrent --force folder writers left a hidden *.wtool-old-* copy behind."""
    out = tmp_path / target
    save(out, ARRAYS)
    other = Pipeline.from_specs(["clip:c=0.25"])
    run(Pipeline.from_specs(["clip:c=0.5"]), small, out, force=True,
        progress=Hook(lambda: run(other, small, out, force=True)))
    assert load(out)[0]["a.weight"].max() == np.float32(0.5)  # the last to commit wins, whole
    assert leftovers(tmp_path) == []


def test_racing_processes_on_a_new_output_one_wins(big, tmp_path):
    """Runs started together each checked the output was free long before writing it; all exited 0."""
    out = tmp_path / "out.safetensors"
    processes = [_start("apply", big, out, "-q", "-t", f"clip:c=0.{i + 1}") for i in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2, 2], results
    assert all("exists" in err or "created by another process" in err for code, err in results if code)
    assert leftovers(tmp_path) == []
    with open_checkpoint(out) as reader:
        assert len(reader.tensors) == 8


@pytest.mark.stress
def test_concurrent_force_processes_leave_one_output_and_no_hidden_copy(big, tmp_path):
    out = tmp_path / "out"
    save(out, ARRAYS)
    for _ in range(5):
        processes = [_start("apply", big, out, "-q", "--force", "--max-shard-size", "20MB", "-t", f"clip:c=0.{i + 1}")
                     for i in range(6)]
        results = [(p.wait(timeout=600), p.stderr.read()) for p in processes]
        assert all(code == 0 for code, _ in results), results
        assert leftovers(tmp_path) == [], results
        with open_checkpoint(out) as reader:
            assert len(reader.tensors) == 8


# -- 4. reports are outputs ----------------------------------------------------------------------------

def test_only_one_output_may_be_stdout(small, tmp_path):
    result = invoke("apply", small, tmp_path / "out.safetensors", "--report", "-", "--markdown", "-")
    assert result.exit_code == 2
    assert error_line(result) == "error: --report and --markdown both write to stdout (-); only one may"
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("second", ["--markdown", "--html"])
def test_two_outputs_on_one_path_are_a_usage_error(small, tmp_path, second):
    same = tmp_path / "r.json"
    result = invoke("apply", small, tmp_path / "out.safetensors", "--report", same, second, tmp_path / "." / "r.json")
    assert result.exit_code == 2, result.output
    assert re.fullmatch(rf"error: --report and {second} both write {re.escape(str(same))}\S*", error_line(result))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_report_inside_the_output_folder_is_a_usage_error(small, tmp_path):
    result = invoke("apply", small, tmp_path / "out", "--report", tmp_path / "out" / "r.json")
    assert result.exit_code == 2 and "inside the output" in error_line(result)


def test_an_existing_report_needs_force(small, tmp_path):
    report = tmp_path / "r.md"
    report.write_text("my notes")
    result = invoke("apply", small, tmp_path / "out.safetensors", "--markdown", report)
    assert result.exit_code == 2 and "--force" in error_line(result)
    assert report.read_text() == "my notes" and not (tmp_path / "out.safetensors").exists()
    assert invoke("apply", small, tmp_path / "out.safetensors", "--markdown", report, "--force").exit_code == 0
    assert report.read_text().startswith("#")
    json_out = tmp_path / "i.json"
    json_out.write_text("old")
    assert invoke("inspect", small, "--json", json_out, "-q").exit_code == 2
    assert invoke("inspect", small, "--json", json_out, "-q", "--force").exit_code == 0


def _fsynced_paths(monkeypatch) -> list[str]:
    synced: list[str] = []

    def spy(descriptor: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))

    monkeypatch.setattr(os, "fsync", spy)
    return synced


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name synced descriptors")
def test_reports_and_copied_model_files_are_fsynced_before_their_rename(tmp_path, monkeypatch):
    source = model_folder(tmp_path / "hf")
    synced = _fsynced_paths(monkeypatch)
    result = invoke("apply", source, tmp_path / "out", "--report", tmp_path / "r.json", "--markdown",
                    tmp_path / "r.md", "--html", tmp_path / "r.html", "-q")
    assert result.exit_code == 0, result.output
    names = {Path(p).name for p in synced}
    assert {"config.json", "README.md", "tokenizer.json", INDEX_NAME} <= names
    for report in ("r.json", "r.md", "r.html"):  # synced under their temporary name, then renamed
        assert any(re.fullmatch(rf"\.{re.escape(report)}\.wtool-tmp-\S+", name) for name in names), names


def test_a_report_that_cannot_be_written_leaves_nothing_and_says_the_checkpoint_is_complete(small, tmp_path,
                                                                                              monkeypatch):
    report = tmp_path / "r.json"
    report.write_text("previous report")
    real = wtool.io.atomic.finish_file

    def full(handle) -> None:
        if ".r.json." in os.readlink(f"/proc/self/fd/{handle.fileno()}"):
            raise OSError(28, "No space left on device")
        real(handle)

    monkeypatch.setattr(wtool.io.atomic, "finish_file", full)
    result = invoke("apply", small, tmp_path / "out.safetensors", "--report", report, "--force", "-q")
    assert result.exit_code == 5, result.output
    assert error_line(result) == (f"error: {report}: cannot write: No space left on device; "
                                  f"{tmp_path / 'out.safetensors'} is complete, but not {report}")
    assert report.read_text() == "previous report" and leftovers(tmp_path) == []
    assert load(tmp_path / "out.safetensors")[0].keys() == ARRAYS.keys()


# -- 5. inputs that change under the run -------------------------------------------------------------

def _rewrite_in_place(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x7f" * 8
    time.sleep(0.01)  # a later timestamp, as any real rewrite has
    with open(path, "r+b") as handle:
        handle.write(data)


def _replace(path: Path) -> None:
    save(path.with_name("new.safetensors"), {k: v + 1 for k, v in ARRAYS.items()})
    os.replace(path.with_name("new.safetensors"), path)


@pytest.mark.parametrize("change", [_rewrite_in_place, _replace], ids=["rewritten", "replaced"])
@pytest.mark.parametrize("target", ["out.safetensors", "out"])
def test_an_input_changed_during_the_run_is_exit_3_and_nothing_is_committed(small, tmp_path, change, target):
    out = tmp_path / target
    with pytest.raises(InputError, match=rf"^{re.escape(str(small))}: changed during the run"):
        run(Pipeline.from_specs(["clip:c=0.5"]), small, out, progress=Hook(lambda: change(small)))
    assert not os.path.lexists(out) and leftovers(tmp_path) == []


def test_a_companion_model_file_or_recipe_changed_during_the_run_is_detected(tmp_path):
    source = model_folder(tmp_path / "hf")
    grads = save(tmp_path / "grads.safetensors", ARRAYS)
    with pytest.raises(InputError, match=rf"^{re.escape(str(grads))}: changed during the run"):
        run(Pipeline.from_specs([f"decay:lr=0.1,grads={grads}"]), source, tmp_path / "o1",
            progress=Hook(lambda: _rewrite_in_place(grads)))
    config = source / "config.json"
    with pytest.raises(InputError, match=rf"^{re.escape(str(config))}: changed during the run"):
        run(Pipeline(), source, tmp_path / "o2", progress=Hook(lambda: config.write_text('{"model_type": "x"}')))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[[steps]]\nop = "clip"\nc = 0.5\n')
    with pytest.raises(InputError, match=rf"^{re.escape(str(recipe))}: changed during the run"):
        run(Pipeline.from_recipe(recipe), source, tmp_path / "o3", reads=[recipe],
            progress=Hook(lambda: recipe.write_text('[[steps]]\nop = "clip"\nc = 0.25\n')))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grads.safetensors", "hf", "recipe.toml"]


def test_inspect_and_diff_reports_of_a_changed_input_are_not_written(tmp_path, monkeypatch):
    import wtool.analyze

    source = save(tmp_path / "m.safetensors", ARRAYS)
    other = save(tmp_path / "o.safetensors", ARRAYS)
    for name in ("inspect", "diff"):
        real = getattr(wtool.analyze, name)

        def changing(*args, real=real, **kwargs):
            result = real(*args, **kwargs)
            _rewrite_in_place(source)  # after the figures were taken, before the report is written
            return result

        monkeypatch.setattr(wtool.analyze, name, changing)
    for args in (["inspect", source, "--json", tmp_path / "r.json"], ["inspect", source, "--json", "-"],
                 ["diff", source, other, "--markdown", tmp_path / "r.md"]):
        result = invoke(*args, "-q")
        assert result.exit_code == 3, result.output
        assert re.fullmatch(rf"error: {re.escape(str(source))}: changed during the run \(it was rewritten\); "
                            r"nothing was written", error_line(result))
        assert result.stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "o.safetensors"]


SHRINK = """
import os, sys
import wtool.io.safetensors as st
from wtool.cli import main
real = st.SafetensorsReader._read
calls = []
def shrink_after_read(self, info):
    array = real(self, info)
    calls.append(info.name)
    if len(calls) == 2:  # the step's own read: the input shrinks while the tensor is held
        os.truncate(self.file, 64)
    return array
st.SafetensorsReader._read = shrink_after_read
sys.argv = ["wtool", "apply", sys.argv[1], sys.argv[2], "-t", "clip:c=0.5"]
main()
"""


def test_an_input_that_shrinks_gives_a_clean_error_not_sigbus(tmp_path):
    source = save(tmp_path / "src.safetensors", {"w": np.ones((1024, 1024), np.float32)})
    out = tmp_path / "out.safetensors"
    done = subprocess.run([sys.executable, "-c", SHRINK, str(source), str(out)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 3, (done.returncode, done.stderr)
    assert re.fullmatch(rf"error: {re.escape(str(source))}: (tensor 'w': )?changed during the run.*\n", done.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_a_short_read_is_input_changed(tmp_path):
    from wtool.io import open_checkpoint

    source = save(tmp_path / "src.safetensors", ARRAYS)
    with open_checkpoint(source) as reader:
        os.truncate(source, source.stat().st_size - 100)
        with pytest.raises(InputError, match=r"tensor 'c\.bias': changed during the run \(the file shrank"):
            for info in reader.tensors:
                reader.read(info.name)


# -- 6. signals --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """~100 MB of float32 that `apply -t quantize` needs a few seconds for."""
    block = np.random.default_rng(0).standard_normal(1 << 16, dtype=np.float32)
    arrays = {f"layer.{i}.weight": np.tile(block + i, 48).reshape(1024, 3072) for i in range(8)}
    return save(tmp_path_factory.mktemp("big") / "big.safetensors", arrays)


def _start(*args: object) -> subprocess.Popen:
    def default_signals():  # a shell may start background jobs with SIGINT ignored; a terminal does not
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "wtool", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
                            env={**os.environ, "NO_COLOR": "1"})


def _wait_for_temp(process: subprocess.Popen, folder: Path, size: int = 1 << 20, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(size == 0 or p.is_file() and p.stat().st_size >= size for p in folder.rglob("*")
               if ".wtool-tmp" in str(p)):
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.kill()
    pytest.fail("the temporary output never appeared")


WORDS = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}


@pytest.mark.parametrize("signum", SIGNALS, ids=[s.name for s in SIGNALS])
def test_every_stopping_signal_removes_the_temporary(big, tmp_path, signum):
    """SIGHUP, SIGUSR1, SIGALRM mid-write left ~220 MB temporaries."""
    process = _start("apply", big, tmp_path / "out.safetensors", "-t", "quantize:bits=4")
    stdout, stderr = stop_midway(process, lambda: _wait_for_temp(process, tmp_path), signum, timeout=60)
    assert process.returncode == 128 + signum, stderr
    word = WORDS.get(signum, f"stopped by {signum.name}")
    assert stderr.splitlines() == [f"{word}: no output written"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("report", [False, True])
def test_a_signal_just_after_a_temporary_is_made_leaves_nothing(small, tmp_path, monkeypatch, report):
    """A signal between creating a temporary and handing it to its writer left it behind."""
    made = wtool.io.atomic.create_file

    def create_then_signal(path: Path):
        handle = made(path)
        if report == path.name.startswith(".r.json"):
            signal.raise_signal(signal.SIGTERM)
        return handle

    monkeypatch.setattr(wtool.io.atomic, "create_file", create_then_signal)
    out = tmp_path / "out"
    out.mkdir()
    result = invoke("apply", small, out / "m.safetensors", "--report", out / "r.json")
    assert result.exit_code == (5 if report else 143), result.output
    assert [p.name for p in out.iterdir()] == (["m.safetensors"] if report else [])


SLOW_STEP = """
import sys, time
from wtool.transforms.clip import Clip
real = Clip.apply
def slow(self, array, ctx):
    time.sleep(60)  # a long numpy kernel in a worker thread
    return real(self, array, ctx)
Clip.apply = slow
from wtool.cli import main
sys.argv = ["wtool", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("target", ["out.safetensors", "out"])
def test_sigterm_with_jobs_does_not_wait_for_tensors_in_flight(small, tmp_path, target):
    """With --jobs 4, SIGTERM took 122 s: every tensor in flight was awaited."""
    out = tmp_path / "out" / target
    out.parent.mkdir()
    process = subprocess.Popen([sys.executable, "-c", SLOW_STEP, "apply", str(small), str(out), "-t", "clip:c=0.5",
                                "--jobs", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "NO_COLOR": "1"})

    def in_their_step() -> None:
        _wait_for_temp(process, out.parent, size=0)
        time.sleep(0.5)  # the jobs are in their step

    # the steps in flight would take 60 s
    stdout, stderr = stop_midway(process, in_their_step, signal.SIGTERM, timeout=30)
    assert process.returncode == 143, stderr
    assert stderr.splitlines() == ["terminated: no output written"]
    assert list(out.parent.iterdir()) == []


AFTER_COMMIT = """
import os, sys
import wtool.io.atomic as atomic
import wtool.report as report
from wtool.cli import main
where, signum = sys.argv[1], int(sys.argv[2])
if where == "report":  # a signal while the report is built, after the checkpoint was committed
    real = report.dumps
    def dumps(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    report.dumps = dumps
else:  # a signal while the old folder is deleted
    real = atomic.remove_tree
    def remove_tree(path):
        os.kill(os.getpid(), signum)
        real(path)
    atomic.remove_tree = remove_tree
sys.argv = ["wtool", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("where", ["report", "old-folder"])
def test_a_signal_after_the_commit_says_the_checkpoint_is_complete(small, tmp_path, where, signum):
    """SIGTERM or Ctrl-C after the commit printed "no output written" although the output was in
    place, and one during the deletion of the old folder left it half deleted."""
    out = tmp_path / "out"
    save(out, ARRAYS, max_shard_size=9000)
    report = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-c", AFTER_COMMIT, where, str(int(signum)), "apply", str(small), str(out),
                           "--force", "-t", "clip:c=0.5", "--report", str(report), "-q"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"})
    assert done.returncode == 5, done.stderr
    # the signal waits until the old folder is gone, then stops the run before the report
    assert done.stderr == f"{WORDS[signum]}: {out} is complete, but not {report}\n"
    assert not report.exists()
    assert load(out)[0]["a.weight"].max() == np.float32(0.5)
    assert leftovers(tmp_path) == []


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_temp_whose_owner_is_gone_is_removed_by_a_later_run(small, tmp_path):
    host = wtool.io.atomic.HOST
    dead = tmp_path / f".out.safetensors.wtool-tmp-{host}-{_dead_pid()}-0a1b2c3d"
    alive = tmp_path / f".out.safetensors.wtool-tmp-{host}-{os.getpid()}-0a1b2c3d"
    elsewhere = tmp_path / f".out.safetensors.wtool-tmp-00000000-{_dead_pid()}-0a1b2c3d"
    dead_folder = tmp_path / f".x.wtool-tmp-{host}-{_dead_pid()}-0a1b2c3d"
    for path in (dead, alive, elsewhere):
        path.write_bytes(b"\0" * 100)
    dead_folder.mkdir()
    (dead_folder / "model-00001-of-00001.safetensors").write_bytes(b"\0")
    assert invoke("apply", small, tmp_path / "other.safetensors").exit_code == 0
    assert not dead.exists() and not dead_folder.exists()
    assert alive.exists() and elsewhere.exists()  # its owner runs, or runs on another host: not ours to judge


def test_a_sigkilled_run_leaves_a_temp_the_next_run_removes(big, tmp_path):
    process = _start("apply", big, tmp_path / "out.safetensors", "-t", "quantize:bits=4")
    try:
        _wait_for_temp(process, tmp_path)
        process.kill()
        process.wait(timeout=60)
    finally:
        process.kill()
    assert len(leftovers(tmp_path)) == 1
    (tmp_path / "x").mkdir()
    small_one = save(tmp_path / "x" / "small.safetensors", ARRAYS)
    assert invoke("apply", small_one, tmp_path / "out.safetensors").exit_code == 0
    assert leftovers(tmp_path) == []


# -- 7. names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".npz", ""])
def test_a_255_byte_output_name_works(small, tmp_path, suffix):
    name = "n" * (255 - len(suffix)) + suffix
    result = invoke("apply", small, tmp_path / name, "--report", tmp_path / ("r" * 250 + ".json"))
    assert result.exit_code == 0, result.output
    assert load(tmp_path / name)[0].keys() == ARRAYS.keys() and leftovers(tmp_path) == []


def test_dot_is_an_ordinary_folder_output(small, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = invoke("apply", small, ".")
    assert result.exit_code == 2 and error_line(result) == "error: . exists; pass --force to replace it"
    result = invoke("apply", small, ".", "--force")
    assert result.exit_code == 0, result.output
    assert load(here)[0].keys() == ARRAYS.keys() and leftovers(tmp_path) == []


@pytest.mark.stress
@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_1gib_input_truncated_during_a_run_is_exit_3_not_sigbus(tmp_path, jobs):
    (tmp_path / "in").mkdir()
    source = save(tmp_path / "in" / "big.safetensors", {f"t{i}": np.full((4096, 4096), i, np.float32)
                                                        for i in range(16)})
    process = _start("apply", source, tmp_path / "out.safetensors", "-t", "clip:c=0.5", "--jobs", jobs)
    try:
        _wait_for_temp(process, tmp_path, size=100 << 20)
        os.truncate(source, source.stat().st_size // 2)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        process.kill()
    assert process.returncode == 3, stderr
    assert re.fullmatch(rf"error: {re.escape(str(source))}: (tensor 't\d+': )?changed during the run.*\n", stderr)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("target", ["out.safetensors", "out"])
def test_without_renameat2_creating_stays_exclusive_and_force_leaves_no_copy(small, tmp_path, monkeypatch, target):
    """Where the system has no renameat2: link (file) or mkdir + rename (folder) still refuse a taken name."""
    monkeypatch.setattr(wtool.io.atomic, "_renameat2", lambda source, target, flags: False)
    out = tmp_path / target
    with pytest.raises(UsageError, match="was created by another process during the run"):
        run(Pipeline(), small, out, progress=Hook(lambda: save(out, ARRAYS)))
    run(Pipeline.from_specs(["clip:c=0.5"]), small, out, force=True)
    assert load(out)[0]["a.weight"].max() == np.float32(0.5)
    assert leftovers(tmp_path) == []


def test_force_asks_the_format_table_what_a_checkpoint_looks_like(tmp_path, monkeypatch):
    import wtool.io

    target = tmp_path / "old.model"
    target.write_bytes(b"GGUF" + bytes(12))
    assert wtool.io.atomic.replace_problem(target, "file") == "is not a checkpoint"
    gguf = wtool.io.Format(".gguf", open_checkpoint, None, magic=lambda start: start[:4] == b"GGUF")
    monkeypatch.setattr(wtool.io, "FORMATS", (*wtool.io.FORMATS, gguf))
    assert wtool.io.atomic.replace_problem(target, "file") is None
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "shard.gguf").write_bytes(b"")
    assert wtool.io.atomic.replace_problem(folder, "folder") == "holds shard.gguf, which wtool did not write"
    monkeypatch.setattr(wtool.io, "FOLDER", wtool.io.Format("/", open_checkpoint, None, folder=True,
                                                            members=(".gguf",)))
    assert wtool.io.atomic.replace_problem(folder, "folder") is None
