"""ProjectTree: the one writer of rows and seq, live quota counters, and the snapshot rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import Limits
from sidecar.metrics import Metrics
from sidecar.tree.project import ProjectTree, snapshot_keeps
from sidecar.tree.state import FileState, StateStore

LIVE = FileState(5, "ab" * 32, 3, 0o644, seq=10)
GONE = FileState(5, None, 0, 0, seq=10)
PUSHED = FileState(5, "ab" * 32, 3, 0o644, seq=None)  # a local push whose event is pending


@pytest.mark.parametrize(
    ("known", "version", "snap_seq", "keeps"),
    [
        (None, 3, 7, False),  # unknown path: the snapshot's
        (LIVE, 4, 7, True),  # ours is newer: an older snapshot never takes it back
        (LIVE, 5, 7, False),  # same version: the snapshot's bytes (repairs damage)
        (LIVE, 6, 12, False),  # the snapshot's is newer
        (GONE, 4, 7, True),  # a tombstone wins over an older file
        (GONE, 5, 7, True),
        (GONE, 6, 12, False),  # re-created after the delete
        (LIVE, None, 7, True),  # created after the snapshot (row seq 10 > 7)
        (LIVE, None, 10, False),  # deleted by the time of the snapshot
        (LIVE, None, 12, False),
        (LIVE, None, None, False),  # a snapshot without seq cannot be placed: trusted
        (PUSHED, None, 12, True),  # our own push, not echoed yet: newer than any snapshot
        (GONE, None, 7, True),  # nothing to do
    ],
)
def test_snapshot_keeps(
    known: FileState | None, version: int | None, snap_seq: int | None, keeps: bool
) -> None:
    assert snapshot_keeps(known, version, snap_seq) is keeps


def test_commit_keeps_seq_monotonic_and_counts_live(tmp_path: Path) -> None:
    metrics = Metrics()
    tree = ProjectTree(tmp_path, StateStore(tmp_path / ".sidecar"), Limits(max_bytes=10), metrics)
    tree.commit({"a": FileState(1, "x", 4), "b": FileState(1, "y", 3)}, seq=5)
    assert (tree.seq, tree.quota.bytes, tree.quota.files) == (5, 7, 2)
    tree.commit({"a": FileState(2, None)}, seq=3)  # an older seq never moves it back
    assert (tree.seq, tree.quota.bytes, tree.quota.files) == (5, 3, 1)
    assert tree.state.get("a") == FileState(2, None)
    assert tree.quota.over(8, 1) == "11 bytes, over SIDECAR_MAX_BYTES=10"
    assert tree.quota.over(7, 1) is None
    assert (
        metrics.registry.get_sample_value(
            "sidecar_project_bytes", {"project_id": "local", "session_id": "local"}
        )
        == 3
    )
    tree.record_snapshot([("c", FileState(1, "z", 2, seq=4))], {"snapshot_id": "s"}, seq=4)
    assert (tree.seq, tree.snapshot_id, tree.quota.bytes) == (5, "s", 2)
    tree.close()


def test_state_written_before_per_path_seq_gets_the_last_seq(tmp_path: Path) -> None:
    """An older state.db (no seq column) is migrated: its rows were recorded at or before the
    meta seq, which is what the snapshot rule needs to know."""
    import sqlite3

    d = tmp_path / ".sidecar"
    d.mkdir()
    db = sqlite3.connect(d / "state.db")
    db.executescript(
        "CREATE TABLE files (path TEXT PRIMARY KEY, version INTEGER NOT NULL, sha256 TEXT,"
        " size INTEGER NOT NULL, mode INTEGER NOT NULL);"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO files VALUES ('a', 3, 'x', 1, 420);"
        "INSERT INTO meta VALUES ('seq', '42');"
    )
    db.commit()
    db.close()
    state = StateStore(d)
    known = state.get("a")
    assert known is not None
    assert known.seq == 42
    state.close()
