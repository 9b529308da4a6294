"""Parsing and strict validation of the delta events broadcast on the project's channel.

`parse_event` turns a broadcast (event name, payload, realtime-py meta) into a `DeltaEvent`, or
raises `InvalidEventError` with a one-line reason. Our own outbound events (`snapshot:request`,
`file:local-change`, `file:conflict`) come back to us on the same channel when the server echoes
broadcasts; they parse to a `DeltaEvent` with `outbound=True` and no changes, which the caller
skips (`Applier.apply` returns "ignored" for them and counts nothing).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

from sidecar.errors import InvalidEventError, UnsafePathError
from sidecar.redact import redact_url
from sidecar.tree.paths import check_rel_path, is_reserved

__all__ = [
    "FILE_DELETE",
    "FILE_UPDATE",
    "INBOUND_EVENTS",
    "OUTBOUND_EVENTS",
    "BULK_APPLY",
    "SNAPSHOT_READY",
    "DeltaEvent",
    "FileChange",
    "InvalidEventError",
    "known_event",
    "parse_event",
]

FILE_UPDATE = "file:update"
FILE_DELETE = "file:delete"
BULK_APPLY = "bulk:apply"
SNAPSHOT_READY = "snapshot:ready"
INBOUND_EVENTS = frozenset({FILE_UPDATE, FILE_DELETE, BULK_APPLY, SNAPSHOT_READY})
OUTBOUND_EVENTS = frozenset({"snapshot:request", "file:local-change", "file:conflict"})

MAX_INT = 2**63 - 1  # what SQLite's INTEGER holds
MAX_BULK_FILES = 100_000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_B64_SPACE = re.compile(r"[ \t\r\n]")  # Postgres encode(..., 'base64') wraps lines at 76 chars


@dataclass(frozen=True, slots=True)
class FileChange:
    """One change to one path: an update (with its bytes or a URL to them) or a delete."""

    action: Literal["update", "delete"]
    path: str
    version: int
    content: bytes | None = field(default=None, repr=False)
    content_url: str | None = field(default=None, repr=False)  # signed URL: never in a repr
    content_hash: str | None = None
    mode: int | None = None
    size: int | None = None  # the body's size, when the event says it

    @property
    def needs_body(self) -> bool:
        """An update that carries no body (large content): fetch it with get_project_file."""
        return self.action == "update" and self.content is None and self.content_url is None


@dataclass(frozen=True, slots=True)
class DeltaEvent:
    """A validated inbound event; `changes` is empty for snapshot:ready and outbound events."""

    event: str
    changes: tuple[FileChange, ...] = ()
    seq: int | None = None
    timestamp: float | None = None  # unix seconds
    sender: str | None = None
    meta_id: str | None = None
    replayed: bool = False
    snapshot_url: str | None = field(default=None, repr=False)
    snapshot_id: str | None = None
    sha256: str | None = None

    @property
    def outbound(self) -> bool:
        """True for our own event names echoed back to us; the caller skips these."""
        return self.event in OUTBOUND_EVENTS


def parse_event(
    event: str,
    payload: Mapping[str, Any],
    meta: Mapping[str, Any] | None,
) -> DeltaEvent:
    """Validate one broadcast and return its DeltaEvent.

    Raises:
        InvalidEventError: unknown event name, missing or ill-typed field, unsafe or reserved
            path, bad base64, bad hash format... The sync engine counts the rejection.
    """
    return _parse(event, payload, meta)


def known_event(event: object) -> bool:
    """Whether `event` is a name of the protocol (metrics label only those)."""
    return isinstance(event, str) and (event in INBOUND_EVENTS or event in OUTBOUND_EVENTS)


def _parse(event: str, payload: Mapping[str, Any], meta: Mapping[str, Any] | None) -> DeltaEvent:
    if not isinstance(event, str):
        raise InvalidEventError(f"event name is not a string: {type(event).__name__}")
    meta_id, replayed = _parse_meta(meta)
    if event in OUTBOUND_EVENTS:
        return DeltaEvent(event=event, meta_id=meta_id, replayed=replayed)
    if event not in INBOUND_EVENTS:
        raise InvalidEventError(f"unknown event {event[:64]!r}")
    if not isinstance(payload, Mapping):
        raise InvalidEventError(f"{event}: payload is not an object")
    seq = _opt_int(payload, "seq", event)
    timestamp = _timestamp(payload.get("timestamp"), event)
    sender = payload.get("sender")
    if sender is not None and not isinstance(sender, str):
        raise InvalidEventError(f"{event}: sender must be a string")
    common: dict[str, Any] = {
        "event": event,
        "seq": seq,
        "timestamp": timestamp,
        "sender": sender,
        "meta_id": meta_id,
        "replayed": replayed,
    }
    if event == FILE_UPDATE:
        return DeltaEvent(changes=(_change(payload, "update", event),), **common)
    if event == FILE_DELETE:
        return DeltaEvent(changes=(_change(payload, "delete", event),), **common)
    if event == BULK_APPLY:
        return DeltaEvent(changes=_bulk(payload), **common)
    return _snapshot_ready(payload, common)


def _parse_meta(meta: Mapping[str, Any] | None) -> tuple[str | None, bool]:
    if meta is None:
        return None, False
    if not isinstance(meta, Mapping):
        raise InvalidEventError("meta is not an object")
    meta_id = meta.get("id")
    if meta_id is not None and not isinstance(meta_id, str):
        raise InvalidEventError("meta.id must be a string")
    replayed = meta.get("replayed", False)
    if replayed is None:
        replayed = False
    if not isinstance(replayed, bool):
        raise InvalidEventError("meta.replayed must be a boolean")
    return meta_id, replayed


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(d: Mapping[str, Any], key: str, where: str) -> int | None:
    v = d.get(key)
    if v is None:
        return None
    if not _is_int(v) or not 0 <= v <= MAX_INT:
        raise InvalidEventError(f"{where}: {key} must be a non-negative integer")
    return int(v)


def _timestamp(v: object, where: str) -> float | None:
    """Milliseconds since the epoch (int/float) or an ISO-8601 string -> unix seconds."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise InvalidEventError(f"{where}: timestamp must be ms epoch or ISO-8601")
    if isinstance(v, int | float):
        if not math.isfinite(v) or v < 0:
            raise InvalidEventError(f"{where}: timestamp must be a non-negative ms epoch")
        return float(v) / 1000.0
    if isinstance(v, str) and len(v) <= 64:
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            pass
        else:
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            return dt.timestamp()
    raise InvalidEventError(f"{where}: timestamp must be ms epoch or ISO-8601")


def _path(d: Mapping[str, Any], where: str) -> str:
    raw = d.get("file_path")
    if raw is None:
        raise InvalidEventError(f"{where}: file_path is missing")
    try:
        path = check_rel_path(raw)
    except UnsafePathError as exc:
        raise InvalidEventError(f"{where}: {exc}") from None
    if is_reserved(path):
        raise InvalidEventError(f"{where}: reserved path {path!r}")
    return path


def _change(d: Mapping[str, Any], action: str, where: str) -> FileChange:
    if not isinstance(d, Mapping):
        raise InvalidEventError(f"{where}: change is not an object")
    path = _path(d, where)
    where = f"{where} {path!r}"
    version = _opt_int(d, "version", where)
    if version is None:
        raise InvalidEventError(f"{where}: version is missing")
    if action == "delete":
        return FileChange(action="delete", path=path, version=version)
    if action != "update":
        raise InvalidEventError(f"{where}: action must be 'update' or 'delete'")
    given = [k for k in ("content", "content_b64", "content_url") if d.get(k) is not None]
    size = _opt_int(d, "size", where)
    # Large content: the database sends no body, only its size (the sidecar fetches it).
    if len(given) > 1 or (not given and size is None):
        raise InvalidEventError(
            f"{where}: exactly one of content, content_b64, content_url is required"
            " (or none, with size, for a body fetched from the database)"
        )
    kind = given[0] if given else None
    content: bytes | None = None
    url: str | None = None
    if kind == "content":
        text = d["content"]
        if not isinstance(text, str):
            raise InvalidEventError(f"{where}: content must be a string")
        try:
            content = text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidEventError(f"{where}: content is not valid UTF-8 text") from None
    elif kind == "content_b64":
        b64 = d["content_b64"]
        if not isinstance(b64, str):
            raise InvalidEventError(f"{where}: content_b64 must be a string")
        try:
            content = base64.b64decode(_B64_SPACE.sub("", b64), validate=True)
        except (binascii.Error, ValueError):
            raise InvalidEventError(f"{where}: content_b64 is not valid base64") from None
    elif kind == "content_url":
        url = _http_url(d["content_url"], f"{where}: content_url")
    digest = d.get("content_hash")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
        raise InvalidEventError(f"{where}: content_hash must be 64 lowercase hex digits")
    mode = d.get("mode")
    if mode is not None and (not _is_int(mode) or not 0 <= mode <= 0o7777):
        raise InvalidEventError(f"{where}: mode must be an integer permission (0..0o7777)")
    return FileChange(
        action="update",
        path=path,
        version=version,
        content=content,
        content_url=url,
        content_hash=digest,
        mode=None if mode is None else mode & 0o777,
        size=size,
    )


def _http_url(v: object, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise InvalidEventError(f"{where} must be a non-empty string")
    try:
        parts = urlsplit(v)
    except ValueError:
        raise InvalidEventError(f"{where} is not a URL") from None
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise InvalidEventError(f"{where} must be an http(s) URL, got {redact_url(v)!r}")
    return v


def _bulk(payload: Mapping[str, Any]) -> tuple[FileChange, ...]:
    files = payload.get("files")
    if not isinstance(files, list) or not files:
        raise InvalidEventError(f"{BULK_APPLY}: files must be a non-empty list")
    if len(files) > MAX_BULK_FILES:
        raise InvalidEventError(f"{BULK_APPLY}: more than {MAX_BULK_FILES} files")
    changes: list[FileChange] = []
    seen: set[str] = set()
    for i, item in enumerate(files):
        where = f"{BULK_APPLY} files[{i}]"
        if not isinstance(item, Mapping):
            raise InvalidEventError(f"{where}: not an object")
        action = item.get("action")
        if action not in ("update", "delete"):
            raise InvalidEventError(f"{where}: action must be 'update' or 'delete'")
        change = _change(item, action, where)
        if change.path in seen:
            raise InvalidEventError(f"{where}: path {change.path!r} appears twice in the bulk")
        seen.add(change.path)
        changes.append(change)
    # Two updates where one path is a directory of the other can never both hold.
    updated = {c.path for c in changes if c.action == "update"}
    for path in updated:
        parent = path
        while "/" in parent:
            parent = parent.rpartition("/")[0]
            if parent in updated:
                raise InvalidEventError(
                    f"{BULK_APPLY}: {parent!r} is both a file and a directory in the bulk"
                )
    return tuple(changes)


def _snapshot_ready(payload: Mapping[str, Any], common: dict[str, Any]) -> DeltaEvent:
    url = _http_url(payload.get("snapshot_url"), f"{SNAPSHOT_READY}: snapshot_url")
    snapshot_id = payload.get("snapshot_id")
    if not isinstance(snapshot_id, str) or not snapshot_id:
        raise InvalidEventError(f"{SNAPSHOT_READY}: snapshot_id must be a non-empty string")
    sha = payload.get("sha256")
    if sha is not None and (not isinstance(sha, str) or not _HEX64.fullmatch(sha)):
        raise InvalidEventError(f"{SNAPSHOT_READY}: sha256 must be 64 lowercase hex digits")
    return DeltaEvent(snapshot_url=url, snapshot_id=snapshot_id, sha256=sha, **common)
