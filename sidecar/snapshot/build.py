"""The reference producer of the snapshot format: a directory into a deterministic .tar.zst.

The manifest `.snapshot.json` comes first, then directories and files in sorted order, as pax tar
with normalised metadata (uid/gid 0, no owner names, one fixed mtime), zstd compressed. The same
tree and the same arguments give the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import structlog
import zstandard

from sidecar.errors import ConfigError, SnapshotInvalidError, UnsafePathError
from sidecar.snapshot.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    check_link_target,
    check_symlink_chains,
)
from sidecar.tree.paths import STATE_DIR_NAME, check_rel_path

__all__ = [
    "build_snapshot",
    "parse_created_at",
    "snapshot_id_for",
    "source_date_epoch_ms",
    "tree_order",
    "write_files_snapshot",
]

log = structlog.get_logger(component="snapshot_build")

_COPY_CHUNK = 1 << 20
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Item:
    rel: str
    kind: str  # "d" | "f" | "l"
    abs: str


def build_snapshot(
    src_dir: Path,
    out: Path | BinaryIO,
    *,
    project_id: str,
    snapshot_id: str | None = None,
    created_at: int | None = None,
    seq: int | None = None,
    versions: Mapping[str, int] | None = None,
    level: int = 3,
) -> Manifest:
    """Write `src_dir` as a format-1 snapshot to `out` (a path, written atomically, or a stream).

    `created_at` (ms epoch) sets every member's mtime; it defaults to `SOURCE_DATE_EPOCH`
    (seconds, https://reproducible-builds.org/specs/source-date-epoch/) when that is set, else
    to now. `snapshot_id` defaults to a hash of the manifest (files, ids, created_at, seq), so a
    fixed created_at gives byte-for-byte the same output for the same tree. `versions`
    maps paths to `project_files.version` (default 0). The `.sidecar` dir is skipped. Raises
    UnsafePathError for a name or symlink the format cannot carry (a symlink leaving the tree,
    a backslash or non-UTF-8 name) and SnapshotInvalidError for special files or a file that
    changes while it is read.
    """
    src = Path(src_dir)
    if created_at is None:
        created_at = source_date_epoch_ms(os.environ)
    if created_at is None:
        created_at = int(time.time() * 1000)
    versions = versions or {}
    items = _walk(src)
    files: dict[str, FileEntry] = {}
    for item in items:
        if item.kind == "f":
            st = Path(item.abs).stat()
            with open(item.abs, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            files[item.rel] = FileEntry(
                item.rel, st.st_size, digest, mode, versions.get(item.rel, 0)
            )
        elif item.kind == "l":
            target = str(Path(item.abs).readlink())
            raw = _utf8(target, item.rel)
            check_link_target(item.rel, target)
            files[item.rel] = FileEntry(
                item.rel,
                len(raw),
                hashlib.sha256(raw).hexdigest(),
                0o777,
                versions.get(item.rel, 0),
                target=target,
            )
    check_symlink_chains({p: e.target for p, e in files.items() if e.target is not None})
    if snapshot_id is None:
        snapshot_id = snapshot_id_for(project_id, created_at, files, seq)
    manifest = Manifest(
        project_id=project_id, snapshot_id=snapshot_id, created_at=created_at, files=files, seq=seq
    )
    if isinstance(out, Path | str):
        dest = Path(out)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.urandom(4).hex()}")
        try:
            with open(tmp, "wb") as f:
                _write(f, manifest, items, level)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        _write(out, manifest, items, level)
    log.info(
        "snapshot_build.done", snapshot_id=snapshot_id, files=len(files), bytes=manifest.total_bytes
    )
    return manifest


def snapshot_id_for(
    project_id: str, created_at: int, files: Mapping[str, FileEntry], seq: int | None
) -> str:
    """The default snapshot_id: a hash of the manifest without its id (same content, same id)."""
    draft = Manifest(project_id, "", created_at, files, seq)
    return "sha256-" + hashlib.sha256(draft.to_bytes()).hexdigest()[:32]


def tree_order(path: str) -> tuple[bytes, ...]:
    """The sort key of the order `build_snapshot` walks a tree in: depth first, each directory's
    names by bytes (so "a/z" comes before "a.txt", unlike a plain string sort)."""
    return tuple(part.encode("utf-8") for part in path.split("/"))


def write_files_snapshot(
    out: BinaryIO,
    manifest: Manifest,
    open_file: Callable[[FileEntry], AbstractContextManager[BinaryIO]],
    *,
    level: int = 3,
) -> None:
    """Write manifest's regular files as a snapshot, reading each through open_file, in
    `tree_order` (open_file is called in that order, once per file), with the directory
    members `build_snapshot` writes for the same tree: the same files, ids, created_at and seq
    give the same bytes as `build_snapshot` of those files on disk with mode 0644.

    A reader whose bytes do not match the manifest's sha256 and size raises
    SnapshotInvalidError.
    """
    items: list[_Item] = []
    seen: set[str] = set()
    for path in sorted(manifest.files, key=tree_order):
        parts = path.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in seen:
                seen.add(parent)
                items.append(_Item(parent, "d", ""))
        items.append(_Item(path, "f", ""))
    _write(out, manifest, items, level, lambda item: open_file(manifest.files[item.rel]))


def source_date_epoch_ms(environ: Mapping[str, str]) -> int | None:
    """SOURCE_DATE_EPOCH (integer seconds) as ms, None when unset; ConfigError when malformed."""
    raw = environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ConfigError(f"SOURCE_DATE_EPOCH must be integer seconds since 1970, got {raw[:40]!r}")
    return int(raw) * 1000


def parse_created_at(text: str) -> int:
    """`--created-at`: ms since the epoch, or an ISO 8601 time (UTC unless it has an offset)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--created-at must be ms since 1970 or an ISO 8601 time, got {text[:40]!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(milliseconds=1)  # exact, unlike float seconds * 1000


def _utf8(name: str, rel: str) -> bytes:
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePathError(f"{rel!r}: name is not valid UTF-8") from None


def _walk(root: Path) -> list[_Item]:
    """Every directory, file and symlink under root, depth first, names sorted by bytes."""
    out: list[_Item] = []

    def visit(abs_dir: str, rel_dir: str) -> None:
        with os.scandir(abs_dir) as it:
            entries = sorted(it, key=lambda e: os.fsencode(e.name))
        for e in entries:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if not rel_dir and e.name == STATE_DIR_NAME:
                continue
            if not rel_dir and e.name == MANIFEST_NAME:
                raise UnsafePathError(f"{MANIFEST_NAME} is reserved for the manifest")
            _utf8(rel, rel)
            check_rel_path(rel)
            mode = e.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                out.append(_Item(rel, "l", e.path))
            elif stat.S_ISDIR(mode):
                out.append(_Item(rel, "d", e.path))
                visit(e.path, rel)
            elif stat.S_ISREG(mode):
                out.append(_Item(rel, "f", e.path))
            else:
                raise SnapshotInvalidError(f"{rel!r} is not a regular file, directory or symlink")

    visit(str(root), "")
    return out


class _HashingReader(io.RawIOBase):
    """Reads a file for tarfile while hashing it, so a file changed mid-build is caught."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.sha.update(data)
        return data


def _open_item(item: _Item) -> AbstractContextManager[BinaryIO]:
    return open(item.abs, "rb")


def _write(
    out: BinaryIO,
    manifest: Manifest,
    items: list[_Item],
    level: int,
    open_item: Callable[[_Item], AbstractContextManager[BinaryIO]] = _open_item,
) -> None:
    mtime = manifest.created_at // 1000
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True)
    with (
        cctx.stream_writer(out, closefd=False) as zw,
        tarfile.open(
            fileobj=zw, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8", bufsize=_COPY_CHUNK
        ) as tar,
    ):
        raw = manifest.to_bytes()
        tar.addfile(_info(MANIFEST_NAME, tarfile.REGTYPE, 0o644, mtime, len(raw)), io.BytesIO(raw))
        for item in items:
            if item.kind == "d":
                tar.addfile(_info(item.rel, tarfile.DIRTYPE, 0o755, mtime))
                continue
            entry = manifest.files[item.rel]
            if item.kind == "l":
                info = _info(item.rel, tarfile.SYMTYPE, 0o777, mtime)
                info.linkname = entry.target or ""
                tar.addfile(info)
                continue
            with open_item(item) as f:
                reader = _HashingReader(f)
                try:
                    tar.addfile(
                        _info(item.rel, tarfile.REGTYPE, entry.mode, mtime, entry.size), reader
                    )
                except OSError as exc:
                    raise SnapshotInvalidError(
                        f"{item.rel!r} changed while the snapshot was built: {exc}"
                    ) from None
                if reader.sha.hexdigest() != entry.sha256 or f.read(1):
                    raise SnapshotInvalidError(f"{item.rel!r} changed while the snapshot was built")


def _info(name: str, type_: bytes, mode: int, mtime: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = mode
    info.mtime = mtime
    info.size = size
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info
