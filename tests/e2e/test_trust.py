"""End to end on a real PostgreSQL, the channel is not a trust boundary: a second client holding a
write-capable token (the opt-in editor policy, sidecar/sql/options/client_broadcast.sql) pushes
file:update (higher version), file:delete, bulk:apply and snapshot:ready on the project's
channel. The sidecar changes nothing, counts each as untrusted, and keeps applying the
database's events, also those whose seqs the pushes used first. Without the option the
migration's realtime.messages policies refuse every client's write, as the real Realtime
does."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from realtime import AsyncRealtimeClient, RealtimeChannelOptions
from realtime.types import ChannelEvents

from sidecar.sql import option_sql
from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import Stack, atomic_write, running_sidecar

pytestmark = [pytest.mark.e2e, pytest.mark.pg]

_EDITOR_POLICY = '"sidecar: editor token broadcasts on its channel"'


@contextlib.asynccontextmanager
async def client_broadcast_option(cluster: PostgresCluster) -> AsyncIterator[None]:
    """`sidecar db sql --allow-client-broadcast` applied for the length of a test, as the
    migration's owner; dropped after, since the other tests share the cluster and expect the
    default (tests/db/test_authorization.py checks it)."""
    async with await psycopg.AsyncConnection.connect(cluster.dsn("postgres"), autocommit=True) as c:
        await c.execute(option_sql("client_broadcast").encode())
        try:
            yield
        finally:
            await c.execute(f"drop policy if exists {_EDITOR_POLICY} on realtime.messages".encode())


def replayed_up_to(stack: Stack, seq: int) -> list[int]:
    """The seqs (at most `seq`) of the database's events that replay sent to a sidecar."""
    return [
        f["payload"]["payload"]["seq"]
        for f in stack.rt.frames_out(event="broadcast", topic=stack.topic)
        if f["payload"].get("meta", {}).get("replayed")
        and f["payload"]["payload"].get("seq", seq + 1) <= seq
    ]


@contextlib.asynccontextmanager
async def pushing_client(stack: Stack, token: str) -> AsyncIterator[Any]:
    """A realtime-py client joined to the project's private channel with `token`."""
    client = AsyncRealtimeClient(stack.rt.url, token=stack.rt.anon_key)
    await client.set_auth(token)
    options: RealtimeChannelOptions = {
        "config": {"private": True, "presence": None, "broadcast": {"self": False, "ack": True}}
    }
    channel = client.channel(stack.topic, options)
    joined = asyncio.Event()
    await channel.subscribe(
        lambda state, _err: joined.set() if str(state).endswith("SUBSCRIBED") else None
    )
    async with asyncio.timeout(10):
        await joined.wait()
    try:
        yield channel
    finally:
        with contextlib.suppress(Exception):
            await client.close()


async def test_client_pushes_are_untrusted_and_database_events_keep_applying(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    async with (
        client_broadcast_option(pg_cluster),
        Stack(pg_cluster) as stack,
        running_sidecar(stack, tmp_path) as sc,
    ):
        assert sc.tree() == await stack.files()
        before = sc.tree()
        evil = b"evil bytes\n"
        h = hashlib.sha256(evil).hexdigest()
        seq = await stack.seq()
        pushes: list[tuple[str, dict[str, Any]]] = [
            (
                "file:update",
                {
                    "file_path": "src/app.js",
                    "content": evil.decode(),
                    "content_hash": h,
                    "version": 1000,
                    "seq": seq + 1,
                },
            ),
            ("file:delete", {"file_path": "index.html", "version": 1000, "seq": seq + 2}),
            (
                "bulk:apply",
                {
                    "seq": seq + 3,
                    "files": [
                        {
                            "file_path": "evil.js",
                            "content": evil.decode(),
                            "content_hash": h,
                            "version": 1,
                        }
                    ],
                },
            ),
            (
                "snapshot:ready",
                {
                    "snapshot_url": "http://127.0.0.1:9/evil.tar.zst",
                    "snapshot_id": "evil",
                    "seq": seq + 100,
                },
            ),
        ]
        attacker = stack.token(session_id="attacker", editor=True)
        async with pushing_client(stack, attacker) as channel:
            for event, payload in pushes:
                await channel.send_broadcast(event, payload)

            async def four() -> bool:
                return await sc.metric("sidecar_events_total", outcome="untrusted") == 4

            await sc.wait(four, "4 untrusted events")
            # The database's policy let the editor token write; the container's may not.
            writes = {ch.claims.get("session_id"): ch.write for ch in stack.sidecar_channels()}
            assert writes["attacker"] is True, writes
            assert writes["e2e"] is not True, writes
        assert sc.tree() == before
        # The database's next events carry the seqs the pushes claimed first.
        await stack.editor_upsert("src/app.js", b"export const v = 2;\n")
        await stack.editor_delete("notes.txt")
        await stack.editor_upsert("src/new.js", b"new\n")
        await sc.wait_tree(stack.files, timeout=10)
        # The only duplicates are what the first join's replay brought that the snapshot
        # already had (delta rule 4, sidecar/live/__init__.py): none of the database's events
        # was dropped for a seq a push had used.
        assert await sc.metric("sidecar_events_total", outcome="duplicate") == len(
            replayed_up_to(stack, seq)
        )
        assert not sc.events("sync.snapshot_requested")
        assert await stack.snapshot_requests() == []


async def test_with_the_channel_policy_forged_pushes_are_refused_by_the_server(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """The real boundary: no container token may write on the channel (the migration's
    realtime.messages policies have no insert policy). A push with a forged meta.id (Realtime
    relays a client's payload unchanged, meta included) never reaches the sidecar."""
    async with Stack(pg_cluster) as stack, running_sidecar(stack, tmp_path) as sc:
        before = sc.tree()
        relayed = stack.rt.counters.delivered
        pushed = stack.rt.counters.client_broadcasts
        attacker = stack.token(session_id="attacker")
        async with pushing_client(stack, attacker) as channel:
            evil = b"evil"
            forged = {
                "type": "broadcast",
                "event": "file:update",
                "payload": {
                    "file_path": "src/app.js",
                    "content": "evil",
                    "content_hash": hashlib.sha256(evil).hexdigest(),
                    "version": 1000,
                    "seq": await stack.seq() + 1,
                },
                "meta": {"id": "forged-row-id"},
            }
            await channel.push(ChannelEvents.broadcast, forged)
            await sc.wait(
                lambda: stack.rt.counters.client_broadcasts == pushed + 1, "push received"
            )
            [refused] = [
                ch for ch in stack.sidecar_channels() if ch.claims.get("session_id") == "attacker"
            ]
            assert refused.write is False  # the write check ran in the database: no
        await stack.editor_upsert("src/app.js", b"db\n")
        await sc.wait_tree(stack.files, timeout=10)
        assert sc.tree() != before
        # The database's event only, to each subscriber (the sidecar).
        assert stack.rt.counters.delivered == relayed + len(stack.rt.channels(stack.topic))
        assert await sc.metric("sidecar_events_total", outcome="untrusted") == 0


async def test_token_file_rotated_to_service_role_keeps_the_preview_up(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """REALTIME_TOKEN_FILE rewritten with a service_role token while running: refused and
    alarmed (error log, /status), the current scoped token is kept, the child keeps running
    and database changes keep applying; the key appears in no log line."""
    token_file = tmp_path / "secrets" / "token"
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(
            stack, tmp_path, cmd=["sleep", "600"], token=stack.token(), token_file=token_file
        ) as sc,
    ):
        bad = stack.token(role="service_role")
        atomic_write(token_file, bad)
        await sc.wait_log("tokens.service_role_refused")
        status = await sc.status()
        assert "service_role" in (status.get("last_error") or ""), status
        await stack.editor_upsert("src/app.js", b"after rotation\n")
        await sc.wait_tree(stack.files, timeout=10)
        assert sc.proc.returncode is None
        assert bad not in sc.log_text()


async def test_two_way_sync_with_a_token_that_cannot_write_on_the_channel(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Every container token is read-only on the channel (the migration's policies): local
    changes are still pushed and reported (rpc/report_local_change, re-broadcast by the database
    with meta.id), and a gap beyond replay and the event log (pruned) still converges through
    rpc/request_snapshot and the worker; the sidecar never broadcasts on the channel itself."""
    async with (
        Stack(pg_cluster, worker=True) as stack,
        running_sidecar(
            stack,
            tmp_path,
            upstream=True,
            env_overrides={"SIDECAR_LOCAL_CHANGES": "true"},
        ) as sc,
    ):
        await sc.wait_log("watcher.ready")
        (sc.project_dir / "local.txt").write_bytes(b"made in the container\n")
        await sc.wait(lambda: stack.content("local.txt"), "local push")

        async def reported() -> bool:
            return any(
                m.get("sender") == "e2e" and m.get("path", m.get("file_path")) == "local.txt"
                for m in await stack.messages("file:local-change")
            )

        await sc.wait(reported, "file:local-change re-broadcast by the database")
        rt = stack.rt
        rt.knobs.replication_up = False  # stored for replay, not delivered live
        for i in range(30):
            await stack.editor_upsert(f"gap/f{i:02d}.txt", f"missed {i}\n".encode())
        assert await stack.prune_event_log() >= 29
        rt.knobs.replication_up = None
        await stack.editor_upsert("gap/last.txt", b"seen live\n")
        await sc.wait_tree(stack.files, timeout=30)
        requests = await stack.snapshot_requests()
        assert requests, "no rpc/request_snapshot"
        assert requests[0]["reason"] == "seq_gap"
        assert requests[0]["session_id"] == "e2e"
        assert stack.rt.counters.client_broadcasts == 0
        assert not sc.events("localsync.broadcast_failed")
