"""What the sidecar knows about the tree on disk: file versions, hashes, tombstones, last seq.

Kept in SQLite under SIDECAR_STATE_DIR (WAL mode, so a per-event commit is cheap), mirrored in
memory for lookups. It shares fate with the files it describes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FileState", "StateStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
  path TEXT PRIMARY KEY,
  version INTEGER NOT NULL,
  sha256 TEXT,            -- NULL: a tombstone (deleted at this version)
  size INTEGER NOT NULL,
  mode INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class FileState:
    """The known version of a path; `sha256 is None` marks a tombstone."""

    version: int
    sha256: str | None
    size: int = 0
    mode: int = 0o644

    @property
    def deleted(self) -> bool:
        return self.sha256 is None


class StateStore:
    """Thread-safe persistent map path -> FileState plus a small key/value meta table."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "state.db"
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._files: dict[str, FileState] = {
            row[0]: FileState(row[1], row[2], row[3], row[4])
            for row in self._db.execute("SELECT path, version, sha256, size, mode FROM files")
        }
        self._meta: dict[str, object] = {
            k: json.loads(v) for k, v in self._db.execute("SELECT key, value FROM meta")
        }

    def close(self) -> None:
        with self._lock:
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

    def update(
        self,
        changes: Mapping[str, FileState | None] | None = None,
        meta: Mapping[str, object] | None = None,
    ) -> None:
        """Apply changes (None removes the row entirely) and meta updates atomically."""
        changes = changes or {}
        meta = meta or {}
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for path, st in changes.items():
                    if st is None:
                        self._db.execute("DELETE FROM files WHERE path=?", (path,))
                    else:
                        self._db.execute(
                            "INSERT OR REPLACE INTO files VALUES (?,?,?,?,?)",
                            (path, st.version, st.sha256, st.size, st.mode),
                        )
                for key, value in meta.items():
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value))
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
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
            self._db.execute("BEGIN")
            try:
                self._db.execute("DELETE FROM files")
                self._db.executemany(
                    "INSERT INTO files VALUES (?,?,?,?,?)",
                    ((p, s.version, s.sha256, s.size, s.mode) for p, s in new.items()),
                )
                for key, value in meta.items():
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta VALUES (?,?)", (key, json.dumps(value))
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._files = new
            self._meta.update(meta)
