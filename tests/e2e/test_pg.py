"""End to end on a real PostgreSQL: the real sidecar as a subprocess, the editor and the
containers writing through the PostgREST-compatible gateway, every event broadcast by the
database (realtime.send) and delivered from committed realtime.messages rows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
import pytest

from sidecar.testing.pgstack import PgStack
from sidecar.testing.postgres import PostgresCluster
from sidecar.twoway.upstream import Upstream

from .e2e_stack import SAMPLE, running_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.pg]


@pytest.fixture
async def stack(pg_cluster: PostgresCluster) -> AsyncIterator[PgStack]:
    async with PgStack(pg_cluster, SAMPLE) as s:
        await s.publish_snapshot()
        yield s


def editor(stack: PgStack) -> Upstream:
    """The editor's client: its own session's token, straight to the gateway."""
    return Upstream(
        stack.rpc.url,
        stack.project,
        apikey=stack.rt.anon_key,
        token=stack.token(session_id="editor"),
        retries=0,
    )


async def test_editor_writes_reach_the_tree(stack: PgStack, tmp_path: Path) -> None:
    async with running_sidecar(stack, tmp_path, token=stack.token()) as sc:  # type: ignore[arg-type]
        assert sc.tree() == await stack.files()
        async with editor(stack) as up:
            await up.upsert("src/app.js", b"export const v = 2;\n", None)
            await up.upsert("new/deep/file.txt", b"hello\n", 0)
            await up.delete("notes.txt", None)
            await up.upsert("assets/blob.bin", bytes(range(255, -1, -1)) * 4, None)
        await stack.service(
            "bulk_upsert_project_files",
            files=[
                {"file_path": "a.txt", "content": "A"},
                {"file_path": "src/util.js", "action": "delete"},
            ],
        )
        want = await stack.files()
        await sc.wait_tree(lambda: want)
        status = await sc.status()
        assert status["last_seq"] == await stack.seq()


async def test_local_edit_goes_through_the_rpc_and_back_to_another_container(
    stack: PgStack, tmp_path: Path
) -> None:
    """Container A's local write is pushed with upsert_project_file; the database broadcasts
    it and container B applies it. Neither container could broadcast on the channel."""
    async with (
        running_sidecar(
            stack,  # type: ignore[arg-type]
            tmp_path,
            name="a",
            token=stack.token(session_id="box-a"),
            upstream=True,
            env_overrides={"SIDECAR_LOCAL_CHANGES": "true"},
        ) as a,
        running_sidecar(
            stack,  # type: ignore[arg-type]
            tmp_path,
            name="b",
            token=stack.token(session_id="box-b"),
        ) as b,
    ):
        (a.project_dir / "src" / "local.js").write_bytes(b"// written inside A\n")
        await b.wait_file("src/local.js", b"// written inside A\n", timeout=20)
        head = await stack.service("get_project_file", p_file_path="src/local.js")
        assert head["version"] == 1
        senders = [
            e["payload"]["sender"]
            for e in await stack.events()
            if e["event"] == "file:update" and e["payload"]["file_path"] == "src/local.js"
        ]
        assert senders == ["box-a"]
        want = await stack.files()
        await a.wait_tree(lambda: want)
        await b.wait_tree(lambda: want)
        # No container token may write on the channel (checked lazily, at a first broadcast).
        assert all(ch.write is not True for ch in stack.rt.channels(stack.topic))


async def test_large_files_travel_without_a_body_and_are_fetched(
    stack: PgStack, tmp_path: Path
) -> None:
    """Above the inline limit the database's event carries no body; the sidecar fetches the
    bytes of that version with get_project_file through the gateway, with its own token."""
    big_text = ("x" * 99 + "\n").encode() * 3000  # 300 KB
    big_bin = bytes(range(256)) * 1000  # 256 KB, base64 larger still
    async with running_sidecar(
        stack,  # type: ignore[arg-type]
        tmp_path,
        token=stack.token(),
        env_overrides={"SUPABASE_URL": stack.rpc.url},
    ) as sc:
        await stack.editor_upsert("big.txt", big_text)
        await stack.editor_upsert("big.bin", big_bin)
        await stack.editor_bulk({"b1.txt": b"1" * 150_000, "b2.txt": b"2" * 150_000})
        # A newer version right after: the sidecar must still get each version's own bytes.
        await stack.editor_upsert("big.txt", big_text + b"more\n")
        want = await stack.files()
        await sc.wait_tree(lambda: want)
        assert await sc.metric("sidecar_resyncs_total") == 0  # fetched, not re-snapshotted
    bodyless = [
        e["payload"].get("file_path")
        for e in await stack.events()
        if e["event"] == "file:update"
        and "content" not in e["payload"]
        and "content_b64" not in e["payload"]
    ]
    assert bodyless == ["big.txt", "big.bin", "big.txt"]


async def snapshot_requests(stack: PgStack) -> int:
    async with await psycopg.AsyncConnection.connect(stack.cluster.dsn("supabase_admin")) as c:
        row = await (
            await c.execute(
                "select count(*) from sidecar.snapshot_requests where project_id = %s",
                (stack.project,),
            )
        ).fetchone()
    return int(row[0]) if row else 0


async def test_gap_beyond_replay_is_filled_from_the_event_log(
    stack: PgStack, tmp_path: Path
) -> None:
    """40 events are committed while nothing is streamed live (Realtime's replication
    connection down): more than one replay (25 rows) can return. The next live event shows
    the gap; the sidecar reads the missing events with project_events_since and converges
    without asking for a snapshot."""
    async with running_sidecar(
        stack,  # type: ignore[arg-type]
        tmp_path,
        token=stack.token(),
        env_overrides={"SUPABASE_URL": stack.rpc.url},
    ) as sc:
        stack.rt.knobs.replication_up = False
        for i in range(40):
            await stack.editor_upsert(f"missed/{i % 7}.txt", f"missed {i}\n".encode())
        stack.rt.knobs.replication_up = True
        await stack.editor_upsert("after.txt", b"the event that shows the gap\n")
        want = await stack.files()
        await sc.wait_tree(lambda: want, timeout=30)
        await sc.wait_log("sync.caught_up")
        assert (await sc.status())["last_seq"] == await stack.seq()
        assert await sc.metric("sidecar_resyncs_total") == 0
        assert await snapshot_requests(stack) == 0


async def test_silently_failed_broadcast_is_caught_up(stack: PgStack, tmp_path: Path) -> None:
    """realtime.send swallows its failures: with today's partition gone the write commits, its
    event is logged but never stored for Realtime, neither live nor in replay. The sidecar
    still gets it from the event log."""

    async with running_sidecar(
        stack,  # type: ignore[arg-type]
        tmp_path,
        token=stack.token(),
        env_overrides={"SUPABASE_URL": stack.rpc.url},
    ) as sc:
        async with await psycopg.AsyncConnection.connect(
            stack.cluster.dsn("supabase_admin"), autocommit=True
        ) as admin:
            [(partition,)] = await (
                await admin.execute(
                    "select 'realtime.messages_' || to_char(now() at time zone 'utc', 'YYYY_MM_DD')"
                )
            ).fetchall()
            await admin.execute(f"drop table {partition}")
            try:
                await stack.editor_upsert("lost.txt", b"broadcast failed silently\n")
            finally:
                await admin.execute("select realtime.create_messages_partitions()")
        lost = [e for e in await stack.events() if e["payload"].get("file_path") == "lost.txt"]
        assert len(lost) == 1  # committed and logged...
        await stack.editor_upsert("next.txt", b"delivered live\n")  # ...and this shows the gap
        want = await stack.files()
        await sc.wait_tree(lambda: want, timeout=30)
        assert (sc.project_dir / "lost.txt").read_bytes() == b"broadcast failed silently\n"
        await sc.wait_log("sync.caught_up")
        assert await sc.metric("sidecar_resyncs_total") == 0
        assert await snapshot_requests(stack) == 0


async def test_write_in_flight_during_the_snapshot_is_replayed(
    stack: PgStack, tmp_path: Path
) -> None:
    """Replay compares `since` with realtime.messages.inserted_at, the writing transaction's
    START. A write that started before the snapshot was read and committed after it (so it is
    not in the snapshot) and before the sidecar subscribed has an inserted_at before the
    snapshot's created_at: the sidecar's first join replays from well before created_at, so it
    is not lost (and delta rule 1, sidecar/live/__init__.py, drops what the snapshot already
    had)."""
    async with (
        await psycopg.AsyncConnection.connect(stack.cluster.dsn("authenticator")) as w,
        w.transaction(),
    ):
        claims = {"role": "authenticated", "project_id": stack.project, "session_id": "slow"}
        await w.execute(
            "select set_config('role', 'authenticated', true),"
            " set_config('request.jwt.claims', %s, true)",
            (json.dumps(claims),),
        )
        await asyncio.sleep(0.3)  # the transaction started well before the snapshot
        await w.execute(
            "select public.upsert_project_file(%s, 'inflight.txt', 'committed late')",
            (stack.project,),
        )
        await stack.publish_snapshot()  # does not see the uncommitted write
        created_at = (await stack.service("project_snapshot"))["created_at"]
    # Committed now, before any sidecar subscribed: nobody gets it live.
    assert "inflight.txt" in await stack.files()
    async with running_sidecar(
        stack,  # type: ignore[arg-type]
        tmp_path,
        token=stack.token(),
    ) as sc:
        await sc.wait_file("inflight.txt", b"committed late", timeout=20)
        [join] = stack.rt.frames_in("phx_join")
        assert join["payload"]["config"]["broadcast"]["replay"]["since"] < created_at - 1000
        assert await sc.metric("sidecar_resyncs_total") == 0


async def test_edits_while_disconnected_are_replayed_from_the_table(
    stack: PgStack, tmp_path: Path
) -> None:
    """Edits committed while the sidecar cannot reach Realtime are stored in
    realtime.messages; the rejoin's replay (the real query on the table) brings them, without
    the event log or a snapshot."""
    async with running_sidecar(stack, tmp_path, token=stack.token()) as sc:  # type: ignore[arg-type]
        rt = stack.rt
        rt.refuse_connects(503)
        rt.abort()
        await sc.wait(lambda: not rt.channels(stack.topic), "sidecar channel gone")
        for i in range(5):
            await stack.editor_upsert(f"offline/{i}.txt", f"edited while offline {i}\n".encode())
        refused = rt.counters.refused
        await sc.wait(lambda: rt.counters.refused > refused, "a refused reconnect after the edits")
        rt.accept_connects()
        want = await stack.files()
        await sc.wait_tree(lambda: want, timeout=30)
        assert await sc.metric("sidecar_resyncs_total") == 0
        assert not sc.events("sync.caught_up")  # no SUPABASE_URL: replay alone did it


async def test_replay_out_of_seq_order_is_put_back_in_order(stack: PgStack, tmp_path: Path) -> None:
    """Replay orders by inserted_at, the transaction's start: a write that started first but
    took the project's lock last has the higher seq and the earlier inserted_at, so replay
    sends seq N+1 before N. The sidecar holds N+1 until N arrives and applies both in order."""
    async with running_sidecar(stack, tmp_path, token=stack.token()) as sc:  # type: ignore[arg-type]
        rt = stack.rt
        rt.refuse_connects(503)
        rt.abort()
        await sc.wait(lambda: not rt.channels(stack.topic), "sidecar channel gone")
        async with (
            await psycopg.AsyncConnection.connect(stack.cluster.dsn("authenticator")) as slow,
            slow.transaction(),
        ):
            claims = {"role": "authenticated", "project_id": stack.project}
            await slow.execute(
                "select set_config('role', 'authenticated', true),"
                " set_config('request.jwt.claims', %s, true)",
                (json.dumps(claims),),
            )
            await asyncio.sleep(0.2)
            fast_version = await stack.editor_upsert("order.txt", b"first by seq\n")
            await slow.execute(
                "select public.upsert_project_file(%s, 'order.txt', 'second by seq', 'text', %s)",
                (stack.project, fast_version),
            )
        rows = await stack.events()
        assert [r["payload"]["content"] for r in rows[-2:]] == ["first by seq\n", "second by seq"]
        rt.accept_connects()
        await sc.wait_file("order.txt", b"second by seq", timeout=30)
        replayed = [
            f["payload"]["payload"]["seq"]
            for f in rt.frames_out(event="broadcast", topic=stack.topic)
            if f["payload"].get("meta", {}).get("replayed")
            and f["payload"]["payload"].get("file_path") == "order.txt"
        ]
        assert len(replayed) == 2, replayed
        assert replayed[0] > replayed[1], replayed  # the inversion happened
        want = await stack.files()
        await sc.wait_tree(lambda: want)
        assert (await sc.status())["last_seq"] == await stack.seq()
        assert await sc.metric("sidecar_resyncs_total") == 0
