"""End to end, live deltas (issue 3): the real `sidecar run` subprocess against the stack on a
real PostgreSQL (tests/e2e/e2e_stack.py).

Edits go through the database's RPCs, which broadcast with `realtime.send`; the Realtime test
server delivers the committed rows; every test ends with the sidecar's tree equal to the
database's files.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from sidecar.config import jwt_claims
from sidecar.errors import ExitCode
from sidecar.testing.postgres import PostgresCluster
from tests.e2e.e2e_stack import (
    Sidecar,
    Stack,
    atomic_write,
    base_env,
    read_tree,
    run_sidecar,
    running_sidecar,
    until_wall_clock,
)

pytestmark = [pytest.mark.e2e, pytest.mark.pg]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_update_delete_and_bulk_reach_disk(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """After hydration, an editor update, a delete and a multi-file bulk save all land on disk."""
    async with Stack(pg_cluster) as stack, running_sidecar(stack, tmp_path) as sc:
        assert sc.tree() == await stack.files()
        await stack.editor_upsert("src/app.js", b"export const v = 2;\n")
        await sc.wait_file("src/app.js", b"export const v = 2;\n")
        await stack.editor_delete("notes.txt")
        await sc.wait_file("notes.txt", None)
        await stack.editor_bulk(
            {"src/a.js": b"a\n", "src/b/c.js": b"c\n", "src/util.js": None, "index.html": b"x"}
        )
        await sc.wait_tree(stack.files)
        await sc.wait(_seq_caught_up(sc, stack), "/status last_seq caught up")
        status = await sc.status()
        assert status["counts"].get("applied", 0) >= 3, status


async def test_hydrate_then_sync_as_separate_commands(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """`sidecar hydrate` (init-container mode) then `sidecar sync` keeps the tree in sync and
    logs each applied event with its path, version, outcome and lag."""
    async with Stack(pg_cluster) as stack:
        project = tmp_path / "sync-project"
        code, _out, err = await run_sidecar(["hydrate"], base_env(stack, project), tmp_path)
        assert code == 0, err
        assert read_tree(project) == await stack.files()
        async with running_sidecar(stack, tmp_path, subcommand="sync", name="sync") as sc:
            await stack.editor_upsert("src/new.js", b"new\n")
            await sc.wait_file("src/new.js", b"new\n")
            line = await sc.wait_log("apply.applied", where=lambda e: e["path"] == "src/new.js")
            assert line["version"] == 1
            assert line["lag_ms"] is not None
            assert not sc.events("snapshot.hydrate_started")


async def test_edit_between_snapshot_and_subscription_is_replayed(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """An edit made after the snapshot was built but before the sidecar subscribed arrives by
    broadcast replay."""
    async with Stack(pg_cluster) as stack:
        snap = await stack.publish()
        await stack.editor_upsert("src/late.js", b"made before subscribing\n")
        assert not stack.sidecar_channels()
        async with running_sidecar(stack, tmp_path, snapshot=snap) as sc:
            await sc.wait_file("src/late.js", b"made before subscribing\n")
            await sc.wait_tree(stack.files)


async def test_edit_while_disconnected_arrives_after_reconnect(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """An edit made while the sidecar cannot reach Realtime (socket dropped, handshakes refused)
    reaches the disk once connections are accepted again."""
    async with Stack(pg_cluster) as stack, running_sidecar(stack, tmp_path) as sc:
        rt = stack.rt
        rt.refuse_connects(503)
        rt.abort()
        await sc.wait(lambda: not stack.sidecar_channels(), "sidecar channel gone")
        await sc.wait(_not_ready(sc), "sidecar noticed the outage")
        await stack.editor_upsert("offline.txt", b"edited while offline\n")
        refused = rt.counters.refused
        await sc.wait(lambda: rt.counters.refused > refused, "a refused reconnect after the edit")
        assert not (sc.project_dir / "offline.txt").exists()
        rt.accept_connects()
        await sc.wait_file("offline.txt", b"edited while offline\n", timeout=20)
        await sc.wait_tree(stack.files)
        await sc.wait_ready()


async def test_gap_beyond_replay_converges_on_snapshot_ready(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """More than 25 missed events cannot be replayed, and the event log no longer has them
    (pruned): the sidecar asks the database for a snapshot (request_snapshot) and converges on
    the worker's snapshot:ready."""
    async with (
        Stack(pg_cluster, worker=True) as stack,
        running_sidecar(stack, tmp_path, env_overrides={"SUPABASE_URL": stack.rpc.url}) as sc,
    ):
        rt = stack.rt
        rt.knobs.replication_up = False  # stored for replay, not delivered live
        for i in range(30):
            await stack.editor_upsert(f"gap/f{i:02d}.txt", f"missed {i}\n".encode())
        assert await stack.prune_event_log() >= 29
        rt.knobs.replication_up = None  # live again: the next event reveals the gap
        await stack.editor_upsert("gap/last.txt", b"seen live\n")
        await sc.wait_tree(stack.files, timeout=30)
        requests = await stack.snapshot_requests()
        assert requests, "no request_snapshot reached the database"
        assert requests[0]["reason"] == "seq_gap", requests
        assert requests[0]["done"], requests  # answered by the worker
        await sc.wait_log("sync.catch_up_incomplete")  # the pruned log could not fill it
        # The files are in place before the engine counts the resync: wait for the count.
        await sc.wait(_resynced(sc, "seq_gap"), "sidecar_resyncs_total{reason=seq_gap} >= 1")
        await sc.wait(_seq_caught_up(sc, stack), "/status last_seq caught up")


async def test_token_rotated_before_expiry_keeps_channel(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """A short-lived token in REALTIME_TOKEN_FILE replaced (atomic rename) before its exp is
    pushed to the joined channel, which survives past the old exp and keeps delivering."""
    async with Stack(pg_cluster) as stack:
        token_path = tmp_path / "secrets" / "token"
        short = stack.token(exp_in=6)
        exp = _exp(short)
        async with running_sidecar(stack, tmp_path, token=short, token_file=token_path) as sc:
            assert time.time() < exp - 1, "the sidecar took too long to start for this scenario"
            refreshes = stack.rt.counters.refreshes
            atomic_write(token_path, stack.token(exp_in=3600))
            await sc.wait(lambda: stack.rt.counters.refreshes > refreshes, "new token pushed")
            await until_wall_clock(exp + 1.5)
            await stack.editor_upsert("after-exp.txt", b"after exp\n")
            await sc.wait_file("after-exp.txt", b"after exp\n")
            assert not _expiry_closes(stack), "the channel was closed for an expired token"
            await sc.wait_ready()


async def test_token_replaced_after_expiry_rebuilds_and_catches_up(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """When the token expires before a new one is written the server closes the channel; once the
    file holds a fresh token the sidecar rejoins and catches up on the missed edit by replay."""
    async with Stack(pg_cluster) as stack:
        token_path = tmp_path / "secrets" / "token"
        short = stack.token(exp_in=5)
        async with running_sidecar(stack, tmp_path, token=short, token_file=token_path) as sc:
            await sc.wait(lambda: _expiry_closes(stack), "server closed the expired channel", 15)
            await sc.wait(_not_ready(sc), "sidecar unready after the channel closed")
            await stack.editor_upsert("missed.txt", b"while expired\n")
            atomic_write(token_path, stack.token(exp_in=3600))
            await sc.wait_file("missed.txt", b"while expired\n", timeout=20)
            await sc.wait_ready()
            await stack.editor_upsert("live.txt", b"live again\n")
            await sc.wait_tree(stack.files)


# -- every server fault of sidecar/testing/realtime/faults.py, against one sidecar process in sequence --


@dataclass(frozen=True)
class Fault:
    """A server-side fault: how to inject it, how to end it, and whether the channel is replaced."""

    name: str
    inject: Callable[[Stack], object]
    clear: Callable[[Stack], object] | None = None
    rejoins: bool = True


def _refuse_briefly(s: Stack) -> None:
    s.rt.refuse_connects(503, seconds=1.0)
    s.rt.abort()


FAULTS = [
    Fault("crash", lambda s: s.rt.crash(s.topic)),
    Fault("shutdown", lambda s: s.rt.shutdown(s.topic)),
    Fault("expire_now", lambda s: s.rt.expire_now(s.topic)),
    Fault("server_disconnect", lambda s: s.rt.server_disconnect()),
    Fault("close_1000", lambda s: s.rt.close(1000)),
    Fault("close_1001", lambda s: s.rt.close(1001)),
    Fault("close_1012", lambda s: s.rt.close(1012)),
    Fault("abort", lambda s: s.rt.abort()),
    Fault("refuse_connects", _refuse_briefly),
    Fault("oversize_frame", lambda s: s.rt.oversize_frame()),
    Fault("stale_close", lambda s: s.rt.stale_close(s.topic)),
    Fault(
        "rate_limit",
        lambda s: s.rt.rate_limit(True),
        clear=lambda s: s.rt.rate_limit(False),
        rejoins=False,
    ),
    Fault("stall", lambda s: s.rt.stall(seconds=5)),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fault_rig(
    pg_cluster: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Stack, Sidecar]]:
    """One stack and one sidecar shared by the fault tests (they run in sequence)."""
    async with (
        Stack(pg_cluster) as stack,
        running_sidecar(stack, tmp_path_factory.mktemp("faults")) as sc,
    ):
        yield stack, sc


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
async def test_fault_survived_without_losing_an_edit(
    fault_rig: tuple[Stack, Sidecar], fault: Fault
) -> None:
    """An edit before, during and after the fault all reach the disk and the tree converges."""
    stack, sc = fault_rig
    base = f"faults/{fault.name}"
    await sc.wait_ready()
    await sc.wait(stack.sidecar_channels, "sidecar joined before the fault")
    await stack.editor_upsert(f"{base}/before.txt", b"before\n")
    await sc.wait_file(f"{base}/before.txt", b"before\n")
    t0 = time.time()
    fault.inject(stack)
    await stack.editor_upsert(f"{base}/during.txt", b"during\n")
    if fault.clear is not None:
        fault.clear(stack)
    if fault.rejoins:
        await sc.wait(
            lambda: any(ch.joined_at > t0 for ch in stack.sidecar_channels()),
            f"sidecar rejoined after {fault.name}",
            20,
        )
    await stack.editor_upsert(f"{base}/after.txt", b"after\n")
    await sc.wait_tree(stack.files, timeout=25)
    assert sc.proc.returncode is None


# -- self-healing start --


async def test_expired_snapshot_url_heals_through_snapshot_request(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """An expired SNAPSHOT_URL at start makes the sidecar ask the database for a fresh snapshot
    (request_snapshot) and hydrate from the worker's snapshot:ready instead of exiting."""
    async with Stack(pg_cluster, worker=True) as stack:
        expired = await stack.publish(expires_in=-10)
        await stack.editor_upsert("src/newer.js", b"after the old snapshot\n")
        async with running_sidecar(
            stack, tmp_path, snapshot=expired, env_overrides={"SUPABASE_URL": stack.rpc.url}
        ) as sc:
            await sc.wait_tree(stack.files)
            requests = await stack.snapshot_requests()
            assert requests, "no request_snapshot reached the database"
            assert requests[0]["reason"] == "snapshot_unavailable", requests
            await sc.wait_log("sidecar.snapshot_request")


async def test_expired_snapshot_url_without_worker_exits_69(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """With the URL expired and no worker answering the database's snapshot request the sidecar
    exits 69 after SIDECAR_SNAPSHOT_REQUEST_WAIT, with a one-line error."""
    async with Stack(pg_cluster, worker=False) as stack:
        expired = await stack.publish(expires_in=-10)
        started = time.monotonic()
        async with running_sidecar(
            stack,
            tmp_path,
            snapshot=expired,
            wait_ready=False,
            env_overrides={"SIDECAR_SNAPSHOT_REQUEST_WAIT": "2", "SUPABASE_URL": stack.rpc.url},
        ) as sc:
            code = await sc.wait_exit(20)
            assert code == ExitCode.SNAPSHOT_UNAVAILABLE, sc.tail()
            assert time.monotonic() - started >= 2
            err = [ln for ln in sc.stderr().splitlines() if ln.startswith("sidecar: error:")]
            assert len(err) == 1, sc.stderr()
            token_value = expired[0].partition("token=")[2]
            assert token_value
            assert token_value not in sc.log_text()
        requests = await stack.snapshot_requests()
        assert [(r["reason"], r["done"]) for r in requests] == [("snapshot_unavailable", False)]


async def test_token_refused_for_good_exits_77(pg_cluster: PostgresCluster, tmp_path: Path) -> None:
    """When the channel policy keeps refusing the token (here: a token of another project, which
    the realtime.messages policy does not let read this topic) and no newer token comes within
    SIDECAR_AUTH_FAIL_WINDOW, the sidecar exits 77 with a one-line reason."""
    async with Stack(pg_cluster) as stack:
        other = stack.rt.make_token(project_id=str(uuid.uuid4()), session_id="e2e")
        async with running_sidecar(
            stack,
            tmp_path,
            token=other,
            wait_ready=False,
            env_overrides={"SIDECAR_AUTH_FAIL_WINDOW": "1"},
        ) as sc:
            code = await sc.wait_exit(30)
            assert code == ExitCode.REALTIME_AUTH, sc.tail()
            err = [ln for ln in sc.stderr().splitlines() if ln.startswith("sidecar: error:")]
            assert len(err) == 1, sc.stderr()
            assert "Unauthorized" in err[0] or "permission" in err[0], err
        assert ("read", stack.topic) in stack.rt.policy_calls  # evaluated in the database


# -- hostile events through the real process --


async def test_hostile_events_are_rejected_and_counted(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """Traversal, absolute paths, a hash mismatch, bad base64 and an unknown event are refused and
    counted as rejected; nothing is written outside PROJECT_DIR and the sidecar keeps syncing.
    The events come from the database (realtime.send, so with meta.id: a buggy trigger or
    producer), the path that the sidecar trusts; the hash mismatch asks for a snapshot, which
    the worker answers."""
    async with (
        Stack(pg_cluster, worker=True) as stack,
        running_sidecar(stack, tmp_path, env_overrides={"SUPABASE_URL": stack.rpc.url}) as sc,
    ):
        escape = tmp_path / "escape.txt"
        absolute = tmp_path / "absolute.txt"
        evil = b"evil\n"
        await stack.send_db(
            "file:update",
            {
                "file_path": "../escape.txt",
                "content": "evil\n",
                "content_hash": _sha(evil),
                "version": 90,
            },
        )
        await stack.send_db(
            "file:update",
            {
                "file_path": str(absolute),
                "content": "evil\n",
                "content_hash": _sha(evil),
                "version": 90,
            },
        )
        await stack.send_db(
            "file:update",
            {
                "file_path": "src/app.js",
                "content": "evil\n",
                "content_hash": _sha(b"other"),
                "version": 90,
            },
        )
        await stack.send_db(
            "file:update",
            {
                "file_path": "b64.bin",
                "content_b64": "%%%not base64%%%",
                "content_hash": _sha(evil),
                "version": 90,
            },
        )
        await stack.send_db("file:explode", {"file_path": "boom.txt"})

        async def rejected() -> float:
            return await sc.metric("sidecar_events_total", outcome="rejected")

        await sc.wait(lambda: _at_least(rejected, 5), "5 rejected events counted")
        code, _ = await sc.get("/healthz")
        assert code == 200
        await stack.editor_upsert("src/app.js", b"good\n")
        await sc.wait_tree(stack.files)
        assert sc.proc.returncode is None
        assert not escape.exists()
        assert not absolute.exists()
        assert not (sc.project_dir / "b64.bin").exists()
        assert not (sc.project_dir / "boom.txt").exists()
        assert await sc.metric("sidecar_events_total", event="unknown", outcome="rejected") >= 1


# -- helpers --


def _exp(token: str) -> float:
    exp = jwt_claims(token)["exp"]
    assert isinstance(exp, int)
    return float(exp)


def _expiry_closes(stack: Stack) -> list[object]:
    """System frames by which the server closed a channel for an expired token."""
    out = []
    for frame in stack.rt.frames_out(event="system", topic=stack.topic):
        payload = frame.get("payload", {}) if isinstance(frame, dict) else frame[4]
        if "Token has expired" in str(payload.get("message", "")):
            out.append(frame)
    return out


def _seq_caught_up(sc: Sidecar, stack: Stack) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool((await sc.status())["last_seq"] == await stack.seq())

    return check


def _resynced(sc: Sidecar, reason: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await sc.metric("sidecar_resyncs_total", reason=reason) >= 1

    return check


def _not_ready(sc: Sidecar) -> Callable[[], object]:
    async def check() -> bool:
        return not await sc.is_ready()

    return check


async def _at_least(value: Callable[[], Awaitable[float]], n: float) -> bool:
    return await value() >= n


async def test_inplace_write_mode_keeps_the_inode(
    pg_cluster: PostgresCluster, tmp_path: Path
) -> None:
    """With SIDECAR_WRITE_MODE=inplace an update rewrites the file in place (same inode, for
    watchers that follow inodes); the default atomic mode replaces it."""
    async with Stack(pg_cluster) as stack:
        for mode, same_inode in (("inplace", True), ("atomic", False)):
            async with running_sidecar(
                stack, tmp_path, env_overrides={"SIDECAR_WRITE_MODE": mode}, name=mode
            ) as sc:
                target = sc.project_dir / "src/app.js"
                inode = target.stat().st_ino
                body = f"export const mode = '{mode}';\n".encode()
                await stack.editor_upsert("src/app.js", body)
                await sc.wait_file("src/app.js", body)
                assert (target.stat().st_ino == inode) is same_inode, mode
