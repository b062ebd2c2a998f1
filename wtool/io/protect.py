"""What a run reads is protected: no output may be, contain or sit on it, and it may not change.

Every input file (shards, index, companions, model files, the recipe) is recorded by identity
(device, inode) and by resolved path, with its size and times, when it is opened. Outputs are
checked against this set before anything is written; just before an output is committed,
every input is checked again, and one that changed fails the run (InputError, exit 3).

>>> inputs = Inputs()
>>> inputs.add(Path("model.safetensors"))                              # doctest: +SKIP
>>> inputs.refuse(Path("."), "output")                                 # doctest: +SKIP
Traceback (most recent call last):
wtool.errors.UsageError: output . contains the input model.safetensors; write to a new path
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wtool.errors import InputError, UsageError


@dataclass(frozen=True)
class Stamp:
    """One input file as it was when opened: where it is, which file it is, and its version."""

    path: Path
    real: Path
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path, status: os.stat_result | None = None) -> Stamp:
        """Stamp `path`; pass `status` from fstat on the open descriptor to stamp exactly what was opened."""
        status = status or os.stat(path)
        return cls(Path(path), Path(os.path.realpath(path)), status.st_dev, status.st_ino, status.st_size,
                   status.st_mtime_ns, status.st_ctime_ns)

    def change(self) -> str | None:
        """How the file at `path` differs from this stamp now (replaced, resized, rewritten), or None."""
        try:
            now = os.stat(self.path)
        except OSError as exc:
            return f"it can no longer be read ({exc.strerror or exc})"
        if (now.st_dev, now.st_ino) != (self.device, self.inode):
            return "another file was put in its place"
        if now.st_size != self.size:
            return f"its size went from {self.size} to {now.st_size} bytes"
        if (now.st_mtime_ns, now.st_ctime_ns) != (self.mtime_ns, self.ctime_ns):
            return "it was rewritten"
        return None


def absolute(path: Path) -> Path:
    """`path` made absolute without resolving links: `.` is the working folder, `a/../b` is `b`."""
    return Path(os.path.abspath(path))


def _identity(path: Path, follow: bool = True) -> tuple[int, int] | None:
    try:
        status = os.stat(path) if follow else os.lstat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


class Inputs:
    """The protected set of one run: every file it reads."""

    def __init__(self) -> None:
        self.stamps: dict[tuple[int, int], Stamp] = {}

    def __len__(self) -> int:
        return len(self.stamps)

    def add(self, path: Path, status: os.stat_result | None = None) -> None:
        """Protect one file (stamped now, or from `status`)."""
        stamp = Stamp.of(path, status)
        self.stamps.setdefault((stamp.device, stamp.inode), stamp)

    def add_stamps(self, stamps: list[Stamp]) -> None:
        for stamp in stamps:
            self.stamps.setdefault((stamp.device, stamp.inode), stamp)

    def holds(self, path: Path) -> bool:
        """Whether `path` (followed, or the link itself) is one of the inputs."""
        return any(key in self.stamps for key in (_identity(path), _identity(path, follow=False)) if key)

    def clash(self, target: Path) -> str | None:
        """Why writing or replacing `target` would touch an input, or None.

        `target` may not be an input (same path, or the same file through a link or a hard
        link) and may not contain one (a folder that is an input's ancestor, by path or by
        identity, which also catches bind mounts).
        """
        given, real = absolute(target), Path(os.path.realpath(target))
        identities = {key for key in (_identity(target), _identity(target, follow=False)) if key}
        folder_identity: dict[Path, tuple[int, int] | None] = {}
        for stamp in self.stamps.values():
            if real == stamp.real or given == absolute(stamp.path) or (stamp.device, stamp.inode) in identities:
                return f"is the input {stamp.path}"
            ancestors = {*absolute(stamp.path).parents, *stamp.real.parents}
            if given in ancestors or real in ancestors:
                return f"contains the input {stamp.path}"
            for folder in stamp.real.parents:
                if folder not in folder_identity:
                    folder_identity[folder] = _identity(folder)
                if folder_identity[folder] in identities:
                    return f"contains the input {stamp.path}"
        return None

    def refuse(self, target: Path, role: str, shown: str | Path | None = None) -> None:
        """UsageError when `target` (the `role`: output, report, ...) would touch an input."""
        problem = self.clash(target)
        if problem:
            raise UsageError(f"{role} {shown or target} {problem}; write to a new path")

    def check_unchanged(self) -> None:
        """InputError naming the first input that changed since it was opened."""
        for stamp in self.stamps.values():
            change = stamp.change()
            if change:
                raise InputError(f"{stamp.path}: changed during the run ({change}); nothing was written")
