"""The PostgREST-compatible gateway over the real database, driven by the sidecar's own RPC
client (sidecar/twoway/upstream.py) and by raw HTTP for PostgREST's statuses and bodies."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from sidecar.testing.gateway import Gateway
from sidecar.testing.postgres import PostgresCluster
from sidecar.twoway.upstream import ConflictError, Upstream, UpstreamError

pytestmark = pytest.mark.pg


@pytest.fixture
async def gateway(pg_cluster: PostgresCluster) -> AsyncIterator[Gateway]:
    async with Gateway(pg_cluster.dsn("authenticator")) as gw:
        yield gw


@pytest.fixture
async def project_id(gateway: Gateway) -> str:
    pid = str(uuid.uuid4())
    await gateway.register_project(pid)
    return pid


def upstream(gateway: Gateway, project_id: str, token: str) -> Upstream:
    return Upstream(
        gateway.url,
        project_id,
        apikey=gateway.anon_key,
        token=token,
        retries=3,
        backoff_initial=0.001,
        backoff_max=0.005,
    )


async def post(
    gateway: Gateway, fn: str, body: Any, token: str | None, *, apikey: str | None = "anon"
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if apikey is not None:
        headers["apikey"] = gateway.anon_key if apikey == "anon" else apikey
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{gateway.url}/rest/v1/rpc/{fn}", data=json.dumps(body), headers=headers) as r,
    ):
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None)


async def test_upstream_client_round_trip(gateway: Gateway, project_id: str) -> None:
    token = gateway.make_token(project_id, session_id="box-1")
    async with upstream(gateway, project_id, token) as up:
        assert await up.upsert("a.txt", b"one\n", 0) == 1
        assert await up.upsert("a.txt", b"two\n", 1) == 2
        assert await up.upsert("img.bin", b"\x00\xff\x10", None) == 1
        head = await up.get("a.txt")
        assert head is not None
        assert (head.version, head.content) == (2, b"two\n")
        assert await up.delete("a.txt", 2) == 3
        head = await up.get("a.txt")
        assert head is not None
        assert head.deleted
        assert head.version == 3
        assert await up.get("never") is None
        files = await up.list_files()
        assert {p: (f.version, f.content) for p, f in files.items()} == {
            "img.bin": (1, b"\x00\xff\x10")
        }


async def test_conflict_is_409_with_current_version(gateway: Gateway, project_id: str) -> None:
    token = gateway.make_token(project_id)
    async with upstream(gateway, project_id, token) as up:
        await up.upsert("a.txt", b"x", None)
        await up.upsert("a.txt", b"y", None)
        with pytest.raises(ConflictError) as info:
            await up.upsert("a.txt", b"mine", 1)
        assert (info.value.expected_version, info.value.current_version) == (1, 2)
        with pytest.raises(ConflictError):
            await up.delete("a.txt", 1)
    status, body = await post(
        gateway,
        "upsert_project_file",
        {
            "project_uuid": project_id,
            "p_file_path": "a.txt",
            "p_content": "z",
            "expected_version": 0,
        },
        token,
    )
    assert status == 409
    assert set(body) == {"code", "message", "details", "hint"}
    assert body["code"] == "PT409"
    assert json.loads(body["details"])["current_version"] == 2


async def test_lost_answer_is_recognised(gateway: Gateway, project_id: str) -> None:
    """The write commits, the answer is lost, the retry conflicts: the client reads the head
    back, finds its own bytes and reports success."""
    token = gateway.make_token(project_id)
    async with upstream(gateway, project_id, token) as up:
        await up.upsert("a.txt", b"v1", 0)
        gateway.faults.lose_response_first = 1
        assert await up.upsert("a.txt", b"v2", 1) == 2
        gateway.faults.fail_first = 2
        assert await up.upsert("a.txt", b"v3", 2) == 3


@pytest.mark.parametrize(
    ("who", "status", "code"),
    [
        ("other", 403, "42501"),
        ("read_only", 403, "42501"),
        ("anon", 403, "42501"),
        ("no_jwt", 401, "42501"),
        ("expired", 401, "PGRST303"),
        ("bad_signature", 401, "PGRST301"),
        ("service", 200, None),
    ],
)
async def test_write_refusals_have_postgrest_statuses(
    gateway: Gateway, project_id: str, who: str, status: int, code: str | None
) -> None:
    tokens: dict[str, str | None] = {
        "other": gateway.make_token(str(uuid.uuid4())),
        "read_only": gateway.make_token(project_id, read_only=True),
        "anon": gateway.make_token(None, role="anon"),
        "no_jwt": None,
        "expired": gateway.make_token(project_id, exp_in=-120),
        "bad_signature": gateway.make_token(project_id) + "x",
        "service": gateway.make_token(None, role="service_role"),
    }
    got, body = await post(
        gateway,
        "upsert_project_file",
        {"project_uuid": project_id, "p_file_path": "w", "p_content": who},
        tokens[who],
    )
    assert got == status, body
    if code is not None:
        assert body["code"] == code
    if status != 200:
        token = tokens[who]
        if token is not None and who not in ("expired", "bad_signature"):
            async with upstream(gateway, project_id, token) as up:
                with pytest.raises(UpstreamError) as info:
                    await up.upsert("w", b"x", None)
                assert (info.value.status, info.value.transient) == (status, False)


async def test_reads_and_other_statuses(gateway: Gateway, project_id: str) -> None:
    token = gateway.make_token(project_id)
    other = str(uuid.uuid4())
    assert (
        await post(gateway, "get_project_file", {"project_uuid": other, "p_file_path": "a"}, token)
    )[0] == 403
    # An unregistered project: 404 for writes (PT404), nothing for reads.
    unknown = str(uuid.uuid4())
    utoken = gateway.make_token(unknown)
    status, body = await post(
        gateway,
        "upsert_project_file",
        {"project_uuid": unknown, "p_file_path": "a", "p_content": "x"},
        utoken,
    )
    assert (status, body["code"]) == (404, "PT404")
    assert await post(gateway, "list_current_files", {"project_uuid": unknown}, utoken) == (200, [])
    assert await post(
        gateway, "get_project_file", {"project_uuid": unknown, "p_file_path": "a"}, utoken
    ) == (200, None)
    # PostgREST's own errors.
    status, body = await post(gateway, "no_such_function", {"project_uuid": project_id}, token)
    assert (status, body["code"]) == (404, "PGRST202")
    status, body = await post(gateway, "get_project_file", {"project_uuid": project_id}, token)
    assert (status, body["code"]) == (404, "PGRST202")  # a required argument is missing
    status, _ = await post(
        gateway, "list_current_files", {"project_uuid": project_id}, token, apikey=None
    )
    assert status == 401
    status, body = await post(gateway, "list_current_files", {"project_uuid": "not-a-uuid"}, token)
    assert (status, body["code"]) == (400, "22P02")
    # A void function answers 204 without a body; a setof function an array.
    assert await post(
        gateway,
        "report_local_change",
        {"project_uuid": project_id, "payload": {"file_path": "a"}},
        token,
    ) == (204, None)
    status, rows = await post(
        gateway, "project_events_since", {"project_uuid": project_id, "after_seq": 0}, token
    )
    assert (status, rows) == (200, [])


async def test_binary_through_the_gateway(gateway: Gateway, project_id: str) -> None:
    data = bytes(range(256)) * 40
    token = gateway.make_token(project_id)
    async with upstream(gateway, project_id, token) as up:
        assert await up.upsert("blob.bin", data, 0) == 1
        head = await up.get("blob.bin")
        assert head is not None
        assert head.content == data


async def test_catch_up_pages_through_the_event_log(gateway: Gateway, project_id: str) -> None:
    """The sidecar's catch-up reads project_events_since page by page until the gap is
    covered, and stops at the end of the log."""
    token = gateway.make_token(project_id)
    async with upstream(gateway, project_id, token) as up:
        for i in range(12):
            await up.upsert(f"f{i % 4}", f"v{i}".encode(), None)
        rows = await up.catch_up(3, 9, page_rows=4)
        seqs = [p["seq"] for _, p in rows]
        assert seqs[:6] == [4, 5, 6, 7, 8, 9]  # whole pages: may run past the gap
        assert seqs == list(range(4, 4 + len(seqs)))
        assert len(seqs) == 8
        everything = await up.catch_up(0, 10**6, page_rows=5)
        assert [p["seq"] for _, p in everything] == list(range(1, 13))
        assert all(e == "file:update" for e, _ in everything)
        other = upstream(gateway, str(uuid.uuid4()), token)
        async with other:
            with pytest.raises(UpstreamError) as info:
                await other.catch_up(0, 5)
            assert info.value.status == 403


async def test_content_trickle_slows_only_body_fetches(gateway: Gateway, project_id: str) -> None:
    """faults.content_trickle: get_project_file's answer (where large bodies come from) arrives
    at about that rate, whole, and is counted in `trickled`; other calls are not slowed."""
    import time

    data = b"y" * 60_000
    token = gateway.make_token(project_id)
    async with upstream(gateway, project_id, token) as up:
        assert await up.upsert("big.txt", data, 0) == 1
        gateway.faults.content_trickle = 200_000.0
        started = time.monotonic()
        assert await up.body("big.txt", 1) == data
        assert time.monotonic() - started >= 0.25  # 60 KB of body at 200 KB/s, at least
        assert gateway.trickled > len(data)  # the whole JSON answer went out trickled
        sent = gateway.trickled
        assert await up.upsert("small.txt", b"s", 0) == 1
        assert gateway.trickled == sent
