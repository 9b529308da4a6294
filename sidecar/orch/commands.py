"""Argument parsing and dispatch of the orchestrator's commands (sidecar/cli.py calls these).

They run outside the container, so they read their own environment here instead of
sidecar.config.Settings, whose refusal of service-role keys stays for the container's commands.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog

from sidecar.errors import ConfigError

__all__ = ["add_parsers", "dispatch", "is_orchestrator_command", "logging_options"]

log = structlog.get_logger(component="orchestrator")

_LEVELS = ("debug", "info", "warning", "error")


def add_parsers(sub: Any, snap_sub: Any) -> None:
    """`token mint` (a new command) and `snapshot publish|worker` (actions of `snapshot`)."""
    token = sub.add_parser("token", help="orchestrator: scoped JWTs for containers")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    mint = token_sub.add_parser(
        "mint",
        help="mint a project-scoped JWT (SUPABASE_JWT_SIGNING_KEY or SUPABASE_JWT_SECRET)",
    )
    mint.add_argument("--project", required=True, help="the project's UUID")
    mint.add_argument("--session", required=True, help="the container's session id (sender)")
    mint.add_argument("--ttl", default="15m", help="lifetime: 900, 900s, 15m, 1h (max 24h)")
    mint.add_argument("--read-only", action="store_true", help="the database refuses its writes")
    mint.add_argument("--role", default="authenticated", help="never service_role")
    mint.add_argument("--sub", default=None, help="a user UUID for auth.uid() (default: none)")
    mint.add_argument("--audience", default="authenticated")
    mint.add_argument("--issuer", default=None)
    mint.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the token to FILE atomically (0600) for REALTIME_TOKEN_FILE; else stdout",
    )
    publish = snap_sub.add_parser(
        "publish",
        help="orchestrator: build the project's snapshot from the database, upload, sign",
    )
    publish.add_argument("--project", required=True, help="the project's UUID")
    publish.add_argument("--json", action="store_true", help="print one JSON object")
    publish.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    publish.add_argument(
        "--work-dir", type=Path, default=None, help="where the snapshot is built (default: tmp)"
    )
    worker = snap_sub.add_parser(
        "worker", help="orchestrator: answer sidecars' snapshot requests (any number of replicas)"
    )
    worker.add_argument(
        "--sweep-interval",
        type=float,
        default=30.0,
        help="seconds between sweeps for requests whose notification was lost (default 30)",
    )
    worker.add_argument(
        "--http-addr",
        default=None,
        metavar="HOST:PORT",
        help="serve /healthz and /metrics (default: SIDECAR_WORKER_HTTP_ADDR, else off)",
    )
    worker.add_argument(
        "--failure-backoff",
        type=float,
        default=5.0,
        help="first wait before a failed project is tried again, doubling to 300 s (default 5)",
    )
    worker.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    worker.add_argument("--work-dir", type=Path, default=None)


def is_orchestrator_command(args: argparse.Namespace) -> bool:
    """True for the commands that run outside the container (token, snapshot publish|worker)."""
    if args.command == "token":
        return True
    return args.command == "snapshot" and args.snapshot_command in {"publish", "worker"}


def logging_options(env: Mapping[str, str], *, isatty: bool) -> tuple[str, str]:
    """LOG_FORMAT (json | console, default console on a TTY) and LOG_LEVEL (default info)."""
    fmt = env.get("LOG_FORMAT", "").strip().lower() or ("console" if isatty else "json")
    level = env.get("LOG_LEVEL", "").strip().lower() or "info"
    problems = []
    if fmt not in ("json", "console"):
        problems.append(f"LOG_FORMAT must be json or console, got {fmt!r}")
    if level not in _LEVELS:
        problems.append(f"LOG_LEVEL must be one of {', '.join(_LEVELS)}, got {level!r}")
    if problems:
        raise ConfigError(problems)
    return fmt, level


async def dispatch(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Run one orchestrator command; the exit code."""
    if args.command == "token":
        return _mint(args, env)
    if args.snapshot_command == "publish":
        return await _publish(args, env)
    if args.snapshot_command == "worker":
        return await _worker(args, env)
    raise AssertionError(args)


async def _worker(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import asyncio
    import signal

    import aiohttp
    from aiohttp import web

    from sidecar.orch.settings import OrchestratorEnv
    from sidecar.orch.storage import StorageClient
    from sidecar.orch.worker import SnapshotWorker

    settings = OrchestratorEnv.from_env(env, need_database=True)
    if not 0.05 <= args.sweep_interval <= 3600:
        raise ConfigError(f"--sweep-interval must be 0.05..3600 s, got {args.sweep_interval}")
    if not 0.01 <= args.failure_backoff <= 300:
        raise ConfigError(f"--failure-backoff must be 0.01..300 s, got {args.failure_backoff}")
    addr = args.http_addr or env.get("SIDECAR_WORKER_HTTP_ADDR", "").strip() or None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with aiohttp.ClientSession() as session:
        worker = SnapshotWorker(
            settings.database_url,
            StorageClient(settings.storage_url, settings.service_key, session),
            settings.bucket,
            settings.url_ttl,
            sweep_interval=args.sweep_interval,
            failure_backoff=args.failure_backoff,
            work_dir=args.work_dir,
            level=args.level,
        )
        runner: web.AppRunner | None = None
        if addr and addr != "off":
            host, _, port = addr.rpartition(":")
            app = web.Application()

            async def metrics(_request: web.Request) -> web.Response:
                return web.Response(body=worker.metrics.render(), content_type="text/plain")

            async def healthz(_request: web.Request) -> web.Response:
                return web.json_response({"ok": True, "worker": worker.worker_id})

            app.router.add_get("/metrics", metrics)
            app.router.add_get("/healthz", healthz)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, host or "0.0.0.0", int(port)).start()
            bound = runner.addresses[0]
            log.info("worker.http", worker=worker.worker_id, host=bound[0], port=bound[1])
        try:
            await worker.run(stop)
        finally:
            if runner is not None:
                await runner.cleanup()
    return 0


async def _publish(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import asyncio
    import json
    import uuid

    import aiohttp

    from sidecar.orch.publish import database_reader, publish
    from sidecar.orch.settings import OrchestratorEnv
    from sidecar.orch.source import Reader, RestReader
    from sidecar.orch.storage import StorageClient

    settings = OrchestratorEnv.from_env(env, need_database=False)
    try:
        project = str(uuid.UUID(args.project))
    except ValueError:
        raise ConfigError(f"--project must be a UUID, got {args.project[:60]!r}") from None
    async with aiohttp.ClientSession() as session:
        storage = StorageClient(settings.storage_url, settings.service_key, session)
        read: Reader
        if settings.database_url:
            read = database_reader(settings.database_url)
        else:  # PostgREST with the service key
            rest = RestReader(
                settings.supabase_url, settings.service_key, session, asyncio.get_running_loop()
            )
            read = rest.read
        result = await publish(
            project,
            read=read,
            storage=storage,
            bucket=settings.bucket,
            expires_in=settings.url_ttl,
            work_dir=args.work_dir,
            level=args.level,
        )
    if args.json:
        sys.stdout.write(json.dumps(result.as_json()) + "\n")
    else:
        sys.stdout.write(f"SNAPSHOT_URL={result.snapshot_url}\nSNAPSHOT_SHA256={result.sha256}\n")
    sys.stdout.flush()
    return 0


def _mint(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from sidecar.orch.token import mint_token, parse_ttl, signing_key_from_env, write_token_file

    ttl = parse_ttl(args.ttl)
    key = signing_key_from_env(env)
    token = mint_token(
        key,
        project_id=args.project,
        session_id=args.session,
        ttl=ttl,
        read_only=args.read_only,
        role=args.role,
        sub=args.sub,
        audience=args.audience,
        issuer=args.issuer,
    )
    if args.out is not None:
        write_token_file(args.out, token)
    else:
        sys.stdout.write(token + "\n")
        sys.stdout.flush()
    log.info(
        "token.minted",
        alg=key.algorithm,
        kid=key.kid,
        ttl=ttl,
        read_only=args.read_only,
        out=str(args.out) if args.out else "stdout",
    )
    return 0
