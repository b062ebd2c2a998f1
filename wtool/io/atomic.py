"""Atomic output: write beside the target under a hidden temporary name, then rename.

Readers of the target see either the old complete file (or folder) or the new complete one,
never a half-written one; an interrupted run leaves nothing behind but, at worst after a
hard kill, a hidden `.NAME.wtool-tmp-XXXXXXXX` beside the target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from wtool.errors import OutputError, UsageError


def check_target(path: Path, force: bool, *, folder: bool) -> None:
    """UsageError when `path` exists and `force` is not set, or cannot be replaced by this kind of output."""
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise UsageError(f"{path} exists; pass --force to replace it")
    if path.is_dir() and not path.is_symlink() and not folder:
        raise UsageError(f"{path} is a folder; refusing to replace it with a file")


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
    """A hidden, unused-looking name beside `path`, e.g. `.model.safetensors.wtool-tmp-1a2b3c4d`."""
    return path.with_name(f".{path.name}.wtool-{kind}-{secrets.token_hex(4)}")


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


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class AtomicFile:
    """A temporary file beside `target`; `commit` renames it onto the target."""

    def __init__(self, target: Path):
        self.target = target
        self.temp = sibling(target, "tmp")
        with as_output_error(target):
            self.handle = create_file(self.temp)

    def finish(self) -> Path:
        """Flush and fsync the temporary file; returns its path for validation before `commit`."""
        with as_output_error(self.target):
            finish_file(self.handle)
        return self.temp

    def commit(self) -> None:
        with as_output_error(self.target):
            os.replace(self.temp, self.target)
        fsync_dir(self.target.parent)

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.handle.close()
        remove_quietly(self.temp)


class AtomicFolder:
    """A temporary folder beside `target`; `commit` puts it in place of the target.

    Replacing an existing target moves it aside first, renames the new folder in, then deletes
    the old one, so a crash in between leaves the old output under a hidden name, not a mix.
    """

    def __init__(self, target: Path):
        self.target = target
        self.temp = sibling(target, "tmp")
        with as_output_error(target):
            os.mkdir(self.temp)

    def commit(self) -> None:
        fsync_dir(self.temp)
        old = None
        with as_output_error(self.target):
            if self.target.exists() or self.target.is_symlink():
                old = sibling(self.target, "old")
                os.rename(self.target, old)
            try:
                os.rename(self.temp, self.target)
            except OSError:
                if old is not None:
                    os.rename(old, self.target)
                raise
        fsync_dir(self.target.parent)
        if old is not None:
            remove_quietly(old)

    def abort(self) -> None:
        remove_quietly(self.temp)
