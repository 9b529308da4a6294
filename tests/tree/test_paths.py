"""Project-relative path validation shared by snapshots and deltas."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import UnsafePathError
from sidecar.tree.paths import check_rel_path, is_reserved, resolve_inside


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "/",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/..",
        ".",
        "./../x",
        "a//b",
        "a\\..\\b",
        "C:/x",
        "a\x00b",
        "x/./y",
        "a" * 300,
        None,
        5,
    ],
)
def test_unsafe_paths_are_refused(bad: object) -> None:
    """Absolute, escaping, empty, non-canonical and non-string paths raise UnsafePathError."""
    with pytest.raises(UnsafePathError):
        check_rel_path(bad)


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("a/b.txt", "a/b.txt"), ("./a", "a"), ("dir/", "dir"), ("ünï/çødé.js", "ünï/çødé.js")],
)
def test_safe_paths_are_normalised(raw: str, norm: str) -> None:
    """A leading ./ and a trailing / are removed; everything else is kept byte for byte."""
    assert check_rel_path(raw) == norm


def test_state_dir_is_reserved() -> None:
    """The .sidecar directory is the sidecar's own and never a project path."""
    assert is_reserved(".sidecar")
    assert is_reserved(".sidecar/state.db")
    assert not is_reserved(".sidecarx")


def test_resolve_inside_refuses_symlinked_parents(tmp_path: Path) -> None:
    """A path through a symlink that leaves the root is refused."""
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError):
        resolve_inside(root, "link/x.txt")
    assert resolve_inside(root, "a/b.txt") == root / "a/b.txt"
