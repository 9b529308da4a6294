"""seq under concurrency, and snapshots read while writers run, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import random
from typing import Any

import psycopg
import pytest

from sidecar.testing.pgrst import call_rpc
from sidecar.testing.realtime.database import MessageFeed, MessageRow

from ..pgfixtures import Db

pytestmark = pytest.mark.pg

WRITERS = 8


def token(project: str, session: str) -> dict[str, Any]:
    return {"role": "authenticated", "project_id": project, "session_id": session}


async def call(
    conn: psycopg.AsyncConnection[Any], fn: str, claims: dict[str, Any], **args: Any
) -> tuple[int, Any]:
    from sidecar.testing.pgrst import RpcError

    try:
        return await call_rpc(conn, fn, args, claims)
    except RpcError as exc:
        return exc.status, exc.body


async def test_concurrent_writers_get_contiguous_seq_in_commit_order(db: Db, project: str) -> None:
    """8 writers: rounds where all race on one expected_version, plus free-running writes with
    deletes, bulks and identical bytes mixed in. seq is 1..n without gaps, events arrive (at
    commit, by NOTIFY) in seq order, each round has exactly one winner, and only the calls
    that changed something have an event."""
    topic = f"project:{project}"
    delivered: list[MessageRow] = []

    async def on_message(row: MessageRow) -> None:
        if row.topic == topic:
            delivered.append(row)

    feed = MessageFeed(db.cluster.dsn("supabase_admin"), on_message)
    await feed.start()
    conns = [await db.connect_api() for _ in range(WRITERS)]
    barrier = asyncio.Barrier(WRITERS)
    rounds = 6
    winners: dict[int, list[int]] = {r: [] for r in range(rounds)}
    changed: list[dict[str, Any]] = []  # every successful answer with a seq
    failed = 0
    noops = 0

    async def writer(i: int) -> None:
        nonlocal failed, noops
        conn, claims, rng = conns[i], token(project, f"w{i}"), random.Random(i)
        for r in range(rounds):
            await barrier.wait()
            # Everyone read version r of the hot path and writes over it: one wins.
            status, body = await call(
                conn,
                "upsert_project_file",
                claims,
                project_uuid=project,
                p_file_path="hot.txt",
                p_content=f"round {r} by {i}",
                expected_version=r,
            )
            if status == 200:
                winners[r].append(i)
                changed.append(body)
            else:
                assert (status, body["code"]) == (409, "PT409")
                failed += 1
            await barrier.wait()
            for _ in range(4):
                path = f"cold/{rng.randrange(4)}.txt"
                kind = rng.random()
                if kind < 0.15:
                    status, body = await call(
                        conn,
                        "delete_project_file",
                        claims,
                        project_uuid=project,
                        p_file_path=path,
                    )
                elif kind < 0.3:
                    status, body = await call(
                        conn,
                        "bulk_upsert_project_files",
                        claims,
                        project_uuid=project,
                        files=[
                            {"file_path": f"bulk/{i}.txt", "content": f"{r}"},
                            {"file_path": path, "content": f"bulk {i} {r}"},
                        ],
                    )
                elif kind < 0.45:
                    # Stale on purpose: conflicts that must leave no trace.
                    status, body = await call(
                        conn,
                        "upsert_project_file",
                        claims,
                        project_uuid=project,
                        p_file_path=path,
                        p_content="stale",
                        expected_version=10_000,
                    )
                else:
                    # Often the same bytes as before: a no-op.
                    status, body = await call(
                        conn,
                        "upsert_project_file",
                        claims,
                        project_uuid=project,
                        p_file_path=path,
                        p_content=f"v{rng.randrange(2)}",
                    )
                if status != 200:
                    assert (status, body["code"]) == (409, "PT409"), body
                    failed += 1
                elif body["seq"] is None:
                    noops += 1
                else:
                    changed.append(body)

    try:
        await asyncio.gather(*(writer(i) for i in range(WRITERS)))
        seqs = sorted(b["seq"] for b in changed)
        n = len(seqs)
        assert seqs == list(range(1, n + 1)), "gap or duplicate in the answers' seq"
        [(head,)] = await db.sql("select seq from sidecar.projects where project_id = %s", project)
        assert head == n
        logged = await db.sql(
            "select seq from sidecar.events where project_id = %s order by seq", project
        )
        assert [r[0] for r in logged] == list(range(1, n + 1))
        async with asyncio.timeout(20):
            while len(delivered) < n:
                await asyncio.sleep(0.01)
        assert [m.payload["seq"] for m in delivered] == list(range(1, n + 1)), (
            "commit order differs from seq order"
        )
        assert all(len(w) == 1 for w in winners.values()), winners
        assert failed >= rounds * (WRITERS - 1)
        assert noops > 0
        stored = await db.sql("select count(*) from realtime.messages where topic = %s", topic)
        assert stored == [(n,)], "a failed or no-op call sent something"
        # The hot path's history is exactly one version per round, each by its winner.
        hot = await db.sql(
            "select version, content from public.project_files where project_id = %s"
            " and file_path = 'hot.txt' order by version",
            project,
        )
        assert hot == [(r + 1, f"round {r} by {winners[r][0]}") for r in range(rounds)]
    finally:
        await feed.close()
        for conn in conns:
            await conn.close()


def replay_state(
    events: list[tuple[int, str, dict[str, Any]]], upto: int
) -> dict[str, tuple[int, str]]:
    """The live files (path -> (version, content_hash)) after the events up to seq `upto`."""
    state: dict[str, tuple[int, str]] = {}
    for seq, event, payload in events:
        if seq > upto:
            break
        entries = (
            payload["files"]
            if event == "bulk:apply"
            else [{**payload, "action": "delete" if event == "file:delete" else "update"}]
        )
        for e in entries:
            if e["action"] == "delete":
                state.pop(e["file_path"], None)
            else:
                state[e["file_path"]] = (e["version"], e["content_hash"])
    return state


async def test_snapshots_under_concurrent_writes_match_the_event_log(db: Db, project: str) -> None:
    """Hundreds of project_snapshot calls while 3 writers churn: each one's files are exactly
    the state after its seq, replayed from the event log."""
    stop = asyncio.Event()
    writers = [await db.connect_api() for _ in range(3)]
    reader = await db.connect_api()
    snapshots: list[dict[str, Any]] = []

    async def churn(i: int) -> None:
        conn, claims, rng = writers[i], token(project, f"w{i}"), random.Random(100 + i)
        k = 0
        while not stop.is_set():
            k += 1
            path = f"d{rng.randrange(3)}/f{rng.randrange(6)}"
            roll = rng.random()
            if roll < 0.2:
                await call(
                    conn, "delete_project_file", claims, project_uuid=project, p_file_path=path
                )
            elif roll < 0.35:
                await call(
                    conn,
                    "bulk_upsert_project_files",
                    claims,
                    project_uuid=project,
                    files=[
                        {"file_path": path, "content": f"{i}-{k}"},
                        {"file_path": f"b/{i}", "content": f"{k}"},
                    ],
                )
            else:
                await call(
                    conn,
                    "upsert_project_file",
                    claims,
                    project_uuid=project,
                    p_file_path=path,
                    p_content=f"{i}-{k}",
                )

    async def read() -> None:
        claims = token(project, "reader")
        for _ in range(300):
            status, snap = await call(reader, "project_snapshot", claims, project_uuid=project)
            assert status == 200
            snapshots.append(snap)
        stop.set()

    try:
        await asyncio.gather(read(), *(churn(i) for i in range(3)))
        rows = await db.sql(
            "select seq, event, payload from sidecar.events where project_id = %s order by seq",
            project,
        )
        events = [(int(s), str(e), p) for s, e, p in rows]
        distinct = {s["seq"] for s in snapshots}
        assert len(distinct) > 20, "the writers did not interleave with the reader"
        for snap in snapshots:
            expected = replay_state(events, snap["seq"])
            got = {f["file_path"]: (f["version"], f["content_hash"]) for f in snap["files"]}
            assert got == expected, f"snapshot at seq {snap['seq']} is not the log's state"
        # The last snapshot's hashes are the stored bytes' hashes.
        files = await db.sql(
            "select file_path, content from public.project_files_current where project_id = %s",
            project,
        )
        final = replay_state(events, 10**9)
        assert {p: hashlib.sha256(c.encode()).hexdigest() for p, c in files} == {
            p: h for p, (_, h) in final.items()
        }
    finally:
        stop.set()
        for conn in (*writers, reader):
            await conn.close()
