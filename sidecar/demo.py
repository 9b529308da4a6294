"""`sidecar demo`: the whole loop on one machine with nothing configured.

Starts the embedded stack (a Realtime server, a Storage-style snapshot server and the database
side), runs the real sidecar as a subprocess with a tiny dev server as its child, then edits the
project the way the editor and a code generator would, and shows each change arriving. The
database is a throwaway PostgreSQL 15 with the shipped migration behind a PostgREST-style gateway
(sidecar/testing/pgstack.py) when the server is installed; otherwise the in-memory RPC server
and its producer stand in, and the demo says so.
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
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from sidecar.log import configure_logging
from sidecar.testing.producer import Producer
from sidecar.testing.realtime.server import RealtimeServer
from sidecar.testing.rpc_server import RpcServer
from sidecar.testing.snapshot_server import SnapshotServer

__all__ = ["SAMPLE", "run"]

PROJECT = "demo-project"
SAMPLE: dict[str, bytes] = {
    "index.html": b"<!doctype html><title>demo</title><script src=src/app.js></script>\n",
    "package.json": b'{"name": "demo", "version": "1.0.0", "scripts": {"dev": "vite"}}\n',
    "src/app.js": b"document.title = 'v1';\n",
    "src/util.js": b"export const add = (a, b) => a + b;\n",
    "notes.txt": b"this file will be deleted by the editor\n",
    "assets/logo.bin": bytes(range(256)) * 4,
}


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
    label: str
    url: str  # SUPABASE_URL
    realtime_url: str
    anon_key: str
    token: Callable[[], str]
    snapshot: tuple[str, str]
    upsert: Callable[[str, bytes], Awaitable[object]]
    delete: Callable[[str], Awaitable[object]]
    bulk: Callable[[Mapping[str, bytes | None]], Awaitable[object]]
    exists: Callable[[str], Awaitable[bool]]


async def _database(stack: contextlib.AsyncExitStack) -> _Database:
    from sidecar.testing.postgres import start_cluster, unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        from sidecar.testing.pgstack import PgStack

        cluster = await asyncio.to_thread(start_cluster)
        stack.callback(cluster.stop)
        pg = await stack.enter_async_context(PgStack(cluster, SAMPLE, project=str(uuid.uuid4())))
        snapshot = await pg.publish_snapshot()

        async def exists(path: str) -> bool:
            head = await pg.service("get_project_file", p_file_path=path)
            return head is not None and not head["deleted"]

        return _Database(
            project=pg.project,
            label=f"PostgreSQL 15 (port {cluster.port}) behind a PostgREST-style gateway "
            f"{pg.rpc.url}",
            url=pg.rpc.url,
            realtime_url=pg.rt.url,
            anon_key=pg.rt.anon_key,
            token=lambda: pg.token(session_id="demo"),
            snapshot=snapshot,
            upsert=pg.editor_upsert,
            delete=pg.editor_delete,
            bulk=pg.editor_bulk,
            exists=exists,
        )
    rt = await stack.enter_async_context(RealtimeServer())
    snaps = await stack.enter_async_context(SnapshotServer())
    rpc = await stack.enter_async_context(RpcServer(realtime=rt))
    rpc.seed(PROJECT, SAMPLE)
    producer = await stack.enter_async_context(
        Producer(PROJECT, rpc=rpc, snapshots=snaps, realtime=rt)
    )

    async def exists_in_memory(path: str) -> bool:
        return rpc.head(PROJECT, path) is not None

    return _Database(
        project=PROJECT,
        label=f"an in-memory table at {rpc.url} ({reason})",
        url=rpc.url,
        realtime_url=rt.url,
        anon_key=rt.anon_key,
        token=lambda: rpc.make_token(PROJECT, session_id="demo"),
        snapshot=producer.snapshot(),
        upsert=lambda path, data: rpc.editor_upsert(PROJECT, path, data),
        delete=lambda path: rpc.editor_delete(PROJECT, path),
        bulk=lambda changes: rpc.editor_bulk(PROJECT, changes),
        exists=exists_in_memory,
    )


async def _story(workdir: Path, project: Path, log_path: Path, keep_running: bool) -> int:
    async with contextlib.AsyncExitStack() as stack:
        db = await _database(stack)
        url, sha = db.snapshot
        _say(f"  stack: realtime {db.realtime_url}, database: {db.label}")
        _say(f"  snapshot of {len(SAMPLE)} files published (signed URL, sha256 {sha[:12]}…)")

        http_port, dev_port = _free_port(), _free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "REALTIME_"))},
            "SNAPSHOT_URL": url,
            "SNAPSHOT_SHA256": sha,
            "REALTIME_URL": db.realtime_url,
            "REALTIME_APIKEY": db.anon_key,
            "REALTIME_TOKEN": db.token(),
            "PROJECT_ID": db.project,
            "SESSION_ID": "demo",
            "PROJECT_DIR": str(project),
            "SIDECAR_HTTP_ADDR": f"127.0.0.1:{http_port}",
            "SUPABASE_URL": db.url,
            "SIDECAR_UPSTREAM": "rpc",
            "LOG_FORMAT": "json",
        }
        child = [sys.executable, "-m", "http.server", str(dev_port), "--bind", "127.0.0.1"]
        started = time.monotonic()
        log_file = stack.enter_context(open(log_path, "wb"))  # noqa: ASYNC230, SIM115
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--",
            *child,
            env=env,
            stdout=log_file,
            stderr=log_file,
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
            if keep_running:
                _say(f"running; Ctrl-C to stop. Metrics: {base}/metrics, logs: {log_path}")
                await _until_interrupted(proc)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await proc.wait()
        tail = (await asyncio.to_thread(log_path.read_text, errors="replace")).splitlines()[-3:]
        _say(f"7. SIGTERM: sidecar stopped the dev server and exited with {code}")
        if code not in (0, 128 + signal.SIGTERM):
            _say("   last log lines:\n   " + "\n   ".join(tail))
            return code
        _say(f"Logs (structured JSON): {log_path} (sidecar), {workdir / 'stack.log'} (servers)")
        return 0


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
