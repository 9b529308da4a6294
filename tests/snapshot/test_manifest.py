"""The format-1 manifest: strict parsing, limits, deterministic serialisation."""

from __future__ import annotations

import json

import pytest

from sidecar.config import Limits
from sidecar.errors import QuotaExceededError, SnapshotInvalidError, UnsafePathError
from sidecar.snapshot.manifest import FileEntry, Manifest, check_limits

SHA = "a" * 64


def _doc(**over: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": 1,
        "project_id": "p",
        "snapshot_id": "s",
        "created_at": 1,
        "files": [{"path": "a.txt", "size": 1, "sha256": SHA, "mode": 0o644, "version": 1}],
    }
    doc.update(over)
    return doc


def test_round_trip_is_deterministic() -> None:
    """Parsing and serialising gives the same bytes regardless of input order."""
    files = [
        {"path": p, "size": 1, "sha256": SHA, "mode": 0o644, "version": 1}
        for p in ("b", "a", "c/d")
    ]
    m = Manifest.parse(json.dumps(_doc(files=files, seq=4)).encode())
    m2 = Manifest.parse(json.dumps(_doc(files=files[::-1], seq=4)).encode())
    assert m.to_bytes() == m2.to_bytes()
    assert Manifest.parse(m.to_bytes()) == m
    assert m.seq == 4


@pytest.mark.parametrize(
    ("override", "exc"),
    [
        ({"format": 2}, SnapshotInvalidError),
        ({"created_at": "yesterday"}, SnapshotInvalidError),
        ({"files": {}}, SnapshotInvalidError),
        ({"files": [{"path": "../x", "size": 1, "sha256": SHA}]}, UnsafePathError),
        ({"files": [{"path": ".sidecar/x", "size": 1, "sha256": SHA}]}, UnsafePathError),
        ({"files": [{"path": "a", "size": -1, "sha256": SHA}]}, SnapshotInvalidError),
        ({"files": [{"path": "a", "size": 1, "sha256": "nothex"}]}, SnapshotInvalidError),
        ({"files": [{"path": "a", "size": 1, "sha256": SHA}] * 2}, SnapshotInvalidError),
        (
            {
                "files": [
                    {"path": "a", "size": 1, "sha256": SHA},
                    {"path": "a/b", "size": 1, "sha256": SHA},
                ]
            },
            SnapshotInvalidError,
        ),
        (
            {
                "files": [
                    {
                        "path": "l",
                        "size": 0,
                        "sha256": SHA,
                        "type": "symlink",
                        "target": "../../etc",
                    }
                ]
            },
            UnsafePathError,
        ),
        (
            {
                "files": [
                    {"path": "l", "size": 0, "sha256": SHA, "type": "symlink", "target": "/etc"}
                ]
            },
            UnsafePathError,
        ),
    ],
)
def test_bad_manifests_are_refused(override: dict[str, object], exc: type[Exception]) -> None:
    """Every malformed or unsafe manifest raises with a reason."""
    with pytest.raises(exc):
        Manifest.parse(json.dumps(_doc(**override)).encode())


def test_setuid_bits_are_dropped() -> None:
    """Modes keep permission bits only."""
    m = Manifest.parse(
        json.dumps(_doc(files=[{"path": "x", "size": 1, "sha256": SHA, "mode": 0o4755}])).encode()
    )
    assert m.files["x"].mode == 0o755


def test_symlink_inside_root_is_allowed() -> None:
    """A relative symlink that stays inside the root is accepted."""
    m = Manifest.parse(
        json.dumps(
            _doc(
                files=[
                    {"path": "a/l", "size": 0, "sha256": SHA, "type": "symlink", "target": "../b"}
                ]
            )
        ).encode()
    )
    assert m.files["a/l"].target == "../b"


def test_limits_are_enforced() -> None:
    """Each of the three limits raises QuotaExceededError."""
    files = [FileEntry(path=f"f{i}", size=10, sha256=SHA) for i in range(3)]
    check_limits(files, Limits(max_bytes=30, max_files=3, max_file_bytes=10))
    for limits in (Limits(max_bytes=29), Limits(max_files=2), Limits(max_file_bytes=9)):
        with pytest.raises(QuotaExceededError):
            check_limits(files, limits)
