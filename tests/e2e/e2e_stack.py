"""Shared helpers for the end-to-end tests: the stack on a real PostgreSQL and the real sidecar as
a subprocess.

`Stack` is the chain of "Deploying with Supabase" (README) on loopback: the session's
PostgreSQL 15 cluster with the migration (tests/pgfixtures.py), the PostgREST-compatible
gateway, the Realtime test server in PostgreSQL mode (live delivery and replay from committed
realtime.messages rows, joins authorized by the real policies) and the Storage-style snapshot
server (sidecar/testing/pgstack.py). Snapshots are made by the real publish path
(sidecar/orch/publish.py, in-process) and, with `worker=True`, snapshot requests are answered by
a real `sidecar snapshot worker` subprocess. Every change goes through the database's RPCs.

`MemoryStack` is the older in-memory stack (RpcServer, Producer): only the in-process unit tests
of tests/test_app.py and scripts/soak use it.

`running_sidecar` runs `python -m sidecar run -- CMD` against a stack with small timing knobs,
waits for /readyz, yields a `Sidecar` handle and stops the process with SIGTERM on exit. Every
wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import psycopg
from psycopg.types.json import Jsonb

from sidecar.orch.publish import Published, database_reader, object_path, publish
from sidecar.orch.storage import StorageClient
from sidecar.testing.commands import (
    CommandTimeoutError,
    sidecar_command,
    spawn_sidecar,
    stop_process,
)
from sidecar.testing.pgstack import PgStack
from sidecar.testing.postgres import SUPERUSER, PostgresCluster
from sidecar.testing.producer import Producer
from sidecar.testing.realtime.server import Channel, Knobs, RealtimeServer
from sidecar.testing.rpc_server import RpcServer
from sidecar.testing.snapshot_server import SnapshotServer

__all__ = [
    "BUCKET",
    "PROJECT",
    "SAMPLE",
    "MemoryStack",
    "Sidecar",
    "Stack",
    "atomic_write",
    "base_env",
    "read_tree",
    "run_sidecar",
    "running_sidecar",
    "until_wall_clock",
    "wait_for",
    "write_script",
]

PROJECT = "e2e-project"
SAMPLE: dict[str, bytes] = {
    "index.html": b"<!doctype html><title>e2e</title>\n",
    "package.json": b'{"name": "e2e", "version": "1.0.0"}\n',
    "src/app.js": b"export const v = 1;\n",
    "src/util.js": b"export const add = (a, b) => a + b;\n",
    "notes.txt": b"to be deleted\n",
    "assets/blob.bin": bytes(range(256)) * 8,
}
STATE_DIR_NAME = ".sidecar"
BUCKET = "project-snapshots"  # the orchestrator's default bucket (sidecar/orch/settings.py)

# Timing knobs for a test-sized sidecar (config.py names); tests override per case.
FAST_ENV: dict[str, str] = {
    "SIDECAR_HEARTBEAT_WINDOW": "4",  # check every 1 s, ping timeout 2 s, grace 2 s
    "SIDECAR_PING_INTERVAL": "1",
    "SIDECAR_REBUILD_BACKOFF": "0.1",
    "SIDECAR_BACKOFF_INITIAL": "0.05",
    "SIDECAR_BACKOFF_MAX": "0.5",
    "SIDECAR_SNAPSHOT_RETRIES": "3",
    "SIDECAR_READ_TIMEOUT": "10",
    "SIDECAR_SNAPSHOT_REQUEST_WAIT": "20",
    "SIDECAR_STOP_GRACE": "3",
    "SIDECAR_LOCAL_CHANGES": "false",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "info",
    "PYTHONUNBUFFERED": "1",
}
_SCRUBBED_PREFIXES = ("SIDECAR_", "REALTIME_", "SNAPSHOT_", "SUPABASE_", "LOG_")
_SCRUBBED = {"PROJECT_ID", "SESSION_ID", "PROJECT_DIR", "SERVICE_ROLE_KEY"}


async def wait_for(
    check: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    proc: asyncio.subprocess.Process | None = None,
    interval: float = 0.02,
    on_timeout: Callable[[], str] | None = None,
) -> Any:
    """Poll `check()` (sync or async) until it returns something truthy; return that value.

    Raises AssertionError naming `what` after `timeout` seconds, or at once when `proc` exits.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if proc is not None and proc.returncode is not None:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"the sidecar exited with {proc.returncode} before: {what}{extra}")
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}{extra}")
        await asyncio.sleep(interval)


def read_tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root (posix relative path -> bytes), the state dir excluded."""
    out: dict[str, bytes] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != STATE_DIR_NAME]
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                try:
                    out[(rel_dir / name).as_posix()] = path.read_bytes()
                except FileNotFoundError:
                    continue  # replaced while walking; the next poll sees it
    return out


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temp file and rename, the way a secret projection or a careful writer does."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)


def write_script(path: Path, source: str) -> Path:
    """Write a Python helper script (a test child or hook) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return path


class MemoryStack:
    """Realtime + snapshot + in-memory RPC servers and a Producer for one project; an async
    context manager. Only tests/test_app.py (in-process unit tests) and scripts/soak use it: the
    end-to-end tests run on `Stack`, a real PostgreSQL.

    Args:
        project: the project id (topic `project:<id>`).
        files: the seed rows of the project table (the first snapshot's content).
        knobs: RealtimeServer knobs (default: the real ones, with 0.05 s error backoffs).
        producer: start the Producer (answers `snapshot:request`); off to test its absence.
    """

    def __init__(
        self,
        project: str = PROJECT,
        files: Mapping[str, bytes] | None = None,
        *,
        knobs: Knobs | None = None,
        producer: bool = True,
    ) -> None:
        self.project = project
        self.seed_files = dict(SAMPLE if files is None else files)
        self.knobs = knobs or Knobs(channel_error_backoff=0.05, connect_error_backoff=0.05)
        self.start_producer = producer
        self._stack = contextlib.AsyncExitStack()
        self.rt: RealtimeServer
        self.snaps: SnapshotServer
        self.rpc: RpcServer
        self.producer: Producer

    @property
    def topic(self) -> str:
        """The project's channel sub-topic."""
        return f"project:{self.project}"

    async def __aenter__(self) -> Self:
        s = self._stack
        self.rt = await s.enter_async_context(RealtimeServer(knobs=self.knobs))
        self.snaps = await s.enter_async_context(SnapshotServer())
        self.rpc = await s.enter_async_context(RpcServer(realtime=self.rt))
        self.rpc.seed(self.project, self.seed_files)
        self.producer = Producer(self.project, rpc=self.rpc, snapshots=self.snaps, realtime=self.rt)
        s.push_async_callback(self.producer.close)
        if self.start_producer:
            await self.producer.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def snapshot(self, *, expires_in: float | None = None) -> tuple[str, str]:
        """Build and publish a snapshot of the table as it is now: (signed URL, sha256)."""
        return self.producer.snapshot(expires_in=expires_in)

    def token(self, *, exp_in: float = 3600, session_id: str = "e2e") -> str:
        """A scoped JWT for this project (role authenticated), signed with the stack's secret."""
        return self.rpc.make_token(self.project, exp_in=exp_in, session_id=session_id)

    def files(self) -> dict[str, bytes]:
        """The database's live files: what every converged tree must equal."""
        return self.rpc.files(self.project)

    def sidecar_channels(self) -> list[Channel]:
        """Live server-side channels of the sidecar (the producer's service_role one excluded)."""
        return [
            ch for ch in self.rt.channels(self.topic) if ch.claims.get("role") != "service_role"
        ]

    def producer_joined(self) -> bool:
        """True while the producer's channel is live on the server."""
        return any(ch.claims.get("role") == "service_role" for ch in self.rt.channels(self.topic))

    async def ensure_producer(self, timeout: float = 10.0) -> None:
        """Restart the producer when a server fault took its channel away (realtime-py does not
        rejoin after a server `phx_close`); wait until it is joined again."""
        if not self.start_producer:
            return
        with contextlib.suppress(AssertionError):
            await wait_for(self.producer_joined, 2.0, "producer rejoined by itself")
            return
        await self.producer.close()
        await self.producer.start()
        await wait_for(self.producer_joined, timeout, "producer joined")


class Stack(PgStack):
    """One registered project on the session's PostgreSQL, seeded with `files` (default SAMPLE)
    and published once; an async context manager.

    Args:
        cluster: the session's cluster (the `pg_cluster` fixture, tests/pgfixtures.py).
        files: the project's first files, written with one bulk_upsert_project_files.
        worker: run `sidecar snapshot worker` (a subprocess, as the orchestrator does), which
            answers the sidecars' request_snapshot calls with snapshot:ready; off to test its
            absence. A sidecar reaches it only with SUPABASE_URL set (container tokens cannot
            broadcast a snapshot:request on the channel).

    The editor writes through the RPCs (`editor_upsert`, `editor_delete`, `editor_bulk`), the
    database broadcasts every change; `files()` is the database's live files, what every
    converged tree must equal. Fault knobs: `rt` (sidecar/testing/realtime/faults.py and
    `rt.knobs`, e.g. `replication_up`), `rpc.faults` (the gateway), `snaps.faults`, and the
    database itself (`prune_event_log`, `send_db`).
    """

    def __init__(
        self,
        cluster: PostgresCluster,
        files: Mapping[str, bytes] | None = None,
        *,
        worker: bool = False,
    ) -> None:
        super().__init__(cluster, SAMPLE if files is None else files)
        self.start_worker = worker
        self.published: list[Published] = []
        self.worker_log: Path | None = None
        self._known: dict[str, tuple[str, int]] = {}  # publish's cache, as the worker keeps one
        self._admin: psycopg.AsyncConnection[Any]
        self._storage: StorageClient
        self._worker: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        s = self._stack
        try:
            self.snaps.buckets.add(BUCKET)
            self._admin = await psycopg.AsyncConnection.connect(
                self.cluster.dsn(SUPERUSER), autocommit=True
            )
            s.push_async_callback(self._admin.close)
            s.push_async_callback(self._forget_requests)
            http = await s.enter_async_context(aiohttp.ClientSession())
            self._storage = StorageClient(self.snaps.base_url, self.snaps.service_role_key, http)
            await self.publish()
            if self.start_worker:
                await self._start_worker()
        except BaseException:
            await s.aclose()
            raise
        return self

    # -- snapshots --

    async def publish(self, *, expires_in: float | None = None) -> tuple[str, str]:
        """Publish the database's files as `sidecar snapshot publish` does (sidecar/orch/
        publish.py: one consistent read, a deterministic build, upload unless stored, sign):
        (signed URL, sha256). With `expires_in` the URL of that object is signed for that long
        instead (negative: already expired, a URL handed out too long ago)."""
        result = await publish(
            self.project,
            read=database_reader(self.cluster.url("postgres")),
            storage=self._storage,
            bucket=BUCKET,
            expires_in=3600,
            known=self._known,
        )
        self.published.append(result)
        url = result.snapshot_url
        if expires_in is not None:
            key = object_path(self.project, result.snapshot_id)
            url = self.snaps.url_for(key, expires_in=expires_in, bucket=BUCKET)
        return url, result.sha256

    def snapshot(self) -> tuple[str, str]:
        """The newest published snapshot (base_env's default; `publish()` makes a newer one)."""
        return self.published[-1].snapshot_url, self.published[-1].sha256

    def orchestrator_env(self) -> dict[str, str]:
        """What the orchestrator and the worker hold: the database URL and the service key."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SUPABASE_", "SIDECAR_", "DATABASE_", "SNAPSHOT_", "REALTIME_"))
        }
        return base | {
            "DATABASE_URL": self.cluster.url("postgres"),
            "SUPABASE_URL": self.rpc.url,
            "SIDECAR_STORAGE_URL": self.snaps.base_url,
            "SUPABASE_SERVICE_ROLE_KEY": self.snaps.service_role_key,
            "SIDECAR_SNAPSHOT_BUCKET": BUCKET,
            "LOG_FORMAT": "json",
        }

    async def _start_worker(self) -> None:
        # No wait for it to listen: it drains the open requests when it starts, after LISTEN
        # (sidecar/orch/worker.py), so a request made before that is answered too.
        workdir = Path(tempfile.mkdtemp(prefix="e2e-worker-"))
        self._stack.callback(shutil.rmtree, workdir, True)
        self.worker_log = workdir / "worker.log"
        self._worker = await spawn_sidecar(
            self.orchestrator_env(),
            "snapshot",
            "worker",
            "--sweep-interval",
            "1",
            log=self.worker_log,
        )
        self._stack.push_async_callback(self._stop_worker)

    async def _stop_worker(self) -> None:
        proc, self._worker = self._worker, None
        if proc is None:
            return
        code = await stop_process(proc)
        assert code == 0, f"the worker exited with {code}{self.worker_tail()}"

    def worker_tail(self, n: int = 20) -> str:
        """The worker's last log lines, for assertion messages."""
        if self.worker_log is None or not self.worker_log.exists():
            return ""
        lines = self.worker_log.read_text(errors="replace").splitlines()[-n:]
        return "\n--- worker log (tail) ---\n" + "\n".join(lines)

    # -- the database, as its superuser --

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """A statement as the superuser (autocommit); its rows."""
        cur = await self._admin.execute(query.encode(), params or None)
        return await cur.fetchall() if cur.description else []

    async def send_db(self, event: str, payload: dict[str, Any]) -> None:
        """`realtime.send` on the project's topic, as a database function (a trigger, another
        producer) would: the event is stored and delivered with meta.id, like the RPCs' own."""
        await self.sql("select realtime.send(%s, %s, %s, true)", Jsonb(payload), event, self.topic)

    async def messages(self, event: str) -> list[dict[str, Any]]:
        """The payloads of the realtime.messages rows of this topic with this event name."""
        rows = await self.sql(
            "select payload from realtime.messages where topic = %s and event = %s"
            " order by inserted_at",
            self.topic,
            event,
        )
        return [dict(r[0]) for r in rows]

    async def content(self, path: str) -> bytes | None:
        """The live bytes of path in the database (None: never written, or deleted)."""
        head = await self.service("get_project_file", p_file_path=path)
        if head is None or head["deleted"]:
            return None
        if "content_b64" in head:
            return base64.b64decode(head["content_b64"])
        return str(head["content"]).encode()

    async def snapshot_requests(self) -> list[dict[str, Any]]:
        """This project's rows of the worker's queue (sidecar.snapshot_requests), oldest first."""
        rows = await self.sql(
            "select session_id, reason, last_seq, snapshot_id, done_at is not null"
            " from sidecar.snapshot_requests where project_id = %s order by id",
            self.project,
        )
        keys = ("session_id", "reason", "last_seq", "snapshot_id", "done")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    async def prune_event_log(self) -> int:
        """Delete this project's logged events but the newest, as `sidecar.prune_events` does
        past its retention (sidecar/sql/001_sidecar.sql), for this project only (the cluster is
        shared): a gap then cannot be filled from project_events_since and needs a snapshot."""
        rows = await self.sql(
            "with gone as (delete from sidecar.events e where e.project_id = %s"
            "  and e.seq < (select p.seq from sidecar.projects p where p.project_id = %s)"
            "  returning 1) select count(*) from gone",
            self.project,
            self.project,
        )
        return int(rows[0][0])

    async def _forget_requests(self) -> None:
        # Requests no worker answered must not be answered by a later test's worker.
        await self.sql(
            "delete from sidecar.snapshot_requests where project_id = %s and done_at is null",
            self.project,
        )

    def sidecar_channels(self) -> list[Channel]:
        """Live server-side channels of the project (service_role ones excluded)."""
        return [
            ch for ch in self.rt.channels(self.topic) if ch.claims.get("role") != "service_role"
        ]


def base_env(
    stack: Stack | MemoryStack | None,
    project_dir: Path,
    *,
    snapshot: tuple[str, str] | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    upstream: bool = False,
    overrides: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The sidecar's environment: the caller's minus every sidecar variable, plus the stack's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED
    }
    env.update(FAST_ENV)
    env.update(
        {
            "PROJECT_DIR": str(project_dir),
            "SESSION_ID": "e2e",
            "SIDECAR_HTTP_ADDR": "127.0.0.1:0",
        }
    )
    if stack is not None:
        url, sha = snapshot if snapshot is not None else stack.snapshot()
        env.update(
            {
                "SNAPSHOT_URL": url,
                "SNAPSHOT_SHA256": sha,
                "REALTIME_URL": stack.rt.url,
                "REALTIME_APIKEY": stack.rt.anon_key,
                "PROJECT_ID": stack.project,
            }
        )
        if token_file is not None:
            if token is not None:
                token_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(token_file, token)
            env["REALTIME_TOKEN_FILE"] = str(token_file)
        else:
            env["REALTIME_TOKEN"] = token if token is not None else stack.token()
        if upstream:
            env["SUPABASE_URL"] = stack.rpc.url
            env["SIDECAR_UPSTREAM"] = "rpc"
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


_METRIC_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Sidecar:
    """A running `sidecar run` subprocess and ways to look at it."""

    proc: asyncio.subprocess.Process
    project_dir: Path
    stdout_path: Path
    stderr_path: Path
    session: aiohttp.ClientSession
    base_url: str = ""
    wrapped: bool = False  # started under a wrapper (unshare): the sidecar is its child
    _closers: list[Callable[[], None]] = field(default_factory=list)

    # -- output --

    def stdout(self) -> str:
        """Everything the sidecar wrote to stdout so far (JSON log lines)."""
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        """Everything the sidecar wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def log_text(self) -> str:
        """stdout and stderr together."""
        return self.stdout() + self.stderr()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines (optionally only those whose `event` is `name`)."""
        out = []
        for line in self.stdout().splitlines():
            if not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if name is None or doc.get("event") == name:
                out.append(doc)
        return out

    def tail(self, n: int = 30) -> str:
        """The last lines of the output, for assertion messages."""
        lines = self.log_text().splitlines()[-n:]
        return "\n--- sidecar output (tail) ---\n" + "\n".join(lines)

    # -- HTTP --

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET a health endpoint: (status, body)."""
        async with self.session.get(self.base_url + path) as resp:
            return resp.status, await resp.read()

    async def status(self) -> dict[str, Any]:
        """The /status document."""
        code, body = await self.get("/status")
        assert code == 200, (code, body)
        doc: dict[str, Any] = json.loads(body)
        return doc

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        """/readyz: (HTTP status, document)."""
        code, body = await self.get("/readyz")
        return code, json.loads(body)

    async def metrics(self) -> str:
        """The /metrics text."""
        code, body = await self.get("/metrics")
        assert code == 200, code
        return body.decode()

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
        total = 0.0
        for line in (await self.metrics()).splitlines():
            m = _METRIC_LINE.match(line)
            if m is None or m.group("name") != name:
                continue
            have = dict(_LABEL.findall(m.group("labels") or ""))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(m.group("value"))
        return total

    async def is_ready(self) -> bool:
        """True when /readyz answers 200."""
        try:
            code, _ = await self.get("/readyz")
        except aiohttp.ClientError:
            return False
        return code == 200

    # -- waiting --

    async def wait(self, check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
        """wait_for bound to this process: fails early (with the log tail) if it exits."""
        return await wait_for(check, timeout, what, proc=self.proc, on_timeout=self.tail)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until /readyz answers 200."""
        await self.wait(self.is_ready, "/readyz 200", timeout)

    async def wait_file(self, rel: str, data: bytes | None, timeout: float = 15.0) -> None:
        """Wait until PROJECT_DIR/rel holds `data` (None: until it does not exist)."""
        path = self.project_dir / rel

        def check() -> bool:
            if data is None:
                return not path.exists()
            try:
                return path.read_bytes() == data
            except OSError:
                return False

        await self.wait(check, f"{rel} == {data[:40]!r}" if data else f"{rel} gone", timeout)

    def tree(self) -> dict[str, bytes]:
        """PROJECT_DIR's files (the state dir excluded)."""
        return read_tree(self.project_dir)

    async def wait_tree(
        self,
        expected: Callable[[], Mapping[str, bytes] | Awaitable[Mapping[str, bytes]]],
        timeout: float = 20.0,
    ) -> None:
        """Wait until PROJECT_DIR equals `expected()` (sync or async, e.g. `stack.files`;
        re-evaluated on every poll)."""
        want: dict[str, bytes] = {}

        async def check() -> bool:
            value = expected()
            want.clear()
            want.update(await value if inspect.isawaitable(value) else value)
            return self.tree() == want

        def diff() -> str:
            have = self.tree()
            missing = sorted(set(want) - set(have))
            extra = sorted(set(have) - set(want))
            wrong = sorted(p for p in set(want) & set(have) if want[p] != have[p])
            return f"\nmissing={missing} extra={extra} wrong={wrong}" + self.tail()

        await wait_for(
            check, timeout, "tree == database", proc=self.proc, interval=0.05, on_timeout=diff
        )

    async def wait_log(
        self,
        event: str,
        timeout: float = 15.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """Wait for a log line with this event name (and matching `where`); return it."""

        def find() -> dict[str, Any] | None:
            for doc in self.events(event):
                if where is None or where(doc):
                    return doc
            return None

        found: dict[str, Any] = await self.wait(find, f"log event {event}", timeout)
        return found

    async def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit; its exit code."""
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            raise AssertionError(
                f"the sidecar did not exit within {timeout}s{self.tail()}"
            ) from None

    # -- signals --

    def sidecar_pid(self) -> int | None:
        """The sidecar's host pid (the wrapper's child when wrapped); None once gone."""
        if self.proc.returncode is not None:
            return None
        if not self.wrapped:
            return self.proc.pid
        try:
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(kids[0]) if kids else None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the sidecar process."""
        pid = self.sidecar_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL after `timeout`. The exit code."""
        if self.proc.returncode is None:
            self.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    await self.proc.wait()
            except TimeoutError:
                pid = self.sidecar_pid()
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


async def _spawn(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, out: Path, err: Path
) -> tuple[asyncio.subprocess.Process, list[Callable[[], None]]]:
    fout = open(out, "wb")  # noqa: SIM115 - closed by the caller's closers
    ferr = open(err, "wb")  # noqa: SIM115
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=fout,
            stderr=ferr,
        )
    except BaseException:
        fout.close()
        ferr.close()
        raise
    return proc, [fout.close, ferr.close]


def _sidecar_argv(cmd: Sequence[str], wrap: Sequence[str], subcommand: str = "run") -> list[str]:
    if subcommand != "run":
        return [*wrap, sys.executable, "-m", "sidecar", subcommand]
    return [*wrap, sys.executable, "-m", "sidecar", "run", "--", *cmd]


@contextlib.asynccontextmanager
async def running_sidecar(
    stack: Stack | MemoryStack,
    tmp_path: Path,
    *,
    cmd: Sequence[str] = (),
    env_overrides: Mapping[str, str | None] | None = None,
    snapshot: tuple[str, str] | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    upstream: bool = False,
    wait_ready: bool = True,
    ready_timeout: float = 30.0,
    wrap: Sequence[str] = (),
    name: str = "sidecar",
    subcommand: str = "run",
    out_dir: Path | None = None,
) -> AsyncIterator[Sidecar]:
    """Run `python -m sidecar run -- CMD` against `stack`; yield a Sidecar once /readyz is 200.

    The project dir is tmp_path/<name>-project, output goes to <name>.out/.err in `out_dir`
    (default tmp_path: a test whose tmp_path is a disk it fills keeps the output elsewhere, as a
    container's stdout is a pipe to its runtime, not a file on the project's disk), the
    health listener binds 127.0.0.1:0 (its port is read from the `health.listening` log line).
    `snapshot` defaults to a fresh one of the database (published now); `token_file` switches
    to REALTIME_TOKEN_FILE (written with `token` when given). On exit the process gets SIGTERM
    (SIGKILL after 15 s).
    """
    project_dir = tmp_path / f"{name}-project"
    out_dir = out_dir or tmp_path
    if snapshot is None and isinstance(stack, Stack):
        snapshot = await stack.publish()
    env = base_env(
        stack,
        project_dir,
        snapshot=snapshot,
        token=token,
        token_file=token_file,
        upstream=upstream,
        overrides=env_overrides,
    )
    proc, closers = await _spawn(
        _sidecar_argv(cmd, wrap, subcommand),
        env,
        tmp_path,
        out_dir / f"{name}.out",
        out_dir / f"{name}.err",
    )
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    sc = Sidecar(
        proc,
        project_dir,
        out_dir / f"{name}.out",
        out_dir / f"{name}.err",
        session,
        wrapped=bool(wrap),
        _closers=closers,
    )
    try:
        if env.get("SIDECAR_HTTP_ADDR", "off") not in {"off", "", "none"}:
            try:
                listening = await wait_for(
                    lambda: sc.events("health.listening"),
                    ready_timeout,
                    "health listener",
                    proc=proc,
                    on_timeout=sc.tail,
                )
                sc.base_url = f"http://127.0.0.1:{listening[0]['port']}"
            except AssertionError:
                if wait_ready:
                    raise
        if wait_ready:
            await sc.wait_ready(ready_timeout)
        yield sc
    finally:
        try:
            await sc.stop()
        finally:
            await session.close()
            for close in closers:
                close()


async def run_sidecar(
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: Path,
    timeout: float = 30.0,
    wrap: Sequence[str] = (),
) -> tuple[int, str, str]:
    """Run `[*WRAP] python -m sidecar ARGV` to completion: (exit code, stdout, stderr)."""
    try:
        return await sidecar_command(env, *argv, timeout=timeout, cwd=cwd, wrap=wrap)
    except CommandTimeoutError as exc:
        raise AssertionError(f"{exc}:\n{exc.out}\n{exc.err}") from None


async def until_wall_clock(t: float) -> None:
    """Wait until time.time() >= t (for scenarios that are about a point in time, e.g. a
    token's exp); a bounded wait on a clock condition, not a sleep to make things pass."""
    await wait_for(lambda: time.time() >= t, max(0.0, t - time.time()) + 5.0, f"time {t}")
