"""The snapshot manifest (`.snapshot.json`, format 1): parsing, validation and serialisation."""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

from sidecar.config import Limits
from sidecar.errors import QuotaExceededError, SidecarError, SnapshotInvalidError, UnsafePathError
from sidecar.snapshot.tarstream import BLOCK
from sidecar.tree.paths import MAX_PATH_BYTES, STATE_DIR_NAME, check_rel_path

__all__ = [
    "MANIFEST_NAME",
    "AdmittedManifest",
    "FileEntry",
    "Manifest",
    "admit_manifest",
    "check_limits",
    "check_symlink_chains",
    "decode_manifest",
    "is_plain_path",
]

MANIFEST_NAME = ".snapshot.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
# Paths that check_rel_path accepts unchanged, recognised in one regex match: ASCII components of
# 1-255 characters without "/", "\\", ":" or NUL that are not "." or "..". Anything else takes
# the full check_rel_path route (same verdict, slower).
_SAFE_PATH = re.compile(
    r"(?:(?!\.\.?/)[A-Za-z0-9._@+~=,#%!-]{1,255}/)*(?!\.\.?\Z)[A-Za-z0-9._@+~=,#%!-]{1,255}"
)
_RESERVED_PREFIX = STATE_DIR_NAME + "/"
_safe_path, _hex64 = _SAFE_PATH.fullmatch, _HEX64.fullmatch
_MODES: dict[int, int] = {}  # at most 512 keys: the permission bits


class FileEntry(NamedTuple):
    """One regular file (or symlink, when `target` is set) the snapshot promises.

    A NamedTuple rather than a frozen dataclass: a manifest makes one per file, and building a
    tuple costs a fraction of a frozen dataclass's `__init__` (see `_entry_hook`).
    """

    path: str
    size: int
    sha256: str
    mode: int = 0o644
    version: int = 0
    target: str | None = None  # symlink target, relative to the link's directory

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "path": self.path,
            "size": self.size,
            "sha256": self.sha256,
            "mode": self.mode,
            "version": self.version,
        }
        if self.target is not None:
            out["type"] = "symlink"
            out["target"] = self.target
        return out


_new_entry = tuple.__new__  # FileEntry from a 6-tuple, without NamedTuple's Python-level __new__


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
            "format": self.format,
            "project_id": self.project_id,
            "snapshot_id": self.snapshot_id,
            "created_at": self.created_at,
            "files": [self.files[p].to_json() for p in sorted(self.files)],
        }
        if self.seq is not None:
            doc["seq"] = self.seq
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def parse(cls, raw: bytes | str) -> Manifest:
        """Parse and validate; raise SnapshotInvalidError with a one-line reason.

        `raw` may also be the text from `decode_manifest` (lets a caller free the bytes first).
        """
        return cls._parse_counted(raw)[0]

    @classmethod
    def _parse_counted(cls, raw: bytes | str) -> tuple[Manifest, int]:
        """(the manifest, how many distinct parent directories its paths have)."""
        if len(raw) > MAX_MANIFEST_BYTES:
            raise SnapshotInvalidError("manifest is larger than 64 MiB")
        # Tens of thousands of new objects, none in a reference cycle: without the cyclic GC
        # the parse is about a third faster.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return cls._parse(raw)
        finally:
            if gc_was_enabled:
                gc.enable()

    @classmethod
    def _parse(cls, raw: bytes | str) -> tuple[Manifest, int]:
        try:
            # File entries become FileEntry objects as the decoder meets them, so the
            # document never holds tens of thousands of dicts at once.
            doc = json.loads(raw, object_hook=_entry_hook)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotInvalidError(f"manifest is not valid JSON: {exc}") from None
        if type(doc) is FileEntry:  # a bare entry-shaped object: no "format" key
            raise SnapshotInvalidError("unsupported manifest format: None")
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
        # Every item the hook made an entry (the common case): one dict build, and a size check
        # for duplicates. Else, or with a duplicate, item by item in document order, to raise
        # the first error (an item the hook left a dict is parsed again for its reason).
        files: dict[str, FileEntry] = {}
        if all(type(item) is FileEntry for item in items):
            files = {item[0]: item for item in items}
        if len(files) != len(items):
            files = {}
            for item in items:
                entry = item if type(item) is FileEntry else _parse_entry(item)
                if entry.path in files:
                    raise SnapshotInvalidError(f"manifest lists {entry.path!r} twice")
                files[entry.path] = entry
        project_id, snapshot_id = doc["project_id"], doc["snapshot_id"]
        del items, doc
        parent_dirs = _check_no_file_dir_clash(files)
        manifest = cls(
            project_id=project_id, snapshot_id=snapshot_id, created_at=created, files=files, seq=seq
        )
        return manifest, parent_dirs


def is_plain_path(path: str) -> bool:
    """True when check_rel_path(path) would return path unchanged (fast and conservative: a
    False only means "run the full check")."""
    return len(path) <= MAX_PATH_BYTES and _SAFE_PATH.fullmatch(path) is not None


def decode_manifest(raw: bytes | bytearray) -> str:
    """The manifest's text, decoded exactly as json.loads would; SnapshotInvalidError if it cannot."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotInvalidError("manifest is larger than 64 MiB")
    try:
        return raw.decode(json.detect_encoding(raw), "surrogatepass")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotInvalidError(f"manifest is not valid JSON: {exc}") from None


def check_limits(entries: Iterable[FileEntry], limits: Limits) -> None:
    """Raise QuotaExceededError when the files break a configured limit."""
    count = total = 0
    for e in entries:
        count += 1
        total += e.size
        if limits.max_file_bytes and e.size > limits.max_file_bytes:
            raise QuotaExceededError(
                f"{e.path!r} is {e.size} bytes, over SIDECAR_MAX_FILE_BYTES={limits.max_file_bytes}"
            )
    if limits.max_files and count > limits.max_files:
        raise QuotaExceededError(f"{count} files, over SIDECAR_MAX_FILES={limits.max_files}")
    if limits.max_bytes and total > limits.max_bytes:
        raise QuotaExceededError(f"{total} bytes, over SIDECAR_MAX_BYTES={limits.max_bytes}")


def _is_int(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry_hook(obj: dict[str, Any]) -> object:
    """json object_hook: a valid file entry becomes a FileEntry; anything else stays a dict."""
    if len(obj) == 5:
        # The common shape ({mode, path, sha256, size, version}: a plain file) with clearly valid
        # values is accepted here in one go, without a further call; anything else gets the
        # checks of _parse_entry, which give the same verdict with a precise reason.
        get = obj.get
        path, size, sha, mode, version = (
            get("path"),
            get("size"),
            get("sha256"),
            get("mode"),
            get("version"),
        )
        if (
            type(path) is str
            and type(size) is int
            and type(sha) is str
            and type(mode) is int
            and type(version) is int
            and size >= 0
            and version >= 0
            and 0 <= mode <= 0o7777
            and len(path) <= MAX_PATH_BYTES
            and _safe_path(path) is not None
            and _hex64(sha) is not None
            and path != MANIFEST_NAME
            and path != STATE_DIR_NAME
            and not path.startswith(_RESERVED_PREFIX)
        ):
            mode &= 0o777
            entry: FileEntry = _new_entry(
                FileEntry, (path, size, sha, _MODES.setdefault(mode, mode), version, None)
            )
            return entry
    if "path" not in obj or "format" in obj:
        return obj
    try:
        return _parse_entry(obj)
    except SidecarError:
        return obj  # Manifest.parse raises it again if the object is in the file list


def _parse_entry(item: object) -> FileEntry:
    if type(item) is not dict:
        raise SnapshotInvalidError("manifest file entry is not an object")
    path = item.get("path")
    if type(path) is not str or len(path) > MAX_PATH_BYTES or _SAFE_PATH.fullmatch(path) is None:
        try:
            path = check_rel_path(path)
        except UnsafePathError as exc:
            raise UnsafePathError(f"manifest entry: {exc}") from None
    if path in (MANIFEST_NAME, STATE_DIR_NAME) or path.startswith(_RESERVED_PREFIX):
        raise UnsafePathError(f"manifest lists a reserved path: {path!r}")
    get = item.get
    size, sha, mode, version = get("size"), get("sha256"), get("mode", 0o644), get("version", 0)
    if type(size) is not int or size < 0:
        raise SnapshotInvalidError(f"manifest entry {path!r}: size must be a non-negative integer")
    if type(sha) is not str or _HEX64.fullmatch(sha) is None:
        raise SnapshotInvalidError(f"manifest entry {path!r}: sha256 must be 64 lowercase hex")
    if mode is None:
        mode = 0o644
    if type(mode) is not int or not 0 <= mode <= 0o7777:
        raise SnapshotInvalidError(f"manifest entry {path!r}: mode must be an integer permission")
    if version is None:
        version = 0
    if type(version) is not int or version < 0:
        raise SnapshotInvalidError(f"manifest entry {path!r}: version must be a non-negative int")
    kind = get("type", "file")
    target = None
    if kind == "symlink":
        target = get("target")
        if not isinstance(target, str) or not target or "\x00" in target:
            raise SnapshotInvalidError(f"manifest entry {path!r}: symlink needs a target")
        check_link_target(path, target)
    elif kind != "file":
        raise SnapshotInvalidError(f"manifest entry {path!r}: unknown type {kind!r}")
    # setuid/setgid/sticky are dropped; only permission bits survive. One int object per
    # distinct mode (json makes a new one for every 420), which saves memory on big manifests.
    mode &= 0o777
    return FileEntry(path, size, sha, _MODES.setdefault(mode, mode), version, target)


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


def _check_no_file_dir_clash(files: Mapping[str, FileEntry]) -> int:
    """Raise if a path is also another one's parent; else the number of parent directories."""
    dirs: set[str] = set()
    add = dirs.add
    for path in files:
        parent = path.rpartition("/")[0]
        while parent and parent not in dirs:
            add(parent)
            parent = parent.rpartition("/")[0]
    if dirs.isdisjoint(files):
        return len(dirs)
    for path in files:  # name the first clash in file order
        parent = path
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            if parent in files:
                raise SnapshotInvalidError(f"{parent!r} is both a file and a directory")
    raise AssertionError("unreachable: dirs and files intersect")  # pragma: no cover


def check_symlink_chains(links: Mapping[str, str]) -> None:
    """Raise UnsafePathError if a symlink (path -> target) resolves outside the root when the
    other symlinks of the same tree are followed (`a -> d/l/..` with `d/l -> ..` escapes)."""
    for path in links:
        resolved = path.split("/")[:-1]  # a link's parents are real directories
        parts = deque(links[path].split("/"))
        hops = 0
        while parts:
            part = parts.popleft()
            if part in {"", "."}:
                continue
            if part == "..":
                if not resolved:
                    raise UnsafePathError(f"symlink {path!r} resolves outside the project")
                resolved.pop()
                continue
            resolved.append(part)
            target = links.get("/".join(resolved))
            if target is not None:
                hops += 1
                if hops > 40 or target.startswith("/"):
                    raise UnsafePathError(f"symlink {path!r} loops or leaves the project")
                resolved.pop()
                parts.extendleft(reversed(target.split("/")))


@dataclass(frozen=True, slots=True)
class AdmittedManifest:
    """A snapshot's manifest that passed `admit_manifest`, with the sizes that bound the stream."""

    manifest: Manifest
    archive_bytes: int  # tar data blocks its file members occupy
    total_bytes: int  # the sum of its file sizes
    parent_dirs: int  # distinct parent directories of its paths


def admit_manifest(
    raw: bytearray, limits: Limits, *, project_id: str | None, reserved_top: str | None
) -> AdmittedManifest:
    """Parse a snapshot's manifest member and check it before any file body is written.

    Refuses (SnapshotInvalidError, UnsafePathError, QuotaExceededError) a manifest for another
    project, a symlink entry whose size and sha256 are not its target's, a path inside the
    sidecar's state directory (`reserved_top`, the project's top-level entry holding staging),
    a symlink chain that leaves the project, and one over `limits`. Clears `raw` once decoded.
    """
    text = decode_manifest(raw)
    raw.clear()  # release the bytes before the entries are built (lower peak memory)
    manifest, parent_dirs = Manifest._parse_counted(text)
    del text
    if project_id is not None and manifest.project_id != project_id:
        raise SnapshotInvalidError(
            f"snapshot is for project {manifest.project_id!r}, not {project_id!r}"
        )
    files = manifest.files
    links: dict[str, str] = {}
    data = total = 0  # archive bytes the file members occupy; their sizes
    for entry in files.values():
        size = entry.size
        total += size
        data += size + (-size % BLOCK)
        if entry.target is not None:
            target = entry.target.encode()
            if entry.sha256 != hashlib.sha256(target).hexdigest() or size != len(target):
                raise SnapshotInvalidError(
                    f"manifest entry {entry.path!r}: a symlink's size and sha256 must be "
                    "those of its target"
                )
            links[entry.path] = entry.target
    top = reserved_top
    if top is not None and top != STATE_DIR_NAME:  # Manifest.parse refuses .sidecar already
        for p in files:
            if p == top or p.startswith(top + "/"):
                raise UnsafePathError(f"{p!r} is inside the sidecar's state directory")
    check_symlink_chains(links)
    check_limits(files.values(), limits)
    return AdmittedManifest(manifest, data, total, parent_dirs)
