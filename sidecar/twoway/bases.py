"""Last synced bytes of text files, kept for diffs (file:local-change) and three-way merges."""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from pathlib import Path

from sidecar.tree import fsio
from sidecar.twoway.merge import is_text

__all__ = ["DEFAULT_BASE_MAX_BYTES", "DEFAULT_BASE_MEMORY_BYTES", "BaseStore"]

DEFAULT_BASE_MAX_BYTES = 1024 * 1024
DEFAULT_BASE_MEMORY_BYTES = 32 * 1024 * 1024


class BaseStore:
    """Last synced bytes of text files, by sha256: a memory LRU in front of
    `root/<sha[:2]>/<sha256>` files.

    Copies of remote updates go to memory only (`persist=False`): a storm of updates costs no
    extra disk writes. An entry superseded by a newer version of its path is dropped; one
    evicted from memory while still possibly needed is written to disk, as is everything on
    `flush()` and every `persist=True` put.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int = DEFAULT_BASE_MAX_BYTES,
        memory_bytes: int = DEFAULT_BASE_MEMORY_BYTES,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.memory_bytes = memory_bytes
        self.puts = 0  # disk copies written since the last gc
        self._mem: OrderedDict[str, bytes] = OrderedDict()
        self._mem_size = 0

    def _path(self, sha: str) -> Path:
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        """True when the bytes with this sha256 are kept."""
        return sha in self._mem or self._path(sha).is_file()

    def get(self, sha: str | None) -> bytes | None:
        """The bytes whose sha256 is sha, or None (not kept, or damaged)."""
        if not sha:
            return None
        data = self._mem.get(sha)
        if data is not None:
            self._mem.move_to_end(sha)
            return data
        try:
            data = self._path(sha).read_bytes()
        except OSError:
            return None
        return data if hashlib.sha256(data).hexdigest() == sha else None

    def put(
        self,
        data: bytes,
        sha: str | None = None,
        *,
        persist: bool = False,
        replaces: str | None = None,
    ) -> None:
        """Keep data if it is text within the size cap (idempotent).

        `replaces`: the sha256 this version supersedes (dropped from memory).
        """
        if replaces and replaces != sha:
            self._drop(replaces)
        if len(data) > self.max_bytes:
            return
        sha = sha or hashlib.sha256(data).hexdigest()
        if sha in self._mem:
            self._mem.move_to_end(sha)
            if persist:
                self._write(sha, data)
            return
        if not is_text(data):
            return
        if persist:
            self._write(sha, data)
            return
        if self._path(sha).is_file():
            return
        self._mem[sha] = data
        self._mem_size += len(data)
        while self._mem_size > self.memory_bytes and len(self._mem) > 1:
            old, old_data = self._mem.popitem(last=False)
            self._mem_size -= len(old_data)
            self._write(old, old_data)

    def flush(self, keep: set[str] | None = None) -> int:
        """Move the copies held in memory to disk (only those in keep, if given); the count."""
        n = 0
        while self._mem:
            sha, data = self._mem.popitem(last=False)
            self._mem_size -= len(data)
            if keep is None or sha in keep:
                n += self._write(sha, data)
        return n

    def gc(self, keep: set[str]) -> int:
        """Remove every kept copy whose sha256 is not in keep; the number removed."""
        removed = 0
        self.puts = 0
        for sha in [s for s in self._mem if s not in keep]:
            self._drop(sha)
        if not self.root.is_dir():
            return 0
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name not in keep:
                    with contextlib.suppress(OSError):
                        f.unlink()
                        removed += 1
        return removed

    def _drop(self, sha: str) -> None:
        data = self._mem.pop(sha, None)
        if data is not None:
            self._mem_size -= len(data)

    def _write(self, sha: str, data: bytes) -> int:
        target = self._path(sha)
        if target.is_file():
            return 0
        self.puts += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = fsio.write_temp(target.parent, sha, data, 0o600)
        tmp.replace(target)
        return 1
