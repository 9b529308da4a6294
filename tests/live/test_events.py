"""Tests for sidecar.live.events: strict parsing and validation of delta events."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pytest

from sidecar.live.events import (
    BULK_APPLY,
    FILE_DELETE,
    FILE_UPDATE,
    SNAPSHOT_READY,
    DeltaEvent,
    InvalidEventError,
    known_event,
    parse_event,
)

DATA = b"hello\n"
SHA = hashlib.sha256(DATA).hexdigest()


def update(**over: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "file_path": "src/a.txt",
        "content": DATA.decode(),
        "content_hash": SHA,
        "version": 3,
        "seq": 7,
        "timestamp": 1_700_000_000_000,
    }
    payload.update(over)
    return {k: v for k, v in payload.items() if v is not None}


def test_update_with_text_content() -> None:
    """A file:update with UTF-8 content parses to one update change with bytes."""
    ev = parse_event(FILE_UPDATE, update(sender="ed"), {"id": "m1", "replayed": True})
    assert ev.event == FILE_UPDATE
    assert ev.seq == 7
    assert ev.timestamp == 1_700_000_000.0
    assert ev.sender == "ed"
    assert ev.meta_id == "m1"
    assert ev.replayed is True
    assert not ev.outbound
    (c,) = ev.changes
    assert (c.action, c.path, c.version, c.content, c.content_hash) == (
        "update",
        "src/a.txt",
        3,
        DATA,
        SHA,
    )
    assert c.content_url is None
    assert c.mode is None


def test_update_with_base64_content_tolerates_line_wrapping() -> None:
    """content_b64 is decoded, and Postgres-style line breaks inside it are accepted."""
    raw = bytes(range(256)) * 2
    b64 = base64.b64encode(raw).decode()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    payload = update(
        content=None, content_b64=wrapped, content_hash=hashlib.sha256(raw).hexdigest()
    )
    ev = parse_event(FILE_UPDATE, payload, None)
    assert ev.changes[0].content == raw


def test_update_with_empty_content_is_an_empty_file() -> None:
    """An empty string is valid content (an empty file)."""
    payload = update(content="", content_hash=hashlib.sha256(b"").hexdigest())
    assert parse_event(FILE_UPDATE, payload, None).changes[0].content == b""


def test_update_without_body_but_with_size_is_fetched_later() -> None:
    """A large file's update carries no body, only its size: it parses to a change whose
    body the Applier fetches from the database (get_project_file)."""
    ev = parse_event(FILE_UPDATE, update(content=None, size=300_000), {"id": "m1"})
    (c,) = ev.changes
    assert (c.content, c.content_url, c.size, c.needs_body) == (None, None, 300_000, True)
    assert not parse_event(FILE_UPDATE, update(size=6), None).changes[0].needs_body
    bulk = parse_event(
        BULK_APPLY,
        {"files": [{**update(content=None, size=9), "action": "update"}], "seq": 1},
        {"id": "m2"},
    )
    assert bulk.changes[0].needs_body


def test_update_with_content_url_hides_it_from_repr() -> None:
    """A content_url is kept for fetching but never shown in a repr (it is a signed URL)."""
    url = "https://storage.example/o/a.bin?token=SECRET"
    ev = parse_event(FILE_UPDATE, update(content=None, content_url=url), None)
    assert ev.changes[0].content_url == url
    assert ev.changes[0].content is None
    assert "SECRET" not in repr(ev)


def test_mode_keeps_permission_bits_only() -> None:
    """A mode with setuid bits keeps only the permission bits."""
    ev = parse_event(FILE_UPDATE, update(mode=0o4755), None)
    assert ev.changes[0].mode == 0o755


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1_700_000_000_123, 1_700_000_000.123),
        (1_700_000_000_123.5, 1_700_000_000.1235),
        ("2023-11-14T22:13:20Z", 1_700_000_000.0),
        ("2023-11-14T22:13:20.5+00:00", 1_700_000_000.5),
        ("2023-11-14 22:13:20+00", 1_700_000_000.0),
        ("2023-11-14T22:13:20", 1_700_000_000.0),
        (None, None),
    ],
)
def test_timestamp_forms(raw: object, expected: float | None) -> None:
    """Timestamps in ms epoch or ISO-8601 become unix seconds; a missing one is None."""
    ev = parse_event(FILE_DELETE, {"file_path": "a", "version": 1, "timestamp": raw}, None)
    assert ev.timestamp == pytest.approx(expected)


def test_delete() -> None:
    """A file:delete parses to one delete change; content fields are ignored."""
    ev = parse_event(FILE_DELETE, {"file_path": "./a/b", "version": 0}, None)
    (c,) = ev.changes
    assert (c.action, c.path, c.version, c.content) == ("delete", "a/b", 0, None)
    assert ev.seq is None


def test_bulk_mixes_updates_and_deletes() -> None:
    """A bulk:apply keeps its changes in order with their actions."""
    files = [
        {"action": "delete", "file_path": "old.txt", "version": 4},
        {**update(file_path="new.txt"), "action": "update"},
    ]
    ev = parse_event(BULK_APPLY, {"files": files, "seq": 9, "timestamp": 1}, None)
    assert [(c.action, c.path) for c in ev.changes] == [
        ("delete", "old.txt"),
        ("update", "new.txt"),
    ]
    assert ev.seq == 9


def test_snapshot_ready() -> None:
    """snapshot:ready carries its URL, id and optional sha256, and no changes."""
    payload = {"snapshot_url": "https://s/x.tar.zst?sig=1", "snapshot_id": "s2", "sha256": SHA}
    ev = parse_event(SNAPSHOT_READY, payload, None)
    assert (ev.snapshot_url, ev.snapshot_id, ev.sha256, ev.changes) == (
        "https://s/x.tar.zst?sig=1",
        "s2",
        SHA,
        (),
    )


@pytest.mark.parametrize("name", ["snapshot:request", "file:local-change", "file:conflict"])
def test_outbound_events_are_recognised_and_marked(name: str) -> None:
    """Our own outbound events parse to an outbound DeltaEvent without changes."""
    ev = parse_event(name, {"anything": [1, 2]}, {"id": "x"})
    assert ev == DeltaEvent(event=name, meta_id="x")
    assert ev.outbound


BAD_PATHS = [
    "../x",
    "a/../../x",
    "./../x",
    "a/./b",
    "a//b",
    "/etc/passwd",
    "C:/x",
    "a\\..\\b",
    "",
    "a\x00b",
    ".sidecar",
    ".sidecar/state.db",
    "./.sidecar/x",
    123,
    None,
]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_unsafe_or_reserved_paths_are_rejected(path: object) -> None:
    """Traversal, absolute, NUL, backslash, reserved and non-string paths are all rejected."""
    with pytest.raises(InvalidEventError):
        parse_event(FILE_UPDATE, update(file_path=path) | {"file_path": path}, None)


BAD_UPDATES: list[tuple[str, dict[str, Any]]] = [
    ("version missing", update(version=None)),
    ("version negative", update(version=-1)),
    ("version bool", update(version=True)),
    ("version float", update(version=1.0)),
    ("version string", update(version="3")),
    ("version too big", update(version=2**63)),
    ("no content", update(content=None)),
    ("no content, size not int", update(content=None, size="9")),
    ("size with two contents", update(content_url="https://x/y", size=9)),
    ("two contents", update(content_b64=base64.b64encode(DATA).decode())),
    ("content not str", update(content=["x"])),
    ("content lone surrogate", update(content="\ud800")),
    ("bad base64 alphabet", update(content=None, content_b64="aGVs$G8K")),
    ("bad base64 padding", update(content=None, content_b64="aGVsbG8")),
    ("base64 not str", update(content=None, content_b64=123)),
    ("url not http", update(content=None, content_url="file:///etc/passwd")),
    ("url without host", update(content=None, content_url="https:///x")),
    ("hash missing", update(content_hash=None)),
    ("hash uppercase", update(content_hash=SHA.upper())),
    ("hash short", update(content_hash=SHA[:63])),
    ("hash not str", update(content_hash=1)),
    ("mode string", update(mode="0644")),
    ("mode too big", update(mode=0o10000)),
    ("mode bool", update(mode=True)),
    ("seq negative", update(seq=-2)),
    ("seq string", update(seq="1")),
    ("timestamp bool", update(timestamp=True)),
    ("timestamp negative", update(timestamp=-1)),
    ("timestamp nan", update(timestamp=float("nan"))),
    ("timestamp words", update(timestamp="yesterday")),
    ("sender not str", update(sender=1)),
]


@pytest.mark.parametrize(("why", "payload"), BAD_UPDATES, ids=[b[0] for b in BAD_UPDATES])
def test_malformed_updates_are_rejected_and_counted(why: str, payload: dict[str, Any]) -> None:
    """Every ill-typed or missing field is rejected with a one-line reason."""
    with pytest.raises(InvalidEventError) as info:
        parse_event(FILE_UPDATE, payload, None)
    assert "\n" not in str(info.value)


BAD_BULKS: list[tuple[str, object]] = [
    ("files missing", None),
    ("files empty", []),
    ("files not list", {"a": 1}),
    ("item not object", ["x"]),
    ("bad action", [{"action": "move", "file_path": "a", "version": 1}]),
    ("no action", [{"file_path": "a", "version": 1}]),
    (
        "duplicate path",
        [
            {"action": "delete", "file_path": "a", "version": 1},
            {"action": "delete", "file_path": "./a", "version": 2},
        ],
    ),
    (
        "file and directory",
        [
            {**update(file_path="a"), "action": "update"},
            {**update(file_path="a/b"), "action": "update"},
        ],
    ),
    ("bad item", [{**update(content_hash="x"), "action": "update"}]),
]


@pytest.mark.parametrize(("why", "files"), BAD_BULKS, ids=[b[0] for b in BAD_BULKS])
def test_malformed_bulks_are_rejected(why: str, files: object) -> None:
    """A bulk needs a non-empty list of valid changes on distinct, compatible paths."""
    payload: dict[str, Any] = {"timestamp": 1}
    if files is not None:
        payload["files"] = files
    with pytest.raises(InvalidEventError):
        parse_event(BULK_APPLY, payload, None)


@pytest.mark.parametrize(
    "payload",
    [
        {"snapshot_id": "s"},
        {"snapshot_url": "ftp://x/y", "snapshot_id": "s"},
        {"snapshot_url": "https://x/y", "snapshot_id": ""},
        {"snapshot_url": "https://x/y", "snapshot_id": "s", "sha256": "ABC"},
    ],
)
def test_malformed_snapshot_ready_is_rejected(payload: dict[str, Any]) -> None:
    """snapshot:ready needs an http(s) snapshot_url, a snapshot_id and a well-formed sha256."""
    with pytest.raises(InvalidEventError):
        parse_event(SNAPSHOT_READY, payload, None)


@pytest.mark.parametrize("name", ["file:rename", "", "x" * 1000, "FILE:UPDATE", "presence"])
def test_unknown_events_are_rejected_under_one_label(name: str) -> None:
    """Unknown event names are rejected; the engine labels them event="unknown"."""
    with pytest.raises(InvalidEventError, match="unknown event"):
        parse_event(name, update(), None)
    assert not known_event(name)


def test_non_string_event_name_is_rejected() -> None:
    """An event name that is not a string is rejected, not crashed on (labelled "unknown")."""
    with pytest.raises(InvalidEventError):
        parse_event(["x"], update(), None)  # type: ignore[arg-type]
    assert not known_event(["x"])


@pytest.mark.parametrize(
    "meta",
    [{"replayed": "yes"}, {"id": 5}, ["not", "a", "mapping"]],
    ids=["replayed", "id", "list"],
)
def test_malformed_meta_is_rejected(meta: Any) -> None:
    """realtime-py meta must have a string id and a boolean replayed flag."""
    with pytest.raises(InvalidEventError):
        parse_event(FILE_UPDATE, update(), meta)


def test_payload_must_be_an_object() -> None:
    """A payload that is not a JSON object is rejected."""
    with pytest.raises(InvalidEventError):
        parse_event(FILE_UPDATE, ["x"], None)  # type: ignore[arg-type]
