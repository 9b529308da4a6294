"""Small synchronous file-writing helpers: temp files, atomic and in-place writes, pruning.

Temp files are named `.<name>.sidecar-tmp-<random>` (see `is_temp_name`, which a watcher uses
to ignore them) and live on the same filesystem as their target, so `os.replace` is atomic: the
sidecar stages them in its state directory (checked to be on PROJECT_DIR's filesystem,
sidecar/tree/preflight.py), so nothing partial is ever visible in PROJECT_DIR; `sweep_temp`
removes what a kill left behind.
None of these follow a symlink at the final path component.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "STAGE_DIR_NAME",
    "TMP_MARKER",
    "create_temp",
    "fsync_dir",
    "is_temp_name",
    "nearest_dir",
    "open_inplace",
    "prune_empty_dirs",
    "remove_file",
    "sweep_temp",
    "write_all",
    "write_inplace",
    "write_temp",
]

TMP_MARKER = ".sidecar-tmp-"
STAGE_DIR_NAME = "tmp"  # under the state directory: staged writes and downloads
_MAX_BASE = 150  # bytes of the original name kept in a temp name (NAME_MAX is 255)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def is_temp_name(name: str) -> bool:
    """True for a file name made by `create_temp` (the sidecar's own, short-lived temp files)."""
    return name.startswith(".") and TMP_MARKER in name


def create_temp(directory: Path, name: str, mode: int = 0o600) -> tuple[Path, int]:
    """Create an empty temp file for `name` in `directory`; return its path and an open fd."""
    base = name.encode("utf-8", "surrogateescape")[:_MAX_BASE].decode("utf-8", "ignore")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_NOFOLLOW
    while True:
        tmp = directory / f".{base}{TMP_MARKER}{secrets.token_hex(6)}"
        try:
            return tmp, os.open(tmp, flags, mode)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte (os.write may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_temp(directory: Path, name: str, data: bytes, mode: int, *, fsync: bool = False) -> Path:
    """Write `data` to a new temp file in `directory` with exactly `mode`; return its path."""
    tmp, fd = create_temp(directory, name)
    try:
        try:
            write_all(fd, data)
            os.fchmod(fd, mode)  # exact mode, whatever the umask
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def open_inplace(target: Path, mode: int | None) -> int:
    """Open `target` for rewriting, keeping its inode; create it when missing.

    A symlink, FIFO, socket or device at `target` is removed first (never written through).
    Raises IsADirectoryError when `target` is a directory. `mode` None keeps the file's mode
    (0o644 for a new file).
    """
    flags = os.O_WRONLY | _O_CLOEXEC | _O_NOFOLLOW
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory", str(target))
    if st is not None and not stat.S_ISREG(st.st_mode):
        target.unlink()
        st = None
    if st is None:
        fd = os.open(target, flags | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o644 if mode is None else mode)
        return fd
    fd = os.open(target, flags | os.O_TRUNC)
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        os.fchmod(fd, mode)
    return fd


def write_inplace(
    target: Path,
    data: bytes | None,
    mode: int | None,
    *,
    source: Path | None = None,
    fsync: bool = False,
) -> None:
    """Rewrite `target` in place (same inode) with `data`, or with the bytes of file `source`."""
    fd = open_inplace(target, mode)
    try:
        if source is not None:
            with open(source, "rb") as src, os.fdopen(os.dup(fd), "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        elif data:
            write_all(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def remove_file(target: Path) -> bool:
    """Unlink a file or symlink (never its target); False when absent or a directory."""
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    try:
        target.unlink()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def prune_empty_dirs(directory: Path, root: Path) -> None:
    """Remove `directory` and its parents while they are empty, stopping below `root`."""
    root_s = str(root)
    d = directory
    while str(d) != root_s and str(d).startswith(root_s + os.sep):
        try:
            d.rmdir()
        except OSError:  # not empty, not a directory (symlink), already gone...
            return
        d = d.parent


def nearest_dir(path: Path, root: Path) -> Path:
    """The nearest existing real directory at or above `path`, within `root` (else `root`)."""
    root_s = str(root)
    d = path
    while str(d) != root_s and str(d).startswith(root_s + os.sep):
        try:
            if stat.S_ISDIR(os.lstat(d).st_mode):
                return d
        except OSError:
            pass
        d = d.parent
    return root


def sweep_temp(stage_dir: Path, project_dir: Path, dirs: Iterable[str] = ()) -> int:
    """At start: empty `stage_dir` (the state directory's temp area: downloads and staged
    writes a kill left behind) and remove our temp names from `project_dir` and its `dirs`
    (project-relative; where an older version staged next to the target). The count removed."""
    removed = 0
    if stage_dir.is_dir() and not stage_dir.is_symlink():
        for entry in os.scandir(stage_dir):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _unlink_quietly(path)
            removed += 1
    stage_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for rel in {"", *dirs}:
        d = project_dir / rel if rel else project_dir
        try:
            with os.scandir(d) as it:
                names = [
                    e.name for e in it if is_temp_name(e.name) and e.is_file(follow_symlinks=False)
                ]
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            _unlink_quietly(d / name)
            removed += 1
    return removed


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename in it is durable."""
    fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
