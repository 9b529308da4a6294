"""The persistent state store: versions, tombstones, meta, and restart."""

from __future__ import annotations

from pathlib import Path

from sidecar.tree.state import FileState, StateStore


def test_state_survives_reopen(tmp_path: Path) -> None:
    """What one StateStore records, a new one on the same directory reads back."""
    s = StateStore(tmp_path)
    s.update({"a": FileState(3, "0" * 64, 10), "b": FileState(4, None)}, meta={"seq": 7})
    s.close()
    t = StateStore(tmp_path)
    assert t.get("a") == FileState(3, "0" * 64, 10)
    assert t.get("b") is not None
    assert t.get("b").deleted  # type: ignore[union-attr]
    assert t.meta("seq") == 7
    assert t.live().keys() == {"a"}
    assert t.total_bytes() == 10


def test_replace_all_forgets_the_old_tree(tmp_path: Path) -> None:
    """replace_all records exactly the new tree and merges meta."""
    s = StateStore(tmp_path)
    s.update({"old": FileState(1, "1" * 64, 1)}, meta={"snapshot_id": "a"})
    s.replace_all([("new", FileState(2, "2" * 64, 2))], meta={"snapshot_id": "b"})
    assert s.get("old") is None
    assert s.get("new") == FileState(2, "2" * 64, 2)
    assert s.meta("snapshot_id") == "b"


def test_failed_update_changes_nothing(tmp_path: Path) -> None:
    """An update that fails mid-transaction leaves memory and disk as they were."""
    s = StateStore(tmp_path)
    s.update({"a": FileState(1, "1" * 64, 1)})
    bad = {"b": FileState(2, "2" * 64, 2), "c": FileState("x", "3" * 64, 3)}  # type: ignore[arg-type]
    try:
        s.update(bad, meta={"k": object()})
    except TypeError:
        pass
    assert s.get("b") is None
    assert StateStore(tmp_path).get("b") is None
