"""What the sidecar knows about the tree on disk: file versions, hashes, tombstones, last seq.

Kept in SQLite under SIDECAR_STATE_DIR (WAL mode, so a per-event commit is cheap), mirrored in
memory for lookups. It shares fate with the files it describes.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.errors import (
    EnvironmentFaultError,
    NoSpaceError,
    PermissionDeniedError,
    ReadOnlyError,
    environment_fault,
)

__all__ = ["FileState", "StateStore", "StateStoreError"]

# SQLite primary result codes (sqlite3.h) that say "the environment", not "our SQL".
_SQLITE_FAULTS: dict[int, type[EnvironmentFaultError]] = {
    3: PermissionDeniedError,  # SQLITE_PERM
    8: ReadOnlyError,  # SQLITE_READONLY
    10: EnvironmentFaultError,  # SQLITE_IOERR
    13: NoSpaceError,  # SQLITE_FULL
    14: EnvironmentFaultError,  # SQLITE_CANTOPEN (directory gone, unreadable, not writable)
    23: PermissionDeniedError,  # SQLITE_AUTH
}


class StateStoreError(EnvironmentFaultError):
    """The state database failed for another reason (corrupt, locked by another process)."""

    kind = "state_store"


def _wrap(exc: sqlite3.Error, path: Path, doing: str) -> EnvironmentFaultError:
    """Every sqlite3 error leaves this module as an EnvironmentFaultError naming state.db."""
    code = getattr(exc, "sqlite_errorcode", None)
    cls = _SQLITE_FAULTS.get(code & 0xFF, StateStoreError) if code is not None else StateStoreError
    fault = cls(f"{doing} {path}: {exc}", path=str(path))
    fault.__cause__ = exc
    return fault


_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  path TEXT PRIMARY KEY,
  version INTEGER NOT NULL,
  sha256 TEXT,            -- NULL: a tombstone (deleted at this version)
  size INTEGER NOT NULL,
  mode INTEGER NOT NULL,
  seq INTEGER             -- seq of the event (or snapshot) that set this row; NULL: unknown
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class FileState:
    """The known version of a path; `sha256 is None` marks a tombstone.

    `seq` is the project seq at which this row was recorded (the event's, or the snapshot's),
    None when unknown. A snapshot older than that seq must not remove the path (see
    sidecar/tree/project.py `snapshot_keeps`); it is bookkeeping, not identity, so two rows
    with the same version and bytes compare equal whatever their seq.
    """

    version: int
    sha256: str | None
    size: int = 0
    mode: int = 0o644
    seq: int | None = field(default=None, compare=False)

    @property
    def deleted(self) -> bool:
        return self.sha256 is None


class StateStore:
    """Thread-safe persistent map path -> FileState plus a small key/value meta table."""

    def __init__(self, state_dir: Path) -> None:
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise environment_fault(exc, state_dir, "creating the state directory") or exc from None
        self.path = state_dir / "state.db"
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path, "opening") from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(files)")}
            if "seq" not in columns:  # a state database written before per-path seq existed
                self._db.execute("ALTER TABLE files ADD COLUMN seq INTEGER")
                # Every row it holds was recorded at or before its last seq.
                self._db.execute(
                    "UPDATE files SET seq = "
                    "(SELECT CAST(value AS INTEGER) FROM meta WHERE key='seq')"
                )
            self._files: dict[str, FileState] = {
                row[0]: FileState(row[1], row[2], row[3], row[4], row[5])
                for row in self._db.execute(
                    "SELECT path, version, sha256, size, mode, seq FROM files"
                )
            }
            self._meta: dict[str, object] = {
                k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")
            }
        except sqlite3.Error as exc:
            self._db.close()
            raise _wrap(exc, self.path, "opening") from None

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- reads (from the in-memory mirror) --

    def get(self, path: str) -> FileState | None:
        return self._files.get(path)

    def items(self) -> Iterator[tuple[str, FileState]]:
        return iter(list(self._files.items()))

    def live(self) -> dict[str, FileState]:
        """Paths that exist (tombstones excluded)."""
        return {p: s for p, s in self._files.items() if not s.deleted}

    def total_bytes(self) -> int:
        return sum(s.size for s in self._files.values() if not s.deleted)

    def meta(self, key: str, default: object = None) -> object:
        return self._meta.get(key, default)

    # -- writes (one transaction each) --

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN ... COMMIT; on any failure roll back (if SQLite has not already: a failed
        COMMIT on a full disk ends the transaction itself) and raise an EnvironmentFaultError.
        The in-memory mirror is updated by the caller only after this returned."""
        try:
            self._db.execute("BEGIN")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _wrap(exc, self.path, "writing") from None

    def update(
        self,
        changes: Mapping[str, FileState | None] | None = None,
        meta: Mapping[str, object] | None = None,
    ) -> None:
        """Apply changes (None removes the row entirely) and meta updates atomically."""
        changes = changes or {}
        meta = meta or {}
        with self._lock:
            with self._transaction():
                for path, st in changes.items():
                    if st is None:
                        self._db.execute("DELETE FROM files WHERE path=?", (path,))
                    else:
                        self._db.execute(
                            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?)",
                            (path, st.version, st.sha256, st.size, st.mode, st.seq),
                        )
                for key, value in meta.items():
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value))
                    )
            for path, st in changes.items():
                if st is None:
                    self._files.pop(path, None)
                else:
                    self._files[path] = st
            self._meta.update(meta)

    def replace_all(
        self, files: Iterable[tuple[str, FileState]], meta: Mapping[str, object]
    ) -> None:
        """Forget everything and record a freshly published snapshot's tree."""
        new = dict(files)
        with self._lock:
            with self._transaction():
                self._db.execute("DELETE FROM files")
                self._db.executemany(
                    "INSERT INTO files VALUES (?,?,?,?,?,?)",
                    ((p, s.version, s.sha256, s.size, s.mode, s.seq) for p, s in new.items()),
                )
                for key, value in meta.items():
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value))
                    )
            self._files = new
            self._meta.update(meta)
