"""The Realtime server's database side, as supabase/realtime does it, over psycopg.

- `authorize_channel`: Realtime Authorization for a private channel (lib/realtime/tenants/
  authorization.ex): a probe row is inserted into realtime.messages as the admin, then, with
  the token's role and claims and `realtime.topic` set, the probe is selected under RLS (read)
  and a row is inserted in a savepoint (write: 42501 means no). Everything is rolled back, so
  nothing is stored and nothing is notified.
- `replay`: the broadcast replay query (lib/realtime/messages.ex): the newest `limit` private
  broadcast rows of the topic since `since`, oldest first, ordered by `inserted_at` (the
  inserting transaction's start, not its commit: replay order can differ from seq order).
- `MessageFeed`: committed realtime.messages rows in commit order, from the shim's NOTIFY
  trigger (sidecar/testing/sql/supabase_shim.sql), where the real server reads the WAL.

The connections log in as the shim's bootstrap superuser (`supabase_admin`, as self-hosted
Realtime does); the checks switch to the token's role inside the transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import psycopg
import structlog

from sidecar.testing.realtime.broker import Broker, Policy
from sidecar.testing.realtime.socket import StoredMessage

__all__ = [
    "ChannelAccess",
    "MessageFeed",
    "MessageRow",
    "PostgresMode",
    "RlsPolicyError",
    "authorize_channel",
    "fetch_message",
    "replay",
]

log = structlog.get_logger(component="realtime_db")

NOTIFY_CHANNEL = "realtime_messages"


class RlsPolicyError(Exception):
    """A policy raised, or the role does not exist: Realtime refuses the join (`Unauthorized`)."""


@dataclass(frozen=True, slots=True)
class ChannelAccess:
    """What a token may do on one private channel."""

    read: bool
    write: bool


@dataclass(frozen=True, slots=True)
class MessageRow:
    """One realtime.messages row as Realtime broadcasts it."""

    id: str
    topic: str
    event: str
    payload: dict[str, Any]
    private: bool
    inserted_at: datetime


def authorize_channel(
    conn: psycopg.Connection[Any],
    sub_topic: str,
    claims: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
) -> ChannelAccess:
    """Run Realtime's read and write checks for `sub_topic` (e.g. 'project:<uuid>').

    `conn` is an idle admin connection (autocommit off). Synchronous: the test server's policy
    hook is (a check takes a few milliseconds on loopback).

    Raises:
        RlsPolicyError: any SQL error other than the write check's 42501.
    """
    role = str(claims.get("role") or "")
    settings = (
        "select set_config('role', %s, true), set_config('realtime.topic', %s, true),"
        " set_config('request.jwt.claims', %s, true),"
        " set_config('request.jwt.claim.sub', %s, true),"
        " set_config('request.jwt.claim.role', %s, true),"
        " set_config('request.headers', %s, true)"
    )
    params = (
        role,
        sub_topic,
        json.dumps(dict(claims)),
        str(claims.get("sub") or ""),
        role,
        json.dumps(headers or {}),
    )
    now = datetime.now(UTC).replace(tzinfo=None)
    probe = uuid.uuid4()
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(
                "insert into realtime.messages (id, topic, extension, inserted_at, updated_at)"
                " values (%s, %s, 'broadcast', %s, %s)",
                (probe, sub_topic, now, now),
            )
            conn.execute(settings, params)
            read = (
                conn.execute("select id from realtime.messages where id = %s", (probe,)).fetchone()
                is not None
            )
        with conn.transaction(force_rollback=True):
            conn.execute(settings, params)
            try:
                with conn.transaction():  # a savepoint, as Realtime does
                    conn.execute(
                        "insert into realtime.messages (topic, extension) values (%s, 'broadcast')",
                        (sub_topic,),
                    )
                write = True
            except psycopg.errors.InsufficientPrivilege:
                write = False
    except psycopg.Error as exc:
        raise RlsPolicyError(f"{exc.sqlstate}: {exc.diag.message_primary or exc}") from exc
    return ChannelAccess(read=read, write=write)


_COLUMNS = "id, topic, event, payload, private, inserted_at"


def replay(
    conn: psycopg.Connection[Any], sub_topic: str, since_ms: int, limit: int
) -> list[MessageRow]:
    """The newest `limit` (clamped to 1..25) private broadcasts since `since_ms`, oldest first."""
    limit = max(1, min(int(limit), 25))
    since = datetime.fromtimestamp(since_ms / 1000, UTC).replace(tzinfo=None)
    with conn.transaction():
        rows = conn.execute(
            f"select {_COLUMNS} from realtime.messages"
            " where topic = %s and private is true and extension = 'broadcast'"
            "   and inserted_at >= %s"
            "   and inserted_at < (now() at time zone 'utc') + interval '1 minute'"
            " order by inserted_at desc limit %s",
            (sub_topic, since, limit),
        ).fetchall()
    return [_row(r) for r in reversed(rows)]


async def fetch_message(conn: psycopg.AsyncConnection[Any], message_id: str) -> MessageRow | None:
    """One realtime.messages row by id (None if it is gone, e.g. its partition was dropped)."""
    async with conn.transaction():
        row = await (
            await conn.execute(
                f"select {_COLUMNS} from realtime.messages where id = %s and payload is not null",
                (message_id,),
            )
        ).fetchone()
    return None if row is None else _row(row)


def _row(r: tuple[Any, ...]) -> MessageRow:
    return MessageRow(
        id=str(r[0]),
        topic=str(r[1]),
        event=str(r[2]),
        payload=dict(r[3]) if isinstance(r[3], dict) else {},
        private=bool(r[4]),
        inserted_at=r[5],
    )


class MessageFeed:
    """Calls `on_message(row)` for every committed broadcast row, in commit order.

    One connection LISTENs; another fetches the rows (a connection iterating `notifies()` is
    busy). Rows are handed over one at a time, in notification (= commit) order.
    """

    def __init__(self, dsn: str, on_message: Callable[[MessageRow], Awaitable[None]]) -> None:
        self.dsn = dsn
        self.on_message = on_message
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    async def start(self) -> None:
        """Start listening; returns once LISTEN is in place (later commits are seen)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="realtime-message-feed")
        waiter = asyncio.ensure_future(self._ready.wait())
        done, _ = await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            self._task.result()  # raises what stopped it

    async def close(self) -> None:
        """Stop listening."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        listen = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        fetch = await psycopg.AsyncConnection.connect(self.dsn)
        try:
            await listen.execute(f"listen {NOTIFY_CHANNEL}")
            self._ready.set()
            async for note in listen.notifies():
                try:
                    key = json.loads(note.payload)
                    row = await fetch_message(fetch, str(key["id"]))
                except (ValueError, KeyError, psycopg.Error) as exc:
                    log.warning("realtime_db.feed_error", error=str(exc))
                    continue
                if row is not None:
                    await self.on_message(row)
        finally:
            await listen.close()
            await fetch.close()


class PostgresMode:
    """Runs a RealtimeServer (its Broker) on the database; an async context manager.

    - Private joins (and token refreshes, and the first client broadcast) are authorized by
      `authorize_channel` with the token's claims: the real realtime.messages policies decide.
    - Live delivery comes from committed realtime.messages rows (`MessageFeed`), sent with
      `meta.id` = the row id through `RealtimeServer.send_db`, in commit order.
    - Replay is the real query on realtime.messages (`replay`).
    - The day partitions are created at start, as Realtime does when it connects to a tenant.

    `dsn` logs in as the shim's superuser (self-hosted Realtime's `supabase_admin`).
    """

    def __init__(self, server: Broker, dsn: str) -> None:
        self.server = server
        self.dsn = dsn
        self.delivered = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._feed = MessageFeed(dsn, self._deliver)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, create partitions, hook the server's policy and replay, start the feed."""
        conn: psycopg.Connection[Any] = await asyncio.to_thread(_connect, self.dsn)
        with conn.transaction():
            conn.execute("select realtime.create_messages_partitions()")
        self._conn = conn
        self.server.policy = self._policy
        self.server.replay_source = self._replay
        await self._feed.start()

    async def close(self) -> None:
        """Stop the feed and close the connection (the server keeps running, in memory)."""
        self.server.replay_source = None
        await self._feed.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _policy(self, claims: Mapping[str, Any], topic: str) -> Policy:
        if self._conn is None:
            raise RlsPolicyError("the database connection is closed")
        access = authorize_channel(self._conn, topic, dict(claims))
        return Policy(read=access.read, write=access.write)

    def _replay(self, topic: str, since_ms: int, limit: int) -> list[StoredMessage]:
        if self._conn is None:
            return []
        try:
            rows = replay(self._conn, topic, since_ms, limit)
        except psycopg.Error as exc:
            log.warning("realtime_db.replay_failed", topic=topic, error=str(exc))
            return []
        return [
            StoredMessage(
                id=r.id,
                topic=r.topic,
                event=r.event,
                payload=r.payload,
                binary_payload=None,
                private=r.private,
                inserted_at=r.inserted_at.replace(tzinfo=UTC),
                inserted_ms=int(r.inserted_at.replace(tzinfo=UTC).timestamp() * 1000),
            )
            for r in rows
        ]

    async def _deliver(self, row: MessageRow) -> None:
        self.delivered += 1
        self.server.send_db(row.topic, row.event, row.payload, row.private, id=row.id)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn)
