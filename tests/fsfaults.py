"""Real environment faults for tests: a small tmpfs (a disk that fills up), read-only bind mounts.

Mounting needs root (CI runs as root); elsewhere the tests that use these skip with the reason.
Every mount is undone on exit, lazily if something still holds it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "readonly_bind", "remount", "tmpfs"]


def _mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs / bind mount needs root (CI runs as root)")
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount here: {proc.stderr.strip()}")


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (e.g. "2m") at `path` (created) for the block."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
    try:
        yield path
    finally:
        _umount(path)


@contextlib.contextmanager
def readonly_bind(path: Path) -> Iterator[Path]:
    """Bind-mount `path` over itself read-only for the block (the filesystem "turned" read-only)."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)


def remount(path: Path, options: str) -> None:
    """Change the options of the mount at `path` (e.g. "remount,ro")."""
    _mount("-o", options, str(path))


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of `directory` up to `leave` free bytes with one ballast file."""
    ballast = directory / "ballast.bin"
    with open(ballast, "ab") as f:
        chunk = b"\0" * 65536
        while True:
            st = os.statvfs(directory)
            free = st.f_bavail * st.f_frsize
            if free <= leave:
                break
            try:
                f.write(chunk[: max(1, min(len(chunk), free - leave))])
                f.flush()
            except OSError:
                break
    return ballast
