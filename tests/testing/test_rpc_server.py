"""The local PostgREST-style RPC server: versions, conflicts, auth, broadcasts, faults."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.testing.realtime.server import RealtimeServer
from sidecar.testing.rpc_server import HttpBroadcaster, RpcServer

PROJECT = "p1"


@pytest.fixture
async def rpc() -> AsyncIterator[RpcServer]:
    """A running RpcServer with no Realtime attached (broadcasts go to listeners)."""
    async with RpcServer(inline_limit=1000) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain aiohttp client session."""
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession,
    rpc: RpcServer,
    name: str,
    args: dict[str, Any],
    *,
    token: str | None = None,
    apikey: str | None = None,
) -> tuple[int, Any]:
    headers = {"apikey": rpc.anon_key if apikey is None else apikey}
    if token != "":
        headers["Authorization"] = f"Bearer {token or rpc.make_token(PROJECT)}"
    async with http.post(f"{rpc.url}/rest/v1/rpc/{name}", json=args, headers=headers) as resp:
        return resp.status, await resp.json()


def upsert_args(path: str, content: str, expected: int | None, **extra: Any) -> dict[str, Any]:
    return {
        "project_uuid": PROJECT,
        "p_file_path": path,
        "p_content": content,
        "p_file_type": "text",
        "expected_version": expected,
        **extra,
    }


async def test_optimistic_concurrency(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """A matching expected_version bumps the version; a stale one is a PostgREST 409 PT409."""
    assert await call(http, rpc, "upsert_project_file", upsert_args("a.txt", "v1", 0)) == (
        200,
        {"file_path": "a.txt", "version": 1, "content_hash": hashlib.sha256(b"v1").hexdigest()},
    )
    status, body = await call(http, rpc, "upsert_project_file", upsert_args("a.txt", "v2", 1))
    assert (status, body["version"]) == (200, 2)
    status, body = await call(http, rpc, "upsert_project_file", upsert_args("a.txt", "x", 1))
    assert status == 409
    assert body["code"] == "PT409"
    assert body["message"] == "version conflict"
    assert json.loads(body["details"]) == {
        "file_path": "a.txt",
        "expected_version": 1,
        "current_version": 2,
    }
    assert set(body) == {"code", "message", "details", "hint"}
    # expected_version null writes unconditionally (what the editor does).
    status, body = await call(http, rpc, "upsert_project_file", upsert_args("a.txt", "v3", None))
    assert (status, body["version"]) == (200, 3)
    assert rpc.files(PROJECT) == {"a.txt": b"v3"}


async def test_delete_leaves_a_tombstone(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """Delete bumps the version, repeats as a no-op, and a re-create continues the versions."""
    await rpc.editor_upsert(PROJECT, "d.txt", b"x")
    args = {"project_uuid": PROJECT, "p_file_path": "d.txt", "expected_version": 1}
    assert await call(http, rpc, "delete_project_file", args) == (
        200,
        {"file_path": "d.txt", "version": 2, "deleted": True},
    )
    again = {"project_uuid": PROJECT, "p_file_path": "d.txt", "expected_version": None}
    assert (await call(http, rpc, "delete_project_file", again))[1]["version"] == 2
    head = rpc.head(PROJECT, "d.txt")
    assert head is not None
    assert head.deleted
    status, body = await call(http, rpc, "upsert_project_file", upsert_args("d.txt", "y", 0))
    assert status == 409
    status, body = await call(http, rpc, "upsert_project_file", upsert_args("d.txt", "y", 2))
    assert (status, body["version"]) == (200, 3)


async def test_list_and_get(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """list_current_files returns live rows with content; get_project_file shows tombstones."""
    await rpc.editor_upsert(PROJECT, "t.txt", b"text\n")
    await rpc.editor_upsert(PROJECT, "b.bin", b"\x00\xff")
    await rpc.editor_upsert(PROJECT, "gone.txt", b"g")
    await rpc.editor_delete(PROJECT, "gone.txt")
    await rpc.editor_upsert("other", "x.txt", b"other project")
    status, rows = await call(http, rpc, "list_current_files", {"project_uuid": PROJECT})
    assert status == 200
    by_path = {r["file_path"]: r for r in rows}
    assert set(by_path) == {"t.txt", "b.bin"}
    assert by_path["t.txt"]["content"] == "text\n"
    assert base64.b64decode(by_path["b.bin"]["content_b64"]) == b"\x00\xff"
    assert by_path["b.bin"]["file_type"] == "binary"
    args = {"project_uuid": PROJECT, "p_file_path": "gone.txt"}
    status, row = await call(http, rpc, "get_project_file", args)
    assert (status, row["deleted"], row["version"]) == (200, True, 2)
    args = {"project_uuid": PROJECT, "p_file_path": "never.txt"}
    assert await call(http, rpc, "get_project_file", args) == (200, None)


async def test_binary_upsert_uses_base64(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """p_file_type binary means p_content is base64; bad base64 is a 400."""
    data = bytes(range(256))
    args = upsert_args("img.png", base64.b64encode(data).decode(), 0, p_file_type="binary")
    assert (await call(http, rpc, "upsert_project_file", args))[0] == 200
    assert rpc.files(PROJECT)["img.png"] == data
    bad = upsert_args("img.png", "***", None, p_file_type="binary")
    status, body = await call(http, rpc, "upsert_project_file", bad)
    assert (status, body["code"]) == (400, "22P02")


async def test_auth_is_scoped_to_the_project(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """apikey required; JWT verified; other projects 403; read-only tokens cannot write."""
    args = upsert_args("a.txt", "x", None)
    status, body = await call(http, rpc, "upsert_project_file", args, apikey="")
    assert status == 401
    assert "No API key" in body["message"]
    status, body = await call(http, rpc, "upsert_project_file", args, token="not-a-jwt")
    assert (status, body["code"]) == (401, "PGRST301")
    status, body = await call(
        http, rpc, "upsert_project_file", args, token=rpc.make_token(PROJECT, exp_in=-10)
    )
    assert (status, body["code"]) == (401, "PGRST303")
    other = RpcServer().make_token(PROJECT)  # signed with another secret
    assert (await call(http, rpc, "upsert_project_file", args, token=other))[0] == 401
    status, body = await call(
        http, rpc, "upsert_project_file", args, token=rpc.make_token("someone-else")
    )
    assert (status, body["code"]) == (403, "42501")
    ro = rpc.make_token(PROJECT, read_only=True)
    assert (await call(http, rpc, "upsert_project_file", args, token=ro))[0] == 403
    assert (await call(http, rpc, "list_current_files", {"project_uuid": PROJECT}, token=ro))[
        0
    ] == 200
    # No Authorization header: the anon apikey's role, which owns no project.
    assert (await call(http, rpc, "upsert_project_file", args, token=""))[0] == 403
    service = rpc.make_token(None, role="service_role")
    assert (await call(http, rpc, "upsert_project_file", args, token=service))[0] == 200
    assert rpc.files(PROJECT) == {"a.txt": b"x"}


async def test_unknown_function_or_arguments(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """PostgREST's PGRST202 for an unknown function or a wrong argument set."""
    status, body = await call(http, rpc, "drop_everything", {"project_uuid": PROJECT})
    assert (status, body["code"]) == (404, "PGRST202")
    status, body = await call(http, rpc, "upsert_project_file", {"project_uuid": PROJECT})
    assert (status, body["code"]) == (404, "PGRST202")
    args = upsert_args("a", "x", None, p_extra=1)
    assert (await call(http, rpc, "upsert_project_file", args))[0] == 404
    args = upsert_args("../escape", "x", None)
    assert (await call(http, rpc, "upsert_project_file", args))[0] == 400


async def test_broadcasts_follow_realtime_send(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """Each change is broadcast once with a gap-free seq per project and the sender."""
    seen: list[tuple[str, str, dict[str, Any]]] = []
    rpc.add_listener(lambda topic, event, payload: seen.append((topic, event, payload)))
    token = rpc.make_token(PROJECT, session_id="sess-9")
    await call(http, rpc, "upsert_project_file", upsert_args("a.txt", "hello", None), token=token)
    await rpc.editor_upsert(PROJECT, "b.bin", b"\x00\x01")
    await rpc.editor_upsert(PROJECT, "big.txt", b"x" * 5000)
    await rpc.editor_delete(PROJECT, "a.txt")
    await rpc.editor_upsert("other", "o.txt", b"o")
    mine = [(e, p) for t, e, p in seen if t == f"project:{PROJECT}"]
    assert [p["seq"] for _, p in mine] == [1, 2, 3, 4]
    assert [e for e, _ in mine] == ["file:update", "file:update", "file:update", "file:delete"]
    first = mine[0][1]
    assert first["content"] == "hello"
    assert first["content_hash"] == hashlib.sha256(b"hello").hexdigest()
    assert (first["version"], first["sender"], first["file_path"]) == (1, "sess-9", "a.txt")
    assert isinstance(first["timestamp"], int)
    assert base64.b64decode(mine[1][1]["content_b64"]) == b"\x00\x01"
    url = mine[2][1]["content_url"]
    assert "content" not in mine[2][1]
    async with http.get(url) as resp:
        assert await resp.read() == b"x" * 5000
    assert mine[3][1] == {
        "file_path": "a.txt",
        "version": 2,
        "seq": 4,
        "timestamp": mine[3][1]["timestamp"],
        "sender": "editor",
    }
    assert [p["seq"] for t, _, p in seen if t == "project:other"] == [1]
    assert rpc.seq(PROJECT) == 4
    assert [r.version for r in rpc.history if r.path == "a.txt"] == [1, 2]


async def test_injected_failures(rpc: RpcServer, http: aiohttp.ClientSession) -> None:
    """fail_first answers 503 without applying; lose_response_first applies then hangs up."""
    rpc.faults.fail_first = 1
    status, body = await call(http, rpc, "upsert_project_file", upsert_args("a", "x", None))
    assert (status, body["code"]) == (503, "PGRST000")
    assert rpc.files(PROJECT) == {}
    rpc.faults.lose_response_first = 1
    with pytest.raises(aiohttp.ClientError):
        await call(http, rpc, "upsert_project_file", upsert_args("a", "x", None))
    assert rpc.files(PROJECT) == {"a": b"x"}
    rpc.faults.drop_first = 1
    with pytest.raises(aiohttp.ClientError):
        await call(http, rpc, "upsert_project_file", upsert_args("a", "y", None))
    assert rpc.files(PROJECT) == {"a": b"x"}


async def test_broadcasts_reach_a_real_realtime_server() -> None:
    """In-process (send_db) and standalone (admin API) wiring both store realtime.send rows."""
    async with RealtimeServer() as rt:
        async with RpcServer(realtime=rt) as rpc:
            assert rpc.jwt_secret == rt.jwt_secret
            assert rpc.anon_key == rt.anon_key
            await rpc.editor_upsert(PROJECT, "a.txt", b"in-process")
        remote = HttpBroadcaster(rt.base_url)
        try:
            async with RpcServer(realtime=remote, jwt_secret=rt.jwt_secret) as rpc:
                await rpc.editor_upsert(PROJECT, "b.txt", b"over http")
        finally:
            await remote.close()
        rows = [m for m in rt.messages if m.topic == f"project:{PROJECT}"]
        assert [(m.event, m.private) for m in rows] == [("file:update", True)] * 2
        assert [m.payload["file_path"] for m in rows if m.payload] == ["a.txt", "b.txt"]


async def test_snapshot_of_the_table(rpc: RpcServer, tmp_path: Path) -> None:
    """A snapshot of the live rows carries each file's version and the last broadcast seq."""
    await rpc.editor_upsert(PROJECT, "src/a.ts", b"a1")
    await rpc.editor_upsert(PROJECT, "src/a.ts", b"a2")
    await rpc.editor_upsert(PROJECT, "gone.txt", b"g")
    await rpc.editor_delete(PROJECT, "gone.txt")
    out = tmp_path / "snap.tar.zst"
    manifest = await rpc.snapshot(PROJECT, out)
    assert out.is_file()
    assert manifest.seq == 4
    assert {p: (e.version, e.sha256) for p, e in manifest.files.items()} == {
        "src/a.ts": (2, hashlib.sha256(b"a2").hexdigest())
    }


async def test_editor_bulk_broadcasts_one_unit(tmp_path: Path) -> None:
    """A bulk save updates and deletes rows together and broadcasts one bulk:apply."""
    from sidecar.testing.rpc_server import RpcServer

    seen: list[tuple[str, str, dict[str, Any]]] = []
    async with RpcServer() as rpc:
        rpc.add_listener(lambda topic, event, payload: seen.append((topic, event, payload)))
        await rpc.editor_upsert("p", "gone.txt", b"x")
        seq = await rpc.editor_bulk("p", {"a.txt": b"A", "gone.txt": None, "never.txt": None})
        assert rpc.files("p") == {"a.txt": b"A"}
        assert rpc.versions("p") == {"a.txt": 1, "gone.txt": 2}
        topic, event, payload = seen[-1]
        assert (topic, event, payload["seq"], seq) == ("project:p", "bulk:apply", 2, 2)
        assert [(f["action"], f["file_path"]) for f in payload["files"]] == [
            ("update", "a.txt"),
            ("delete", "gone.txt"),
        ]


async def test_report_local_change_and_request_snapshot(
    rpc: RpcServer, http: aiohttp.ClientSession
) -> None:
    """A read-only container token may report a local change and request a snapshot: each is
    re-broadcast like the database would (sender from the token, no seq), the request recorded
    and answered with its id; another project's token is refused."""
    seen: list[tuple[str, str, dict[str, Any]]] = []
    rpc.add_listener(lambda topic, event, payload: seen.append((topic, event, payload)))
    ro = rpc.make_token(PROJECT, read_only=True, session_id="box-1")
    report = {"path": "a.txt", "sha256": "0" * 64, "diff": "+x"}
    status, body = await call(
        http, rpc, "report_local_change", {"project_uuid": PROJECT, "payload": report}, token=ro
    )
    assert (status, body) == (200, None)
    status, body = await call(
        http,
        rpc,
        "request_snapshot",
        {"project_uuid": PROJECT, "p_reason": "seq_gap", "p_last_seq": 7},
        token=ro,
    )
    assert (status, body) == (200, {"request_id": 1})
    assert seen == [
        ("project:p1", "file:local-change", {**report, "sender": "box-1"}),
        (
            "project:p1",
            "snapshot:request",
            {"request_id": 1, "session_id": "box-1", "reason": "seq_gap", "last_seq": 7},
        ),
    ]
    assert rpc.seq(PROJECT) == 0
    other = rpc.make_token("p2")
    status, _ = await call(http, rpc, "request_snapshot", {"project_uuid": PROJECT}, token=other)
    assert status == 403
