"""`sidecar demo`: the whole loop on one machine with nothing configured.

The real chain by default: a throwaway PostgreSQL 15 with the shipped migration
(sidecar/testing/postgres.py), the PostgREST-style gateway, the Storage and Realtime test servers
(sidecar/testing/pgstack.py) and `sidecar snapshot worker`. The demo then does what an
orchestrator does (README, "Deploying with Supabase"): it runs `sidecar snapshot publish` and
`sidecar token mint` as commands, and starts the real `sidecar run` (a tiny dev server as its
child) with only what those printed plus the public settings, never a service key. It edits the
project through the gateway's RPCs with an editor's token and shows each change arriving, then
starts a second container whose signed URL has expired: it asks the database for a snapshot and
the worker answers. Where no PostgreSQL can be started, the in-memory RPC server and its
producer stand in, and the demo says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp

from sidecar.log import configure_logging
from sidecar.redact import redact_url
from sidecar.testing.commands import sidecar_command, spawn_sidecar, stop_process
from sidecar.testing.producer import Producer
from sidecar.testing.realtime.server import RealtimeServer
from sidecar.testing.rpc_server import RpcServer
from sidecar.testing.snapshot_server import SIGN_PREFIX, SnapshotServer

__all__ = ["SAMPLE", "run"]

PROJECT = "demo-project"
BUCKET = "project-snapshots"  # the orchestrator commands' default SIDECAR_SNAPSHOT_BUCKET
SAMPLE: dict[str, bytes] = {
    "index.html": b"<!doctype html><title>demo</title><script src=src/app.js></script>\n",
    "package.json": b'{"name": "demo", "version": "1.0.0", "scripts": {"dev": "vite"}}\n',
    "src/app.js": b"document.title = 'v1';\n",
    "src/util.js": b"export const add = (a, b) => a + b;\n",
    "notes.txt": b"this file will be deleted by the editor\n",
    "assets/logo.bin": bytes(range(256)) * 4,
}
# What a container's environment inherits from the machine: nothing of the stack's secrets.
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


async def run(directory: Path | None, *, keep_running: bool = False) -> int:
    """Run the demo; returns the sidecar's exit code (0 when everything converged).

    Without a directory a fresh one is made under the temp dir and kept, so its logs and the
    project can be looked at afterwards.
    """
    if directory is None:
        directory = Path(tempfile.mkdtemp(prefix="sidecar-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    return await _run(directory.absolute(), keep_running)


async def _run(workdir: Path, keep_running: bool) -> int:
    project = workdir / "project"
    log_path = workdir / "sidecar.log"
    _say(f"sidecar demo: working in {workdir}")
    # The embedded servers log to their own file; stdout is for the story.
    with open(workdir / "stack.log", "w") as stack_log:  # noqa: ASYNC230
        configure_logging("json", "info", project_id=PROJECT, session_id="stack", stream=stack_log)
        try:
            return await _story(workdir, project, log_path, keep_running)
        finally:
            configure_logging("json", "warning", stream=sys.stderr)


@dataclass
class _Database:
    """What the story needs from the database side, whichever one runs."""

    project: str
    url: str  # SUPABASE_URL
    realtime_url: str
    anon_key: str
    # The container's SNAPSHOT_URL, SNAPSHOT_SHA256 and REALTIME_TOKEN for a session id.
    container_env: Callable[[str], Awaitable[dict[str, str]]]
    upsert: Callable[[str, bytes], Awaitable[object]]
    delete: Callable[[str], Awaitable[object]]
    bulk: Callable[[Mapping[str, bytes | None]], Awaitable[object]]
    exists: Callable[[str], Awaitable[bool]]
    files: Callable[[], Awaitable[dict[str, bytes]]]
    # PostgreSQL only: a second container's environment with an expired signed URL, and the
    # worker's log (where its answers are).
    expired_env: Callable[[str], Awaitable[dict[str, str]]] | None = None
    worker_log: Path | None = None
    published: list[str] = field(default_factory=list)


async def _database(stack: contextlib.AsyncExitStack, workdir: Path) -> _Database:
    from sidecar.testing.postgres import start_cluster, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return await _in_memory(stack, reason)
    from sidecar.testing.pgstack import PgStack

    cluster = await asyncio.to_thread(start_cluster)
    stack.callback(cluster.stop)
    pg = await stack.enter_async_context(PgStack(cluster, SAMPLE, project=str(uuid.uuid4())))
    pg.snaps.buckets.add(BUCKET)
    label = f"PostgreSQL 15 (port {cluster.port}) behind a PostgREST-style gateway {pg.rpc.url}"
    _say(f"  stack: realtime {pg.rt.url}, database: {label}")
    session = await stack.enter_async_context(aiohttp.ClientSession())
    # What the orchestrator (and the worker) hold: the database, the service key, the JWT secret.
    orchestrator = _base_env() | {
        "DATABASE_URL": cluster.url("postgres"),
        "SUPABASE_URL": pg.rpc.url,
        "SIDECAR_STORAGE_URL": pg.snaps.base_url,
        "SUPABASE_SERVICE_ROLE_KEY": pg.snaps.service_role_key,
        "SUPABASE_JWT_SECRET": pg.rt.jwt_secret,
        "LOG_FORMAT": "json",
    }
    worker_log = workdir / "worker.log"
    await _start_worker(stack, orchestrator, worker_log)

    async def container_env(session_id: str) -> dict[str, str]:
        published = await _orchestrator(
            orchestrator, "snapshot", "publish", "--project", pg.project
        )
        out = dict(line.split("=", 1) for line in published.strip().splitlines())
        token = await _orchestrator(
            orchestrator,
            "token",
            "mint",
            "--project",
            pg.project,
            "--session",
            session_id,
            "--ttl",
            "15m",
        )
        db.published.append(out["SNAPSHOT_URL"])
        return {
            "SNAPSHOT_URL": out["SNAPSHOT_URL"],
            "SNAPSHOT_SHA256": out["SNAPSHOT_SHA256"],
            "REALTIME_TOKEN": token.strip(),
        }

    async def expired_env(session_id: str) -> dict[str, str]:
        # The first container's object, signed as the orchestrator did but already expired (a
        # URL given out more than SIDECAR_SNAPSHOT_URL_TTL ago): the sidecar must ask for more.
        bucket, _, key = unquote(urlsplit(db.published[0]).path[len(SIGN_PREFIX) :]).partition("/")
        token = await _orchestrator(
            orchestrator, "token", "mint", "--project", pg.project, "--session", session_id
        )
        return {
            "SNAPSHOT_URL": pg.snaps.url_for(key, expires_in=-60, bucket=bucket),
            "REALTIME_TOKEN": token.strip(),
        }

    editor_token = (
        await _orchestrator(
            orchestrator, "token", "mint", "--project", pg.project, "--session", "editor"
        )
    ).strip()

    async def rpc(fn: str, **args: Any) -> Any:
        """An RPC over HTTP with the editor's token, as the editor's backend sends it."""
        async with session.post(
            f"{pg.rpc.url}/rest/v1/rpc/{fn}",
            json={"project_uuid": pg.project, **args},
            headers={"apikey": pg.rt.anon_key, "Authorization": f"Bearer {editor_token}"},
        ) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise RuntimeError(f"{fn} answered {r.status}: {body}")
            return body

    async def upsert(path: str, data: bytes) -> object:
        return await rpc("upsert_project_file", p_file_path=path, p_content=data.decode())

    async def delete(path: str) -> object:
        return await rpc("delete_project_file", p_file_path=path)

    async def bulk(changes: Mapping[str, bytes | None]) -> object:
        files = [
            {"file_path": p, "action": "delete"}
            if d is None
            else {"file_path": p, "content": d.decode()}
            for p, d in changes.items()
        ]
        return await rpc("bulk_upsert_project_files", files=files)

    async def exists(path: str) -> bool:
        head = await pg.service("get_project_file", p_file_path=path)
        return head is not None and not head["deleted"]

    db = _Database(
        project=pg.project,
        url=pg.rpc.url,
        realtime_url=pg.rt.url,
        anon_key=pg.rt.anon_key,
        container_env=container_env,
        upsert=upsert,
        delete=delete,
        bulk=bulk,
        exists=exists,
        files=pg.files,
        expired_env=expired_env,
        worker_log=worker_log,
    )
    return db


async def _in_memory(stack: contextlib.AsyncExitStack, reason: str) -> _Database:
    rt = await stack.enter_async_context(RealtimeServer())
    snaps = await stack.enter_async_context(SnapshotServer())
    rpc = await stack.enter_async_context(RpcServer(realtime=rt))
    rpc.seed(PROJECT, SAMPLE)
    producer = await stack.enter_async_context(
        Producer(PROJECT, rpc=rpc, snapshots=snaps, realtime=rt)
    )

    async def container_env(session_id: str) -> dict[str, str]:
        url, sha = producer.snapshot()
        _say(f"  snapshot of {len(SAMPLE)} files published (signed URL, sha256 {sha[:12]}…)")
        return {
            "SNAPSHOT_URL": url,
            "SNAPSHOT_SHA256": sha,
            "REALTIME_TOKEN": rpc.make_token(PROJECT, session_id=session_id),
        }

    _say(f"  stack: realtime {rt.url}, database: an in-memory table at {rpc.url}")
    _say(f"  (no PostgreSQL: {reason}; the orchestrator's commands and worker need one)")

    async def exists_in_memory(path: str) -> bool:
        return rpc.head(PROJECT, path) is not None

    async def files() -> dict[str, bytes]:
        return {}

    return _Database(
        project=PROJECT,
        url=rpc.url,
        realtime_url=rt.url,
        anon_key=rt.anon_key,
        container_env=container_env,
        upsert=lambda path, data: rpc.editor_upsert(PROJECT, path, data),
        delete=lambda path: rpc.editor_delete(PROJECT, path),
        bulk=lambda changes: rpc.editor_bulk(PROJECT, changes),
        exists=exists_in_memory,
        files=files,
    )


def _base_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _BASE_ENV if k in os.environ}


async def _orchestrator(env: Mapping[str, str], *args: str) -> str:
    """Run one orchestrator command as a subprocess, show it and what it printed (secrets
    shortened); its stdout."""
    code, text, err = await sidecar_command(env, *args, timeout=60)
    if code != 0:
        raise RuntimeError(f"sidecar {' '.join(args)} exited {code}: {err}")
    _say(f"  orchestrator$ sidecar {' '.join(args)}")
    for line in text.strip().splitlines():
        _say(f"    {_shorten(line)}")
    return text


def _shorten(line: str) -> str:
    """A printed line with its secret part cut: the signed URL's query, most of a JWT."""
    name, sep, value = line.partition("=")
    if sep and value.startswith("http"):
        return f"{name}={redact_url(value)}"
    if line.count(".") == 2 and " " not in line:
        return f"{line[:16]}… (a JWT, {len(line)} characters)"
    return line


async def _start_worker(
    stack: contextlib.AsyncExitStack, env: Mapping[str, str], log_path: Path
) -> None:
    """`sidecar snapshot worker`, as the orchestrator's side runs it, until the demo ends."""
    proc = await spawn_sidecar(env, "snapshot", "worker", "--sweep-interval", "5", log=log_path)
    stack.push_async_callback(stop_process, proc)
    _say("  orchestrator$ sidecar snapshot worker --sweep-interval 5   (running)")


def _container_env(db: _Database, project: Path, session_id: str) -> tuple[dict[str, str], int]:
    """The public half of a container's environment (plus its HTTP port)."""
    http_port = _free_port()
    return _base_env() | {
        "REALTIME_URL": db.realtime_url,
        "REALTIME_APIKEY": db.anon_key,
        "PROJECT_ID": db.project,
        "SESSION_ID": session_id,
        "PROJECT_DIR": str(project),
        "SIDECAR_HTTP_ADDR": f"127.0.0.1:{http_port}",
        "SUPABASE_URL": db.url,
        "SIDECAR_UPSTREAM": "rpc",
        "LOG_FORMAT": "json",
    }, http_port


async def _start_sidecar(
    stack: contextlib.AsyncExitStack, env: Mapping[str, str], dev_port: int, log_path: Path
) -> asyncio.subprocess.Process:
    child = [sys.executable, "-m", "http.server", str(dev_port), "--bind", "127.0.0.1"]
    log_file = stack.enter_context(open(log_path, "wb"))  # noqa: ASYNC230, SIM115
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--",
        *child,
        env=dict(env),
        stdout=log_file,
        stderr=log_file,
    )


async def _story(workdir: Path, project: Path, log_path: Path, keep_running: bool) -> int:
    async with contextlib.AsyncExitStack() as stack:
        db = await _database(stack, workdir)

        env, http_port = _container_env(db, project, "demo")
        env |= await db.container_env("demo")
        dev_port = _free_port()
        started = time.monotonic()
        proc = await _start_sidecar(stack, env, dev_port, log_path)
        _say(
            "  container$ sidecar run -- python -m http.server   (environment: "
            + ", ".join(sorted(k for k in env if k not in _BASE_ENV))
            + ")"
        )
        base = f"http://127.0.0.1:{http_port}"
        dev = f"http://127.0.0.1:{dev_port}"
        session = await stack.enter_async_context(aiohttp.ClientSession())
        try:
            await _wait(lambda: _ok(session, f"{base}/readyz"), 30, "sidecar ready", proc)
            await _wait(lambda: _ok(session, f"{dev}/index.html"), 10, "dev server up", proc)
            _say(
                f"1. hydrated, subscribed and serving in {time.monotonic() - started:.2f}s: "
                f"{dev}/  (health {base}/status)"
            )

            async def served(path: str, expect: bytes | None) -> bool:
                async with session.get(f"{dev}/{path}") as r:
                    return (
                        (r.status == 404)
                        if expect is None
                        else (r.status == 200 and await r.read() == expect)
                    )

            async def step(
                title: str, action: Awaitable[object], checks: dict[str, bytes | None]
            ) -> None:
                t0 = time.monotonic()
                await action
                for path, expect in checks.items():
                    await _wait(lambda p=path, e=expect: served(p, e), 10, title, proc)  # type: ignore[misc]
                _say(f"{title} ({(time.monotonic() - t0) * 1000:.0f} ms to disk and served)")

            await step(
                "2. editor saved src/app.js, the dev server serves the new bytes",
                db.upsert("src/app.js", b"document.title = 'v2';\n"),
                {"src/app.js": b"document.title = 'v2';\n"},
            )
            await step(
                "3. editor deleted notes.txt, it is gone",
                db.delete("notes.txt"),
                {"notes.txt": None},
            )
            bulk = {
                "src/a.js": b"export const a = 1;\n",
                "src/b.js": b"export const b = 2;\n",
                "src/util.js": None,
            }
            await step(
                "4. a multi-file save arrived as one bulk:apply",
                db.bulk(bulk),
                bulk,
            )

            t0 = time.monotonic()
            (project / "src" / "generated.js").write_bytes(b"// written inside the container\n")
            await _wait(
                lambda: db.exists("src/generated.js"),
                10,
                "local change pushed",
                proc,
            )
            _say(
                f"5. a file written inside the container reached the database "
                f"({(time.monotonic() - t0) * 1000:.0f} ms)"
            )

            async with session.get(f"{base}/status") as r:
                status = await r.json()
            _say(
                f"6. /status: state={status['state']} ready={status['ready']} "
                f"last_seq={status['last_seq']} counts={json.dumps(status['counts'])}"
            )
            last = 7
            if db.expired_env is not None:
                await _second_container(stack, db, workdir, session)
                last = 8
            if keep_running:
                _say(f"running; Ctrl-C to stop. Metrics: {base}/metrics, logs: {log_path}")
                await _until_interrupted(proc)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
        tail = (await asyncio.to_thread(log_path.read_text, errors="replace")).splitlines()[-3:]
        _say(f"{last}. SIGTERM: sidecar stopped the dev server and exited with {code}")
        if code not in (0, 128 + signal.SIGTERM):
            _say("   last log lines:\n   " + "\n   ".join(tail))
            return code
        logs = f"{log_path} (sidecar), {workdir / 'stack.log'} (servers)"
        if db.worker_log is not None:
            logs += f", {db.worker_log} (worker)"
        _say(f"Logs (structured JSON): {logs}")
        return 0


async def _second_container(
    stack: contextlib.AsyncExitStack, db: _Database, workdir: Path, session: aiohttp.ClientSession
) -> None:
    """A container given a signed URL that has expired asks the database (request_snapshot with
    its own token); the worker publishes the current files and answers with snapshot:ready."""
    assert db.expired_env is not None
    assert db.worker_log is not None
    project = workdir / "project-b"
    log_path = workdir / "sidecar-b.log"
    env, http_port = _container_env(db, project, "demo-b")
    env |= await db.expired_env("demo-b")
    t0 = time.monotonic()
    proc = await _start_sidecar(stack, env, _free_port(), log_path)
    try:
        await _wait(
            lambda: _ok(session, f"http://127.0.0.1:{http_port}/readyz"),
            60,
            "second container ready",
            proc,
        )
        log = await asyncio.to_thread(log_path.read_text, errors="replace")
        if '"sync.snapshot_requested"' not in log:
            raise RuntimeError("the second container did not ask for a snapshot")
        answered = [
            json.loads(line)
            for line in (await asyncio.to_thread(db.worker_log.read_text)).splitlines()
            if '"worker.answered"' in line
        ]
        if not answered:
            raise RuntimeError("the worker logged no answer")
        tree = {
            str(p.relative_to(project)): p.read_bytes()
            for p in project.rglob("*")
            if p.is_file() and ".sidecar" not in p.relative_to(project).parts
        }
        if tree != await db.files():
            raise RuntimeError("the second container's tree differs from the database")
        _say(
            f"7. a second container started with an expired signed URL: it asked the database "
            f"for a snapshot, the worker published seq {answered[-1].get('seq')} and sent "
            f"snapshot:ready; hydrated with the database's {len(tree)} files in "
            f"{time.monotonic() - t0:.2f}s"
        )
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await proc.wait()


def _say(line: str) -> None:
    print(line, flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False


async def _wait(
    check: Callable[[], Awaitable[bool]],
    within: float,
    what: str,
    proc: asyncio.subprocess.Process,
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if proc.returncode is not None:
            raise RuntimeError(f"the sidecar exited with {proc.returncode} before: {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.02)


async def _until_interrupted(proc: asyncio.subprocess.Process) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        waiter.cancel()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
