"""The persistent state store: versions, tombstones, meta, and restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.errors import NoSpaceError, ReadOnlyError
from sidecar.tree.state import FileState, StateStore
from tests.fsfaults import fill, readonly_bind, tmpfs


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


def test_full_disk_commit_raises_a_named_fault_and_the_store_goes_on(tmp_path: Path) -> None:
    """On a full filesystem an update raises NoSpaceError naming state.db (no sqlite3 error, no
    'cannot rollback' from a second ROLLBACK), memory keeps the last committed state, and once
    space is freed the same store commits again."""
    with tmpfs(tmp_path / "disk", "256k") as disk:
        s = StateStore(disk / "state")
        s.update({"a": FileState(1, "1" * 64, 1)}, meta={"seq": 1})
        ballast = fill(disk)
        big = {f"f{i:05d}/" + "x" * 200: FileState(2, "2" * 64, 2) for i in range(2000)}
        with pytest.raises(NoSpaceError) as info:
            s.update(big, meta={"seq": 2})
        assert "state.db" in str(info.value)
        assert s.get("f00000/" + "x" * 200) is None
        assert s.meta("seq") == 1
        ballast.unlink()
        s.update({"b": FileState(3, "3" * 64, 3)}, meta={"seq": 3})
        s.close()
        t = StateStore(disk / "state")
        assert t.meta("seq") == 3
        assert t.get("a") == FileState(1, "1" * 64, 1)
        assert t.get("f00000/" + "x" * 200) is None
        t.close()


def test_read_only_state_dir_is_a_named_fault(tmp_path: Path) -> None:
    """A state directory on a read-only filesystem: ReadOnlyError naming the path."""
    ro = tmp_path / "ro"
    ro.mkdir()
    with readonly_bind(ro), pytest.raises(ReadOnlyError) as info:
        StateStore(ro / "state")
    assert str(ro / "state") in str(info.value)
