"""The one owner of PROJECT_DIR: its lock, its state rows, `seq` and the quota counters.

Every writer of the tree goes through a `ProjectTree` and writes only while `lock` is held:
the Applier (remote deltas), LocalSync (pushed versions, conflict copies, merges) and snapshot
publication (sidecar/snapshot/hydrate.py takes the lock around the publish step only, so a
download never blocks deltas). The watcher takes the same lock before it compares a file with
the state, so none of our writes is ever mistaken for a local change.

Records go through `commit` (deltas, local sync) or `record_snapshot` (a published snapshot):
those two are the only writers of the state's rows and of meta `seq`, and they keep the quota
counters current, so nobody rescans the state to learn the tree's size.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from sidecar.config import Limits
from sidecar.errors import EnvironmentFaultError
from sidecar.tree.state import FileState, StateStore

if TYPE_CHECKING:  # prometheus_client is not needed by the one-shot `sidecar hydrate`
    from sidecar.metrics import Metrics

__all__ = ["META_OWED", "ProjectTree", "Quota", "snapshot_keeps"]

log = structlog.get_logger("tree")

_UNSAVED = object()  # no owed-snapshot record waiting for a commit that succeeds

META_OWED = "resync.owed"  # {"reason", "needs"} while a snapshot must repair given-up events


def snapshot_keeps(known: FileState | None, version: int | None, snapshot_seq: int | None) -> bool:
    """True when the state's row for a path must survive a snapshot publish.

    `version` is the snapshot's version of the path (None: the snapshot does not have it),
    `snapshot_seq` the snapshot's seq. The version rule holds for snapshots as for events: a
    snapshot never takes a path back to an older version than the one applied, and a
    tombstone wins over an older file. A live path the snapshot lacks was either deleted
    before the snapshot (remove it) or created after it (keep it); the row's seq tells which.
    A row without a seq is a local push whose event has not come back yet (LocalSync records
    it; the Applier fills the seq in when the event arrives): it is newer than any snapshot.
    A snapshot without a seq cannot be placed, and is trusted as before.
    """
    if known is None:
        return False
    if version is None:
        if known.deleted:
            return True
        if snapshot_seq is None:
            return False
        return known.seq is None or known.seq > snapshot_seq
    if known.deleted:
        return known.version >= version
    return known.version > version


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class Quota:
    """Live byte and file counters of the tree against SIDECAR_MAX_* (0 = unlimited)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.bytes = 0
        self.files = 0

    def over(self, d_bytes: int, d_files: int) -> str | None:
        """Why growing the tree by (d_bytes, d_files) would break the quota, or None."""
        lim = self.limits
        if lim.max_bytes and d_bytes > 0 and self.bytes + d_bytes > lim.max_bytes:
            return f"{self.bytes + d_bytes} bytes, over SIDECAR_MAX_BYTES={lim.max_bytes}"
        if lim.max_files and d_files > 0 and self.files + d_files > lim.max_files:
            return f"{self.files + d_files} files, over SIDECAR_MAX_FILES={lim.max_files}"
        return None

    def file_too_big(self, path: str, size: int) -> str | None:
        lim = self.limits.max_file_bytes
        if lim and size > lim:
            return f"{path!r} is {size} bytes, over SIDECAR_MAX_FILE_BYTES={lim}"
        return None

    def _move(self, old: FileState | None, new: FileState | None) -> None:
        if old is not None and not old.deleted:
            self.bytes -= old.size
            self.files -= 1
        if new is not None and not new.deleted:
            self.bytes += new.size
            self.files += 1


class ProjectTree:
    """PROJECT_DIR, what the sidecar knows about it, and the lock every writer holds."""

    def __init__(
        self,
        root: Path,
        state: StateStore,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.state = state
        self.limits = limits or Limits()
        self.metrics = metrics
        self.lock = asyncio.Lock()
        # Hydrations of one tree run one at a time (a resync racing the start-up one).
        self.hydrating = asyncio.Lock()
        self.quota = Quota(self.limits)
        self._owed_pending: object = _UNSAVED
        if metrics is not None:
            metrics.quota_bytes.set(self.limits.max_bytes)
        self.recount()

    @classmethod
    def open(
        cls,
        root: Path,
        state_dir: Path,
        limits: Limits | None = None,
        metrics: Metrics | None = None,
    ) -> ProjectTree:
        return cls(root, StateStore(state_dir), limits, metrics)

    def close(self) -> None:
        self.state.close()

    # -- reads --

    def get(self, path: str) -> FileState | None:
        return self.state.get(path)

    @property
    def seq(self) -> int | None:
        """The last applied seq (meta "seq")."""
        return _int(self.state.meta("seq"))

    @property
    def snapshot_id(self) -> str | None:
        v = self.state.meta("snapshot_id")
        return v if isinstance(v, str) else None

    @property
    def created_at(self) -> int | None:
        """When the snapshot in place was made (ms), the replay `since` after a restart."""
        return _int(self.state.meta("created_at"))

    @property
    def owed_snapshot(self) -> tuple[str, int | None] | None:
        """(reason, oldest seq it must include) while a snapshot is owed: an event was given
        up (its seq is recorded as passed) until a snapshot repairs its paths. Kept here so a
        restart asks again instead of forgetting the repair."""
        v = self.state.meta(META_OWED)
        if not isinstance(v, dict) or not isinstance(v.get("reason"), str):
            return None
        return str(v["reason"]), _int(v.get("needs"))

    def owe_snapshot(self, reason: str | None, needs: int | None = None) -> None:
        """Record (or, with reason None, clear) the snapshot owed to the tree."""
        owed = None if reason is None else {"reason": reason, "needs": needs}
        if owed is None and self.state.meta(META_OWED) is None and self._owed_pending is _UNSAVED:
            return
        try:
            self.state.update(meta={META_OWED: owed})
        except EnvironmentFaultError as exc:
            # A full or read-only disk must not end the sidecar here: the request goes out
            # anyway, and the record only matters after a restart; the next commit that
            # succeeds carries it (tests/e2e/test_environment.py, the resync on a full disk).
            self._owed_pending = owed
            log.warning("tree.owed_snapshot_unsaved", reason=reason, error=str(exc))
        else:
            self._owed_pending = _UNSAVED

    # -- the only writers of rows and seq --

    def commit(
        self,
        records: Mapping[str, FileState | None] | None = None,
        *,
        seq: int | None = None,
        meta: Mapping[str, object] | None = None,
    ) -> None:
        """Record changed paths (and a newer `seq`) in one transaction; the caller holds `lock`
        when it wrote files. `seq` only moves forward."""
        records = records or {}
        extra: dict[str, object] = dict(meta or {})
        if self._owed_pending is not _UNSAVED:
            extra.setdefault(META_OWED, self._owed_pending)
        current = self.seq
        if seq is not None and (current is None or seq > current):
            extra["seq"] = seq
        if not records and not extra:
            return
        olds = [(self.state.get(p), new) for p, new in records.items()]
        self.state.update(records, extra)
        if META_OWED in extra:
            self._owed_pending = _UNSAVED
        for old, new in olds:
            self.quota._move(old, new)
        self._publish_metrics(bool(records), _int(extra.get("seq")))

    def record_snapshot(
        self,
        rows: Iterable[tuple[str, FileState]],
        meta: Mapping[str, object],
        seq: int | None,
    ) -> None:
        """Replace every row with a published snapshot's tree (see `snapshot_keeps` for the
        rows it kept); meta `seq` becomes the snapshot's only when that is newer."""
        extra = {k: v for k, v in meta.items() if k != "seq"}
        current = self.seq
        if seq is not None and (current is None or seq > current):
            extra["seq"] = seq
        self.state.replace_all(rows, extra)
        self.recount()
        if "seq" in extra:
            self._publish_metrics(False, seq)

    def recount(self) -> None:
        """Recompute the quota counters from the state (start-up, after a snapshot)."""
        live = self.state.live()
        self.quota.bytes = sum(s.size for s in live.values())
        self.quota.files = len(live)
        self._publish_metrics(True, None)

    def _publish_metrics(self, sizes: bool, seq: int | None) -> None:
        m = self.metrics
        if m is None:
            return
        if sizes:
            m.project_bytes.set(self.quota.bytes)
            m.project_files.set(self.quota.files)
        if seq is not None:
            m.last_seq.set(seq)
