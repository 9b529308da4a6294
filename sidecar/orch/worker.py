"""`sidecar snapshot worker`: answers the sidecars' snapshot requests from the database.

A sidecar asks through the RPC `request_snapshot` (its scoped token; the database records a row
in sidecar.snapshot_requests, reusing an open one of the project, and NOTIFYs
'sidecar_snapshot_requests'). Any number of workers may run:

* A worker wakes on that notification, and sweeps every `sweep_interval` seconds anyway, so a
  lost notification (a reconnect, a worker that was down) only delays a request.
* Claiming a project: a transaction-scoped advisory lock on the project (one worker per project
  at a time), then its open rows `FOR UPDATE SKIP LOCKED`. All of a project's open requests are
  answered by one publish (coalescing), and the row locks are held until the answer commits: a
  worker that dies mid-publish loses its connection, PostgreSQL releases the locks, and the next
  worker (woken by the sweep) publishes again. While the locks are held, `request_snapshot`
  still sees the rows unanswered and attaches new requests to them instead of adding rows.
* The answer is `snapshot:ready` sent with `realtime.send` in the same transaction that marks
  the rows done, so it carries `meta.id` like every database-authored event and is sent if and
  only if the rows are marked. A failed publish records its error on the rows, leaves them open
  and backs off that project until a later sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from psycopg.types.json import Jsonb

from sidecar.errors import ConfigError
from sidecar.orch.publish import database_reader, publish
from sidecar.orch.storage import StorageClient
from sidecar.redact import redact
from sidecar.retry import backoff_delay

__all__ = ["CHANNEL", "SnapshotWorker", "WorkerMetrics"]

log = structlog.get_logger(component="snapshot_worker")

CHANNEL = "sidecar_snapshot_requests"
_KNOWN_MAX = 10_000

_CANDIDATES = """
select r.project_id::text from sidecar.snapshot_requests r
 where r.done_at is null and not (r.project_id::text = any(%s::text[]))
 group by r.project_id order by min(r.id) limit 20
"""
_LOCK = "select pg_try_advisory_xact_lock(hashtextextended('sidecar.snapshot:' || %s, 0))"
_CLAIM = """
select r.id, r.session_id, r.last_seq from sidecar.snapshot_requests r
 where r.project_id = %s and r.done_at is null
 order by r.id
 for update skip locked
"""
_MARK_CLAIMED = """
update sidecar.snapshot_requests set claimed_by = %s, claimed_at = now() where id = any(%s::bigint[])
"""
_DONE = """
update sidecar.snapshot_requests set done_at = now(), snapshot_id = %s, error = null
 where id = any(%s::bigint[])
"""
_FAILED = "update sidecar.snapshot_requests set error = %s where id = any(%s::bigint[])"
_SEND = """
select realtime.send(%s, 'snapshot:ready', 'project:' || %s, true)
"""


class WorkerMetrics:
    """The worker's Prometheus metrics (its own registry), labelled by worker id."""

    def __init__(self, worker_id: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.publishes = Counter(
            "sidecar_worker_publishes", "Publishes by outcome", ("outcome",), registry=r
        )
        self.requests_answered = Counter(
            "sidecar_worker_requests_answered", "Snapshot requests marked done", registry=r
        )
        self.uploads = Counter(
            "sidecar_worker_uploads", "Publishes that uploaded a new object", registry=r
        )
        self.publish_seconds = Histogram(
            "sidecar_worker_publish_duration_seconds",
            "Wall time of one publish",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.wakeups = Counter(
            "sidecar_worker_wakeups", "Drains started, by cause", ("cause",), registry=r
        )
        self.up = Gauge("sidecar_worker_up", "1 while the worker runs", ("worker",), registry=r)
        self.up.labels(worker_id).set(0)
        self._worker_id = worker_id

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class SnapshotWorker:
    """One worker; `run(stop)` until stop is set."""

    dsn: str
    storage: StorageClient
    bucket: str
    url_ttl: int
    sweep_interval: float = 30.0
    work_dir: Path | None = None
    level: int = 3
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    failure_backoff: float = 5.0
    metrics: WorkerMetrics = field(init=False)
    _wake: asyncio.Event = field(init=False, default_factory=asyncio.Event)
    _backoff: dict[str, tuple[float, int]] = field(init=False, default_factory=dict)
    # snapshot_id -> (sha256, size) of what this worker built: an unchanged project is signed
    # again without a rebuild. Bounded: cleared when it grows past _KNOWN_MAX entries.
    _known: dict[str, tuple[str, int]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = WorkerMetrics(self.worker_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Listen, drain, sweep; reconnect with backoff when the database goes away."""
        attempt = 0
        self.metrics.up.labels(self.worker_id).set(1)
        log.info("worker.started", worker=self.worker_id, sweep_interval=self.sweep_interval)
        try:
            while not stop.is_set():
                try:
                    await self._session(stop)
                    attempt = 0
                except psycopg.errors.InsufficientPrivilege as exc:
                    raise ConfigError(
                        "DATABASE_URL's role may not use sidecar.snapshot_requests "
                        f"({str(exc).splitlines()[0]}); connect as postgres"
                    ) from None
                except (psycopg.OperationalError, OSError) as exc:
                    attempt += 1
                    delay = backoff_delay(attempt, 0.5, 30.0, floor=0.5)
                    log.warning(
                        "worker.database_unavailable",
                        error=redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__,
                        retry_in=round(delay, 2),
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        finally:
            self.metrics.up.labels(self.worker_id).set(0)
            log.info("worker.stopped", worker=self.worker_id)

    async def _session(self, stop: asyncio.Event) -> None:
        listen = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, application_name="sidecar-worker-listen"
        )
        claim = await psycopg.AsyncConnection.connect(
            self.dsn, application_name=f"sidecar-worker {self.worker_id}"
        )
        try:
            await listen.execute(f"listen {CHANNEL}")
            listener = asyncio.create_task(self._listen(listen))
            cause = "start"
            try:
                while not stop.is_set():
                    self.metrics.wakeups.labels(cause).inc()
                    # Cleared before draining: a notification that arrives during the drain
                    # (for a row the drain's query could not see yet) makes the wait return.
                    self._wake.clear()
                    while not stop.is_set() and await self.drain_one(claim):
                        pass
                    if listener.done():
                        listener.result()  # the LISTEN connection died: reconnect
                    waiters = {
                        asyncio.create_task(self._wake.wait()),
                        asyncio.ensure_future(stop.wait()),
                    }
                    _done, pending = await asyncio.wait(
                        waiters | {listener},
                        timeout=self.sweep_interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    for task in pending - {listener}:
                        task.cancel()
                    cause = "notify" if self._wake.is_set() else "sweep"
            finally:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, psycopg.Error):
                    await listener
        finally:
            await claim.close()
            await listen.close()

    async def _listen(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async for note in conn.notifies():
            log.debug("worker.notified", project_id=note.payload)
            self._wake.set()

    async def drain_one(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Answer one project's open requests; False when there is nothing to do now."""
        now = time.monotonic()
        skip = [p for p, (until, _) in self._backoff.items() if until > now]
        async with conn.transaction():
            candidates = [r[0] for r in await (await conn.execute(_CANDIDATES, (skip,))).fetchall()]
            for project in candidates:
                locked = (await (await conn.execute(_LOCK, (project,))).fetchone() or (False,))[0]
                if not locked:
                    continue  # another worker is publishing it; it answers these rows too
                rows = await (await conn.execute(_CLAIM, (project,))).fetchall()
                if not rows:
                    continue
                await self._answer(conn, project, [int(r[0]) for r in rows])
                return True
        return False

    async def _answer(
        self, conn: psycopg.AsyncConnection[Any], project: str, ids: list[int]
    ) -> None:
        await conn.execute(_MARK_CLAIMED, (self.worker_id, ids))
        log.info("worker.claimed", project_id=project, requests=len(ids))
        started = time.monotonic()
        try:
            result = await publish(
                project,
                read=database_reader(self.dsn),
                storage=self.storage,
                bucket=self.bucket,
                expires_in=self.url_ttl,
                work_dir=self.work_dir,
                level=self.level,
                known=self._known,
            )
        except Exception as exc:  # noqa: BLE001 - recorded on the rows, retried after a backoff
            reason = redact(f"{type(exc).__name__}: {exc}")[:500]
            failures = self._backoff.get(project, (0.0, 0))[1] + 1
            delay = backoff_delay(failures, self.failure_backoff, 300.0, floor=0.5)
            self._backoff[project] = (time.monotonic() + delay, failures)
            await conn.execute(_FAILED, (reason, ids))
            self.metrics.publishes.labels("error").inc()
            log.warning(
                "worker.publish_failed", project_id=project, reason=reason, retry_in=round(delay, 2)
            )
            return
        self._backoff.pop(project, None)
        if len(self._known) > _KNOWN_MAX:
            self._known.clear()
        payload = result.as_json() | {"timestamp": int(time.time() * 1000)}
        await conn.execute(_DONE, (result.snapshot_id, ids))
        await conn.execute(_SEND, (Jsonb(payload), project))
        self.metrics.publishes.labels("ok").inc()
        self.metrics.requests_answered.inc(len(ids))
        if result.uploaded:
            self.metrics.uploads.inc()
        self.metrics.publish_seconds.observe(time.monotonic() - started)
        log.info(
            "worker.answered",
            project_id=project,
            requests=len(ids),
            snapshot_id=result.snapshot_id,
            seq=result.seq,
            uploaded=result.uploaded,
        )
