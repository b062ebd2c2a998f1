"""Hostile input and faults, end to end through the CLI (issue 5).

Every malformed file of the corpus, fuzzed headers, absurd sizes under a memory cap, a full
disk, SIGTERM/SIGINT mid-write, colour and stream hygiene, odd tensor names, internal bugs
and NaN/Inf policies: each must end in the documented exit code with one line naming the
file (and tensor), no traceback, and nothing left behind.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import typer.testing
from corpus import (  # noqa: F401 (skip_fsync is an autouse fixture)
    HOSTILE_NPZ,
    HOSTILE_SAFETENSORS,
    OLD_NPZ,
    OLD_SAFETENSORS,
    entry,
    load,
    npy_bytes,
    safetensors_bytes,
    same_bits,
    save,
    skip_fsync,
    stop_midway,
    write,
    zip_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_io_safetensors import FullDisk
from test_io_sharded import HOSTILE as HOSTILE_INDEX
from test_io_sharded import SHARDS, make_folder
from typer.testing import CliRunner

import wtool.io.atomic
import wtool.io.sharded
from wtool.cli import app
from wtool.errors import InputError
from wtool.io import open_checkpoint
from wtool.io.sharded import INDEX_NAME
from wtool.transforms import REGISTRY

runner = CliRunner()


def invoke(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones included) with the sha256 of its bytes."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "folder"
    return found


def temporaries(root: Path) -> list[Path]:
    return [path for path in root.rglob("*") if ".wtool-" in path.name]


def one_line(result) -> str:
    """The single line a failed command printed (on stderr), with nothing on stdout."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- 1. the malformed-file corpus through every command ---------------------------------------------

def _sharded_case(index):
    def build(folder: Path) -> tuple[Path, Path]:
        hf = make_folder(folder / "hf", SHARDS)
        document = index(hf)
        write(hf / INDEX_NAME, (document if isinstance(document, str) else json.dumps(document)).encode())
        return hf, hf / INDEX_NAME
    return build


def _file_case(build):
    def wrapped(folder: Path) -> tuple[Path, Path]:
        path = build(folder)
        return path, path
    return wrapped


CORPUS = ([(f"safetensors-{name}", _file_case(build), pattern) for name, build, pattern in HOSTILE_SAFETENSORS]
          + [(f"npz-{name}", _file_case(build), pattern) for name, build, pattern in HOSTILE_NPZ]
          + [(f"sharded-{name}", _sharded_case(index), pattern) for name, index, pattern in HOSTILE_INDEX])


@pytest.mark.parametrize("command", ["inspect", "apply", "diff"])
@pytest.mark.parametrize("build,pattern", [case[1:] for case in CORPUS], ids=[case[0] for case in CORPUS])
def test_malformed_input_exits_3_with_one_line(tmp_path, build, pattern, command):
    source, named = build(tmp_path)
    out = tmp_path / "out.safetensors"
    args = {"inspect": ["inspect", source], "apply": ["apply", source, out], "diff": ["diff", source, source]}
    before = tree(tmp_path)
    result = invoke(*args[command])
    assert result.exit_code == 3, result.output
    assert re.match(rf"error: {re.escape(str(named))}: {pattern}", one_line(result)), result.stderr
    assert tree(tmp_path) == before  # no output, no temporary, the input's bytes unchanged


# -- 2. fuzzed safetensors headers ------------------------------------------------------------------

def _valid_file() -> tuple[bytes, dict]:
    arrays = {
        "embed.weight": np.arange(-6, 6, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16),
        "proj.weight": np.arange(8, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).reshape(2, 4),
        "proj.scale": np.arange(4, dtype=np.uint8).view(ml_dtypes.float8_e5m2),
        "mask": np.array([True, False, True]),
        "bias": np.array([0.5, -1.5], np.float32),
        "step": np.array(7, np.int64),
        "empty": np.zeros((0, 3), np.float16),
    }
    header: dict = {"__metadata__": {"format": "pt"}}
    offset, data = 0, b""
    for name, array in arrays.items():
        raw = array.tobytes()
        header[name] = entry({"bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
                              "bool": "BOOL", "float32": "F32", "int64": "I64", "float16": "F16"}[array.dtype.name],
                             list(array.shape), offset, offset + len(raw))
        offset += len(raw)
        data += raw
    return safetensors_bytes(header, data), header


VALID, VALID_HEADER = _valid_file()
HEADER_END = 8 + struct.unpack("<Q", VALID[:8])[0]
TOKENS = [b"{", b"}", b"[", b"]", b",", b":", b'"', b"null", b"true", b"-1", b"1e999", b"0.5", b"NaN",
          b"18446744073709551616", b'"F8_E4M3"', b'"BOOL"', b'"BF16"', b'"__metadata__"', b"\\u0000",
          b'"\\ud800"', b"\xff", b"\x00", b" " * 9, b'"data_offsets":[0,0],', b'"shape":[],']
WEIRD = st.one_of(st.integers(-2, 10), st.sampled_from([2**31, 2**32, 2**63, 2**64, 10**12, 10**400]),
                  st.floats(allow_nan=False), st.text(max_size=4), st.none(), st.booleans(),
                  st.lists(st.integers(-1, 20), max_size=4))


def _set_length(blob: bytearray, length: int) -> None:
    if len(blob) >= 8:
        struct.pack_into("<Q", blob, 0, length % 2**64)


@st.composite
def hostile_files(draw) -> bytes:
    """The valid file with one to three mutations: bytes, lengths, truncation, JSON splices, duplicates."""
    blob = bytearray(VALID)
    for op in draw(st.lists(st.sampled_from(["flip", "overwrite", "truncate", "length", "splice", "duplicate",
                                             "field"]), min_size=1, max_size=3)):
        if not blob and op != "field":
            break
        in_header = st.integers(0, max(0, min(len(blob), HEADER_END) - 1))
        anywhere = st.integers(0, len(blob) - 1) if blob else st.just(0)
        if op == "flip":
            pos = draw(st.one_of(in_header, anywhere))
            blob[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "overwrite":
            pos = draw(st.one_of(in_header, anywhere))
            blob[pos] = draw(st.one_of(st.sampled_from([0, 1, 2, 0x22, 0x5B, 0x7B, 0x7D, 0xFF]), st.integers(0, 255)))
        elif op == "truncate":
            del blob[draw(st.integers(0, len(blob))):]
        elif op == "length":
            actual = HEADER_END - 8
            _set_length(blob, draw(st.one_of(
                st.sampled_from([0, 1, 2, actual - 8, actual - 1, actual + 1, actual + 8, len(blob), len(blob) - 8,
                                 100_000_001, 2**63, 2**64 - 1]),
                st.integers(0, 2**64 - 1))))
        elif op == "splice":
            pos = draw(in_header)
            token = draw(st.sampled_from(TOKENS))
            blob[pos:pos] = token
            if draw(st.booleans()):
                _set_length(blob, HEADER_END - 8 + len(token))
        elif op == "duplicate":
            name = draw(st.sampled_from([key for key in VALID_HEADER if key != "__metadata__"]))
            text = json.dumps({name: VALID_HEADER[name]})[1:-1].encode() + b","
            if draw(st.booleans()):
                text = b'"dtype":"F32",'
                pos = VALID.index(b'"dtype"') if b'"dtype"' in blob else 9
            else:
                pos = 9
            blob[pos:pos] = text
            _set_length(blob, HEADER_END - 8 + len(text))
        else:  # one field of one entry set to a weird value, header re-encoded with a correct length
            header = json.loads(json.dumps(VALID_HEADER))
            name = draw(st.sampled_from(list(header)))
            if name == "__metadata__":
                header[name] = draw(st.one_of(WEIRD, st.dictionaries(st.text(max_size=3), WEIRD, max_size=2)))
            else:
                field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
                header[name][field] = draw(st.one_of(WEIRD, st.lists(WEIRD, max_size=3),
                                                     st.sampled_from(["F64", "I8", "BOOL", "F8_E5M2", "C64"])))
            try:
                blob = bytearray(safetensors_bytes(header, VALID[HEADER_END:]))
            except (ValueError, OverflowError):
                pass
    return bytes(blob)


class Hang(BaseException):
    """Raised by the alarm when one example runs too long; not an Exception, so nothing catches it."""


def _alarm(signum, frame):
    raise Hang("one fuzz example ran for more than 10 s")


@contextlib.contextmanager
def time_limit(seconds: float = 10):
    """Fail (instead of hanging) when the block runs longer than `seconds`."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def built_once(monkeypatch):
    """Typer rebuilds the command from the app on every invoke (~10 ms); the fuzz reuses one build."""
    real = getattr(typer.testing, "_get_command", None)
    if real is not None:
        monkeypatch.setattr(typer.testing, "_get_command", functools.cache(real))


FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _library_outcome(path: Path) -> str | None:
    """None when every tensor reads, else the InputError message; any other exception propagates."""
    try:
        with open_checkpoint(path) as reader:
            for info in reader.tensors:
                np.array(reader.read(info.name))
    except InputError as exc:
        return str(exc)
    return None


@FUZZ
@given(blob=hostile_files())
def test_fuzzed_file_inspect_exits_0_with_json_or_3_with_one_line(tmp_path, built_once, blob):
    path = write(tmp_path / "fuzz.safetensors", blob)
    with time_limit():
        result = invoke("inspect", "--json", "-", "-q", path)
        library = _library_outcome(path)
    assert result.exit_code in (0, 3), (result.exit_code, result.output, result.exception)
    if result.exit_code == 0:
        assert "Traceback" not in result.output and result.stderr == ""
        data = json.loads(result.stdout)
        assert data["format"] == "safetensors"
    else:
        line = one_line(result)
        assert line.startswith(f"error: {path}: ")
    assert (result.exit_code == 0) == (library is None)  # the CLI and the library agree


@FUZZ
@given(blob=hostile_files())
def test_fuzzed_file_reads_or_raises_input_error(tmp_path, blob):
    path = write(tmp_path / "fuzz.safetensors", blob)
    with time_limit():
        message = _library_outcome(path)
    if message is not None:
        assert message.startswith(f"{path}: ") and "\n" not in message


def test_the_fuzz_base_file_is_valid(tmp_path):
    """The mutations start from a file every reader accepts, so the fuzz reaches past the header."""
    from safetensors import safe_open

    path = write(tmp_path / "base.safetensors", VALID)
    assert _library_outcome(path) is None
    with safe_open(str(path), framework="numpy") as opened:
        assert set(opened.keys()) == set(VALID_HEADER) - {"__metadata__"}


# -- 3. absurd sizes are refused before anything is allocated ------------------------------------------

CAPPED = """
import resource, sys
cap = 2 << 30
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
if sys.argv[1] == "--control":
    import numpy
    try:
        numpy.ones(3 << 30, numpy.uint8)
    except MemoryError:
        sys.exit(42)
    sys.exit(0)
sys.argv[0] = "wtool"
from wtool.cli import main
main()
"""
TERA = 10**6  # a [10**6, 10**6] tensor holds 10**12 elements


def _huge_safetensors(folder: Path) -> Path:
    header = {"w": entry("F32", [TERA, TERA], 0, 4 * TERA * TERA)}
    return write(folder / "huge.safetensors", safetensors_bytes(header, bytes(64)))


def _huge_but_short(folder: Path) -> Path:
    header = {"w": entry("F32", [TERA, TERA], 0, 64)}
    return write(folder / "short.safetensors", safetensors_bytes(header, bytes(64)))


def _huge_npz(folder: Path) -> Path:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    return write(folder / "huge.npz", zip_bytes([("w.npy", npy_bytes(header=header, data=bytes(64)))]))


def _huge_shard(folder: Path) -> Path:
    hf = folder / "hf"
    hf.mkdir()
    _huge_safetensors(hf).rename(hf / "model-00001-of-00001.safetensors")
    write(hf / INDEX_NAME, json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}).encode())
    return hf


def _run_capped(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CAPPED, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "NO_COLOR": "1"})


def test_memory_cap_is_effective():
    """The cap used below would turn a real 3 GiB allocation into a MemoryError."""
    assert _run_capped("--control").returncode == 42


@pytest.mark.parametrize("build,pattern", [
    (_huge_safetensors, r"huge\.safetensors: tensor 'w': data offsets \[0, 4000000000000\] run past the end"),
    (_huge_but_short, r"short\.safetensors: tensor 'w': data offsets \[0, 64\] hold 64 bytes but F32 "
                      r"\[1000000, 1000000\] needs 4000000000000"),
    (_huge_npz, r"huge\.npz: tensor 'w': the zip declares \d+ bytes but the \.npy header"),
    (_huge_shard, r"model-00001-of-00001\.safetensors: tensor 'w': data offsets .* run past the end"),
], ids=["past-end", "short", "npz", "shard"])
def test_tera_element_tensor_is_refused_under_a_memory_cap(tmp_path, build, pattern):
    source = build(tmp_path)
    before = tree(tmp_path)
    result = _run_capped("apply", source, tmp_path / "out.safetensors", "-t", "quantize")
    assert result.returncode == 3, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr and "MemoryError" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and re.search(pattern, result.stderr), result.stderr
    assert tree(tmp_path) == before


# -- 4. the output cannot be written ------------------------------------------------------------------

ARRAYS = {"a.weight": np.linspace(-1, 1, 4096, dtype=np.float32).reshape(64, 64),
          "b.weight": np.linspace(-2, 2, 8192, dtype=np.float32).reshape(128, 64)}


@pytest.fixture
def small(tmp_path) -> Path:
    source = tmp_path / "in"
    source.mkdir()
    return save(source / "model.safetensors", ARRAYS)


@pytest.mark.parametrize("room", [0, 20_000], ids=["first-write", "mid-data"])
@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_disk_full_exits_4_and_keeps_the_old_target(tmp_path, monkeypatch, small, target, room):
    real = wtool.io.atomic.create_file
    monkeypatch.setattr(wtool.io.atomic, "create_file", lambda path: FullDisk(real(path), room))
    monkeypatch.setattr(wtool.io.sharded, "create_file", lambda path: FullDisk(real(path), room))
    out = tmp_path / target
    _existing(out)
    before = tree(tmp_path)
    result = invoke("apply", small, out, "-t", "quantize:bits=4", "--force")
    assert result.exit_code == 4, result.output
    line = one_line(result)
    assert line.startswith(f"error: {out}") and line.endswith("cannot write: No space left on device"), line
    assert tree(tmp_path) == before


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_failed_flush_to_disk_exits_4(tmp_path, monkeypatch, small, target):
    """Quotas and network file systems often report ENOSPC/EIO only when the data is synced."""
    def failing(descriptor):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing)
    out = tmp_path / target
    before = tree(tmp_path)
    result = invoke("apply", small, out)
    assert result.exit_code == 4, result.output
    assert re.fullmatch(rf"error: {re.escape(str(out))}\S*: cannot write: Input/output error", one_line(result))
    assert tree(tmp_path) == before


def test_report_on_a_full_disk_exits_5_after_the_checkpoint(tmp_path, monkeypatch, small):
    real = wtool.io.atomic.create_file
    monkeypatch.setattr(wtool.io.atomic, "create_file",
                        lambda path: FullDisk(real(path), 0 if ".r.json." in path.name else 1 << 40))
    out, report = tmp_path / "out.safetensors", tmp_path / "r.json"
    result = invoke("apply", small, out, "--report", report, "-q")
    assert result.exit_code == 5
    assert one_line(result) == (f"error: {report}: cannot write: No space left on device; "
                                f"{out} is complete, but not {report}")
    assert not report.exists() and not temporaries(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; see the /sys and "
                                              "not-a-folder cases for an unwritable output that root meets too")
@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_unwritable_folder_exits_4(tmp_path, small, target):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = invoke("apply", small, locked / target)
    assert result.exit_code == 4
    assert one_line(result) == f"error: {locked / target}: cannot write: Permission denied"
    assert list(locked.iterdir()) == []


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_output_under_a_file_exits_4(tmp_path, small, target):
    """The output's folder is a regular file (ENOTDIR): refused for root too."""
    blocker = write(tmp_path / "blocker", b"not a folder")
    result = invoke("apply", small, blocker / target)
    assert result.exit_code == 4, result.output
    assert one_line(result) == f"error: {blocker / target}: cannot write: Not a directory"
    assert blocker.read_bytes() == b"not a folder"


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs sysfs, where no one may create files")
def test_output_in_sysfs_exits_4(small):
    """sysfs refuses new files even to root: an honest unwritable location without chmod."""
    target = Path("/sys/wtool-robustness-test.safetensors")
    result = invoke("apply", small, target)
    assert result.exit_code == 4, result.output
    assert re.fullmatch(rf"error: {re.escape(str(target))}: cannot write: "
                        r"(Permission denied|Read-only file system|Operation not permitted)", one_line(result))
    assert not target.exists()


@pytest.mark.parametrize("args", [
    ["inspect", "{src}", "--json", "{src}"],
    ["apply", "{src}", "{out}", "--report", "{src}"],
    ["apply", "{src}", "{out}", "--markdown", "{out}"],
    ["apply", "{src}", "{out}", "--html", "{out}", "--force"],
    ["diff", "{src}", "{out}", "--json", "{out}"],
    ["inspect", "{hf}", "--json", "{hf}/model-00001-of-00002.safetensors"],
    ["inspect", "{hf}/model.safetensors.index.json", "--json", "{hf}/model.safetensors.index.json"],
], ids=["inspect-json", "apply-report", "apply-markdown-output", "apply-html-existing-output", "diff-json",
        "shard", "index"])
def test_a_report_never_overwrites_a_checkpoint(tmp_path, small, args):
    """`--json model.safetensors` (a slip of the keyboard) must not destroy the model."""
    save(tmp_path / "out.safetensors", ARRAYS)
    make_folder(tmp_path / "hf", SHARDS)
    names = {"src": small, "out": tmp_path / "out.safetensors", "hf": tmp_path / "hf"}
    before = tree(tmp_path)
    result = invoke(*[arg.format(**names) for arg in args])
    assert result.exit_code == 2, result.output
    assert re.fullmatch(r"error: (report \S+ is the input \S+; write to a new path|the output and --\w+ both write \S+"
                        r"|\S+ exists; pass --force to replace it)", one_line(result))
    assert tree(tmp_path) == before


def test_a_report_beside_a_sharded_checkpoint_is_allowed(tmp_path):
    hf = make_folder(tmp_path / "hf", SHARDS)
    result = invoke("inspect", hf, "--json", hf / "stats.json", "-q")
    assert result.exit_code == 0 and json.loads((hf / "stats.json").read_text())["totals"]["tensors"] == 3


# -- 5. SIGTERM and SIGINT mid-write -------------------------------------------------------------------

@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """~100 MB of float32 that `apply -t quantize` needs a few seconds for."""
    block = np.random.default_rng(0).standard_normal(1 << 16, dtype=np.float32)
    arrays = {f"layer.{i}.weight": np.tile(block + i, 48).reshape(1024, 3072) for i in range(8)}
    from safetensors.numpy import save_file

    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    save_file(arrays, str(path))
    return path


def _start(source: Path, out: Path, *extra: str) -> subprocess.Popen:
    def default_sigint():  # a shell may start background jobs with SIGINT ignored; a terminal does not
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "wtool", "apply", str(source), str(out), "-t", "quantize:bits=4",
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint, env={**os.environ, "NO_COLOR": "1"})


def _wait_for_data(process: subprocess.Popen, folder: Path, timeout: float = 30) -> None:
    """Until the temporary beside the target (a file, or a folder of shards) holds tensor data."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        written = [p for p in folder.rglob("*") if ".wtool-" in str(p.relative_to(folder)) and p.is_file()
                   and p.stat().st_size > 1 << 20]  # the header alone is < 1 KB
        if written:
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.kill()
    pytest.fail("the temporary output never appeared")


def _existing(out: Path) -> None:
    """An old checkpoint at `out` (what --force may replace)."""
    if out.suffix:
        write(out, OLD_NPZ if out.suffix == ".npz" else OLD_SAFETENSORS)
    else:
        out.mkdir()
        write(out / "model.safetensors", OLD_SAFETENSORS)


@pytest.mark.parametrize("signum,code,word,target,existing", [
    (signal.SIGTERM, 143, "terminated", "out.safetensors", False),
    (signal.SIGTERM, 143, "terminated", "out.safetensors", True),
    (signal.SIGINT, 130, "interrupted", "out.safetensors", False),
    (signal.SIGINT, 130, "interrupted", "out.safetensors", True),
    (signal.SIGTERM, 143, "terminated", "out.npz", True),
    (signal.SIGINT, 130, "interrupted", "out", True),
], ids=["sigterm", "sigterm-force", "sigint", "sigint-force", "sigterm-npz-force", "sigint-sharded-force"])
def test_signal_mid_write_leaves_nothing(tmp_path, big, signum, code, word, target, existing):
    out = tmp_path / target
    if existing:
        _existing(out)
    before = tree(tmp_path)
    process = _start(big, out, *(["--force"] if existing else []))
    stdout, stderr = stop_midway(process, lambda: _wait_for_data(process, tmp_path), signum, timeout=30)
    assert process.returncode == code, stderr
    assert stdout == "" and "Traceback" not in stderr
    assert stderr.splitlines() == [f"{word}: no output written"]
    assert tree(tmp_path) == before  # no temporary; no target, or the old one untouched


# -- 6. streams and colour ----------------------------------------------------------------------------

def test_no_color_and_piped_streams_carry_no_escapes(tmp_path, small, monkeypatch):
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(variable, raising=False)
    out = tmp_path / "out.safetensors"
    bad = write(tmp_path / "bad.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    runs = [
        (["inspect", small], 0),
        (["apply", small, out, "-t", "quantize:bits=2", "--report", "-", "--markdown", tmp_path / "m.md"], 0),
        (["apply", small, "-n", "-t", "quantize"], 0),
        (["diff", small, out, "--fail-above", "rel_l2=0.0001"], 1),
        (["transforms"], 0),
        (["transforms", "quantize"], 0),
        (["apply", "--help"], 0),
        (["inspect", bad], 3),
        (["inspect", tmp_path / "missing.safetensors"], 3),  # a missing input is invalid input
        (["apply", small, tmp_path / "o2.safetensors", "-t", "quantise"], 2),
    ]
    for args, code in runs:
        result = invoke(*args, env={"NO_COLOR": "1"})
        assert result.exit_code == code, (args, result.output)
        assert "\x1b" not in result.stdout + result.stderr, (args, result.output)


def test_inspect_json_dash_keeps_stdout_pure(small):
    result = invoke("inspect", small, "--json", "-")
    assert result.exit_code == 0
    data = json.loads(result.stdout)  # the whole of stdout, nothing before or after
    assert [t["name"] for t in data["tensors"]] == list(ARRAYS)
    assert result.stderr == ""  # nothing but errors: the JSON has everything the table would show


def test_progress_on_a_terminal_stderr_stays_off_stdout(tmp_path, small):
    """A real process whose stderr is a terminal: the (transient) progress bar goes there, stdout is JSON."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.run([sys.executable, "-m", "wtool", "inspect", str(small), "--json", "-"],
                                 stdout=subprocess.PIPE, stderr=follower, timeout=60,
                                 env={**os.environ, "TERM": "xterm", "COLUMNS": "120"})
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO once the terminal has no writer left
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower >= 0:
            os.close(follower)
        os.close(leader)
    assert process.returncode == 0
    terminal = b"".join(chunks).decode("utf-8", "replace")
    assert "inspect" in terminal and "a.weight" not in terminal
    assert json.loads(process.stdout)["totals"]["tensors"] == 2


# -- 7. tensor names that look like paths, markup, unicode, or are very long ----------------------------

ODD_NAMES = ["../x", "a/b", "../../../../etc/passwd", "/abs", "ünïcödé.権重", "[red]x[/red]", "[bold]",
             "back\\slash", "dots...", "long." + "n" * 10_240]


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_odd_names_round_trip_and_print_literally(tmp_path, target):
    work = tmp_path / "work"
    work.mkdir()
    arrays = {name: np.full((2, 2), i, np.float32) for i, name in enumerate(ODD_NAMES)}
    source = save(work / "in.safetensors", arrays)
    before = set(tree(tmp_path))
    out = work / target
    result = invoke("apply", source, out, "-t", "clip:c=5", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    created = set(tree(tmp_path)) - before
    assert all(path == f"work/{target}" or path.startswith(f"work/{target}/") for path in created - {"r.json"})
    loaded, _ = load(out)
    assert list(loaded) == ODD_NAMES
    assert all(np.array_equal(loaded[name], np.clip(arrays[name], -5, 5)) for name in ODD_NAMES)
    assert "[red]x[/red]" in result.stdout and "../../../../etc/passwd" in result.stdout

    shown = invoke("inspect", out)
    assert shown.exit_code == 0
    cells = [line.split("│")[1].strip() for line in shown.stdout.splitlines() if line.startswith("│")]
    assert "".join(cells) == "".join(ODD_NAMES)  # every name, literally, in order (the long one folded)


# -- 8. a bug inside wtool ----------------------------------------------------------------------------

def test_internal_error_exits_70_with_one_line(tmp_path, monkeypatch, small):
    def broken(self, array, ctx):
        raise RuntimeError("boom")

    monkeypatch.setattr(REGISTRY["clip"], "apply", broken)
    out = tmp_path / "out.safetensors"
    result = invoke("apply", small, out, "-t", "clip:c=1")
    assert result.exit_code == 70
    assert one_line(result).startswith("internal error: RuntimeError: boom (rerun with --debug")
    assert temporaries(tmp_path) == [] and not out.exists()

    debug = invoke("--debug", "apply", small, out, "-t", "clip:c=1")
    assert debug.exit_code == 70, debug.exception
    assert "Traceback (most recent call last)" in debug.stderr and "RuntimeError: boom" in debug.stderr
    assert temporaries(tmp_path) == [] and not out.exists()


def test_debug_keeps_the_exit_code_of_an_input_error(tmp_path):
    bad = write(tmp_path / "bad.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{nope")
    result = invoke("--debug", "inspect", bad)
    assert result.exit_code == 3 and "Traceback" in result.stderr and "InputError" in result.stderr


# -- 9. NaN and Inf -----------------------------------------------------------------------------------

def test_cli_nonfinite_policies(tmp_path):
    values = np.array([[np.nan, np.inf, -1.0, 0.25], [0.5, -0.75, 1.0, 0.0]], np.float32)
    source = save(tmp_path / "nan.safetensors", {"w": values})

    refused = invoke("apply", source, tmp_path / "e.safetensors", "-t", "quantize:bits=4")
    assert refused.exit_code == 3
    assert re.fullmatch(r"error: (\S+: )?tensor 'w': 2 non-finite value\(s\) \(NaN/Inf\) would spread through "
                        r"quantize; pass --nonfinite=skip or --nonfinite=zero", one_line(refused))
    assert temporaries(tmp_path) == [] and not (tmp_path / "e.safetensors").exists()

    rows = {}
    for policy in ("skip", "zero"):
        out = tmp_path / f"{policy}.safetensors"
        result = invoke("apply", source, out, "-t", "quantize:bits=4", "--nonfinite", policy, "--report", "-", "-q")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["nonfinite_policy"] == policy
        rows[policy] = data["tensors"][0]
        assert rows[policy]["before"]["nan"] == 1 and rows[policy]["before"]["inf"] == 1
    assert same_bits(load(tmp_path / "skip.safetensors")[0]["w"], values)
    assert rows["skip"]["after"]["nan"] == 1 and rows["skip"]["changed"] is False
    zeroed = load(tmp_path / "zero.safetensors")[0]["w"]
    assert np.isfinite(zeroed).all() and rows["zero"]["after"]["nan"] == 0 and rows["zero"]["after"]["inf"] == 0
