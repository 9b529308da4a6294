"""The Realtime test server in PostgreSQL mode, with the real realtime-py client: joins decided
by the real realtime.messages policies, live rows from committed realtime.messages, replay from
the table."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

from sidecar.testing.postgres import PostgresCluster
from sidecar.testing.realtime.database import PostgresMode
from sidecar.testing.realtime.server import Knobs, RealtimeServer

from ..pgfixtures import Db

pytestmark = pytest.mark.pg


@pytest.fixture
async def rt(pg_cluster: PostgresCluster) -> AsyncIterator[RealtimeServer]:
    async with (
        RealtimeServer(
            knobs=Knobs(channel_error_backoff=0.05, connect_error_backoff=0.05)
        ) as server,
        PostgresMode(server, pg_cluster.dsn("supabase_admin")),
    ):
        yield server


@contextlib.asynccontextmanager
async def client(rt: RealtimeServer) -> AsyncIterator[AsyncRealtimeClient]:
    c = AsyncRealtimeClient(rt.url, token=rt.anon_key)
    try:
        yield c
    finally:
        await c.close()
        for ch in list(c.channels.values()):
            ch.rejoin_timer.reset()


async def subscribe(
    c: AsyncRealtimeClient, token: str, topic: str, broadcast: dict[str, Any] | None = None
) -> tuple[Any, list[tuple[RealtimeSubscribeStates, Exception | None]], list[dict[str, Any]]]:
    await c.set_auth(token)
    states: list[tuple[RealtimeSubscribeStates, Exception | None]] = []
    got: list[Any] = []
    params: Any = {  # realtime-py's TypedDicts do not admit a plain dict literal
        "config": {"broadcast": {"ack": False, "self": False, **(broadcast or {})}, "private": True}
    }
    ch = c.channel(topic, params)
    ch.on_broadcast("*", got.append)
    await ch.subscribe(lambda state, err: states.append((state, err)))
    async with asyncio.timeout(10):
        while not any(
            s in (RealtimeSubscribeStates.SUBSCRIBED, RealtimeSubscribeStates.CHANNEL_ERROR)
            for s, _ in states
        ):
            await asyncio.sleep(0.01)
    return ch, states, got


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def token(rt: RealtimeServer, project: str, **claims: Any) -> str:
    return rt.make_token(project_id=project, session_id="sess", **claims)


async def test_project_token_joins_and_gets_committed_rows_live(
    rt: RealtimeServer, db: Db, project: str
) -> None:
    async with client(rt) as c:
        _, states, got = await subscribe(c, token(rt, project), f"project:{project}")
        assert states[-1][0] == RealtimeSubscribeStates.SUBSCRIBED
        claims = {"role": "authenticated", "project_id": project, "session_id": "editor"}
        for i in range(3):
            status, _ = await db.call(
                "upsert_project_file",
                claims,
                project_uuid=project,
                p_file_path="a.txt",
                p_content=f"v{i}",
            )
            assert status == 200
        await until(lambda: len(got) == 3, "three broadcasts")
        rows = await db.sql(
            "select id::text, payload->>'seq' from realtime.messages where topic = %s"
            " order by (payload->>'seq')::int",
            f"project:{project}",
        )
        assert [(m["meta"]["id"], str(m["payload"]["seq"])) for m in got] == rows
        assert [m["payload"]["content"] for m in got] == ["v0", "v1", "v2"]
        assert all(m["event"] == "file:update" and m["payload"]["sender"] == "editor" for m in got)


async def test_other_project_and_anon_are_refused_at_join(rt: RealtimeServer, project: str) -> None:
    topic = f"project:{project}"
    for bad in (
        token(rt, str(uuid.uuid4())),
        rt.make_token(role="anon"),
        rt.make_token(role="authenticated"),  # no project_id claim
    ):
        async with client(rt) as c:
            _, states, _ = await subscribe(c, bad, topic)
            state, err = states[-1]
            assert state == RealtimeSubscribeStates.CHANNEL_ERROR
            assert (
                "Unauthorized: You do not have permissions to read from this Channel topic"
                in str(err)
            )


async def test_container_token_cannot_broadcast(rt: RealtimeServer, project: str) -> None:
    """A client's broadcast (which Realtime would relay with any payload) is refused by the
    write check: the listener never sees it."""
    topic = f"project:{project}"
    async with client(rt) as listener, client(rt) as writer:
        _, _, got = await subscribe(listener, token(rt, project), topic)
        ch, states, _ = await subscribe(writer, token(rt, project), topic)
        assert states[-1][0] == RealtimeSubscribeStates.SUBSCRIBED
        forged = {"file_path": "x", "content": "evil", "version": 99, "content_hash": "0" * 64}
        await ch.send_broadcast("file:update", forged)
        await until(lambda: ("write", topic) in rt.policy_calls, "the write check")
        await asyncio.sleep(0.2)  # nothing is coming: give a relay the time it would take
        assert got == []


async def test_replay_comes_from_the_table(rt: RealtimeServer, db: Db, project: str) -> None:
    claims = {"role": "service_role"}
    since = int(time.time() * 1000) - 1000
    for i in range(30):
        await db.call(
            "upsert_project_file",
            claims,
            project_uuid=project,
            p_file_path=f"f{i}",
            p_content=str(i),
        )
    async with client(rt) as c:
        _, states, got = await subscribe(
            c, token(rt, project), f"project:{project}", {"replay": {"since": since, "limit": 10}}
        )
        assert states[-1][0] == RealtimeSubscribeStates.SUBSCRIBED
        await until(lambda: len(got) == 10, "ten replayed rows")
        assert all(m["meta"].get("replayed") is True for m in got)
        # The newest 10 since `since`, oldest first (one writer: inserted_at order = seq order).
        assert [m["payload"]["seq"] for m in got] == list(range(21, 31))


async def test_rolled_back_and_failed_calls_deliver_nothing(
    rt: RealtimeServer, db: Db, project: str
) -> None:
    claims = {"role": "authenticated", "project_id": project}
    async with client(rt) as c:
        _, _, got = await subscribe(c, token(rt, project), f"project:{project}")
        await db.call(
            "upsert_project_file",
            claims,
            project_uuid=project,
            p_file_path="a",
            p_content="1",
            expected_version=5,
        )
        await db.call(
            "upsert_project_file", claims, project_uuid=project, p_file_path="a", p_content="1"
        )
        await until(lambda: len(got) == 1, "the one successful write")
        await asyncio.sleep(0.2)
        assert [m["payload"]["seq"] for m in got] == [1]
