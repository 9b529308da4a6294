"""End to end, the channel is not a trust boundary: a second client holding a write-capable
token pushes file:update (higher version), file:delete, bulk:apply and snapshot:ready on the
project's channel. The sidecar changes nothing, counts each as untrusted, and keeps applying
the database's events, also those whose seqs the pushes used first."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from realtime import AsyncRealtimeClient, RealtimeChannelOptions
from realtime.types import ChannelEvents

from sidecar.testing.realtime.server import Policy
from tests.e2e.e2e_stack import Stack, atomic_write, running_sidecar

pytestmark = pytest.mark.e2e


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
    tmp_path: Path,
) -> None:
    async with Stack() as stack, running_sidecar(stack, tmp_path) as sc:
        assert sc.tree() == stack.files()
        before = sc.tree()
        evil = b"evil bytes\n"
        h = hashlib.sha256(evil).hexdigest()
        seq = stack.rpc.seq(stack.project)
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
        attacker = stack.rpc.make_token(stack.project, session_id="attacker")
        async with pushing_client(stack, attacker) as channel:
            for event, payload in pushes:
                await channel.send_broadcast(event, payload)

            async def four() -> bool:
                return await sc.metric("sidecar_events_total", outcome="untrusted") == 4

            await sc.wait(four, "4 untrusted events")
        assert sc.tree() == before
        # The database's next events carry the seqs the pushes claimed first.
        await stack.rpc.editor_upsert(stack.project, "src/app.js", b"export const v = 2;\n")
        await stack.rpc.editor_delete(stack.project, "notes.txt")
        await stack.rpc.editor_upsert(stack.project, "src/new.js", b"new\n")
        await sc.wait_tree(stack.files, timeout=10)
        assert await sc.metric("sidecar_events_total", outcome="duplicate") == 0
        assert not sc.events("sync.snapshot_requested")
        assert stack.producer.requests == []


async def test_with_the_channel_policy_forged_pushes_are_refused_by_the_server(
    tmp_path: Path,
) -> None:
    """The real boundary: no container token may write on the channel (the database-half
    channel policy, emulated here). A push with a forged meta.id (Realtime relays a client's
    payload unchanged, meta included) never reaches the sidecar."""
    async with Stack() as stack:
        stack.rt.policy = lambda claims, _topic: Policy(read=True, write=False)
        async with running_sidecar(stack, tmp_path) as sc:
            before = sc.tree()
            relayed = stack.rt.counters.delivered
            pushed = stack.rt.counters.client_broadcasts
            attacker = stack.rpc.make_token(stack.project, session_id="attacker")
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
                        "seq": stack.rpc.seq(stack.project) + 1,
                    },
                    "meta": {"id": "forged-row-id"},
                }
                await channel.push(ChannelEvents.broadcast, forged)
                await sc.wait(
                    lambda: stack.rt.counters.client_broadcasts == pushed + 1, "push received"
                )
            await stack.rpc.editor_upsert(stack.project, "src/app.js", b"db\n")
            await sc.wait_tree(stack.files, timeout=10)
            assert sc.tree() != before
            # The database's event only, to each subscriber (the sidecar and the producer).
            assert stack.rt.counters.delivered == relayed + len(stack.rt.channels(stack.topic))
            assert await sc.metric("sidecar_events_total", outcome="untrusted") == 0


async def test_token_file_rotated_to_service_role_keeps_the_preview_up(tmp_path: Path) -> None:
    """REALTIME_TOKEN_FILE rewritten with a service_role token while running: refused and
    alarmed (error log, /status), the current scoped token is kept, the child keeps running
    and database changes keep applying; the key appears in no log line."""
    token_file = tmp_path / "secrets" / "token"
    async with (
        Stack() as stack,
        running_sidecar(
            stack, tmp_path, cmd=["sleep", "600"], token=stack.token(), token_file=token_file
        ) as sc,
    ):
        bad = stack.rpc.make_token(stack.project, role="service_role")
        atomic_write(token_file, bad)
        await sc.wait_log("tokens.service_role_refused")
        status = await sc.status()
        assert "service_role" in (status.get("last_error") or ""), status
        await stack.rpc.editor_upsert(stack.project, "src/app.js", b"after rotation\n")
        await sc.wait_tree(stack.files, timeout=10)
        assert sc.proc.returncode is None
        assert bad not in sc.log_text()


async def test_two_way_sync_with_a_token_that_cannot_write_on_the_channel(
    tmp_path: Path,
) -> None:
    """Every container token is read-only on the channel (the policy): local changes are still
    pushed and reported (rpc/report_local_change, re-broadcast by the database with meta.id), and
    a gap beyond replay still converges through rpc/request_snapshot; the sidecar never
    broadcasts on the channel itself."""
    async with Stack() as stack:
        stack.rt.policy = lambda claims, _topic: Policy(read=True, write=False)
        async with running_sidecar(
            stack,
            tmp_path,
            upstream=True,
            env_overrides={"SIDECAR_LOCAL_CHANGES": "true"},
        ) as sc:
            await sc.wait_log("watcher.ready")
            (sc.project_dir / "local.txt").write_bytes(b"made in the container\n")
            await sc.wait(lambda: stack.rpc.head(stack.project, "local.txt"), "local push")

            def reported() -> bool:
                return any(
                    m.event == "file:local-change"
                    and (m.payload or {}).get("sender") == "e2e"
                    and (m.payload or {}).get("path", (m.payload or {}).get("file_path"))
                    == "local.txt"
                    for m in stack.rt.messages
                )

            await sc.wait(reported, "file:local-change re-broadcast by the database")
            rt, p = stack.rt, stack.project
            rt.knobs.replication_up = False  # stored for replay, not delivered live
            for i in range(30):
                await stack.rpc.editor_upsert(p, f"gap/f{i:02d}.txt", f"missed {i}\n".encode())
            rt.knobs.replication_up = None
            await stack.rpc.editor_upsert(p, "gap/last.txt", b"seen live\n")
            await sc.wait_tree(stack.files, timeout=30)
            assert stack.rpc.snapshot_requests, "no rpc/request_snapshot"
            assert stack.rpc.snapshot_requests[0]["reason"] == "seq_gap"
            assert stack.rpc.snapshot_requests[0]["session_id"] == "e2e"
            assert stack.rt.counters.client_broadcasts == 0
            assert not sc.events("localsync.broadcast_failed")
