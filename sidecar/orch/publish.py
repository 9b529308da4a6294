"""`sidecar snapshot publish`: the database's current files as a signed snapshot URL.

1. Read the project consistently (sidecar/orch/source.py) and build the format-1 snapshot into a
   temporary file with sidecar/snapshot/build.py, hashing it: the same files and seq give the
   same bytes, snapshot_id and sha256.
2. The object is content addressed, `{project}/{snapshot_id}.tar.zst` in the bucket: signing
   it first tells whether an earlier publish already uploaded it (Storage answers a missing
   object with statusCode 404), so an unchanged project is never uploaded twice. Otherwise
   upload it (a concurrent publisher's Duplicate is the same bytes, so that counts as done)
   and sign it.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
import structlog

from sidecar.errors import SidecarError, SnapshotUnavailableError
from sidecar.orch.source import ProjectChangedError, Reader, read_project
from sidecar.orch.storage import StorageClient, StorageError
from sidecar.retry import backoff_delay
from sidecar.snapshot.build import snapshot_id_for, write_files_snapshot
from sidecar.snapshot.manifest import Manifest

__all__ = [
    "Built",
    "Published",
    "build_from_database",
    "database_reader",
    "object_path",
    "publish",
]

log = structlog.get_logger(component="snapshot_publish")

_ATTEMPTS = 4
_READS = 5


@dataclass(frozen=True, slots=True)
class Built:
    """A snapshot written to `path`."""

    path: Path | None  # None: not written, its sha256 and size came from `known`
    manifest: Manifest
    sha256: str
    size: int


@dataclass(frozen=True, slots=True)
class Published:
    """What the orchestrator hands the container (SNAPSHOT_URL, SNAPSHOT_SHA256) and more."""

    snapshot_url: str
    sha256: str
    snapshot_id: str
    seq: int
    uploaded: bool
    size: int
    files: int
    built: bool = True  # False: the bytes were known (`known`), only signed

    def as_json(self) -> dict[str, Any]:
        return {
            "snapshot_url": self.snapshot_url,
            "sha256": self.sha256,
            "snapshot_id": self.snapshot_id,
            "seq": self.seq,
        }


def object_path(project_id: str, snapshot_id: str) -> str:
    """The object's path in the bucket: content addressed per project."""
    return f"{project_id}/{snapshot_id}.tar.zst"


class _HashingWriter:
    """A write-only file object that hashes and counts what passes to the real file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def database_reader(dsn: str) -> Reader:
    """Reads through a direct database connection (sidecar/orch/source.py read_project)."""
    return lambda project_id: read_project(dsn, project_id)


def build_from_database(
    read: Reader,
    project_id: str,
    out_dir: Path,
    *,
    level: int = 3,
    known: Mapping[str, tuple[str, int]] | None = None,
) -> Built:
    """Read the project and write its snapshot into a new file under out_dir (blocking); a
    read that saw the project change (the REST path) is done again, a few times at most.

    `known` maps snapshot_ids already built to (sha256, size): such a snapshot is not written
    again (the bytes are deterministic), so only the metadata is read.
    """
    for attempt in range(_READS):
        try:
            return _build_once(read, project_id, out_dir, level, known or {})
        except ProjectChangedError as exc:
            log.info("snapshot.project_changed", project_id=project_id, path=str(exc), read=attempt)
    raise SnapshotUnavailableError(
        f"project {project_id} changed during each of {_READS} reads; try again when it is quieter"
    )


def _build_once(
    read: Reader,
    project_id: str,
    out_dir: Path,
    level: int,
    known: Mapping[str, tuple[str, int]],
) -> Built:
    with read(project_id) as (state, open_file):
        snapshot_id = snapshot_id_for(project_id, state.created_at, state.files, state.seq)
        manifest = Manifest(project_id, snapshot_id, state.created_at, state.files, state.seq)
        if snapshot_id in known:
            sha256, size = known[snapshot_id]
            return Built(None, manifest, sha256, size)
        fd, name = tempfile.mkstemp(prefix=".publish-", suffix=".tar.zst", dir=out_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f)
                write_files_snapshot(writer, manifest, open_file, level=level)  # type: ignore[arg-type]
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return Built(path, manifest, writer.sha.hexdigest(), writer.size)


async def publish(
    project_id: str,
    *,
    read: Reader,
    storage: StorageClient,
    bucket: str,
    expires_in: int,
    work_dir: Path | None = None,
    level: int = 3,
    known: MutableMapping[str, tuple[str, int]] | None = None,
) -> Published:
    """Build, upload unless already there, and sign the project's snapshot.

    `known` (snapshot_id -> (sha256, size)) is a cache a long-running caller keeps: an
    unchanged project then costs a metadata read and a sign, no build.
    """
    started = time.monotonic()
    out_dir = work_dir or Path(tempfile.gettempdir())

    async def build(cache: Mapping[str, tuple[str, int]] | None) -> Built:
        return await asyncio.to_thread(
            build_from_database, read, project_id, out_dir, level=level, known=cache
        )

    built = await build(known)
    uploaded = False
    try:
        path = object_path(project_id, built.manifest.snapshot_id)
        try:
            url = await _retrying("sign", lambda: storage.sign(bucket, path, expires_in))
        except StorageError as exc:
            if not exc.not_found:
                raise
            if built.path is None:  # known, but the object is gone (deleted): build it again
                built = await build(None)
                path = object_path(project_id, built.manifest.snapshot_id)
            file = built.path
            assert file is not None
            try:
                await _retrying("upload", lambda: storage.upload(bucket, path, file))
                uploaded = True
            except StorageError as dup:
                if not dup.duplicate:  # a concurrent publisher stored the same bytes
                    raise
            url = await _retrying("sign", lambda: storage.sign(bucket, path, expires_in))
    finally:
        if built.path is not None:
            built.path.unlink(missing_ok=True)
    manifest = built.manifest
    if known is not None:
        known[manifest.snapshot_id] = (built.sha256, built.size)
    seq = manifest.seq if manifest.seq is not None else 0
    log.info(
        "snapshot.published",
        project_id=project_id,
        snapshot_id=manifest.snapshot_id,
        seq=seq,
        files=len(manifest.files),
        bytes=built.size,
        uploaded=uploaded,
        built=built.path is not None,
        seconds=round(time.monotonic() - started, 3),
    )
    return Published(
        url,
        built.sha256,
        manifest.snapshot_id,
        seq,
        uploaded,
        built.size,
        len(manifest.files),
        built=built.path is not None,
    )


async def _retrying(action: str, call: Any) -> Any:
    """Retry Storage's 5xx/429 answers and connection failures with capped backoff."""
    for attempt in range(_ATTEMPTS):
        try:
            return await call()
        except StorageError as exc:
            if not exc.retryable or attempt == _ATTEMPTS - 1:
                raise
            reason = str(exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if attempt == _ATTEMPTS - 1:
                raise SnapshotUnavailableError(f"storage {action} failed: {exc}") from None
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("snapshot.storage_retry", action=action, attempt=attempt + 1, reason=reason)
        await asyncio.sleep(backoff_delay(attempt + 1, 0.2, 5.0, floor=0.5))
    raise SidecarError("unreachable")
