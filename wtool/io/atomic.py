"""Atomic, exclusive output: write beside the target under a hidden temporary name, then put it in place.

Readers of the target see either the old complete file (or folder) or the new complete one,
never a half-written one. Putting the output in place is the only moment that decides:

- without `--force` it is an operation that fails when the target exists (`renameat2`
  RENAME_NOREPLACE; `link` for a file or `mkdir` + `rename` for a folder elsewhere), so of two
  runs racing for a new output exactly one wins and the other leaves nothing behind;
- with `--force` the new output and the old one swap places atomically (RENAME_EXCHANGE); the
  old one, now under the temporary name, is checked again (`replace_problem`) and deleted, or
  swapped back when it is not something wtool may replace.

Signals arriving while an output is put in place are held until it is done (`critical`),
so an old folder is never left half deleted. Temporary names carry a hash of the host name
and the PID: `.NAME.wtool-tmp-HOST-PID-RANDOM` (a hash instead of NAME when NAME is long), so a
later run in the same folder removes what a killed run left once that PID is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import wtool.io as formats  # the format table: what a checkpoint looks like (read at call time)
from wtool.errors import OutputError, UsageError
from wtool.io.protect import Inputs, absolute

#: Inside a folder output: every file wtool wrote there, so `--force` can tell its own files from the user's.
MANIFEST = ".wtool-files.json"
#: What `--force` may replace, for messages.
FORCE_RULE = "--force replaces only a checkpoint wtool wrote (see the README)"
def _host() -> str:
    """This host and PID namespace (containers sharing a folder and a host name do not share PIDs)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.sha256(f"{socket.gethostname()}:{namespace}".encode("utf-8", "replace")).hexdigest()[:8]


#: Temporary names carry this, so that only a run on the same host judges whether their owner is alive.
HOST = _host()
_TEMP = re.compile(r"\..+\.wtool-(?:tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-[0-9a-f]{8}")
_NAME_LIMIT = 255
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def output_error(path: Path, exc: OSError) -> OutputError:
    """OutputError naming the output and the operating-system reason, e.g. No space left on device."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OutputError(f"{path}: cannot write: {reason}")


@contextlib.contextmanager
def as_output_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise output_error(path, exc) from exc


def sibling(path: Path, kind: str) -> Path:
    """A hidden, unused name beside `path`, e.g. `.model.safetensors.wtool-tmp-1a2b3c4d-4242-0a1b2c3d`.

    A name too long to carry the suffix is replaced by its hash, so any legal output name works.
    """
    path = absolute(path)
    suffix = f".wtool-{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    stem = path.name
    if len(os.fsencode(f".{stem}{suffix}")) > _NAME_LIMIT:
        stem = hashlib.sha256(os.fsencode(stem)).hexdigest()[:16]
    return path.with_name(f".{stem}{suffix}")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale(folder: Path, inputs: Inputs | None = None) -> None:
    """Remove temporaries in `folder` left by wtool runs on this host whose process is gone (SIGKILL)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = _TEMP.fullmatch(name)
        if not match or match["host"] != HOST or _alive(int(match["pid"])):
            continue
        path = folder / name
        if inputs is None or not inputs.holds(path):
            remove_quietly(path)


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable; ignored where directories cannot be opened (Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def create_file(path: Path) -> BinaryIO:
    """Create `path` exclusively with ordinary permissions (0666 minus umask, unlike mkstemp's 0600)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return os.fdopen(descriptor, "wb")


def finish_file(handle: BinaryIO) -> None:
    """Flush, fsync and close."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def copy_file(source: Path, target: Path) -> None:
    """Copy `source` to a new file `target`, fsynced (model files travelling with a folder output)."""
    handle = create_file(target)
    try:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, handle, 1 << 20)
        finish_file(handle)
    except BaseException:
        handle.close()
        raise


def remove_tree(path: Path) -> None:
    """Delete a file or a folder (links inside are removed, never followed)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        remove_tree(path)


# ------------------------------------------------------------------ what --force may replace

def _looks_like_checkpoint(path: Path) -> bool:
    """An empty file, or one that starts like a checkpoint format (`wtool.io.sniff`)."""
    try:
        with open(path, "rb") as handle:
            start = handle.read(formats.MAGIC_BYTES)
    except OSError:
        return False
    return not start or formats.sniff(start) is not None


def read_manifest(folder: Path) -> set[str]:
    """The files wtool recorded as written in `folder` (empty when there is no readable record)."""
    try:
        with open(folder / MANIFEST, "rb") as handle:
            record = json.loads(handle.read(10_000_000))
        files = record["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return set()
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def write_manifest(folder: Path) -> None:
    """Record every file under `folder` as written by wtool (relative POSIX paths), fsynced."""
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")
                   if path.is_file() and not path.is_symlink() and path.name != MANIFEST)
    handle = create_file(folder / MANIFEST)
    try:
        handle.write(json.dumps({"about": "files wtool wrote here; `wtool apply --force` replaces nothing else",
                                 "files": files}, indent=1).encode("utf-8"))
        finish_file(handle)
    except BaseException:
        handle.close()
        raise


def _folder_problem(folder: Path) -> str | None:
    listed = read_manifest(folder)
    for root, folders, files in os.walk(folder):
        folders.sort()
        for name in sorted(files) + [f for f in folders if os.path.islink(os.path.join(root, f))]:
            path = Path(root) / name
            relative = path.relative_to(folder).as_posix()
            regular = stat.S_ISREG(os.lstat(path).st_mode)
            top = "/" not in relative
            if regular and (relative in listed or top and (relative == MANIFEST or formats.FOLDER.holds(name))):
                continue
            return f"holds {relative}, which wtool did not write"
    return None


def replace_problem(target: Path, kind: str) -> str | None:
    """Why `--force` may not replace `target` with a `kind` output ("file", "folder" or "report"), or None.

    A file output may replace a regular file that is a checkpoint (or empty); a report, any
    regular file; a folder output, a folder that is empty or holds only checkpoint files
    (`*.safetensors`, an index) and files wtool recorded in its `.wtool-files.json`. Links,
    FIFOs, devices and anything else are never replaced.
    """
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if kind == "folder":
        return _folder_problem(target) if stat.S_ISDIR(mode) else "is not a folder"
    if stat.S_ISDIR(mode):
        return "is a folder"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if kind == "file" and not _looks_like_checkpoint(target):
        return "is not a checkpoint"
    return None


def check_target(path: Path, force: bool, kind: str) -> None:
    """UsageError when `path` exists and `force` is not set, or is not something `--force` may replace."""
    if not os.path.lexists(path):
        return
    if not force:
        raise UsageError(f"{path} exists; pass --force to replace it")
    problem = replace_problem(path, kind)
    if problem:
        raise UsageError(f"{path} {problem}; {FORCE_RULE}")


# ------------------------------------------------------------------ putting an output in place

_state = threading.Lock()
_depth = 0
_held: list[int] = []
_placed: list[Path] = []
_live: set[Path] = set()  # temporaries made and not yet placed or removed


def hold_signal(signum: int) -> bool:
    """Called by a signal handler: True when an output is being put in place and the signal must wait."""
    with _state:
        if _depth:
            _held.append(signum)
            return True
    return False


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold signals (through `hold_signal`) until the block is done, then deliver the first one."""
    global _depth
    with _state:
        _depth += 1
    try:
        yield
    finally:
        with _state:
            _depth -= 1
            pending = _held[:1] if not _depth else []
            if not _depth:
                _held.clear()
        if pending:
            signal.raise_signal(pending[0])


def placements() -> int:
    """How many outputs this process has put in place so far (a mark for `placed`)."""
    return len(_placed)


def placed(path: Path, since: int = 0) -> bool:
    """Whether this process has put an output in place at `path` after mark `since`."""
    return absolute(path) in _placed[since:]


_libc_renameat2 = None


def _renameat2(source: Path, target: Path, flags: int) -> bool:
    """renameat2(2); False where the system or the file system cannot do it."""
    global _libc_renameat2
    if _libc_renameat2 is None:
        try:
            _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        except (AttributeError, OSError):
            _libc_renameat2 = False
    if not _libc_renameat2:
        return False
    if _libc_renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(target))


def _rename_exclusive(source: Path, target: Path) -> None:
    """Rename, raising FileExistsError when `target` exists, in one operation that decides."""
    if _renameat2(source, target, _RENAME_NOREPLACE):
        return
    if os.path.isdir(source):
        os.mkdir(target)  # taken: FileExistsError; a folder may then be renamed onto the empty one
        try:
            os.rename(source, target)
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(target)
            raise
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this file system: check, then rename, is the best left
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def place(temp: Path, target: Path, shown: Path, kind: str, *, force: bool, inputs: Inputs | None) -> None:
    """Put `temp` at `target`: exclusively, or with `force` replacing only what `replace_problem` allows.

    `inputs` are checked unchanged first (InputError); a target that appeared during the run
    is a UsageError without `force`. Signals wait until the output is in place and the old
    one is gone.
    """
    with critical():
        if inputs is not None and kind != "report":  # a report follows its committed checkpoint
            inputs.check_unchanged()
        while True:
            if not force or not os.path.lexists(target):
                try:
                    _rename_exclusive(temp, target)
                    break
                except FileExistsError:
                    if not force:
                        raise UsageError(f"{shown} was created by another process during the run; "
                                         f"pass --force to replace it") from None
                    continue
            _refuse(shown, replace_problem(target, kind), inputs, target)
            try:
                swapped = _renameat2(temp, target, _RENAME_EXCHANGE)
            except FileNotFoundError:
                continue  # the target went away meanwhile: create it instead
            if swapped:  # the old output is now at `temp`: judge it again, it may have changed
                try:
                    _refuse(shown, replace_problem(temp, kind), inputs, temp)
                except UsageError:
                    _renameat2(temp, target, _RENAME_EXCHANGE)
                    raise
                remove_tree(temp)
            else:  # no atomic exchange here: move the old one aside, then in, then delete the old one
                old = sibling(target, "old")
                os.rename(target, old)
                try:
                    os.rename(temp, target)
                except OSError:
                    os.rename(old, target)
                    raise
                remove_tree(old)
            break
        fsync_dir(target.parent)
        _placed.append(target)


def _refuse(shown: Path, problem: str | None, inputs: Inputs | None, path: Path) -> None:
    if problem is None and inputs is not None:
        problem = inputs.clash(path)
    if problem:
        raise UsageError(f"{shown} {problem}; {FORCE_RULE}")


class _Temporary:
    """A temporary beside `target` that `_place` puts in place, or `abort` removes.

    It is made with signals held and recorded in `_live` until then, so a signal arriving
    between its creation and its owner's first line can still not leave it behind
    (`remove_leftovers`).
    """

    def __init__(self, target: Path, *, force: bool, inputs: Inputs | None, kind: str) -> None:
        self.shown, self.target = target, absolute(target)
        self.force, self.inputs, self.kind = force, inputs, kind
        self.placed = False
        remove_stale(self.target.parent, inputs)
        with as_output_error(target), critical():
            self.temp = sibling(self.target, "tmp")
            self._make()
            _live.add(self.temp)

    def _make(self) -> None:
        raise NotImplementedError

    def _place(self) -> None:
        place(self.temp, self.target, self.shown, self.kind, force=self.force, inputs=self.inputs)
        self.placed = True
        _live.discard(self.temp)

    def abort(self) -> None:
        if not self.placed:
            remove_quietly(self.temp)
            _live.discard(self.temp)


class AtomicFile(_Temporary):
    """A temporary file beside `target`; `commit` puts it in place (see `place`)."""

    def __init__(self, target: Path, *, force: bool = False, inputs: Inputs | None = None, kind: str = "file"):
        super().__init__(target, force=force, inputs=inputs, kind=kind)

    def _make(self) -> None:
        self.handle = create_file(self.temp)

    def finish(self) -> Path:
        """Flush and fsync the temporary file; returns its path for validation before `commit`."""
        with as_output_error(self.shown):
            finish_file(self.handle)
        return self.temp

    def commit(self) -> None:
        with as_output_error(self.shown):
            self._place()

    def abort(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            self.handle.close()
        super().abort()


class AtomicFolder(_Temporary):
    """A temporary folder beside `target`; `commit` records what is in it and puts it in place."""

    def __init__(self, target: Path, *, force: bool = False, inputs: Inputs | None = None):
        super().__init__(target, force=force, inputs=inputs, kind="folder")

    def _make(self) -> None:
        os.mkdir(self.temp)

    def commit(self) -> None:
        with as_output_error(self.shown):
            write_manifest(self.temp)
            for folder in sorted({p.parent for p in self.temp.rglob("*")}, key=lambda p: -len(p.parts)):
                fsync_dir(folder)
            self._place()


def remove_leftovers() -> None:
    """Remove every temporary this process made and neither placed nor removed: what a run
    stopped by a signal (or abandoned by its threads) would otherwise leave behind."""
    for temp in list(_live):
        _live.discard(temp)
        if os.path.lexists(temp):
            remove_quietly(temp)


def write_text(target: Path, text: str | Iterable[str], *, force: bool = False,
               inputs: Inputs | None = None) -> None:
    """Write a report (text, or its pieces in order) as UTF-8: to a temporary beside `target`,
    fsynced, then put in place like any output (a regular file it replaces with `force` must not
    be one of `inputs`). A lone surrogate (a file name that is not UTF-8) is written as "?"."""
    check_target(target, force, "report")
    output = AtomicFile(target, force=force, inputs=inputs, kind="report")
    try:
        with as_output_error(target):
            for chunk in [text] if isinstance(text, str) else text:
                output.handle.write(chunk.encode("utf-8", "replace"))
        output.finish()
        output.commit()
    except BaseException:
        output.abort()
        raise
