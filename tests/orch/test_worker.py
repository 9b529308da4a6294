"""`sidecar snapshot worker` as real processes against a real PostgreSQL (the migration) and the
Storage test server: coalescing under a burst with two workers, and a worker killed mid-publish."""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sidecar.testing.commands import spawn_sidecar, stop_process
from sidecar.testing.pgrst import call_rpc
from sidecar.testing.postgres import PostgresCluster
from sidecar.testing.snapshot_server import SnapshotServer

from ..pgfixtures import Db

pytestmark = pytest.mark.pg

BUCKET = "project-snapshots"
SERVICE = {"role": "service_role"}


@pytest.fixture
async def storage() -> AsyncIterator[SnapshotServer]:
    async with SnapshotServer(buckets=[BUCKET]) as server:
        yield server


class Workers:
    """Worker subprocesses, stopped (SIGTERM, then SIGKILL) at the end of the test."""

    def __init__(self, cluster: PostgresCluster, storage: SnapshotServer, log_dir: Path) -> None:
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SUPABASE_", "SIDECAR_", "DATABASE_"))
        } | {
            "DATABASE_URL": cluster.url("postgres"),
            "SUPABASE_URL": storage.base_url,
            "SUPABASE_SERVICE_ROLE_KEY": storage.service_role_key,
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "debug",
        }
        self.log_dir = log_dir
        self.procs: list[asyncio.subprocess.Process] = []

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        proc = await spawn_sidecar(
            self.env,
            "snapshot",
            "worker",
            "--sweep-interval",
            "0.3",
            "--http-addr",
            "127.0.0.1:0",
            *args,
            log=self.log_dir / f"worker-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        return proc

    async def port(self, proc: asyncio.subprocess.Process, timeout: float = 30) -> int:
        """The port of the worker's /metrics, from its `worker.http` line (waited for: a worker
        that the other one beat to every request may still be starting)."""
        import json

        deadline = time.monotonic() + timeout
        while True:
            for line in self.logs().splitlines():
                if '"worker.http"' in line:
                    doc = json.loads(line)
                    if doc["worker"].endswith(f":{proc.pid}"):
                        return int(doc["port"])
            if proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker {proc.pid} never listened:\n{self.logs()[-2000:]}")
            await asyncio.sleep(0.05)

    async def metric(self, proc: asyncio.subprocess.Process, name: str) -> float:
        """The sum of a metric's samples on the worker's /metrics."""
        import aiohttp

        port = await self.port(proc)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )

    def logs(self) -> str:
        return "\n".join(p.read_text() for p in sorted(self.log_dir.glob("worker-*.log")))

    async def stop(self) -> None:
        await asyncio.gather(*(stop_process(proc, grace=10) for proc in self.procs))


@pytest.fixture
async def workers(
    pg_cluster: PostgresCluster, storage: SnapshotServer, tmp_path: Path
) -> AsyncIterator[Workers]:
    w = Workers(pg_cluster, storage, tmp_path)
    try:
        yield w
    finally:
        await w.stop()


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def new_project(db: Db, files: int) -> str:
    pid = str(uuid.uuid4())
    assert (await db.call("register_project", SERVICE, project_uuid=pid))[0] == 200
    entries = [
        {"file_path": f"src/f{i}.txt", "content": f"file {i} of {pid}\n"} for i in range(files)
    ]
    status, body = await db.call(
        "bulk_upsert_project_files", SERVICE, project_uuid=pid, files=entries
    )
    assert status == 200, body
    return pid


async def open_requests(db: Db, projects: list[str]) -> int:
    rows = await db.sql(
        "select count(*) from sidecar.snapshot_requests where done_at is null"
        " and project_id::text = any(%s)",
        projects,
    )
    return int(rows[0][0])


async def ready_messages(db: Db, project: str) -> list[dict[str, Any]]:
    rows = await db.sql(
        "select payload from realtime.messages where topic = %s and event = 'snapshot:ready'",
        f"project:{project}",
    )
    return [r[0] for r in rows]


async def test_burst_is_coalesced_per_project_with_two_workers(
    db: Db, pg_cluster: PostgresCluster, storage: SnapshotServer, workers: Workers
) -> None:
    """50 request_snapshot calls from 5 sessions (their scoped claims) for 3 projects while two
    workers run: every request answered, each project published (uploaded, snapshot:ready)
    exactly once, the answer at the project's seq with meta-carrying realtime.send rows."""
    projects = [await new_project(db, n) for n in (3, 5, 8)]
    sessions = [(f"sess-{i}", projects[i % 3]) for i in range(5)]
    storage.upload_gate = asyncio.Event()  # publishes wait in the upload until the burst is in
    procs = [await workers.start(), await workers.start()]

    async def sidecar(session: str, project: str) -> None:
        claims = {"role": "authenticated", "project_id": project, "session_id": session}
        async with await psycopg.AsyncConnection.connect(pg_cluster.dsn("authenticator")) as conn:
            for i in range(10):
                body = await call_rpc(
                    conn,
                    "request_snapshot",
                    {"project_uuid": project, "p_reason": f"gap {i}", "p_last_seq": 1},
                    claims,
                )
                assert "request_id" in body[1]

    await asyncio.gather(*(sidecar(s, p) for s, p in sessions))
    await until(lambda: _now(bool(storage.uploads)), "a publish to reach the upload")
    storage.upload_gate.set()
    await until(lambda: _zero(open_requests(db, projects)), "every request answered")

    for project in projects:
        (seq,) = (await db.sql("select seq from sidecar.projects where project_id = %s", project))[
            0
        ]
        ready = await ready_messages(db, project)
        assert len(ready) == 1, (project, ready)
        assert ready[0]["seq"] == seq
        assert set(ready[0]) >= {"snapshot_url", "snapshot_id", "sha256", "seq", "timestamp"}
        keys = [k for k in storage.object_keys() if k.startswith(f"{BUCKET}/{project}/")]
        assert keys == [f"{BUCKET}/{project}/{ready[0]['snapshot_id']}.tar.zst"]
        rows = await db.sql(
            "select snapshot_id, claimed_by, error from sidecar.snapshot_requests"
            " where project_id = %s",
            project,
        )
        assert rows
        assert all(r[0] == ready[0]["snapshot_id"] and r[2] is None for r in rows), rows
    assert sorted(u.status for u in storage.uploads) == ["200", "200", "200"]
    assert "token=" not in workers.logs()
    ok = [await workers.metric(p, 'sidecar_worker_publishes_total{outcome="ok"}') for p in procs]
    assert sum(ok) == 3
    answered = [await workers.metric(p, "sidecar_worker_requests_answered_total") for p in procs]
    rows = await db.sql(
        "select count(*) from sidecar.snapshot_requests where project_id::text = any(%s)",
        projects,
    )
    assert sum(answered) == rows[0][0]


async def test_a_failed_publish_is_recorded_and_retried(
    db: Db, pg_cluster: PostgresCluster, storage: SnapshotServer, workers: Workers
) -> None:
    """Storage refuses (no such bucket): the error is on the request, which stays open, and
    counted; once the bucket exists, a later sweep answers it."""
    project = await new_project(db, 2)
    storage.buckets.discard(BUCKET)
    proc = await workers.start("--failure-backoff", "0.2")
    claims = {"role": "authenticated", "project_id": project, "session_id": "s-1"}
    assert (await db.call("request_snapshot", claims, project_uuid=project))[0] == 200

    async def recorded() -> bool:
        rows = await db.sql(
            "select error, done_at from sidecar.snapshot_requests where project_id = %s", project
        )
        return bool(rows and rows[0][0])

    await until(recorded, "the error on the request")
    ((error, done_at),) = await db.sql(
        "select error, done_at from sidecar.snapshot_requests where project_id = %s", project
    )
    assert "Bucket not found" in error
    assert done_at is None
    assert await workers.metric(proc, 'sidecar_worker_publishes_total{outcome="error"}') >= 1
    storage.buckets.add(BUCKET)
    await until(lambda: _zero(open_requests(db, [project])), "the retried request answered")
    assert len(await ready_messages(db, project)) == 1


async def _answered(db: Db, project: str) -> bool:
    return await open_requests(db, [project]) == 0


async def _now(value: bool) -> bool:
    return value


async def _zero(count: Awaitable[int]) -> bool:
    return await count == 0


async def test_a_worker_killed_mid_publish_leaves_the_request_to_another(
    db: Db, pg_cluster: PostgresCluster, storage: SnapshotServer, workers: Workers
) -> None:
    """Worker A dies (SIGKILL) while its upload is in flight; its row locks go with its
    connection and worker B answers the request; A never sent snapshot:ready."""
    project = await new_project(db, 4)
    storage.upload_gate = asyncio.Event()
    first = await workers.start()
    claims = {"role": "authenticated", "project_id": project, "session_id": "s-1"}
    status, _ = await db.call("request_snapshot", claims, project_uuid=project, p_last_seq=0)
    assert status == 200
    await until(lambda: _now(bool(storage.uploads)), "worker A's upload")
    second = await workers.start()
    await until(lambda: _logged(workers, second.pid, "worker.started"), "worker B running")
    first.kill()
    await first.wait()
    storage.upload_gate.set()
    await until(lambda: _zero(open_requests(db, [project])), "the request answered by B")
    rows = await db.sql(
        "select claimed_by, snapshot_id, error from sidecar.snapshot_requests where project_id = %s",
        project,
    )
    assert len(rows) == 1
    claimed_by, snapshot_id, error = rows[0]
    assert claimed_by.endswith(f":{second.pid}")
    assert error is None
    ready = await ready_messages(db, project)
    assert [m["snapshot_id"] for m in ready] == [snapshot_id]
    assert storage.object_keys() == [f"{BUCKET}/{project}/{snapshot_id}.tar.zst"]


async def _logged(workers: Workers, pid: int, event: str) -> bool:
    await asyncio.sleep(0)
    return any(event in line and f":{pid}" in line for line in workers.logs().splitlines())


async def test_notify_wakes_the_worker_without_a_sweep(
    db: Db, pg_cluster: PostgresCluster, storage: SnapshotServer, workers: Workers
) -> None:
    """With a 10-minute sweep, each request_snapshot is answered at once: its NOTIFY woke the
    worker (counted as such), never a sweep."""
    proc = await workers.start("--sweep-interval", "600")
    await until(lambda: _logged(workers, proc.pid, "worker.http"), "the worker running")
    for n in range(3):
        project = await new_project(db, 1 + n)
        claims = {"role": "authenticated", "project_id": project, "session_id": f"s-{n}"}
        assert (await db.call("request_snapshot", claims, project_uuid=project))[0] == 200
        await until(functools.partial(_answered, db, project), "answered", timeout=20)
    assert await workers.metric(proc, 'sidecar_worker_wakeups_total{cause="notify"}') >= 3
    assert await workers.metric(proc, 'sidecar_worker_wakeups_total{cause="sweep"}') == 0
