"""The migration's RPCs on a real PostgreSQL, called the way PostgREST calls them.

Statuses are PostgREST's (sidecar/testing/pgrst.py maps SQLSTATE to HTTP as its Error.hs does).
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from typing import Any

import psycopg
import pytest

from sidecar.testing.pgrst import RpcError, call_rpc

from ..pgfixtures import Db

pytestmark = pytest.mark.pg

SERVICE = {"role": "service_role"}


def token(project: str, **extra: Any) -> dict[str, Any]:
    return {"role": "authenticated", "project_id": project, "session_id": "sess-1", **extra}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def events(db: Db, project: str) -> list[tuple[int, str, dict[str, Any]]]:
    rows = await db.sql(
        "select seq, event, payload from sidecar.events where project_id = %s order by seq",
        project,
    )
    return [(int(r[0]), str(r[1]), r[2]) for r in rows]


async def messages(db: Db, project: str) -> list[tuple[str, dict[str, Any], bool]]:
    rows = await db.sql(
        "select event, payload, private from realtime.messages where topic = %s"
        " order by inserted_at",
        f"project:{project}",
    )
    return [(str(r[0]), r[1], bool(r[2])) for r in rows]


async def test_upsert_answers_and_broadcasts_the_contract_event(db: Db, project: str) -> None:
    status, body = await db.call(
        "upsert_project_file",
        token(project),
        project_uuid=project,
        p_file_path="src/a.ts",
        p_content="export {}\n",
    )
    assert status == 200
    assert body == {
        "file_path": "src/a.ts",
        "version": 1,
        "seq": 1,
        "content_hash": sha(b"export {}\n"),
    }
    [(event, payload, private)] = await messages(db, project)
    assert (event, private) == ("file:update", True)
    assert payload["id"]  # realtime.send's id, which Realtime also sends as meta.id
    assert {k: payload[k] for k in ("file_path", "version", "seq", "content", "sender")} == {
        "file_path": "src/a.ts",
        "version": 1,
        "seq": 1,
        "content": "export {}\n",
        "sender": "sess-1",
    }
    assert payload["content_hash"] == sha(b"export {}\n")
    assert isinstance(payload["timestamp"], int)
    [(seq, ev, logged)] = await events(db, project)
    assert (seq, ev) == (1, "file:update")
    assert logged == {k: v for k, v in payload.items() if k != "id"}


async def test_identical_bytes_are_a_no_op_without_seq_or_event(db: Db, project: str) -> None:
    args = {"project_uuid": project, "p_file_path": "a.txt", "p_content": "same"}
    assert (await db.call("upsert_project_file", token(project), **args))[1]["seq"] == 1
    status, body = await db.call("upsert_project_file", token(project), **args)
    assert status == 200
    assert body == {"file_path": "a.txt", "version": 1, "seq": None, "content_hash": sha(b"same")}
    assert len(await messages(db, project)) == 1
    assert len(await events(db, project)) == 1


async def test_expected_version_rules_and_the_409_body(db: Db, project: str) -> None:
    t = token(project)
    base = {"project_uuid": project, "p_file_path": "f"}
    assert (await db.call("upsert_project_file", t, **base, p_content="1", expected_version=0))[
        0
    ] == 200
    status, body = await db.call(
        "upsert_project_file", t, **base, p_content="2", expected_version=0
    )
    assert status == 409
    assert body["code"] == "PT409"
    assert body["message"] == "version conflict"
    assert json.loads(body["details"]) == {
        "file_path": "f",
        "expected_version": 0,
        "current_version": 1,
    }
    # A tombstone keeps its version; an upsert over it takes the next one.
    assert (await db.call("delete_project_file", t, **base, expected_version=1))[1]["version"] == 2
    assert (await db.call("upsert_project_file", t, **base, p_content="3", expected_version=0))[
        0
    ] == 409
    status, body = await db.call(
        "upsert_project_file", t, **base, p_content="3", expected_version=2
    )
    assert (status, body["version"], body["seq"]) == (200, 3, 3)
    # Deleting what is already gone is a no-op with the head's version.
    await db.call("delete_project_file", t, **base)
    status, body = await db.call("delete_project_file", t, **base)
    assert (status, body["version"], body["seq"]) == (200, 4, None)
    assert [s for s, _, _ in await events(db, project)] == [1, 2, 3, 4]


async def test_unknown_project_writes_404_reads_nothing(db: Db) -> None:
    other = str(uuid.uuid4())
    t = token(other)
    status, body = await db.call(
        "upsert_project_file", t, project_uuid=other, p_file_path="a", p_content="x"
    )
    assert (status, body["code"]) == (404, "PT404")
    assert (await db.call("delete_project_file", t, project_uuid=other, p_file_path="a"))[0] == 404
    assert await db.call("get_project_file", t, project_uuid=other, p_file_path="a") == (200, None)
    assert await db.call("list_current_files", t, project_uuid=other) == (200, [])
    assert await db.call("project_snapshot", t, project_uuid=other) == (200, None)
    assert await db.call("project_events_since", t, project_uuid=other, after_seq=0) == (200, [])


async def test_register_project_is_idempotent_and_service_only(db: Db) -> None:
    pid = str(uuid.uuid4())
    assert await db.call("register_project", SERVICE, project_uuid=pid) == (
        200,
        {"project_id": pid, "seq": 0},
    )
    await db.call("upsert_project_file", SERVICE, project_uuid=pid, p_file_path="a", p_content="x")
    assert await db.call("register_project", SERVICE, project_uuid=pid) == (
        200,
        {"project_id": pid, "seq": 1},
    )
    status, body = await db.call("register_project", token(pid), project_uuid=pid)
    assert (status, body["code"]) == (403, "42501")


async def test_binary_round_trip(db: Db, project: str) -> None:
    data = bytes(range(256)) * 7 + b"\x00\xff"
    encoded = base64.encodebytes(data).decode()  # with line breaks, as some encoders write
    status, body = await db.call(
        "upsert_project_file",
        token(project),
        project_uuid=project,
        p_file_path="img.png",
        p_content=encoded,
        p_file_type="binary",
    )
    assert (status, body["content_hash"]) == (200, sha(data))
    status, got = await db.call(
        "get_project_file", token(project), project_uuid=project, p_file_path="img.png"
    )
    assert status == 200
    assert base64.b64decode(got["content_b64"]) == data
    assert "\n" not in got["content_b64"]
    assert (got["file_type"], got["size"], got["deleted"]) == ("binary", len(data), False)
    [(_, payload, _)] = await messages(db, project)
    assert base64.b64decode(payload["content_b64"]) == data
    # The same bytes in another base64 spelling are still the same bytes: a no-op.
    status, body = await db.call(
        "upsert_project_file",
        token(project),
        project_uuid=project,
        p_file_path="img.png",
        p_content=base64.b64encode(data).decode(),
        p_file_type="binary",
    )
    assert body["seq"] is None
    status, body = await db.call(
        "upsert_project_file",
        token(project),
        project_uuid=project,
        p_file_path="bad",
        p_content="***",
        p_file_type="binary",
    )
    assert (status, body["code"]) == (400, "22023")


async def test_unicode_text_hash_is_of_the_utf8_bytes(db: Db, project: str) -> None:
    text = "héllo wörld ✓ 🎉\n"
    _, body = await db.call(
        "upsert_project_file",
        token(project),
        project_uuid=project,
        p_file_path="u.txt",
        p_content=text,
    )
    assert body["content_hash"] == sha(text.encode())
    _, got = await db.call(
        "get_project_file", token(project), project_uuid=project, p_file_path="u.txt"
    )
    assert got["size"] == len(text.encode())
    assert got["content"] == text


@pytest.mark.parametrize(
    "path",
    ["", "/abs", "a/../b", "./a", "a//b", "a/", "C:/x", "a\\b", ".sidecar/state", "x" * 300],
)
async def test_bad_paths_are_refused(db: Db, project: str, path: str) -> None:
    status, body = await db.call(
        "upsert_project_file",
        token(project),
        project_uuid=project,
        p_file_path=path,
        p_content="x",
    )
    assert (status, body["code"]) == (400, "22023")
    assert await messages(db, project) == []


async def test_a_path_cannot_be_both_file_and_directory(db: Db, project: str) -> None:
    t = token(project)
    await db.call("upsert_project_file", t, project_uuid=project, p_file_path="a/b", p_content="1")
    for path in ("a", "a/b/c"):
        status, body = await db.call(
            "upsert_project_file", t, project_uuid=project, p_file_path=path, p_content="2"
        )
        assert (status, body["code"]) == (400, "22023"), path
    # A bulk may replace the directory by a file: deletes apply before the check.
    status, body = await db.call(
        "bulk_upsert_project_files",
        t,
        project_uuid=project,
        files=[{"file_path": "a", "content": "f"}, {"file_path": "a/b", "action": "delete"}],
    )
    assert status == 200, body
    assert [e for _, e, _ in await events(db, project)] == ["file:update", "bulk:apply"]


async def test_bulk_is_all_or_nothing_with_one_seq(db: Db, project: str) -> None:
    t = token(project)
    await db.call("upsert_project_file", t, project_uuid=project, p_file_path="keep", p_content="k")
    status, body = await db.call(
        "bulk_upsert_project_files",
        t,
        project_uuid=project,
        files=[
            {"file_path": "new1", "content": "1"},
            {"file_path": "keep", "content": "x", "expected_version": 7},
        ],
    )
    assert (status, body["code"]) == (409, "PT409")
    assert (await db.call("get_project_file", t, project_uuid=project, p_file_path="new1"))[
        1
    ] is None
    status, body = await db.call(
        "bulk_upsert_project_files",
        t,
        project_uuid=project,
        files=[
            {"file_path": "z.bin", "content_b64": base64.b64encode(b"\x00\x01").decode()},
            {"file_path": "keep", "action": "delete", "expected_version": 1},
            {"file_path": "same", "content": "s"},
            {"file_path": "gone", "action": "delete"},
        ],
    )
    assert status == 200
    assert body["seq"] == 2
    assert [(f["file_path"], f["changed"], f["version"]) for f in body["files"]] == [
        ("gone", False, 0),
        ("keep", True, 2),
        ("same", True, 1),
        ("z.bin", True, 1),
    ]
    [_, (seq, event, payload)] = await events(db, project)
    assert (seq, event) == (2, "bulk:apply")
    assert [(f["action"], f["file_path"]) for f in payload["files"]] == [
        ("delete", "keep"),
        ("update", "same"),
        ("update", "z.bin"),
    ]
    assert payload["files"][2]["content_b64"] == "AAE="
    # Nothing changes: no seq, no event.
    status, body = await db.call(
        "bulk_upsert_project_files",
        t,
        project_uuid=project,
        files=[{"file_path": "same", "content": "s"}],
    )
    assert (status, body["seq"]) == (200, None)
    assert len(await messages(db, project)) == 2
    for bad in (
        [],
        [{"file_path": "a", "content": "1"}, {"file_path": "a", "content": "2"}],
        [{"file_path": "a"}],
        [{"file_path": "a", "content": "x", "action": "move"}],
    ):
        status, body = await db.call(
            "bulk_upsert_project_files", t, project_uuid=project, files=bad
        )
        assert (status, body["code"]) == (400, "22023"), bad


async def test_large_content_travels_without_a_body(db: Db, project: str) -> None:
    t = token(project)
    inline_max = 192 * 1024
    small = "a" * (inline_max - 2)  # + the JSON string's quotes
    big = "b" * (inline_max - 1)
    escaped = "\n" * (inline_max // 2)  # half the limit in bytes, twice that escaped in JSON
    for path, content in (("small", small), ("big", big), ("escaped", escaped)):
        await db.call(
            "upsert_project_file", t, project_uuid=project, p_file_path=path, p_content=content
        )
    (_, small_ev, _), (_, big_ev, _), (_, escaped_ev, _) = await messages(db, project)
    assert small_ev["content"] == small
    assert not {"content", "content_b64", "content_url"} & set(big_ev)
    assert "content" not in escaped_ev
    assert (big_ev["size"], big_ev["content_hash"]) == (len(big), sha(big.encode()))
    _, got = await db.call("get_project_file", t, project_uuid=project, p_file_path="big")
    assert got["content"] == big
    # In a bulk the budget is shared: the second body no longer fits.
    await db.call(
        "bulk_upsert_project_files",
        t,
        project_uuid=project,
        files=[
            {"file_path": "x1", "content": "x" * 150_000},
            {"file_path": "x2", "content": "y" * 150_000},
        ],
    )
    [*_, (_, bulk, _)] = await messages(db, project)
    first, second = bulk["files"]
    assert first["content"] == "x" * 150_000
    assert "content" not in second
    assert second["size"] == 150_000


async def test_rolled_back_call_leaves_no_gap_and_sends_nothing(db: Db, project: str) -> None:
    t = token(project)
    await db.call("upsert_project_file", t, project_uuid=project, p_file_path="a", p_content="1")
    conn = await db.connect_api()
    try:
        # The whole PostgREST transaction rolls back after the function succeeded (a client
        # disconnect, a failing db-post-request): its seq is never used.

        async def call_then_roll_back() -> None:
            async with conn.transaction():
                await call_rpc(
                    conn,
                    "upsert_project_file",
                    {"project_uuid": project, "p_file_path": "b", "p_content": "2"},
                    t,
                )
                raise RpcError(500, "XX000", "rolled back on purpose")

        with pytest.raises(RpcError):
            await call_then_roll_back()
    finally:
        await conn.close()
    _, body = await db.call(
        "upsert_project_file", t, project_uuid=project, p_file_path="c", p_content="3"
    )
    assert body["seq"] == 2
    assert [s for s, _, _ in await events(db, project)] == [1, 2]
    assert [p["file_path"] for _, p, _ in await messages(db, project)] == ["a", "c"]


async def test_functions_pin_utc_so_partitions_and_replay_hold(db: Db, project: str) -> None:
    # A caller's session time zone (PostgREST's Prefer: timezone=) must not shift inserted_at.
    conn = await db.connect_api()
    try:
        await conn.execute("set timezone to 'Pacific/Kiritimati'")  # UTC+14
        await conn.commit()
        await call_rpc(
            conn,
            "upsert_project_file",
            {"project_uuid": project, "p_file_path": "tz", "p_content": "x"},
            token(project),
        )
    finally:
        await conn.close()
    [(lag,)] = await db.sql(
        "select extract(epoch from (now() at time zone 'utc') - inserted_at) from realtime.messages"
        " where topic = %s",
        f"project:{project}",
    )
    assert -5 < float(lag) < 60


async def test_events_since_pages_in_seq_order(db: Db, project: str) -> None:
    t = token(project)
    for i in range(12):
        await db.call(
            "upsert_project_file",
            t,
            project_uuid=project,
            p_file_path=f"f{i % 3}",
            p_content=str(i),
        )
    seen: list[int] = []
    after = 0
    while True:
        status, page = await db.call(
            "project_events_since", t, project_uuid=project, after_seq=after, max_rows=5
        )
        assert status == 200
        if not page:
            break
        assert len(page) <= 5
        seen += [row["seq"] for row in page]
        assert all(row["payload"]["seq"] == row["seq"] for row in page)
        after = page[-1]["seq"]
    assert seen == list(range(1, 13))


async def test_local_change_and_snapshot_request(db: Db, project: str) -> None:
    t = token(project)
    status, _ = await db.call(
        "report_local_change",
        t,
        project_uuid=project,
        payload={"file_path": "a", "diff": "+x", "sender": "forged", "seq": 99, "id": "forged"},
    )
    assert status == 204
    [(event, payload, _)] = await messages(db, project)
    assert event == "file:local-change"
    assert payload["sender"] == "sess-1"
    assert "seq" not in payload
    assert payload["id"] != "forged"
    assert await events(db, project) == []  # changes no file: no seq
    status, body = await db.call(
        "report_local_change", t, project_uuid=project, payload={}, p_event="file:update"
    )
    assert (status, body["code"]) == (400, "22023")
    listener = await psycopg.AsyncConnection.connect(
        db.cluster.dsn("supabase_admin"), autocommit=True
    )
    try:
        await listener.execute("listen sidecar_snapshot_requests")
        ro = token(project, read_only=True, session_id="sess-ro")
        status, first = await db.call(
            "request_snapshot", ro, project_uuid=project, p_reason="gap", p_last_seq=3
        )
        assert status == 200
        _, again = await db.call("request_snapshot", t, project_uuid=project)
        assert again == first  # an open request is reused
        notes = [n.payload async for n in listener.notifies(timeout=5, stop_after=2)]
        assert notes == [project, project]
    finally:
        await listener.close()
    [row] = await db.sql(
        "select session_id, reason, last_seq from sidecar.snapshot_requests where id = %s",
        first["request_id"],
    )
    assert row == ("sess-ro", "gap", 3)


async def test_get_project_file_by_version(db: Db, project: str) -> None:
    """Versions are immutable rows: a subscriber fetching an event's body gets those bytes."""
    t = token(project)
    for body in ("one", "two"):
        await db.call(
            "upsert_project_file", t, project_uuid=project, p_file_path="f", p_content=body
        )
    await db.call("delete_project_file", t, project_uuid=project, p_file_path="f")
    got = [
        (await db.call("get_project_file", t, project_uuid=project, p_file_path="f", p_version=v))[
            1
        ]
        for v in (1, 2, 3, 4)
    ]
    assert [g and g.get("content") for g in got[:2]] == ["one", "two"]
    assert got[2]["deleted"] is True
    assert "content" not in got[2]
    assert got[3] is None
    _, head = await db.call("get_project_file", t, project_uuid=project, p_file_path="f")
    assert (head["version"], head["deleted"]) == (3, True)


async def test_events_since_pages_are_bounded_in_bytes(db: Db, project: str) -> None:
    """A page holds at most about 8 MiB of payload (always at least one event), so catching up
    over large events does not load them all at once."""
    t = token(project)
    body = "z" * 190_000  # inline: each event is about 190 KB
    for i in range(60):
        await db.call(
            "upsert_project_file",
            t,
            project_uuid=project,
            p_file_path=f"f{i}",
            p_content=body + str(i),
        )
    _, page = await db.call("project_events_since", t, project_uuid=project, after_seq=0)
    assert 40 <= len(page) <= 45  # 8 MiB / 190 KB
    assert [r["seq"] for r in page] == list(range(1, len(page) + 1))
    _, rest = await db.call(
        "project_events_since", t, project_uuid=project, after_seq=page[-1]["seq"]
    )
    assert [r["seq"] for r in rest] == list(range(len(page) + 1, 61))


async def test_sender_is_session_then_sub_and_null_for_the_service_role(
    db: Db, project: str
) -> None:
    sub = str(uuid.uuid4())
    callers = [
        {"role": "authenticated", "project_id": project, "session_id": "box", "sub": sub},
        {"role": "authenticated", "project_id": project, "sub": sub},
        SERVICE,
    ]
    for i, claims in enumerate(callers):
        await db.call(
            "upsert_project_file",
            claims,
            project_uuid=project,
            p_file_path=f"s{i}",
            p_content="x",
        )
    assert [p["sender"] for _, p, _ in await messages(db, project)] == ["box", sub, None]
    rows = await db.sql(
        "select created_by, last_modified_by from public.project_files where project_id = %s"
        " order by file_path",
        project,
    )
    assert rows == [("box", "box"), (sub, sub), ("service_role", "service_role")]
