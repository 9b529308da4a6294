"""The snapshot manifest (`.snapshot.json`, format 1): parsing, validation and serialisation."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeGuard

from sidecar.config import Limits
from sidecar.errors import QuotaExceededError, SnapshotInvalidError, UnsafePathError
from sidecar.paths import check_rel_path, is_reserved

__all__ = ["MANIFEST_NAME", "FileEntry", "Manifest", "check_limits"]

MANIFEST_NAME = ".snapshot.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One regular file (or symlink, when `target` is set) the snapshot promises."""

    path: str
    size: int
    sha256: str
    mode: int = 0o644
    version: int = 0
    target: str | None = None  # symlink target, relative to the link's directory

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"path": self.path, "size": self.size, "sha256": self.sha256,
                                  "mode": self.mode, "version": self.version}
        if self.target is not None:
            out["type"] = "symlink"
            out["target"] = self.target
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a snapshot contains; `seq` is the highest event sequence already included."""

    project_id: str
    snapshot_id: str
    created_at: int
    files: Mapping[str, FileEntry]
    seq: int | None = None
    format: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def to_bytes(self) -> bytes:
        """Deterministic JSON: sorted files, sorted keys, no whitespace variance."""
        doc: dict[str, object] = {
            "format": self.format, "project_id": self.project_id,
            "snapshot_id": self.snapshot_id, "created_at": self.created_at,
            "files": [self.files[p].to_json() for p in sorted(self.files)],
        }
        if self.seq is not None:
            doc["seq"] = self.seq
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        """Parse and validate; raise SnapshotInvalidError with a one-line reason."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise SnapshotInvalidError("manifest is larger than 64 MiB")
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotInvalidError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise SnapshotInvalidError("manifest is not a JSON object")
        if doc.get("format") != 1:
            raise SnapshotInvalidError(f"unsupported manifest format: {doc.get('format')!r}")
        for key in ("project_id", "snapshot_id"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise SnapshotInvalidError(f"manifest {key} must be a non-empty string")
        created = doc.get("created_at")
        if not _is_int(created) or created < 0:
            raise SnapshotInvalidError("manifest created_at must be an integer (ms epoch)")
        seq = doc.get("seq")
        if seq is not None and (not _is_int(seq) or seq < 0):
            raise SnapshotInvalidError("manifest seq must be a non-negative integer")
        items = doc.get("files")
        if not isinstance(items, list):
            raise SnapshotInvalidError("manifest files must be a list")
        files: dict[str, FileEntry] = {}
        for item in items:
            entry = _parse_entry(item)
            if entry.path in files:
                raise SnapshotInvalidError(f"manifest lists {entry.path!r} twice")
            files[entry.path] = entry
        _check_no_file_dir_clash(files)
        return cls(project_id=doc["project_id"], snapshot_id=doc["snapshot_id"],
                   created_at=created, files=files, seq=seq)


def check_limits(entries: Iterable[FileEntry], limits: Limits) -> None:
    """Raise QuotaExceededError when the files break a configured limit."""
    count = total = 0
    for e in entries:
        count += 1
        total += e.size
        if limits.max_file_bytes and e.size > limits.max_file_bytes:
            raise QuotaExceededError(
                f"{e.path!r} is {e.size} bytes, over SIDECAR_MAX_FILE_BYTES={limits.max_file_bytes}")
    if limits.max_files and count > limits.max_files:
        raise QuotaExceededError(f"{count} files, over SIDECAR_MAX_FILES={limits.max_files}")
    if limits.max_bytes and total > limits.max_bytes:
        raise QuotaExceededError(f"{total} bytes, over SIDECAR_MAX_BYTES={limits.max_bytes}")


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse_entry(item: object) -> FileEntry:
    if not isinstance(item, dict):
        raise SnapshotInvalidError("manifest file entry is not an object")
    try:
        path = check_rel_path(item.get("path"))
    except UnsafePathError as exc:
        raise UnsafePathError(f"manifest entry: {exc}") from None
    if path == MANIFEST_NAME or is_reserved(path):
        raise UnsafePathError(f"manifest lists a reserved path: {path!r}")
    size, sha, mode, version = (item.get(k) for k in ("size", "sha256", "mode", "version"))
    if not _is_int(size) or size < 0:
        raise SnapshotInvalidError(f"manifest entry {path!r}: size must be a non-negative integer")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise SnapshotInvalidError(f"manifest entry {path!r}: sha256 must be 64 lowercase hex")
    if mode is None:
        mode = 0o644
    if not _is_int(mode) or not 0 <= mode <= 0o7777:
        raise SnapshotInvalidError(f"manifest entry {path!r}: mode must be an integer permission")
    if version is None:
        version = 0
    if not _is_int(version) or version < 0:
        raise SnapshotInvalidError(f"manifest entry {path!r}: version must be a non-negative int")
    target = None
    if item.get("type", "file") == "symlink":
        target = item.get("target")
        if not isinstance(target, str) or not target or "\x00" in target:
            raise SnapshotInvalidError(f"manifest entry {path!r}: symlink needs a target")
        check_link_target(path, target)
    elif item.get("type", "file") != "file":
        raise SnapshotInvalidError(f"manifest entry {path!r}: unknown type {item.get('type')!r}")
    # setuid/setgid/sticky are dropped; only permission bits survive.
    return FileEntry(path=path, size=size, sha256=sha, mode=mode & 0o777, version=version,
                     target=target)


def check_link_target(path: str, target: str) -> None:
    """Raise UnsafePathError unless a symlink at path pointing to target stays inside the root."""
    if target.startswith("/"):
        raise UnsafePathError(f"symlink {path!r} points to an absolute path")
    depth = path.count("/")
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                raise UnsafePathError(f"symlink {path!r} points outside the project")
        elif part not in {"", "."}:
            depth += 1


def _check_no_file_dir_clash(files: Mapping[str, FileEntry]) -> None:
    for path in files:
        parent = path
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            if parent in files:
                raise SnapshotInvalidError(f"{parent!r} is both a file and a directory")
