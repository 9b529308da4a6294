"""Validation of project-relative paths, shared by the tar reader, the manifest and the deltas."""

from __future__ import annotations

import os
from pathlib import Path

from sidecar.errors import UnsafePathError

__all__ = ["STATE_DIR_NAME", "check_rel_path", "is_reserved", "resolve_inside"]

STATE_DIR_NAME = ".sidecar"
MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255


def check_rel_path(path: object) -> str:
    """Return the normalised project-relative path, or raise UnsafePathError naming it.

    Refuses empty names, NUL, absolute paths (POSIX or Windows spellings), backslashes,
    `.`/`..` components, and over-long names. A trailing slash (directory entries) is removed.
    """
    if not isinstance(path, str):
        raise UnsafePathError(f"path is not a string: {path!r}")
    shown = repr(path[:200])
    if not path or path in {"/", "./"}:
        raise UnsafePathError(f"empty path: {shown}")
    if "\x00" in path:
        raise UnsafePathError(f"path contains NUL: {shown}")
    if "\\" in path:
        raise UnsafePathError(f"path contains a backslash: {shown}")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        raise UnsafePathError(f"absolute path: {shown}")
    stripped = path.removeprefix("./")
    stripped = stripped.rstrip("/")
    if not stripped:
        raise UnsafePathError(f"empty path: {shown}")
    parts = stripped.split("/")
    for part in parts:
        if part in {"", ".", ".."}:
            raise UnsafePathError(f"path escapes or is not canonical: {shown}")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_BYTES:
            raise UnsafePathError(f"path component too long: {shown}")
    if len(stripped.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise UnsafePathError(f"path too long: {shown}")
    return stripped


def is_reserved(rel: str) -> bool:
    """True for paths the sidecar owns (its state directory), never synced or served."""
    return rel == STATE_DIR_NAME or rel.startswith(STATE_DIR_NAME + "/")


def resolve_inside(root: Path, rel: str) -> Path:
    """Join a checked relative path to root, refusing to pass through a symlinked directory."""
    rel = check_rel_path(rel)
    target = root / rel
    parent = target.parent
    # A parent that is (or passes through) a symlink could lead outside the root.
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(parent)
    if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
        raise UnsafePathError(f"path leads outside the project: {rel!r}")
    return target
